"""Delayed labels joined to predictions (``transforms.feedback``).

The join runs on the DirectRunner with a ``TestStream`` that moves the
watermark, so every arrival order is played exactly: labels before and after
their prediction, never, twice, after the TTL, without a prediction, and
after the watermark passed the TTL. Live quality per window is checked
against the same metrics computed offline (scikit-learn, numpy) from the
same pairs.
"""

import collections
import json
import math
import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import (PipelineOptions,
                                                  StandardOptions)
from apache_beam.testing import test_stream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from sklearn import metrics as skm

from transforms import feedback as F
from transforms import problem as problem_lib
from transforms import windowing

TAXI = problem_lib.load('taxi')
HOUSES = problem_lib.load('houses')
EXASENS = problem_lib.load('exasens')
TTL = 100  # seconds
T0 = 1_000_020  # seconds, a whole minute


def prediction(eid, at, version=1, probability=0.8):
  return ('p', eid, {'event_id': eid, 'problem': 'taxi',
                     'event_time_ms': (T0 + at) * 1000,
                     'probability': probability,
                     'class': int(probability >= 0.5),
                     'model_version': version})


def label(eid, at, value=1):
  return ('l', eid, {'event_id': eid, 'label': value,
                     'label_time_ms': (T0 + at) * 1000})


def elements(*records):
  """TestStream elements, timestamped at the event or label time."""
  return [TimestampedValue(r, (r[2].get('event_time_ms')
                               or r[2]['label_time_ms']) / 1000)
          for r in records]


