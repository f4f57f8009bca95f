"""Drift and quality monitoring against training statistics, on real rows.

Training statistics come from the rows of data/taxi_trips.csv; "live" windows
are other real rows of the same file (no alert expected) and the same rows
shifted the way a broken upstream would shift them: fares x3 and a payment
type never seen in training (exactly those alerts expected).
"""

import collections
import functools
import math
import os

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from transforms import monitoring as M
from transforms import records as R
from transforms import stats as S
from transforms import windowing
from tests.taxi import TAXI
from transforms import problem as P

HOUR = 3600


@functools.lru_cache(maxsize=1)
def _rows():
  return list(R.read_csv(TAXI, 'data/taxi_trips.csv'))


# Every 25th row is "live", the others are "training": both are samples of
# the whole file (its order is not random: 1000-row blocks have mean fares
# from 8 to 22, because fares are heavy-tailed).
_LIVE_EVERY = 25


@functools.lru_cache(maxsize=1)
def training_stats():
  rows = [r for i, r in enumerate(_rows()) if i % _LIVE_EVERY]
  return S.compute_stats(TAXI, (R.parse_csv_row(TAXI, r) for r in rows))


def live_rows(n=400):
  return _rows()[::_LIVE_EVERY][:n]


def scored(rows):
  """Scores each row with a perfect model (prediction = actual label)."""
  out = []
  for row in rows:
    record = R.parse_csv_row(TAXI, row)
    label = R.label_value(TAXI, record)
    out.append(M.Scored.of(TAXI, record, {'class': label,
                                          'probability': float(label)}))
  return out


def shift(row):
  row = dict(row)
  row['fare'] = str(float(row['fare']) * 3)
  row[TAXI.label.column] = str(float(row[TAXI.label.column]) * 3)   # same tip rate
  row['payment_type'] = 'Bitcoin'
  return row


def report(events):
  plans = M.drift_plan(TAXI, training_stats())
  acc = M.new_accumulator(TAXI, plans)
  for event in events:
    acc = M.add_scored(TAXI, acc, plans, event)
  quality = M.quality_summary(TAXI, acc)
  drift = M.drift_summary(acc, plans, training_stats())
  return quality, drift, M.alerts_for(TAXI, quality, drift, M.DriftThresholds())


def test_training_distribution_raises_no_alert():
  quality, drift, alerts = report(scored(live_rows()))
  assert alerts == []
  assert quality['count'] == quality['labelled'] == 400
  assert quality['accuracy'] == 1.0
  fare = next(r for r in drift if r['feature'] == 'fare')
  assert abs(fare['mean_shift']) < 0.3


def test_shifted_fares_and_new_payment_type_raise_those_alerts():
  _, drift, alerts = report(scored(shift(r) for r in live_rows()))
  raised = {(a['feature'], a['metric']) for a in alerts}
  assert ('fare', 'mean_shift') in raised
  assert ('payment_type', 'unseen_share') in raised
  # Nothing else moved; a std tripling may or may not cross 2 std.
  assert raised <= {('fare', 'mean_shift'), ('fare', 'std_shift'),
                    ('payment_type', 'unseen_share')}
  payment = next(r for r in drift if r['feature'] == 'payment_type')
  assert payment['unseen_share'] == 1.0


def test_small_window_does_not_alert():
  _, _, alerts = report(scored(shift(r) for r in live_rows(10)))
  assert alerts == []


def test_missing_rate_and_rate_gap_alerts():
  rows = [dict(r, company='') for r in live_rows()]
  events = [e._replace(predicted=1) for e in scored(rows)]
  _, _, alerts = report(events)
  raised = {(a['feature'], a['metric']) for a in alerts}
  assert raised == {('company', 'missing_rate_increase'),
                    (TAXI.label.name, 'positive_rate_gap')}


