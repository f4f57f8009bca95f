"""Training driven by Kafka, on the real broker: a bounded topic range, the
same rows in JSON, CSV and Avro, and the control → train → publish → serve
loop with duplicate, malformed and interrupted control messages.

Kafka-ML's own example data (``data/hcopd.csv``, 239 rows) keeps each
training to seconds.
"""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest

from models import registry
from models import serving
from pipelines import control
from pipelines import serve
from pipelines import train
from problems.hcopd import PROBLEM as HCOPD
from tests.topics import TopicReader, every, produce
from tools import datasource
from tools import replay
from transforms import formats
from transforms import records as R

pytestmark = pytest.mark.integration

EPOCHS = '8'


def _train_on(bootstrap, topic, fmt, out, extra=()):
  return train.run(['--problem', 'hcopd', '--bootstrap_servers', bootstrap,
                    '--input_topic', topic, '--input_format', fmt.name,
                    '--output_dir', str(out), '--epochs', EPOCHS]
                   + (['--avro_schema', json.dumps(fmt.schema)]
                      if fmt.schema else []) + list(extra))


def _end_offsets(bootstrap, topic) -> dict[str, int]:
  from kafka import KafkaConsumer, TopicPartition
  consumer = KafkaConsumer(bootstrap_servers=bootstrap)
  try:
    end = consumer.end_offsets([TopicPartition(topic, p) for p in (0, 1)])
  finally:
    consumer.close()
  return {str(tp.partition): offset for tp, offset in end.items()}


def test_a_topic_range_trains_on_exactly_its_messages(
    kafka_bootstrap, kafka_topic, tmp_path):
  topic = kafka_topic(partitions=2)
  events = [e for _, e in replay.load_events(HCOPD, 'data/hcopd.csv')]
  fmt = formats.EventFormat()

  def rows(some):
    return [(None, fmt.encode(HCOPD, e), i % 2) for i, e in enumerate(some)]

  # Before the range: 20 rows; in it: the 239 rows and 2 malformed ones;
  # after it: 30 more rows.
  produce(kafka_bootstrap, topic, rows(events[:20]))
  first = _end_offsets(kafka_bootstrap, topic)
  produce(kafka_bootstrap, topic, rows(events) + [
      (None, b'{"Age": 70, not json', 0),
      (None, json.dumps({'Gender': 1, 'Age': 60, 'Smoking': 9,
                         'Diagnosis': 1}).encode(), 1)])
  last = _end_offsets(kafka_bootstrap, topic)
  produce(kafka_bootstrap, topic, rows(events[:30]))
  assert sum(last[p] - first[p] for p in last) == 239 + 2

  metrics = _train_on(kafka_bootstrap, topic, fmt, tmp_path / 'out', [
      '--from_offsets', json.dumps(first), '--to_offsets', json.dumps(last)])
  assert metrics['n_train'] + metrics['n_eval'] == 239
  assert metrics['n_dead_letters'] == 2
  letters = [json.loads(line) for path in (tmp_path / 'out' / 'dead_letters'
                                           ).glob('*.jsonl')
             for line in open(path)]
  reasons = sorted(l['errors'][0]['reason'][:8] for l in letters)
  assert reasons == ['not JSON', 'out of d']


@pytest.fixture(scope='module')
def three_formats(kafka_bootstrap, tmp_path_factory):
  """The HCOPD rows as JSON, CSV lines and Confluent Avro, each trained."""
  out = {}
  for name in (formats.JSON, formats.CSV, formats.AVRO_CONFLUENT):
    topic = f'hcopd-{name}-{uuid.uuid4().hex[:6]}'
    from runners import kafka as kafka_runner
    kafka_runner.create_topic(kafka_bootstrap, topic, 2)
    fmt = formats.EventFormat.of(HCOPD, name, schema_id=3)
    datasource.send(HCOPD, 'data/hcopd.csv', topic, kafka_bootstrap, fmt,
                    progress=None)
    root = tmp_path_factory.mktemp(name)
    out[name] = (root, _train_on(kafka_bootstrap, topic, fmt, root))
  return out


