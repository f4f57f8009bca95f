"""Event-time windowing: per window and per pane, with late data kept.

Each window kind gets a TestStream that moves the watermark (and processing
time, for EARLY panes) explicitly and sends an on-time, a late-but-allowed and
a too-late element. The assertions are on the emitted rows' window and pane
fields, and the too-late element must be in the late output, not in any
aggregate. These run on the DirectRunner (TestStream selects it).
"""

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.testing import test_stream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window as W
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.windowed_value import PaneInfo, PaneInfoTiming

from tests import taxi
from transforms import records as R
from transforms import windowing
from transforms.windowing import WindowConfig
from tests.taxi import TAXI
from transforms import problem as P

# A real row of data/taxi_trips.csv.
_ROW = taxi.row(2)  # line 4: a Cash trip with missing dropoff fields


def trip(area, ts, fare=10.0, tips=1.0):
  row = dict(_ROW, **{TAXI.entity_key: str(area),
                      TAXI.event_time.field: str(ts), 'fare': str(fare),
                      TAXI.label.column: str(tips)})
  return TimestampedValue(R.parse_csv_row(TAXI, row), ts)


def pane(row):
  """(key, window start, window end, timing, pane index, count)."""
  return (row['key'], row['window_start_s'], row['window_end_s'],
          row['timing'], row['pane_index'], row['count'])


def late(row):
  """(key, event time, window start, window end) of a late record."""
  return (row['key'], row['event_time_s'], row['window_start_s'],
          row['window_end_s'])


def run(stream, config, expected_panes, expected_late):
  options = PipelineOptions([])
  options.view_as(StandardOptions).streaming = True
  p = beam.Pipeline(options=options)
  out = p | stream | windowing.WindowedAggregates(TAXI, config)
  assert_that(out['stats'] | 'Panes' >> beam.Map(pane),
              equal_to(expected_panes), label='CheckPanes')
  assert_that(out['late'] | 'Late' >> beam.Map(late),
              equal_to(expected_late), label='CheckLate')
  # The too_late counter is checked in test_count_fn_counts: this runner
  # (BundleBasedDirectRunner) drops counter updates after a step's first
  # bundle, so a count here would not test our code.
  p.run().wait_until_finish()


def test_fixed_windows_early_on_time_late_and_too_late():
  config = WindowConfig(kind='fixed', size=60, allowed_lateness=30,
                        early_every=10, late_every=1)
  stream = (
      test_stream.TestStream()
      .advance_watermark_to(0)
      .add_elements([trip(8, 10), trip(8, 20, fare=20.0, tips=5.0)])
      .advance_processing_time(11)            # EARLY pane of [0, 60)
      .advance_watermark_to(60)               # ON_TIME pane
      .add_elements([trip(8, 30)])            # late, within allowed lateness
      .advance_watermark_to(100)              # [0, 60) expires at 90
      .add_elements([trip(8, 40), trip(9, 45)])   # too late, even a new key
      .add_elements([trip(8, 100)])           # on time in [60, 120)
      .advance_watermark_to_infinity())
  run(stream, config,
      expected_panes=[
          (8, 0, 60, 'EARLY', 0, 2),
          (8, 0, 60, 'ON_TIME', 1, 2),
          (8, 0, 60, 'LATE', 2, 3),           # accumulating: 2 + 1
          (8, 60, 120, 'ON_TIME', 0, 1),
      ],
      expected_late=[(8, 40, 0, 60), (9, 45, 0, 60)])


def test_fixed_windows_discarding_late_pane_holds_only_new_elements():
  config = WindowConfig(kind='fixed', size=60, allowed_lateness=30,
                        late_every=1, accumulation='discarding')
  stream = (
      test_stream.TestStream()
      .add_elements([trip(8, 10), trip(8, 20)])
      .advance_watermark_to(60)
      .add_elements([trip(8, 30)])
      .advance_watermark_to(100)
      .add_elements([trip(8, 40)])
      .advance_watermark_to_infinity())
  run(stream, config,
      expected_panes=[(8, 0, 60, 'ON_TIME', 0, 2), (8, 0, 60, 'LATE', 1, 1)],
      expected_late=[(8, 40, 0, 60)])