def test_labels_joined_in_every_arrival_order():
  stream = (
      test_stream.TestStream()
      .advance_watermark_to(T0)
      .add_elements(elements(
          prediction('e1', 0), label('e2', 60),          # e2's label first
          prediction('e3', 10),                          # never labelled
          prediction('e4', 30),
          prediction('e5', 0),
          label('e6', 100),                              # never predicted
          prediction('e7', 5), prediction('e7', 5),      # a replayed one
          prediction('e8', 40, version=1),               # two models
          prediction('e8', 40, version=2, probability=0.3),
          prediction('e9', 0)))
      .add_elements(elements(
          label('e1', 50), prediction('e2', 20),
          label('e4', 70), label('e4', 80, value=0),     # twice: first wins
          label('e5', 200),                              # 200 s > TTL
          label('e7', 50), label('e8', 90)))
      .advance_watermark_to(T0 + 150)                    # e9's TTL passed
      .add_elements(elements(label('e9', 90)))           # after it: late
      # Past every second TTL before the end: this runner does not hold the
      # watermark for timers that fire only at the end of time.
      .advance_watermark_to(T0 + 400)
      .advance_watermark_to_infinity())
  options = PipelineOptions([])
  options.view_as(StandardOptions).streaming = True
  with beam.Pipeline(options=options) as p:
    records = p | stream
    out = {
        'predictions': records | 'P' >> beam.Filter(lambda r: r[0] == 'p')
        | 'KP' >> beam.Map(lambda r: (r[1], r[2])),
        'feedback': records | 'L' >> beam.Filter(lambda r: r[0] == 'l')
        | 'KL' >> beam.Map(lambda r: (r[1], r[2]))} | F.JoinFeedback(TTL)
    assert_that(
        out['joined'] | 'J' >> beam.Map(
            lambda j, ts=beam.DoFn.TimestampParam: (
                j['event_id'], j['model_key'], j['label'],
                int(ts.micros // 1_000_000) - T0)),
        equal_to([('e1', 'taxi@1', 1, 50), ('e2', 'taxi@1', 1, 60),
                  ('e4', 'taxi@1', 1, 70), ('e7', 'taxi@1', 1, 50),
                  ('e8', 'taxi@1', 1, 90), ('e8', 'taxi@2', 1, 90)]),
        label='Joined')
    assert_that(out['unlabelled'] | 'U' >> beam.Map(
        lambda u: (u['event_id'], u['reason'])), equal_to([
            ('e3', 'no label within the 100 s TTL'),
            ('e5', 'no label within the 100 s TTL'),
            ('e9', 'no label within the 100 s TTL')]), label='Unlabelled')
    assert_that(out['late'] | 'Late' >> beam.Map(
        lambda u: (u['event_id'], u['reason'])), equal_to([
            ('e5', 'label known 200 s after the event, over the 100 s TTL'),
            ('e6', 'no prediction of this event within the TTL'),
            ('e9', 'the label came after the TTL of its prediction')]),
        label='Late')


def test_feedback_records_are_checked_per_task():
  assert F.feedback_record(TAXI, {'event_id': 'a', 'label': True,
                                  'label_time_ms': 5}) == {
      'event_id': 'a', 'label': 1, 'label_time_ms': 5}
  assert F.label_of(EXASENS, EXASENS.label.classes[2]) == 2
  assert F.label_of(EXASENS, 1) == 1
  assert F.label_of(HOUSES, 350000) == 350000.0
  for problem, bad in ((TAXI, 2), (TAXI, 0.5), (TAXI, 'yes'),
                       (EXASENS, len(EXASENS.label.classes)),
                       (HOUSES, float('nan')), (HOUSES, 'cheap')):
    with pytest.raises(F.InvalidFeedback):
      F.label_of(problem, bad)
  for value in ({'label': 1, 'label_time_ms': 5},
                {'event_id': 'a', 'label_time_ms': 5},
                {'event_id': 'a', 'label': 1}, [1]):
    with pytest.raises(F.InvalidFeedback):
      F.feedback_record(TAXI, value)


def _quality_rows(tmp_path, problem, pairs, size=60):
  config = windowing.WindowConfig(kind='fixed', size=size, allowed_lateness=0)
  with beam.Pipeline() as p:
    out = (p
           | beam.Create([TimestampedValue(pair, t) for t, pair in pairs])
           | F.LiveQuality(problem, config))
    _ = (out['quality'] | beam.Map(json.dumps)
         | beam.io.WriteToText(str(tmp_path / problem.name)))
  return [json.loads(line) for path in tmp_path.glob(f'{problem.name}*')
          for line in path.read_text().splitlines()]


def test_live_binary_quality_equals_offline_metrics(tmp_path):
  rng = np.random.default_rng(7)
  pairs = []
  for i in range(400):
    y = int(rng.random() < 0.3)
    p = float(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0.01, 0.99))
    p = round(p, 2)  # ties, as real scores have
    model = 'taxi@1' if i % 4 else 'taxi@2'
    pairs.append((T0 + (i % 120), {'model_key': model, 'probability': p,
                                   'class': int(p >= 0.5), 'label': y}))
  rows = _quality_rows(tmp_path, TAXI, pairs)
  assert {(r['model_key'], r['window_start_s']) for r in rows} == {
      (m, T0 - T0 % 60 + k * 60) for m in ('taxi@1', 'taxi@2')
      for k in range(3) if any(
          pm['model_key'] == m and (t - (T0 - T0 % 60)) // 60 == k
          for t, pm in pairs)}
  for row in rows:
    group = [pm for t, pm in pairs if pm['model_key'] == row['model_key']
             and row['window_start_s'] <= t < row['window_end_s']]
    y = [pm['label'] for pm in group]
    p = [pm['probability'] for pm in group]
    assert row['labelled'] == len(group)
    assert row['auc'] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert row['log_loss'] == pytest.approx(skm.log_loss(y, p), rel=1e-9)
    assert row['accuracy'] == pytest.approx(
        skm.accuracy_score(y, [int(q >= 0.5) for q in p]))
    assert row['positive_rate'] == pytest.approx(np.mean(y))
    assert row['mean_probability'] == pytest.approx(np.mean(p))
    assert 0 <= row['calibration_error'] <= 1


def test_live_regression_and_multiclass_quality_equal_offline_metrics(
    tmp_path):
  rng = np.random.default_rng(3)
  pairs = [(T0 + i % 60, {'model_key': 'houses@1',
                          'prediction': float(rng.normal(5e5, 1e5)),
                          'label': float(rng.normal(5e5, 1e5))})
           for i in range(200)]
  row, = _quality_rows(tmp_path, HOUSES, pairs)
  pred = np.array([pm['prediction'] for _, pm in pairs])
  true = np.array([pm['label'] for _, pm in pairs])
  assert row['mae'] == pytest.approx(skm.mean_absolute_error(true, pred))
  assert row['rmse'] == pytest.approx(
      math.sqrt(skm.mean_squared_error(true, pred)))
  assert row['mape'] == pytest.approx(
      skm.mean_absolute_percentage_error(true, pred))
  n = len(EXASENS.label.classes)
  pairs = []
  for i in range(150):
    probs = rng.dirichlet(np.ones(n)).tolist()
    pairs.append((T0 + i % 60, {'model_key': 'exasens@1',
                                'probabilities': probs,
                                'class': int(np.argmax(probs)),
                                'label': int(rng.integers(n))}))
  row, = _quality_rows(tmp_path, EXASENS, pairs)
  y = [pm['label'] for _, pm in pairs]
  assert row['accuracy'] == pytest.approx(
      skm.accuracy_score(y, [pm['class'] for _, pm in pairs]))
  assert row['log_loss'] == pytest.approx(skm.log_loss(
      y, [pm['probabilities'] for _, pm in pairs], labels=list(range(n))))


def test_quality_alerts_name_the_metric_and_the_evidence():
  thresholds = F.QualityThresholds(min_auc=0.8, max_log_loss=0.5,
                                   min_labelled=50)
  row = {'type': 'quality', 'model_key': 'taxi@2', 'labelled': 80,
         'auc': 0.71, 'log_loss': 0.42, 'accuracy': 0.9, 'timing': 'ON_TIME',
         'window_start_s': 60.0, 'window_end_s': 120.0}
  alert, = F.quality_alerts(row, thresholds)
  assert (alert['metric'], alert['value'], alert['threshold'],
          alert['bound'], alert['labelled']) == ('auc', 0.71, 0.8, 'min', 80)
  assert F.quality_alerts(dict(row, timing='EARLY'), thresholds) == []
  assert F.quality_alerts(dict(row, labelled=49), thresholds) == []
  assert F.quality_alerts(dict(row, auc=0.85), thresholds) == []


def _synthetic_stream(n=200, flip_from=100, seed=11):
  """Predictions of a binary model every 2 s of event time (a year ago, so
  the source's idle watermark closes everything once the topics go quiet),
  and their feedback: none for every 10th event, twice for i % 10 == 1, after
  the TTL for i % 10 == 2, 30 s later for the rest; labels flipped from
  event ``flip_from`` on (the model has gone stale)."""
  rng = np.random.default_rng(seed)
  t0 = (int(time.time()) // 86400 - 365) * 86400
  predictions, feedback, expected = [], [], []
  for i in range(n):
    y = int(rng.random() < 0.4)
    p = round(float(np.clip(rng.normal(0.3 + 0.4 * y, 0.15), 0.01, 0.99)), 3)
    event_ms = (t0 + 2 * i) * 1000
    eid = f'ev-{i}'
    predictions.append({'event_id': eid, 'problem': 'taxi',
                        'event_time_ms': event_ms, 'probability': p,
                        'class': int(p >= 0.5), 'model_version': 1})
    truth = 1 - y if i >= flip_from else y
    if i % 10 == 0:
      continue
    delay_s = 300 if i % 10 == 2 else 30
    feedback.append({'event_id': eid, 'label': truth,
                     'label_time_ms': event_ms + delay_s * 1000})
    if i % 10 == 1:
      feedback.append({'event_id': eid, 'label': 1 - truth,
                       'label_time_ms': event_ms + 40_000})
    if delay_s == 30:
      expected.append((event_ms + 30_000, p, truth))
  predictions.insert(50, dict(predictions[40]))  # a replayed prediction
  feedback.append({'event_id': 'never-predicted', 'label': 1,
                   'label_time_ms': (t0 + 100) * 1000})
  return predictions, feedback, expected


def test_quality_job_joins_late_labels_on_the_broker_and_alerts_on_a_stale_model(
    kafka_bootstrap, kafka_topic):
  """pipelines.quality on Prism from the real broker: live quality per
  window equals the metrics computed offline from the pairs that should
  join; the windows where the labels flipped alert, the others do not; the
  late and unlabelled records and the dead letter are all there."""
  from pipelines import quality
  from tests.topics import TopicReader, produce
  names = {role: kafka_topic(suffix=role) for role in (
      'predictions', 'feedback', 'quality', 'alerts', 'late', 'dlq')}
  predictions, feedback, expected = _synthetic_stream()
  produce(kafka_bootstrap, names['predictions'], [
      (p['event_id'].encode(), json.dumps(p).encode()) for p in predictions])
  produce(kafka_bootstrap, names['feedback'], [
      (f['event_id'].encode(), json.dumps(f).encode()) for f in feedback] + [
      (b'bad', b'{"event_id": "ev-3", "label": 7, "label_time_ms": 1}')])
  ttl, size, min_auc, min_labelled = 120, 60, 0.6, 10
  # Offline: the same metric from the pairs that should join, per window.
  windows = {}
  for done_ms, p, y in expected:
    start = done_ms // 1000 - (done_ms // 1000) % size
    windows.setdefault(start, []).append((p, y))
  offline = {start: (len(pairs), skm.roc_auc_score(
      [y for _, y in pairs], [p for p, _ in pairs]))
             for start, pairs in windows.items()}
  should_alert = {s for s, (n, a) in offline.items()
                  if n >= min_labelled and a < min_auc}
  assert should_alert and should_alert != set(offline)  # both kinds occur
  result = quality.start([
      '--problem', 'taxi', '--bootstrap_servers', kafka_bootstrap,
      '--predictions_topic', names['predictions'],
      '--feedback_topic', names['feedback'],
      '--quality_topic', names['quality'], '--alerts_topic', names['alerts'],
      '--late_topic', names['late'], '--dead_letter_topic', names['dlq'],
      '--group_id', f"quality-{names['quality']}",
      '--label_ttl', str(ttl), '--size', str(size),
      '--min_auc', str(min_auc), '--min_labelled', str(min_labelled),
      # Quiet topics let the watermark follow the clock after 5 s (not 30).
      '--idle_timeout_s', '5', '--runner', 'prism'])
  rows = TopicReader(kafka_bootstrap, names['quality'])
  alerts = TopicReader(kafka_bootstrap, names['alerts'])
  late = TopicReader(kafka_bootstrap, names['late'])
  dead = TopicReader(kafka_bootstrap, names['dlq'])
  try:
    rows.until(len(offline), 240)
    late.until(61, 60)
    alerts.until(len(should_alert), 30)
    dead.until(1, 30)
  finally:
    result.cancel()
    for reader in (rows, alerts, late, dead):
      reader.close()
  live = {r['window_start_s']: r for r in rows.items
          if r['timing'] == 'ON_TIME'}
  assert set(live) == set(offline)
  for start, (n, offline_auc) in offline.items():
    assert live[start]['model_key'] == 'taxi@1'
    assert live[start]['labelled'] == n
    assert live[start]['auc'] == pytest.approx(offline_auc, abs=1e-12)
  assert {a['window_start_s'] for a in alerts.items} == should_alert
  assert {a['metric'] for a in alerts.items} == {'auc'}
  kinds = collections.Counter(r['type'] for r in late.items)
  # 20 events never labelled and 20 labelled after the TTL are unlabelled;
  # those 20 labels and the one never predicted are late.
  assert kinds == {'unlabelled': 40, 'late_label': 21}
  assert len({r['event_id'] for r in late.items
              if r['type'] == 'unlabelled'}) == 40
  letter, = dead.items
  assert letter['stage'] == 'DecodeFeedback' and 'not a label' in (
      letter['errors'][0]['reason'])