def test_json_csv_and_avro_give_the_same_training(three_formats):
  (json_root, json_metrics), *others = three_formats.values()
  stats = json.load(open(json_root / 'stats.json'))
  for root, metrics in others:
    assert json.load(open(root / 'stats.json')) == stats
    for key in ('n_train', 'n_eval', 'n_dead_letters'):
      assert metrics[key] == json_metrics[key]
    assert metrics['auc'] == pytest.approx(json_metrics['auc'], abs=0.02)
  assert json_metrics['n_train'] + json_metrics['n_eval'] == 239


def test_the_models_answer_alike(three_formats):
  """Not bit for bit: stochastic gradient descent sees the rows in the
  order the topic's partitions delivered them, which differs run to run
  (the split, the statistics and the transform do not)."""
  rows = [R.parse_json(HCOPD, e) for _, e in
          replay.load_events(HCOPD, 'data/hcopd.csv')]
  answers = [np.asarray(serving.predict(
      HCOPD, serving.load(str(root / 'model' / '1')), rows)['probability'])
             for root, _ in three_formats.values()]
  for other in answers[1:]:
    assert np.mean(np.abs(other - answers[0])) < 0.05
    assert np.mean((other >= 0.5) == (answers[0] >= 0.5)) > 0.9


def test_control_train_publish_serve_loop(kafka_bootstrap, tmp_path):
  suffix = uuid.uuid4().hex[:6]
  t = {n: f'hcopd-{n}-{suffix}' for n in (
      'data', 'control', 'results', 'models', 'events', 'predictions',
      'dlq', 'model-events')}
  from runners import kafka as kafka_runner
  for name in ('data', 'control', 'events', 'predictions', 'dlq',
               'model-events'):
    kafka_runner.create_topic(kafka_bootstrap, t[name])
  fmt = formats.EventFormat.of(HCOPD, formats.AVRO)
  sent = datasource.send(HCOPD, 'data/hcopd.csv', t['data'], kafka_bootstrap,
                         fmt, progress=None)
  message = datasource.control_message(HCOPD, 'dep-1', t['data'], sent, fmt,
                                       publish_state='live')
  message['epochs'] = int(EPOCHS)
  controller = control.Controller(
      kafka_bootstrap, t['control'], t['results'], t['models'],
      str(tmp_path / 'control'), 'hcopd', group_id=f'control-{suffix}')
  produce(kafka_bootstrap, t['control'], [
      (b'dep-1', json.dumps(message).encode()),
      (b'dep-1', json.dumps(message).encode()),          # a repeat
      (b'junk', b'{"deployment_id": 7'),                  # not JSON
      (b'dep-x', json.dumps(dict(message, deployment_id='dep-x',
                                 total_msg=5)).encode()),  # wrong count
  ])
  results = controller.run(run_seconds=300, max_messages=4)
  assert [r['status'] for r in results] == [
      'done', 'duplicate', 'failed', 'failed']
  assert results[0]['model'] == 'hcopd@1' and results[1]['model'] == 'hcopd@1'
  assert results[0]['metrics']['n_train'] + results[0]['metrics'][
      'n_eval'] == 239
  assert 'not JSON' in results[2]['reason']
  assert 'total_msg 5' in results[3]['reason']
  state = registry.read(kafka_bootstrap, t['models'], 'hcopd')
  assert [d.ref for d in state.descriptors()] == ['hcopd@1']
  assert state.resolve('hcopd').ref == 'hcopd@1'

  result = serve.start([
      '--problem', 'hcopd', '--runner', 'prism',
      '--bootstrap_servers', kafka_bootstrap, '--input_topic', t['events'],
      '--output_topic', t['predictions'], '--dead_letter_topic', t['dlq'],
      '--model_topic', t['models'], '--model_events_topic', t['model-events'],
      '--group_id', f'serve-{suffix}'])
  predictions = TopicReader(kafka_bootstrap, t['predictions'])
  try:
    events = replay.load_events(HCOPD, 'data/hcopd.csv')
    first = [(f'a-{i}', e) for i, (_, e) in enumerate(events[:30])]
    replay.replay(HCOPD, first, t['events'], kafka_bootstrap)
    predictions.until(10**9, 180, every([i for i, _ in first]))

    # A second deployment, live: serving switches to it with no restart.
    # A third one was "started" by a controller that crashed: it resumes.
    produce(kafka_bootstrap, t['control'], [
        (b'dep-2', json.dumps(dict(message, deployment_id='dep-2')).encode())])
    assert [r['status'] for r in controller.run(300, 1)] == ['done']
    registry.publish(kafka_bootstrap, t['results'], [(
        'dep-3', {'deployment_id': 'dep-3', 'status': 'started'})])
    produce(kafka_bootstrap, t['control'], [
        (b'dep-3', json.dumps(dict(message, deployment_id='dep-3',
                                   publish_state='candidate')).encode())])
    resumed, = control.Controller(
        kafka_bootstrap, t['control'], t['results'], t['models'],
        str(tmp_path / 'control'), 'hcopd', group_id=f'control-{suffix}'
    ).run(300, 1)
    assert (resumed['status'], resumed['resumed'], resumed['model']) == (
        'done', True, 'hcopd@3')
    events_topic = TopicReader(kafka_bootstrap, t['model-events'])
    events_topic.until(10**9, 120, lambda items: any(
        e.get('event') == 'serving' and e.get('models') == {
            'hcopd': 'hcopd@2'} for e in items))
    second = [(f'b-{i}', e) for i, (_, e) in enumerate(events[30:60])]
    replay.replay(HCOPD, second, t['events'], kafka_bootstrap)
    predictions.until(10**9, 120, every([i for i, _ in second]))
  finally:
    result.cancel()
    predictions.close()
  by_id = {p['event_id']: p for p in predictions.items}
  assert {by_id[i]['model_version'] for i, _ in first} == {1}
  assert {by_id[i]['model_version'] for i, _ in second} == {2}
  final = control.read_results(kafka_bootstrap, t['results'])
  assert {k: v['status'] for k, v in final.items() if '@' not in k
          and k != 'junk'} == {'dep-1': 'done', 'dep-2': 'done', 'dep-3': 'done',
                'dep-x': 'failed'}
  assert os.path.isdir(tmp_path / 'control' / 'hcopd' / 'model' / '3')