def test_sliding_windows_split_lateness_per_window():
  # ts 40 and 50 belong to [0, 60) and [30, 90).
  config = WindowConfig(kind='sliding', size=60, period=30,
                        allowed_lateness=30, late_every=1)
  stream = (
      test_stream.TestStream()
      .add_elements([trip(8, 40)])
      .advance_watermark_to(95)        # [0, 60) expired at 90; [30, 90) open
      # Too late for [0, 60), late but allowed for [30, 90).
      .add_elements([trip(8, 50)])
      .advance_watermark_to_infinity())
  run(stream, config,
      expected_panes=[
          (8, 0, 60, 'ON_TIME', 0, 1),
          (8, 30, 90, 'ON_TIME', 0, 1),
          (8, 30, 90, 'LATE', 1, 2),
      ],
      expected_late=[(8, 50, 0, 60)])


def test_sessions_merge_across_gap_and_route_too_late():
  config = WindowConfig(kind='session', gap=60, allowed_lateness=30,
                        early_every=10, late_every=1)
  stream = (
      test_stream.TestStream()
      .advance_watermark_to(0)
      .add_elements([trip(8, 0), trip(8, 100)])   # two sessions: gap > 60
      .advance_processing_time(11)                 # EARLY panes of both
      .add_elements([trip(8, 50)])                 # bridges them: [0, 160)
      .advance_watermark_to(200)                   # ON_TIME [0, 160)
      .add_elements([trip(8, 120)])                # late, allowed: in [0, 180)
      .advance_watermark_to(300)
      .add_elements([trip(8, 10)])                 # too late: expired at 100
      .advance_watermark_to_infinity())
  run(stream, config,
      expected_panes=[
          (8, 0, 60, 'EARLY', 0, 1),
          (8, 100, 160, 'EARLY', 0, 1),
          (8, 0, 160, 'ON_TIME', 0, 3),
          # The late element extends the session; pane state restarts on merge.
          (8, 0, 180, 'LATE', 0, 4),
      ],
      expected_late=[(8, 10, 10, 70)])


def test_count_fn_counts():
  p = beam.Pipeline(options=PipelineOptions(['--runner=FnApiRunner']))
  _ = (p | beam.Create(['a', 'b', 'c'])
       | beam.ParDo(windowing._CountFn('too_late')))
  result = p.run()
  result.wait_until_finish()
  counters = result.metrics().query(
      MetricsFilter().with_name('too_late'))['counters']
  assert [c.committed for c in counters] == [3]


# ------------------------------------------------------------- plain functions

def test_taxi_summary_means_and_tip_rate():
  acc = windowing.new_aggregate(TAXI)
  for value in (trip(8, 0, 10.0, 1.0), trip(8, 1, 30.0, 5.0)):
    acc = windowing.add_record(TAXI, acc, value.value)
  unlabelled = R.parse_json(TAXI, R.csv_row_to_event(
      TAXI, {k: v for k, v in _ROW.items() if k != TAXI.label.column}))
  acc = windowing.merge_aggregates(TAXI, [acc, windowing.add_record(
      TAXI, windowing.new_aggregate(TAXI), unlabelled)])
  assert windowing.summarize(TAXI, acc) == {
      'count': 3, 'fare_count': 3, 'fare_sum': 67.05,
      'fare_mean': 67.05 / 3, 'tips_count': 2, 'tips_sum': 6.0,
      'tips_mean': 3.0, 'tip_rate': 6.0 / 40.0}


