"""Several models on one stream, following the model registry topic.

One serving job per runner (Prism; Flink for single, ab and shadow) reads
taxi events and its models from a registry topic; the test changes the plan
and the models by registry messages while the job runs, one phase each:

  single → ab → shadow → ensemble → budget (a slow member) → confidence →
  promote and rollback under load → a descriptor that cannot load →
  the promotion gate on a clearly better shadow, then on an equal one.

The models are the session's trained taxi model and real SavedModels around
it (``tests.model_variants``): inverted (clearly worse), sharpened (more
confident), slow (a sleep in the graph), plain copies. Every live answer is
checked against what the members' own SavedModels answer offline.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid

import numpy as np
import pytest

from models import gate
from models import registry
from models import serving
from models import strategies
from pipelines import serve
from tests.flink_jobs import HARNESS_HANG_UP, stopping_job_servers
from tests.model_variants import write_variant
from tests.taxi import TAXI
from tests.topics import TopicReader, every
from tools import replay
from transforms import records as R

pytestmark = pytest.mark.integration

SLOW_MS = 1500


@pytest.fixture(scope='module')
def model_root(tmp_path_factory, taxi_model):
  """Versions of the taxi model: 1 trained, 2 inverted, 3 slow, 4 a copy,
  5 corrupt, 6 sharpened, 7 and 8 copies."""
  root = tmp_path_factory.mktemp('strategies') / 'model'
  source = os.path.join(taxi_model, '1')
  for version in (1, 4, 7, 8):
    shutil.copytree(source, root / str(version))
  write_variant(TAXI, source, str(root / '2'), 'invert')
  write_variant(TAXI, source, str(root / '3'), delay_ms=SLOW_MS)
  write_variant(TAXI, source, str(root / '6'), 'sharpen')
  (root / '5').mkdir()
  (root / '5' / 'saved_model.pb').write_bytes(b'not a SavedModel')
  return root


class Scenario:
  """The serving job, its topics and the registry, driven by the test."""

  def __init__(self, bootstrap: str, root, runner: str):
    self.bootstrap = bootstrap
    self.root = root
    suffix = uuid.uuid4().hex[:8]
    self.topics = {name: f'strategies-{name}-{suffix}' for name in (
        'events', 'predictions', 'dlq', 'shadow', 'metrics', 'models',
        'model-events')}
    from runners import kafka as kafka_runner
    kafka_runner.create_topic(bootstrap, self.topics['events'], partitions=2)
    for name in ('predictions', 'dlq', 'shadow', 'metrics', 'model-events'):
      kafka_runner.create_topic(bootstrap, self.topics[name])
    registry.ensure_topic(bootstrap, self.topics['models'])
    self.model_events = TopicReader(bootstrap, self.topics['model-events'])
    self.phases: dict[str, list[str]] = {}
    self._mark = 0
    self.state = registry.RegistryState('taxi')
    # Pinned members are published retired: they never become candidates.
    self.publish_version(1, registry.LIVE)
    for version in (2, 3, 4, 6):
      self.publish_version(version, registry.RETIRED)
    pool = replay.load_events(TAXI, 'data/taxi_trips.csv', split='eval')
    self._pool = iter(pool)
    self.by_id = dict(pool)
    self.result = serve.start([
        '--runner', runner, '--bootstrap_servers', bootstrap,
        '--input_topic', self.topics['events'],
        '--output_topic', self.topics['predictions'],
        '--dead_letter_topic', self.topics['dlq'],
        '--shadow_topic', self.topics['shadow'],
        '--metrics_topic', self.topics['metrics'],
        '--model_topic', self.topics['models'],
        '--model_events_topic', self.topics['model-events'],
        '--plan', json.dumps({'strategy': 'single', 'models': ['taxi']}),
        '--group_id', f'serve-{suffix}', '--max_out_of_orderness', '5',
        '--monitor_window', '10', '--monitor_allowed_lateness', '600'])
    self.predictions = TopicReader(bootstrap, self.topics['predictions'])
    self.shadows = TopicReader(bootstrap, self.topics['shadow'])

  # --- the registry ---
  def publish_version(self, version: int, state: str,
                      uri: str | None = None) -> None:
    path = str(self.root / str(version))
    d = registry.describe(TAXI, path).with_state(state)
    if uri:
      d = registry.ModelDescriptor(**{**d.__dict__, 'uri': uri})
    self._publish([(d.key, d.to_json())])

  def promote(self, version: int) -> None:
    self._publish(registry.promote_messages(self.state, 'taxi', version))

  def rollback(self) -> None:
    self._publish(registry.rollback_messages(self.state, 'taxi'))

  def plan(self, plan: dict | None) -> None:
    self._publish([(registry.PLAN_KEY, plan and registry.ServingPlan.from_json(
        plan).to_json())])

  def _publish(self, messages) -> None:
    self.mark()
    for key, value in messages:
      assert self.state.apply(key, value) is None
    registry.publish(self.bootstrap, self.topics['models'], messages)

  def mark(self) -> None:
    """Model events read so far are before the next change."""
    self._mark = len(self.model_events.items)

  def serving(self, models: dict[str, str], timeout_s: float = 120) -> None:
    """Waits until the job reports serving exactly these references (after
    the last change)."""
    def done(items):
      return any(e.get('event') == 'serving' and e.get('models') == models
                 for e in items[self._mark:])
    self.model_events.until(10**9, timeout_s, done)
    assert done(self.model_events.items), (models, self.model_events.items)

  # --- events ---
  def take(self, n: int) -> list[tuple[str, dict]]:
    """The next ``n`` held-out events, timed now (so windows close)."""
    out = []
    for _ in range(n):
      event_id, event = next(self._pool)
      out.append((event_id, dict(event, trip_start_timestamp=int(
          time.time()))))
    return out

  def send(self, phase: str, n: int, rate: float | None = None) -> list[str]:
    events = self.take(n)
    replay.replay(TAXI, events, self.topics['events'], self.bootstrap,
                  rate=rate)
    ids = [e for e, _ in events]
    self.phases[phase] = ids
    return ids

  def answered(self, ids, timeout_s: float = 180) -> list[dict]:
    self.predictions.until(10**9, timeout_s, every(ids))
    wanted = set(ids)
    return [p for p in self.predictions.items if p['event_id'] in wanted]

  def close(self) -> None:
    self.result.cancel()
    for reader in (self.predictions, self.shadows, self.model_events):
      reader.close()


def offline(root, version: int, events) -> list[dict]:
  """What version ``version``'s SavedModel answers to the raw events."""
  model = serving.load(str(root / str(version)))
  return serving.score(TAXI, model, [R.parse_json(TAXI, e) for e in events])


