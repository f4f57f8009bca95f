"""The model registry, serving plans, the strategies' rules and the
promotion gate's verdict, on literal values (fast tier)."""

import collections

import pytest

from models import gate
from models import registry
from models import strategies
from problems.exasens import PROBLEM as EXASENS
from problems.houses import PROBLEM as HOUSES
from tests.taxi import TAXI
from transforms.records import Record


def _descriptor(version, state=registry.CANDIDATE, name='taxi'):
  return registry.ModelDescriptor(
      problem='taxi', name=name, version=version, uri=f'/m/{version}',
      task='binary', signature=registry.signature_fingerprint(TAXI),
      metrics={'auc': 0.95}, created_ms=1, state=state)


def _state(*descriptors, plan=None):
  state = registry.RegistryState('taxi')
  for d in descriptors:
    assert state.apply(d.key, d.to_json()) is None
  if plan is not None:
    assert state.apply(registry.PLAN_KEY, plan.to_json()) is None
  return state


def _apply(state, messages):
  for key, value in messages:
    assert state.apply(key, value) is None


def test_descriptor_round_trip_and_refusals():
  d = _descriptor(3)
  assert registry.ModelDescriptor.from_json(d.to_json()) == d
  state = registry.RegistryState('taxi')
  bad = dict(d.to_json(), version='3')
  assert 'natural number' in state.apply(d.key, bad)
  assert 'does not match' in state.apply('model/taxi/4', d.to_json())
  assert 'state' in state.apply(d.key, dict(d.to_json(), state='gold'))
  other = dict(d.to_json(), problem='houses')
  assert "problem 'houses'" in state.apply(d.key, other)
  assert 'unknown registry key' in state.apply('models/x', d.to_json())
  assert state.descriptors() == []


def test_signature_fingerprint_differs_between_problems():
  prints = {registry.signature_fingerprint(p) for p in (TAXI, HOUSES, EXASENS)}
  assert len(prints) == 3


def test_promote_then_rollback_is_blue_green():
  state = _state(_descriptor(1, registry.LIVE), _descriptor(2))
  assert state.resolve('taxi').version == 1
  assert state.resolve('taxi@candidate').version == 2
  messages = registry.promote_messages(state, 'taxi')
  # The new version is declared live before the old one is retired: a
  # follower between the two messages already serves the new one.
  half = _state(_descriptor(1, registry.LIVE), _descriptor(2))
  _apply(half, messages[:1])
  assert half.resolve('taxi').version == 2
  _apply(state, messages)
  assert state.resolve('taxi').version == 2
  assert state.get('taxi', 1).state == registry.RETIRED
  assert state.get('taxi', 2).replaces == 1
  assert state.resolve('taxi@candidate') is None
  _apply(state, registry.rollback_messages(state, 'taxi'))
  assert state.resolve('taxi').version == 1
  assert state.get('taxi', 2).state == registry.RETIRED
  with pytest.raises(registry.InvalidMessage, match='already live'):
    registry.promote_messages(state, 'taxi', 1)
  with pytest.raises(registry.InvalidMessage, match='replaced another'):
    registry.rollback_messages(state, 'taxi')


def test_a_tombstone_deletes_and_a_plan_message_overrides():
  state = _state(_descriptor(1, registry.LIVE))
  plan = registry.ServingPlan('ab', ('taxi@1', 'taxi@2'), (0.7, 0.3))
  _apply(state, [(registry.PLAN_KEY, plan.to_json())])
  assert state.plan == plan
  _apply(state, [('model/taxi/1', None), (registry.PLAN_KEY, None)])
  assert state.resolve('taxi') is None and state.plan is None


