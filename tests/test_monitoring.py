"""Drift and quality monitoring against training statistics, on real rows.

Training statistics come from the rows of data/taxi_trips.csv; "live" windows
are other real rows of the same file (no alert expected) and the same rows
shifted the way a broken upstream would shift them: fares x3 and a payment
type never seen in training (exactly those alerts expected).
"""

import functools
import math
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
  acc = M.new_accumulator(M.drift_plan(TAXI, training_stats()))
  plans = M.drift_plan(TAXI, training_stats())
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
  acc = M.new_accumulator(plans)
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


def test_monitor_merges_no_accumulators_into_an_empty_one():
  """Flink merges none for the empty pane it fires when a window's timers
  fire one by one (windowing.DropEmptyPanes): the empty accumulator, not a
  StopIteration."""
  monitor = M.MonitorFn(TAXI, training_stats())
  assert monitor.merge_accumulators([]) == monitor.create_accumulator()