def _newest(predictions: list[dict]) -> dict[str, dict]:
  return {p['event_id']: p for p in predictions}


def _phase_basics(s: Scenario, name: str) -> tuple[list[str], dict]:
  ids = s.phases[name]
  got = _newest(s.answered(ids, 5))
  assert set(got) == set(ids), f'{name}: missing predictions'
  return ids, got


def _run_common_phases(s: Scenario, out: dict) -> None:
  """single, ab and shadow: on every runner."""
  s.serving({'taxi': 'taxi@1'})
  s.send('single', 60)
  s.answered(s.phases['single'])

  s.plan({'strategy': 'ab', 'models': ['taxi@1', 'taxi@2'],
          'weights': [0.5, 0.5]})
  s.serving({'taxi@1': 'taxi@1', 'taxi@2': 'taxi@2'})
  s.send('ab', 150)
  s.answered(s.phases['ab'])

  s.plan({'strategy': 'shadow', 'models': ['taxi'], 'shadows': ['taxi@2']})
  s.serving({'taxi': 'taxi@1', 'taxi@2': 'taxi@2'})
  ids = s.send('shadow', 100)
  s.answered(ids)
  s.shadows.until(10**9, 120, every(ids))
  out['shadow_records'] = list(s.shadows.items)


def _check_common_phases(s: Scenario, out: dict) -> None:
  root = s.root
  ids, got = _phase_basics(s, 'single')
  events = [s.by_id[i] for i in ids]
  v1 = offline(root, 1, events)
  assert {(p['model'], p['model_version'], p['strategy'])
          for p in got.values()} == {('taxi', 1, 'single')}
  np.testing.assert_allclose([got[i]['probability'] for i in ids],
                             [a['probability'] for a in v1], atol=1e-6)

  # A/B: each event's arm is its entity key's, by the stable hash (sticky);
  # both arms serve; each answer is its arm's model's.
  ids, got = _phase_basics(s, 'ab')
  events = [s.by_id[i] for i in ids]
  answers = {1: offline(root, 1, events), 2: offline(root, 2, events)}
  arms = {}
  for k, (event_id, event) in enumerate(zip(ids, events)):
    p = got[event_id]
    key = strategies.entity_key(TAXI, R.parse_json(TAXI, event))
    version = 1 + strategies.ab_arm(key, (0.5, 0.5))
    assert p['decision'] == {'arm': f'taxi@{version}'}
    assert p['model_version'] == version and p['strategy'] == 'ab'
    assert p['probability'] == pytest.approx(
        answers[version][k]['probability'], abs=1e-6)
    assert arms.setdefault(key, version) == version  # sticky per key
  assert set(arms.values()) == {1, 2}

  # Shadow: the live model answers on the output topic, the shadow only on
  # the shadow topic, for every event.
  ids, got = _phase_basics(s, 'shadow')
  assert {(p['model_version'], p['strategy']) for p in got.values()} == {
      (1, 'shadow')}
  shadows = {r['event_id']: r for r in out['shadow_records']
             if r['event_id'] in set(ids)}
  assert set(shadows) == set(ids)
  assert {(r['model'], r['model_version'], r['shadow_of'])
          for r in shadows.values()} == {('taxi', 2, 'taxi@1')}
  events = [s.by_id[i] for i in ids]
  v2 = offline(root, 2, events)
  np.testing.assert_allclose([shadows[i]['probability'] for i in ids],
                             [a['probability'] for a in v2], atol=1e-6)
  # No prediction of the whole run came from the shadow model in a phase
  # where it was a shadow.
  assert all(p['model_version'] == 1 for p in got.values())