def test_retraining_on_drift_and_schedule_publishes_only_what_validates(
    kafka_bootstrap, tmp_path):
  suffix = uuid.uuid4().hex[:6]
  t = {n: f'hcopd-retrain-{n}-{suffix}' for n in (
      'data', 'control', 'results', 'models', 'alerts')}
  from runners import kafka as kafka_runner
  for name in ('data', 'control', 'alerts'):
    kafka_runner.create_topic(kafka_bootstrap, t[name])
  datasource.send(HCOPD, 'data/hcopd.csv', t['data'], kafka_bootstrap,
                  progress=None)
  template = {'problem': 'hcopd', 'topic': t['data'], 'input_format': 'json',
              'validation_rate': 0.2, 'epochs': int(EPOCHS)}

  def controller(**policy):
    return control.Controller(
        kafka_bootstrap, t['control'], t['results'], t['models'],
        str(tmp_path / 'control'), 'hcopd', group_id=f'control-{suffix}',
        policy=control.RetrainPolicy(template, hours=1, min_gap_s=0,
                                     **policy))

  # A drift alert retrains on the last hour of the data topic: no model is
  # live yet, so the new one is published live.
  on_alerts = controller(alerts_topic=t['alerts'])
  produce(kafka_bootstrap, t['alerts'], [(b'a', json.dumps(
      {'type': 'alert', 'kind': 'drift', 'feature': 'Age'}).encode())])
  try:
    result, = on_alerts.run(run_seconds=300, max_messages=1)
  finally:
    on_alerts.close()
  assert result['deployment_id'].startswith('retrain-drift-')
  assert (result['status'], result['model']) == ('done', 'hcopd@1')
  assert result['metrics']['n_train'] + result['metrics']['n_eval'] == 239
  assert registry.read(kafka_bootstrap, t['models'], 'hcopd').resolve(
      'hcopd').ref == 'hcopd@1'

  # On a schedule, with a bar no model can pass (AUC better by 1.0): the
  # version is trained and kept on disk, but not published.
  result, = controller(every_s=0.1, max_regression=-1.0).run(
      run_seconds=300, max_messages=1)
  assert result['deployment_id'].startswith('retrain-schedule-')
  assert result['status'] == 'rejected' and result['model'] is None
  assert 'worse than the live model' in result['validation']['reason']
  assert result['validation']['live_model'] == 'hcopd@1'
  state = registry.read(kafka_bootstrap, t['models'], 'hcopd')
  assert [d.ref for d in state.descriptors()] == ['hcopd@1']
  assert os.path.isdir(tmp_path / 'control' / 'hcopd' / 'model' / '2')
