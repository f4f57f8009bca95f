"""The analytics job: its builder seam, a CSV batch run, and a Kafka oracle.

The oracle replays real taxi trips to a real local broker out of event-time
order, runs ``pipelines.analytics`` on it in streaming mode (per-partition
watermarks from the Kafka source, the BundleBasedDirectRunner), and checks
the hourly counts per community area of each window's final pane against a
plain-Python group-by of the same rows.
"""

import collections
import functools
import json
import os
import random
import uuid

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.testing import test_stream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from pipelines import analytics
from tools import report as analytics_report
from transforms import records as R
from transforms import stats as S
from transforms import windowing
from tests.taxi import TAXI

HOUR = 3600


def _streaming_runner() -> tuple[list[str], bool]:
  """Runner flags for the oracle, and whether they give streaming semantics.

  Prism runs the Kafka read as a stream (watermarks, late panes); without a
  local Prism binary the DirectRunner runs the bounded read as a batch, where
  nothing is late but the counts must still match.
  """
  if os.environ.get('RTML_TEST_RUNNER'):
    return os.environ['RTML_TEST_RUNNER'].split(), True
  from runners import options as runner_options
  prism = ['--runner', 'prism']
  if any(f.startswith('--prism_location') for f in runner_options.resolve(
      prism)):
    return prism, True
  return ['--runner', 'DirectRunner'], False


@functools.lru_cache(maxsize=1)
def _rows():
  return list(R.read_csv(TAXI, 'data/taxi_trips.csv'))


def _records(rows):
  return [R.parse_csv_row(TAXI, r) for r in rows]


def test_build_seam_takes_teststream():
  """The builder takes any timestamped Record PCollection (here TestStream)."""
  rows = _rows()[:60]
  training = S.compute_stats(TAXI, _records(_rows()[100:3100]))
  base = _records(rows)
  # All in hour [0, 1h) of area 8, then one too late after the window closes.
  def at(record, ts):
    values = dict(record.values, **{TAXI.entity_key: 8,
                                     TAXI.event_time.field: ts})
    return TimestampedValue(record._replace(values=values), ts)
  stream = (test_stream.TestStream()
            .add_elements([at(r, 10 + i) for i, r in enumerate(base[:-1])])
            .advance_watermark_to(3 * HOUR)
            .add_elements([at(base[-1], 20)])
            .advance_watermark_to_infinity())
  config = windowing.WindowConfig(kind='fixed', size=HOUR,
                                  allowed_lateness=HOUR)
  options = PipelineOptions([])
  options.view_as(StandardOptions).streaming = True
  p = beam.Pipeline(options=options)
  out = analytics.build(TAXI, p | stream, config, training)
  assert_that(out['stats'] | 'Counts' >> beam.Map(
      lambda r: (r['type'], r['key'], r['window_start_s'], r['timing'],
                 r['count'])),
              equal_to([('window_stats', 8, 0, 'ON_TIME', 59)]),
              label='CheckStats')
  # The late record is reported once by each stage that windows it.
  assert_that(out['late'] | 'Late' >> beam.Map(
      lambda r: (r['stage'], r['event_time_s'])),
              equal_to([('window_stats', 20), ('drift', 20)]),
              label='CheckLate')
  assert_that(out['quality'] | 'Quality' >> beam.Map(
      lambda r: (r['type'], r['count'], r['scored'], r['labelled'])),
              equal_to([('quality', 59, 0, 59)]), label='CheckQuality')
  p.run().wait_until_finish()