def test_monitor_predictions_pipeline_alerts_per_window():
  # Hour 0: training-like rows. Hour 1: shifted rows. One alert set, hour 1.
  events = [TimestampedValue(e, 10) for e in scored(live_rows())] + [
      TimestampedValue(e, HOUR + 10)
      for e in scored(shift(r) for r in live_rows())]
  config = windowing.WindowConfig(kind='fixed', size=HOUR,
                                  allowed_lateness=0)
  p = beam.Pipeline(options=PipelineOptions(['--runner=FnApiRunner']))
  out = (p | beam.Create(events)
         | M.MonitorPredictions(TAXI, training_stats(), config))
  assert_that(
      out['alerts'] | beam.Map(lambda a: (a['window_start_s'], a['feature'],
                                          a['metric'])),
      lambda got: _assert_alerts(got), label='CheckAlerts')
  assert_that(
      out['quality'] | beam.Map(lambda q: (q['window_start_s'], q['count'],
                                           q['timing'])),
      equal_to([(0, 400, 'ON_TIME'), (HOUR, 400, 'ON_TIME')]),
      label='CheckQuality')
  assert_that(out['late'], equal_to([]), label='CheckNoLate')
  p.run().wait_until_finish()


def _assert_alerts(got):
  windows = {w for w, _, _ in got}
  assert windows == {HOUR}, got
  assert {(f, m) for _, f, m in got} >= {
      ('fare', 'mean_shift'), ('payment_type', 'unseen_share')}, got


def test_regression_quality_is_mae_rmse_mape_of_the_labelled_events():
  houses = P.load('houses')
  rows = [r for r in R.read_csv(houses, 'data/houses.csv')
          if float(r['price']) > 0][:50]
  records = [R.parse_csv_row(houses, r) for r in rows]
  stats = S.compute_stats(houses, records)
  plans = M.drift_plan(houses, stats)
  acc = M.new_accumulator(houses, plans)
  predictions = [r.values['price'] * 1.1 for r in records]   # 10 % too high
  for record, prediction in zip(records, predictions):
    acc = M.add_scored(houses, acc, plans,
                       M.Scored.of(houses, record, {'prediction': prediction}))
  quality = M.quality_summary(houses, acc)
  errors = [0.1 * r.values['price'] for r in records]
  assert quality['task'] == 'regression'
  assert quality['labelled_scored'] == 50
  assert quality['mae'] == pytest.approx(sum(errors) / 50)
  assert quality['rmse'] == pytest.approx(
      math.sqrt(sum(e * e for e in errors) / 50))
  assert quality['mape'] == pytest.approx(0.1)
  assert 'accuracy' not in quality
  assert quality['mean_prediction'] == pytest.approx(
      sum(predictions) / 50)
  mean = sum(predictions) / 50
  assert quality['prediction_std'] == pytest.approx(
      math.sqrt(sum((p - mean) ** 2 for p in predictions) / 50))


def test_prediction_distribution_per_task():
  # Binary: probabilities 0.05, 0.15, ... 0.95 and 1.0 (the last bin's edge).
  records = [R.parse_csv_row(TAXI, r) for r in live_rows(11)]
  probabilities = [0.05 + 0.1 * i for i in range(10)] + [1.0]
  plans = M.drift_plan(TAXI, training_stats())
  acc = M.new_accumulator(TAXI, plans)
  for record, p in zip(records, probabilities):
    acc = M.add_scored(TAXI, acc, plans, M.Scored.of(
        TAXI, record, {'class': int(p >= 0.5), 'probability': p}))
  quality = M.quality_summary(TAXI, acc)
  assert quality['probability_histogram'] == [1] * 9 + [2]
  assert quality['mean_probability'] == pytest.approx(sum(probabilities) / 11)
  assert quality['predicted_positive_rate'] == pytest.approx(6 / 11)
  # Multi-class: the share of each predicted class, by name.
  exasens = P.load('exasens')
  rows = list(R.read_csv(exasens, exasens.data))[:8]
  records = [R.parse_csv_row(exasens, r) for r in rows]
  stats = S.compute_stats(exasens, records)
  plans = M.drift_plan(exasens, stats)
  acc = M.new_accumulator(exasens, plans)
  predicted = [0, 0, 0, 1, 1, 2, 3, 3]
  for record, c in zip(records, predicted):
    acc = M.add_scored(exasens, acc, plans,
                       M.Scored.of(exasens, record, {'class': c}))
  shares = M.quality_summary(exasens, acc)['predicted_class_shares']
  classes = exasens.label.classes
  assert shares == {classes[0]: 3 / 8, classes[1]: 2 / 8, classes[2]: 1 / 8,
                    classes[3]: 2 / 8}


def test_monitor_merges_no_accumulators_into_an_empty_one():
  """Flink merges none for the empty pane it fires when a window's timers
  fire one by one (windowing.DropEmptyPanes): the empty accumulator, not a
  StopIteration."""
  monitor = M.MonitorFn(TAXI, training_stats())
  assert monitor.merge_accumulators([]) == monitor.create_accumulator()