@pytest.mark.parametrize('plan, message', [
    (dict(strategy='vote', models=['a']), 'not one of'),
    (dict(strategy='single', models=['a', 'b']), 'one model'),
    (dict(strategy='shadow', models=['a']), 'no shadow'),
    (dict(strategy='ensemble', models=['a']), 'two models'),
    (dict(strategy='ab', models=['a', 'b'], weights=[1]), 'one weight'),
    (dict(strategy='ab', models=['a', 'b'], weights=[0, 0]), 'one weight'),
    (dict(strategy='budget', models=['a', 'b'], budget_ms=0), 'budget_ms'),
    (dict(strategy='single', models=['a@x']), 'reference'),
    (dict(strategy='single', models=['a'], colour='red'), 'unknown'),
])
def test_plans_that_cannot_serve_are_refused(plan, message):
  with pytest.raises(registry.InvalidMessage, match=message):
    registry.ServingPlan.from_json(plan)


def test_confidence_needs_classes():
  plan = registry.ServingPlan('confidence', ('a', 'b'))
  plan.check('binary')
  with pytest.raises(registry.InvalidMessage, match='regression'):
    plan.check('regression')


def test_plan_from_yaml_file(tmp_path):
  path = tmp_path / 'plan.yaml'
  path.write_text('strategy: shadow\nmodels: [taxi]\n'
                  'shadows: [taxi@candidate]\n')
  plan = registry.load_plan(str(path))
  assert plan == registry.ServingPlan('shadow', ('taxi',),
                                      shadows=('taxi@candidate',))
  assert plan.refs() == ('taxi', 'taxi@candidate')


def test_ab_arms_are_sticky_and_follow_the_weights():
  keys = [f'entity-{i}' for i in range(20000)]
  arms = [strategies.ab_arm(k, (0.7, 0.2, 0.1)) for k in keys]
  shares = collections.Counter(arms)
  for arm, weight in enumerate((0.7, 0.2, 0.1)):
    assert shares[arm] / len(keys) == pytest.approx(weight, abs=0.015)
  # Sticky: the same key, the same arm, every time.
  assert arms == [strategies.ab_arm(k, (0.7, 0.2, 0.1)) for k in keys]
  # A weight of zero gets nothing.
  assert {strategies.ab_arm(k, (1, 0)) for k in keys[:500]} == {0}


def test_entity_key_is_the_problems_entity_field():
  record = Record({'pickup_community_area': 8, 'fare': 1.0}, (), 'e1')
  assert strategies.entity_key(TAXI, record) == '8'
  # Without the entity field: the event id; without one: the values.
  assert strategies.entity_key(TAXI, Record({'fare': 1.0}, (), 'e1')) == 'e1'
  assert strategies.entity_key(TAXI, Record({'fare': 1.0}, ())) == (
      strategies.entity_key(TAXI, Record({'fare': 1.0}, ()))) != (
          strategies.entity_key(TAXI, Record({'fare': 2.0}, ())))


def test_vote_binary_majority_with_ties_by_mean_probability():
  answers = [{'probability': 0.9, 'class': 1},
             {'probability': 0.4, 'class': 0},
             {'probability': 0.45, 'class': 0}]
  assert strategies.vote(TAXI, answers) == {
      'probability': pytest.approx(0.5833333), 'class': 0}
  tie = [{'probability': 0.9, 'class': 1}, {'probability': 0.3, 'class': 0}]
  assert strategies.vote(TAXI, tie)['class'] == 1  # mean 0.6 >= 0.5


def test_vote_multiclass_and_regression():
  answers = [{'probabilities': [0.5, 0.3, 0.2], 'class': 0},
             {'probabilities': [0.1, 0.6, 0.3], 'class': 1},
             {'probabilities': [0.2, 0.7, 0.1], 'class': 1}]
  out = strategies.vote(EXASENS, answers)
  assert out['class'] == 1
  assert out['probabilities'] == pytest.approx([0.26666, 0.53333, 0.2],
                                               abs=1e-4)
  values = [{'prediction': v} for v in (100.0, 200.0, 600.0)]
  assert strategies.vote(HOUSES, values)['prediction'] == pytest.approx(300)
  assert strategies.vote(HOUSES, values, 'median')['prediction'] == 200