def test_csv_batch_run_and_report(tmp_path):
  rows = _rows()[:300]
  csv_path = tmp_path / 'trips.csv'
  with open(csv_path, 'w', encoding='utf-8') as f:
    header = list(rows[0])
    f.write(','.join(header) + '\n')
    for row in rows:
      f.write(','.join(f'"{row[h]}"' for h in header) + '\n')
  stats_path = tmp_path / 'stats.json'
  S.write_stats(S.compute_stats(TAXI, _records(_rows()[300:3300])), str(stats_path))
  out = tmp_path / 'out'
  analytics.run(['--input_csv', str(csv_path), '--output_path', str(out),
                 '--window', 'fixed', '--size', str(30 * 24 * HOUR),
                 '--training_stats', str(stats_path)])
  stats = analytics_report.load_rows(str(out), 'stats')
  totals = analytics_report.window_totals(stats)
  assert sum(r['count'] for r in totals.values()) == 300
  assert analytics_report.load_rows(str(out), 'late') == []
  assert analytics_report.load_rows(str(out), 'dead_letters') == []
  assert analytics_report.load_rows(str(out), 'drift')
  png = analytics_report.draw(TAXI, str(out), str(tmp_path / 'report.png'))
  with open(png, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


# ------------------------------------------------------------------ oracle

@pytest.fixture(scope='module')
def bootstrap(kafka_bootstrap):
  """The session's real broker (tests/conftest.py)."""
  return kafka_bootstrap


def _replay(bootstrap_servers, topic, rows):
  from kafka import KafkaProducer
  producer = KafkaProducer(bootstrap_servers=bootstrap_servers,
                           value_serializer=lambda v: json.dumps(v).encode())
  for row in rows:
    producer.send(topic, R.csv_row_to_event(TAXI, row))
  producer.flush()
  producer.close()


def _hour_counts(rows):
  return collections.Counter(
      (R.parse_csv_row(TAXI, r).values[TAXI.entity_key],
       int(r[TAXI.event_time.field]) // HOUR * HOUR) for r in rows)


def test_oracle_hourly_counts_through_kafka_out_of_order(bootstrap, tmp_path):
  # 400 consecutive trips of 2013 (a few weeks of event time), replayed with
  # up to 2 h of event-time disorder; allowed lateness 3 h covers it. Then 5
  # trips from months before: far beyond the allowed lateness.
  timed = sorted(_rows(), key=lambda r: int(r[TAXI.event_time.field]))
  body = timed[2000:2400]
  rng = random.Random(5)
  disordered = sorted(body, key=lambda r: int(r[TAXI.event_time.field])
                      + rng.uniform(0, 2 * HOUR))
  ancient = timed[:5]
  topic = f'trips-oracle-{uuid.uuid4().hex[:8]}'
  from runners.kafka import create_topic
  create_topic(bootstrap, topic, partitions=1)
  _replay(bootstrap, topic, disordered + ancient)

  out = tmp_path / 'out'
  runner, streaming = _streaming_runner()
  analytics.run([
      '--bootstrap_servers', bootstrap, '--input_topic', topic, '--bounded',
      '--group_id', topic, '--streaming', *runner,
      '--output_path', str(out), '--window', 'fixed', '--size', str(HOUR),
      '--allowed_lateness', str(3 * HOUR), '--max_out_of_orderness', '600',
      '--late_every', '1', '--accumulation', 'accumulating'])

  stats = analytics_report.load_rows(str(out), 'stats')
  late = analytics_report.load_rows(str(out), 'late')
  got = collections.Counter({
      slot: row['count']
      for slot, row in analytics_report.window_totals(stats).items()})
  # Only the ancient trips can be too late; the disordered body never is.
  ancient_times = {int(r[TAXI.event_time.field]) for r in ancient}
  assert {int(r['event_time_s']) for r in late} <= ancient_times
  # Final panes = group-by of every replayed row minus those routed late.
  late_counts = collections.Counter(
      (r['key'], int(r['event_time_s']) // HOUR * HOUR) for r in late)
  expected = _hour_counts(disordered + ancient) - late_counts
  assert got == expected
  assert sum(got.values()) + len(late) == len(disordered) + len(ancient)
  if streaming:
    # The disorder was real: some windows got LATE panes.
    assert any(r['timing'] == 'LATE' for r in stats)
  print(f'oracle: {len(stats)} panes, {len(late)} too late, runner {runner}')