@pytest.fixture(scope='module')
def on_prism(kafka_bootstrap, model_root):
  s = Scenario(kafka_bootstrap, model_root, 'prism')
  out = {}
  try:
    _run_common_phases(s, out)

    s.plan({'strategy': 'ensemble',
            'models': ['taxi@1', 'taxi@2', 'taxi@6']})
    s.serving({'taxi@1': 'taxi@1', 'taxi@2': 'taxi@2', 'taxi@6': 'taxi@6'})
    s.answered(s.send('ensemble', 60))

    s.plan({'strategy': 'budget', 'models': ['taxi@3', 'taxi@1'],
            'budget_ms': 300})
    s.serving({'taxi@3': 'taxi@3', 'taxi@1': 'taxi@1'})
    s.answered(s.send('budget', 40, rate=20))

    s.plan({'strategy': 'confidence', 'models': ['taxi@2', 'taxi@6'],
            'min_confidence': 0.5, 'fallback': 'taxi@1'})
    s.serving({'taxi@2': 'taxi@2', 'taxi@6': 'taxi@6', 'taxi@1': 'taxi@1'})
    s.answered(s.send('confidence', 60))

    # Promote and roll back while events flow (25/s), until every
    # partition has been answered by version 4 and then by version 1 again.
    s.plan(None)
    s.serving({'taxi': 'taxi@1'})
    stop, sent = threading.Event(), []

    def flow():
      while not stop.is_set():
        batch = s.take(5)
        replay.replay(TAXI, batch, s.topics['events'], s.bootstrap, rate=25)
        sent.extend(e for e, _ in batch)

    flow_thread = threading.Thread(target=flow)
    flow_thread.start()
    try:
      s.predictions.until(10**9, 60, lambda items: len(
          _rollout(items, sent)) >= 30)
      s.promote(4)
      s.predictions.until(10**9, 120, lambda items: _switched(
          _rollout(items, sent), [1, 4]))
      s.rollback()
      s.predictions.until(10**9, 120, lambda items: _switched(
          _rollout(items, sent), [1, 4, 1]))
    finally:
      stop.set()
      flow_thread.join()
    s.phases['rollout'] = list(sent)
    s.answered(s.phases['rollout'])

    # A descriptor whose model cannot load is rejected; version 1 serves.
    s.publish_version(5, registry.CANDIDATE)
    s.promote(5)
    s.model_events.until(10**9, 60, lambda items: any(
        e.get('event') == 'rejected' and e.get('model') == 'taxi@5'
        for e in items))
    s.answered(s.send('rejected', 30))

    # The gate: live inverted (2), shadow the trained model as candidate.
    s.promote(2)
    s.publish_version(7, registry.CANDIDATE)
    s.plan({'strategy': 'shadow', 'models': ['taxi'],
            'shadows': ['taxi@candidate']})
    s.serving({'taxi': 'taxi@2', 'taxi@candidate': 'taxi@7'})
    ids = s.send('gate_better', 200)
    s.answered(ids)
    s.shadows.until(10**9, 120, every(ids))
    rule = gate.PromotionRule.parse('auc:0.005', 150)
    s.mark()
    out['better'] = gate.run(
        TAXI, rule, s.bootstrap, s.topics['predictions'], s.topics['shadow'],
        s.topics['models'], s.topics['model-events'], once=True,
        timeout_s=120, progress=None)
    s.state = registry.read(s.bootstrap, s.topics['models'], 'taxi')
    out['live_after_better'] = s.state.resolve('taxi').ref
    s.serving({'taxi': 'taxi@7'})
    s.answered(s.send('after_gate', 30))

    s.publish_version(8, registry.CANDIDATE)
    s.serving({'taxi': 'taxi@7', 'taxi@candidate': 'taxi@8'})
    ids = s.send('gate_equal', 200)
    s.answered(ids)
    s.shadows.until(10**9, 120, every(ids))
    out['equal'] = gate.run(
        TAXI, rule, s.bootstrap, s.topics['predictions'], s.topics['shadow'],
        s.topics['models'], s.topics['model-events'], once=True,
        timeout_s=120, progress=None)
    out['live_after_equal'] = registry.read(
        s.bootstrap, s.topics['models'], 'taxi').resolve('taxi').ref
    out['shadow_records'] = list(s.shadows.items)
    out['dead_letters'] = TopicReader(s.bootstrap, s.topics['dlq']).until(
        1, 3)
    # Agreement rows of the windows the shadow phase filled.
    out['metrics'] = TopicReader(s.bootstrap, s.topics['metrics']).until(
        10**9, 60, lambda rows: _agreement_n(rows, 'taxi@1|taxi@2') >= 100)
    yield s, out
  finally:
    s.close()