def test_empty_on_time_pane_is_not_emitted():
  """Beam fires the on-time pane even with nothing in it (here: discarding,
  everything went out in the early pane). Such a pane is dropped - on Flink
  a second, empty "last" pane of a window overwrote its real total
  (windowing.DropEmptyPanes; tests/test_faults.py restores on Flink)."""
  config = WindowConfig(kind='fixed', size=60, early_every=10,
                        accumulation='discarding')
  stream = (
      test_stream.TestStream()
      .advance_watermark_to(0)
      .add_elements([trip(8, 10), trip(8, 20)])
      .advance_processing_time(11)            # EARLY pane: both elements
      .advance_watermark_to(60)               # ON_TIME pane: empty
      .add_elements([trip(9, 70)])
      .advance_watermark_to_infinity())
  run(stream, config,
      expected_panes=[(8, 0, 60, 'EARLY', 0, 2),
                      (9, 60, 120, 'ON_TIME', 0, 1)],
      expected_late=[])


def test_combine_fns_merge_no_accumulators_into_an_empty_one():
  """Flink merges none for the empty pane it fires when a window's timers
  fire one by one: the empty accumulator, not a StopIteration (the
  monitor's: tests/test_monitoring.py)."""
  from transforms import feedback
  fn = windowing.AggregateFn(TAXI)
  assert fn.merge_accumulators([]) == fn.create_accumulator()
  assert fn.extract_output(fn.merge_accumulators(iter([])))['count'] == 0
  quality = feedback.QualityFn(TAXI)
  assert quality.extract_output(quality.merge_accumulators([])) == {
      'labelled': 0}


def test_houses_summary_min_max_and_price_per_sqft():
  houses = P.load('houses')
  rows = [r for r in R.read_csv(houses, 'data/houses.csv')][:3]
  records = [R.parse_csv_row(houses, r) for r in rows]
  acc = windowing.merge_aggregates(houses, [
      windowing.add_record(houses, windowing.new_aggregate(houses), r)
      for r in records])
  prices = [float(r['price']) for r in rows]
  sqft = [float(r['sqft_living']) for r in rows]
  assert windowing.summarize(houses, acc) == pytest.approx({
      'count': 3, 'price_count': 3, 'price_sum': sum(prices),
      'price_mean': sum(prices) / 3, 'price_min': min(prices),
      'price_max': max(prices), 'sqft_living_count': 3,
      'sqft_living_mean': sum(sqft) / 3,
      'price_per_sqft': sum(prices) / sum(sqft)})


def test_window_result_fields():
  window = W.IntervalWindow(3600, 7200)
  row = windowing.window_result(
      TAXI.entity_key, 8, {'count': 1}, window,
      PaneInfo(False, True, PaneInfoTiming.LATE, 2, 1))
  assert row == {
      'key_name': TAXI.entity_key, 'key': 8,
      'window_start': '1970-01-01T01:00:00Z',
      'window_end': '1970-01-01T02:00:00Z',
      'window_start_s': 3600.0, 'window_end_s': 7200.0,
      'timing': 'LATE', 'pane_index': 2, 'is_first': False, 'is_last': True,
      'count': 1}


def test_expiry_is_window_max_timestamp_plus_lateness():
  window = W.IntervalWindow(0, 60)
  assert windowing.expiry_micros(window, 30) == 90_000_000 - 1


@pytest.mark.parametrize('kwargs', [
    {'kind': 'tumbling'}, {'size': 0}, {'kind': 'sliding', 'period': 7200},
    {'late_every': 0}, {'shards': 0}])
def test_bad_config_is_rejected(kwargs):
  with pytest.raises(ValueError):
    WindowConfig(**kwargs)


def test_unknown_key_is_rejected_for_the_problem():
  with pytest.raises(ValueError, match='no_such_feature'):
    windowing.WindowedAggregates(TAXI, WindowConfig(key='no_such_feature'))


def test_config_builds_beam_windowing():
  config = WindowConfig(kind='sliding', size=3600, period=300,
                        early_every=10, late_every=2,
                        accumulation='discarding')
  assert config.window_fn() == W.SlidingWindows(3600, 300)
  assert config.step == 300 and config.margin == 300
  assert 'AfterProcessingTime' in str(config.trigger())
  assert 'AfterCount(2)' in str(config.trigger())