def test_serving_monitor_on_the_broker_alerts_exactly_on_the_shifted_windows(
    kafka_bootstrap, kafka_topic, taxi_model, taxi_training, tmp_path):
  """pipelines.serve --training_stats on Prism from the real broker. Three
  10-minute windows of the same held-out trips: as they are (no alert),
  fares x3 (the fare alerts the offline computation raises, nothing else)
  and a payment type never seen (only its unseen-share alert). Each window
  reports its prediction distribution and accuracy, equal to those of the
  predictions topic; malformed events are counted per window; an event
  after its window closed is scored and also goes to the late topic. The
  live report draws those rows, with the model's training figure."""
  import json
  from pipelines import serve
  from tools import replay
  from tests.topics import TopicReader, produce
  stats = S.read_stats(os.path.join(os.path.dirname(taxi_model),
                                    'stats.json'))
  names = {role: kafka_topic(suffix=role) for role in (
      'events', 'predictions', 'dlq', 'metrics', 'alerts', 'late')}
  size, n = 600, 100
  t0 = 1_400_000_000 - 1_400_000_000 % size
  rows = replay.load_events(TAXI, 'data/taxi_trips.csv', split='eval',
                            limit=n + 1)
  windows = {
      t0: [e for _, e in rows[:n]],
      t0 + size: [dict(e, fare=e['fare'] * 3, tips=e['tips'] * 3)
                  for _, e in rows[:n]],
      t0 + 2 * size: [dict(e, payment_type='Bitcoin') for _, e in rows[:n]]}
  messages = []
  for start, events in windows.items():
    for i, event in enumerate(events):
      eid = f'w{start}-{i}'
      messages.append((eid.encode(), json.dumps(dict(
          event, event_id=eid, trip_start_timestamp=start + i)).encode()))
  bad = [(b'bad-0', b'{"fare": 1, not json', None, (t0 + 5) * 1000),
         (b'bad-1', b'\xff\xfe', None, (t0 + 6) * 1000)]
  # Moves the watermark past the three windows (out-of-orderness 60 s).
  closer = dict(rows[n][1], event_id='closer',
                trip_start_timestamp=t0 + 10 * size)
  produce(kafka_bootstrap, names['events'], messages[:n] + bad + messages[n:]
          + [(b'closer', json.dumps(closer).encode())])
  offline = {}
  plans = M.drift_plan(TAXI, stats)
  for start, events in windows.items():
    acc = M.new_accumulator(TAXI, plans)
    for event in events:
      record = R.parse_json(TAXI, event)
      acc = M.add_scored(TAXI, acc, plans, M.Scored.unscored(record))
    drift = M.drift_summary(acc, plans, stats)
    offline[start] = {(a['feature'], a['metric']) for a in M.alerts_for(
        TAXI, M.quality_summary(TAXI, acc), drift, M.DriftThresholds())}
  assert offline[t0] == set()
  assert ('fare', 'mean_shift') in offline[t0 + size]
  assert {f for f, _ in offline[t0 + size]} == {'fare'}
  assert offline[t0 + 2 * size] == {('payment_type', 'unseen_share')}

  result = serve.start([
      '--bootstrap_servers', kafka_bootstrap,
      '--input_topic', names['events'], '--output_topic', names['predictions'],
      '--dead_letter_topic', names['dlq'], '--metrics_topic', names['metrics'],
      '--alerts_topic', names['alerts'], '--late_topic', names['late'],
      '--model_dir', taxi_model, '--group_id', f"serve-{names['events']}",
      '--training_stats', os.path.join(os.path.dirname(taxi_model),
                                       'stats.json'),
      '--monitor_window', str(size), '--monitor_allowed_lateness', '0',
      '--max_out_of_orderness', '60', '--runner', 'prism'])
  predictions = TopicReader(kafka_bootstrap, names['predictions'])
  metrics = TopicReader(kafka_bootstrap, names['metrics'])
  alerts = TopicReader(kafka_bootstrap, names['alerts'])
  late = TopicReader(kafka_bootstrap, names['late'])

  features = len(TAXI.model_features)

  def closed(rows):
    # Every window's prediction row, drift rows and the dead-letter count.
    return len([r for r in _panes(rows).values()
                if r['timing'] == 'ON_TIME']) >= 3 * (1 + features) + 1

  try:
    metrics.until(10**9, 300, done=closed)
    late_event = dict(rows[0][1], event_id='late',
                      trip_start_timestamp=t0 + 30)
    produce(kafka_bootstrap, names['events'],
            [(b'late', json.dumps(late_event).encode())])
    late.until(1, 120)
    predictions.until(3 * n + 2, 120)
    alerts.until(10**9, 60, done=lambda items: len({
        (a['window_start_s'], a['feature'], a['metric']) for a in items
    }) >= sum(map(len, offline.values())))
  finally:
    result.cancel()
    for reader in (predictions, metrics, alerts, late):
      reader.close()
  by_window = collections.defaultdict(list)
  for p in predictions.items:
    by_window[p['event_time_ms'] // 1000 // size * size].append(p)
  panes = _panes(metrics.items)
  # Beam closes an accumulating window with a final pane (EMIT_ALWAYS): with
  # no late element in it, its figures are the on-time pane's.
  for (kind, what, start, index), row in panes.items():
    if row['timing'] != 'ON_TIME':
      assert row['timing'] == 'LATE' and row['is_last'], row
      assert _figures(row) == _figures(panes[kind, what, start, 0]), row
  panes = {k: r for k, r in panes.items() if r['timing'] == 'ON_TIME'}
  rows_of = {r['window_start_s']: r for r in panes.values()
             if r['type'] == 'predictions'}
  for start in windows:
    row, scored = rows_of[start], by_window[start]
    if start == t0:
      scored = [p for p in scored if p['event_id'] != 'late']
    assert row['model_key'] == 'taxi@1'
    assert row['count'] == row['scored'] == row['labelled'] == n == len(scored)
    assert sum(row['probability_histogram']) == n
    assert row['mean_probability'] == pytest.approx(
        sum(p['probability'] for p in scored) / n)
    assert row['accuracy'] == pytest.approx(
        sum(p['class'] == p['label'] for p in scored) / n)
  drift_rows = [r for r in panes.values() if r['type'] == 'drift']
  assert len(drift_rows) == 3 * features
  letters = [r for r in panes.values() if r['type'] == 'dead_letters']
  assert [(r['window_start_s'], r['stage'], r['count']) for r in letters] == [
      (t0, 'DecodeEvents', 2)], letters
  got = collections.defaultdict(set)
  for a in alerts.items:
    assert a['type'] == 'alert' and a['model_key'] == 'taxi@1'
    got[a['window_start_s']].add((a['feature'], a['metric']))
  assert dict(got) == {s: a for s, a in offline.items() if a}
  record, = late.items
  assert record['stage'] == 'monitor' and record['key'] == 'taxi@1'
  assert record['record']['event_id'] == 'late'
  assert record['window_start_s'] == t0

  from tools import live_report
  png = str(tmp_path / 'live' / 'report.png')
  summary = live_report.main([
      '--problem', 'taxi', '--bootstrap_servers', kafka_bootstrap,
      '--quality_topic', kafka_topic(suffix='quality'),
      '--metrics_topic', names['metrics'], '--alerts_topic', names['alerts'],
      '--model_dir', taxi_model, '--output', png])
  assert {slot: row['mean_probability']
          for slot, row in summary['predictions'].items()} == {
              ('taxi@1', start): rows_of[start]['mean_probability']
              for start in windows}
  assert {(a['window_start_s'], a['feature'], a['metric'])
          for a in summary['alerts']} == {
              (start, f, m) for start, got_ in offline.items()
              for f, m in got_}
  assert live_report.training_figures(taxi_model, TAXI) == {
      'taxi@1': taxi_training['metrics']['auc']}
  with open(png, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with open(png[:-4] + '.html', encoding='utf-8') as f:
    page = f.read()
  assert 'unseen_share' in page and 'data:image/png;base64,' in page


def _panes(rows):
  """Monitor rows by what they measure and their pane. The rows are written
  at least once: a repeated row must repeat the same figures."""
  out = {}
  for row in rows:
    slot = (row['type'], row.get('feature') or row.get('stage') or row.get(
        'metric'), row['window_start_s'], row['pane_index'])
    assert out.setdefault(slot, row) == row, (out[slot], row)
    out[slot] = row
  return out


def _figures(row):
  return {k: v for k, v in row.items() if k not in (
      'timing', 'pane_index', 'is_first', 'is_last')}