def _rollout(items, sent):
  ids = set(sent)
  return [p for p in items if p['event_id'] in ids]


def _versions_by_partition(predictions) -> dict[int, list[int]]:
  """Per partition, the model versions in offset order, runs collapsed."""
  out = {}
  for p in sorted(predictions, key=lambda p: (p['source']['partition'],
                                              p['source']['offset'])):
    runs = out.setdefault(p['source']['partition'], [])
    if not runs or runs[-1] != p['model_version']:
      runs.append(p['model_version'])
  return out


def _switched(predictions, expected) -> bool:
  """Both partitions have gone through ``expected`` versions."""
  by_partition = _versions_by_partition(predictions)
  return len(by_partition) == 2 and all(
      runs == expected for runs in by_partition.values())


def _agreement_rows(rows, key):
  newest = {}
  for row in rows:
    if row.get('type') == 'agreement' and row['model_key'] == key:
      newest[row['window_start_s']] = row
  return list(newest.values())


def _agreement_n(rows, key):
  return sum(r['n'] for r in _agreement_rows(rows, key))


def test_single_ab_and_shadow_on_prism(on_prism):
  _check_common_phases(*on_prism)


def test_shadow_agreement_per_window_on_prism(on_prism):
  s, out = on_prism
  ids = s.phases['shadow']
  got = _newest(s.answered(ids, 5))
  shadows = {r['event_id']: r for r in out['shadow_records']
             if r['event_id'] in set(ids)}
  rows = _agreement_rows(out['metrics'], 'taxi@1|taxi@2')
  assert sum(r['n'] for r in rows) == len(ids)
  same = sum(got[i]['class'] == shadows[i]['class'] for i in ids)
  assert sum(r['n'] * r['same_class_share'] for r in rows) == (
      pytest.approx(same))
  diff = sum(abs(got[i]['probability'] - shadows[i]['probability'])
             for i in ids)
  assert sum(r['n'] * r['mean_abs_diff'] for r in rows) == pytest.approx(
      diff, abs=1e-4)