def test_confidence_is_the_class_margin():
  assert strategies.confidence(TAXI.task, {'probability': 0.9}) == (
      pytest.approx(0.8))
  assert strategies.confidence(EXASENS.task, {
      'probabilities': [0.5, 0.3, 0.2]}) == pytest.approx(0.2)
  answers = [{'probability': 0.6}, None, {'probability': 0.05}]
  assert strategies.most_confident(TAXI.task, answers) == 2


def test_disagreement_per_task():
  assert strategies.disagreement(
      TAXI.task, {'probability': 0.7, 'class': 1},
      {'probability': 0.4, 'class': 0}) == (False, pytest.approx(0.3))
  assert strategies.disagreement(
      HOUSES.task, {'prediction': 10.0}, {'prediction': 12.5}) == (None, 2.5)


def test_promotion_rule_parse_and_judge():
  rule = gate.PromotionRule.parse('auc:0.005', 4)
  assert (rule.metric, rule.gain, rule.relative) == ('auc', 0.005, False)
  assert gate.PromotionRule.parse('mae:2%').gain == pytest.approx(0.02)
  with pytest.raises(registry.InvalidMessage):
    gate.PromotionRule.parse('auc')
  with pytest.raises(registry.InvalidMessage, match='not a binary metric'):
    gate.PromotionRule.parse('mae:2%').check(TAXI.task)
  labels = [0, 0, 1, 1]
  live = [0.6, 0.4, 0.5, 0.7]   # AUC 0.75
  better = [0.1, 0.2, 0.8, 0.9]  # AUC 1.0
  verdict = gate.judge(TAXI, rule, 'taxi@1', 'taxi@2',
                       list(zip(labels, live, better)))
  assert verdict.promote and verdict.gain == pytest.approx(0.25)
  same = gate.judge(TAXI, rule, 'taxi@1', 'taxi@3',
                    list(zip(labels, live, live)))
  assert not same.promote and same.gain == 0
  mae = gate.PromotionRule.parse('mae:2%', 2)
  verdict = gate.judge(HOUSES, mae, 'h@1', 'h@2',
                       [(100.0, 110.0, 101.0), (200.0, 190.0, 199.0)])
  assert verdict.promote and verdict.gain == pytest.approx(0.9)


def test_pair_book_pairs_only_labelled_events_answered_by_both():
  book = gate.PairBook(TAXI)
  book.add_prediction({'event_id': 'a', 'model': 'taxi', 'model_version': 1,
                       'probability': 0.3, 'label': 0})
  book.add_shadow({'event_id': 'a', 'model': 'taxi', 'model_version': 2,
                   'probability': 0.2, 'label': 0})
  book.add_prediction({'event_id': 'b', 'model': 'taxi', 'model_version': 1,
                       'probability': 0.6, 'label': None})
  book.add_shadow({'event_id': 'b', 'model': 'taxi', 'model_version': 2,
                   'probability': 0.9, 'label': None})
  assert book.counts() == {('taxi@1', 'taxi@2'): 1}
  book.add_feedback({'event_id': 'b', 'label': 1, 'label_time_ms': 5})
  assert book.triples('taxi@1', 'taxi@2') == [(0, 0.3, 0.2), (1, 0.6, 0.9)]



def test_pair_book_forgets_the_oldest_events_past_its_bound():
  book = gate.PairBook(TAXI, max_events=3)
  for i in range(5):
    event = {'event_id': f'e{i}', 'model': 'taxi', 'probability': 0.5,
             'label': i % 2}
    book.add_prediction(dict(event, model_version=1))
    book.add_shadow(dict(event, model_version=2))
  assert book.counts() == {('taxi@1', 'taxi@2'): 3}
  assert [t[0] for t in book.triples('taxi@1', 'taxi@2')] == [0, 1, 0]