def test_ensemble_is_the_vote_of_its_members(on_prism):
  s, _ = on_prism
  ids, got = _phase_basics(s, 'ensemble')
  events = [s.by_id[i] for i in ids]
  members = {v: offline(s.root, v, events) for v in (1, 2, 6)}
  for k, event_id in enumerate(ids):
    p = got[event_id]
    expected = strategies.vote(TAXI, [members[v][k] for v in (1, 2, 6)])
    assert (p['model'], p['strategy']) == ('ensemble', 'ensemble')
    assert p['class'] == expected['class']
    assert p['probability'] == pytest.approx(expected['probability'],
                                             abs=1e-6)
    assert p['decision']['members'] == {
        f'taxi@{v}': members[v][k]['class'] for v in (1, 2, 6)}


def test_budget_answers_in_time_from_the_fast_member(on_prism):
  s, _ = on_prism
  ids, got = _phase_basics(s, 'budget')
  v1 = offline(s.root, 1, [s.by_id[i] for i in ids])
  for k, event_id in enumerate(ids):
    p = got[event_id]
    assert p['decision']['winner'] == 'taxi@1'
    assert p['decision']['within_budget'] is True
    # Answered long before the preferred, slow member could have.
    assert p['decision']['answered_ms'] < SLOW_MS
    assert p['probability'] == pytest.approx(v1[k]['probability'], abs=1e-6)


def test_most_confident_answer_wins_with_a_fallback(on_prism):
  s, _ = on_prism
  ids, got = _phase_basics(s, 'confidence')
  events = [s.by_id[i] for i in ids]
  answers = {v: offline(s.root, v, events) for v in (1, 2, 6)}
  fallbacks = 0
  for k, event_id in enumerate(ids):
    best = (2, 6)[strategies.most_confident(
        TAXI.task, [answers[2][k], answers[6][k]])]
    if strategies.confidence(TAXI.task, answers[best][k]) < 0.5:
      best, fallbacks = 1, fallbacks + 1
    p = got[event_id]
    assert p['model_version'] == best
    assert p['probability'] == pytest.approx(answers[best][k]['probability'],
                                             abs=1e-6)
  assert 0 < fallbacks < len(ids)


def test_promote_and_rollback_under_load_lose_nothing(on_prism):
  s, out = on_prism
  ids, got = _phase_basics(s, 'rollout')
  assert not [d for d in out['dead_letters'] if d.get('key') in set(ids)]
  # In each partition's order: version 1, then 4, then 1 again (a batch is
  # scored by one version; partitions are read side by side).
  assert _versions_by_partition(got.values()) == {0: [1, 4, 1],
                                                  1: [1, 4, 1]}


def test_a_model_that_cannot_load_leaves_the_live_one_serving(on_prism):
  s, _ = on_prism
  _, got = _phase_basics(s, 'rejected')
  assert {p['model_version'] for p in got.values()} == {1}
  rejected = [e for e in s.model_events.items if e.get('event') == 'rejected'
              and e.get('model') == 'taxi@5']
  assert rejected and 'cannot load' in rejected[0]['reason']


def test_gate_promotes_a_clearly_better_shadow_and_not_an_equal_one(
    on_prism):
  s, out = on_prism
  better, = out['better']
  assert better.promote and (better.live, better.shadow) == (
      'taxi@2', 'taxi@7')
  assert better.n >= 150 and better.shadow_value > better.live_value + 0.5
  assert out['live_after_better'] == 'taxi@7'
  _, got = _phase_basics(s, 'after_gate')
  assert {p['model_version'] for p in got.values()} == {7}
  after = set(s.phases['after_gate'])
  assert not [r for r in out['shadow_records'] if r['event_id'] in after]
  promoted = [e for e in s.model_events.until(10**9, 10, lambda items: any(
      e.get('event') == 'promoted' for e in items))
              if e.get('event') == 'promoted']
  assert promoted[0]['evidence']['n'] == better.n

  equal, = out['equal']
  assert (equal.live, equal.shadow) == ('taxi@7', 'taxi@8')
  assert not equal.promote and equal.gain == 0
  assert out['live_after_equal'] == 'taxi@7'


@HARNESS_HANG_UP
def test_single_ab_and_shadow_on_flink(kafka_bootstrap, model_root):
  with stopping_job_servers():
    s = Scenario(kafka_bootstrap, model_root, 'flink')
    out = {}
    try:
      _run_common_phases(s, out)
      _check_common_phases(s, out)
    finally:
      s.close()
