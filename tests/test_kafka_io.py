"""Tests of transforms.kafka_io: plain-function units, then a real broker.

Integration tests run against the session broker of ``conftest.py`` on the
DirectRunner (in this Beam: Prism when its binary is available, else the
FnApiRunner) and, for watermark-driven firing, on Prism explicitly. Nothing
is mocked.

    python -m pytest tests/test_kafka_io.py -x -q
"""

from __future__ import annotations

import base64
import collections
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp
from kafka import KafkaConsumer

from tools import replay
from transforms import decode
from transforms import kafka_io
from transforms.kafka_io.watermarks import GroupWatermarkEstimator
from tests.taxi import TAXI
from tests.topics import committed_offsets, consume_all, produce
EVENT_TIME_KEY = TAXI.event_time.field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAXI_CSV = os.path.join(REPO, 'data', 'taxi_trips.csv')


# ------------------------------------------------------------------ helpers

def direct_options(*extra: str) -> PipelineOptions:
  return PipelineOptions(['--runner=DirectRunner', *extra])


def counter(result, name: str) -> int:
  found = result.metrics().query(
      MetricsFilter().with_namespace(kafka_io.METRICS_NAMESPACE)
      .with_name(name))['counters']
  return sum(c.committed or c.attempted or 0 for c in found)


class FakeClock:

  def __init__(self, now: float = 1_000_000.0):
    self.now = now

  def __call__(self) -> float:
    return self.now


def seconds(ts: float) -> Timestamp:
  return Timestamp.of(ts)


# -------------------------------------------------------------- plain units

def test_watermark_is_max_event_time_minus_bound_and_never_goes_back():
  clock = FakeClock()
  policy = kafka_io.WatermarkPolicy(max_out_of_orderness_s=10,
                                    idle_timeout_s=None)
  est = kafka_io.PartitionWatermarkEstimator(None, policy, clock=clock)
  assert est.current_watermark() == kafka_io.MIN_TIMESTAMP
  est.observe_timestamp(seconds(1000))
  assert est.current_watermark() == seconds(990)
  est.observe_timestamp(seconds(950))  # out of order (late): no effect
  assert est.current_watermark() == seconds(990)
  est.observe_timestamp(seconds(1005))
  assert est.current_watermark() == seconds(995)
  # The state survives a checkpoint.
  resumed = kafka_io.PartitionWatermarkEstimator(
      est.get_estimator_state(), policy, clock=clock)
  resumed.observe_timestamp(seconds(1001))
  assert resumed.current_watermark() == seconds(995)


def test_idle_partition_advances_to_wall_clock_only_when_caught_up():
  clock = FakeClock(now=5000.0)
  policy = kafka_io.WatermarkPolicy(max_out_of_orderness_s=10,
                                    idle_timeout_s=30)
  est = kafka_io.PartitionWatermarkEstimator(None, policy, clock=clock)
  est.observe_timestamp(seconds(1000))
  clock.now += 29
  est.on_empty_poll(caught_up=True)
  assert est.current_watermark() == seconds(990)  # not idle long enough
  clock.now += 60
  est.on_empty_poll(caught_up=False)  # behind the log end: not idle
  assert est.current_watermark() == seconds(990)
  clock.now += 31
  est.on_empty_poll(caught_up=True)
  assert est.current_watermark() == seconds(clock.now - 10)
  # A partition that never saw a record is released by the same rule.
  empty = kafka_io.PartitionWatermarkEstimator(None, policy, clock=clock)
  clock.now += 31
  empty.on_empty_poll(caught_up=True)
  assert empty.current_watermark() == seconds(clock.now - 10)
  # Disabled: an idle partition holds its watermark.
  held = kafka_io.PartitionWatermarkEstimator(
      None, kafka_io.WatermarkPolicy(idle_timeout_s=None), clock=clock)
  clock.now += 1000
  held.on_empty_poll(caught_up=True)
  assert held.current_watermark() == kafka_io.MIN_TIMESTAMP


def test_event_times_far_in_the_future_do_not_advance_the_watermark():
  clock = FakeClock(now=2000.0)
  policy = kafka_io.WatermarkPolicy(max_out_of_orderness_s=0,
                                    idle_timeout_s=None, max_future_s=60)
  est = kafka_io.PartitionWatermarkEstimator(None, policy, clock=clock)
  est.observe_timestamp(seconds(1500))
  est.observe_timestamp(seconds(2000 + 3600))  # a corrupt clock
  assert est.current_watermark() == seconds(1500)
  assert est.take_future_events() == 1
  assert est.take_future_events() == 0


def test_partitions_report_the_minimum_of_their_committed_peers():
  clock = FakeClock()
  peers = kafka_io.PeerWatermarks('reader-under-test', ttl_s=60, clock=clock)
  peers.register([(('t', 0),), (('t', 1),)])
  policy = kafka_io.WatermarkPolicy(max_out_of_orderness_s=0,
                                    idle_timeout_s=None)

  def estimator(partition: int) -> GroupWatermarkEstimator:
    # A read of one partition (the default: a group of one).
    return GroupWatermarkEstimator(
        GroupWatermarkEstimator.initial_state((('t', partition),)),
        policy, peers)

  p0, p1 = estimator(0), estimator(1)
  p0.observe_timestamp(seconds(100))
  assert p0.own_watermark() == seconds(100)
  assert p0.current_watermark() == kafka_io.MIN_TIMESTAMP  # p1 not read yet
  p1.observe_timestamp(seconds(50))
  # p0's 100 is not visible until p0's next bundle starts (this one is not
  # committed yet).
  assert p1.current_watermark() == kafka_io.MIN_TIMESTAMP
  p0.begin_read()
  assert p1.current_watermark() == seconds(50)
  assert p0.current_watermark() == kafka_io.MIN_TIMESTAMP
  p1.begin_read()
  assert p0.current_watermark() == seconds(50)
  clock.now += 61  # no news from p1 (finished, or moved): it stops counting
  p0.observe_timestamp(seconds(120))
  assert p0.current_watermark() == seconds(120)
  peers.register([(('t', 2),)])
  assert p0.current_watermark() == seconds(120)  # never goes back


def test_a_group_of_partitions_claims_each_in_order_and_checkpoints_all():
  from transforms.kafka_io.partitions import (UNBOUNDED_STOP,
                                              _GroupOffsetTracker,
                                              group_specs)
  specs = [('t', 0, 5, UNBOUNDED_STOP), ('t', 1, 0, 3), ('t', 2, 7, 9)]
  assert group_specs(specs, None) == [(s,) for s in specs]
  assert group_specs(specs, 2) == [(specs[0], specs[2]), (specs[1],)]
  tracker = _GroupOffsetTracker(tuple(specs))
  assert not tracker.is_bounded()
  assert tracker.try_claim(('t', 0, 5)) and tracker.try_claim(('t', 0, 8))
  assert tracker.try_claim(('t', 1, 2))
  assert not tracker.try_claim(('t', 1, 3))  # its stop: partition 1 done
  with pytest.raises(ValueError):
    tracker.try_claim(('t', 0, 6))  # backwards
  primary, residual = tracker.try_split(0)
  assert primary == (('t', 0, 5, 9), ('t', 1, 0, 3), ('t', 2, 7, 7))
  assert residual == (('t', 0, 9, UNBOUNDED_STOP), ('t', 2, 7, 9))
  assert not tracker.try_claim(('t', 0, 9))  # the residual's now
  tracker.check_done()
  assert tracker.try_split(0.5) is None
  unfinished = _GroupOffsetTracker((('t', 1, 0, 3),))
  unfinished.try_claim(('t', 1, 0))
  with pytest.raises(ValueError, match='unclaimed'):
    unfinished.check_done()


def test_a_group_watermark_is_its_slowest_partition():
  clock = FakeClock(1_000_000.0)
  policy = kafka_io.WatermarkPolicy(max_out_of_orderness_s=10,
                                    idle_timeout_s=None)
  est = GroupWatermarkEstimator(
      GroupWatermarkEstimator.initial_state((('t', 0), ('t', 1))), policy,
      clock=clock)
  est.select(('t', 0))
  est.observe_timestamp(Timestamp.of(500))
  est.select(('t', 1))
  est.observe_timestamp(Timestamp.of(200))
  assert est.current_watermark() == Timestamp.of(190)
  resumed = GroupWatermarkEstimator(est.get_estimator_state(), policy,
                                    clock=clock)
  resumed.select(('t', 1))
  resumed.observe_timestamp(Timestamp.of(300))
  assert resumed.current_watermark() == Timestamp.of(290)
  resumed.finish(('t', 1))  # read to its end: only partition 0 counts
  assert resumed.current_watermark() == Timestamp.of(490)


@pytest.mark.parametrize('runner, given, finalizes', [
    ('PrismRunner', None, True),
    ('runners.flink.runner.FlinkRunner', None, False),
    ('runners.flink.runner.FlinkRunner', True, True),
    ('PrismRunner', False, False)])
def test_offsets_are_committed_in_bundle_finalization_except_on_flink(
    runner, given, finalizes):
  # Flink finalizes a bundle only at its next checkpoint, and until then the
  # Python worker sets up new DoFns (a new consumer) for every bundle.
  from apache_beam.runners.common import DoFnSignature
  pipeline = beam.Pipeline(options=PipelineOptions([f'--runner={runner}']))
  _ = pipeline | kafka_io.ReadFromKafka(
      '127.0.0.1:9', 'events', group_id='g', commit_in_finalize=given)
  readers = []

  class Readers(beam.pipeline.PipelineVisitor):

    def visit_transform(self, node):
      if node.full_label.endswith('ReadPartitions'):
        readers.append(node.transform.fn)

  pipeline.visit(Readers())
  reader, = readers
  assert DoFnSignature(reader).has_bundle_finalization() == finalizes
  assert DoFnSignature(reader).is_splittable_dofn()


@pytest.mark.parametrize('flags, expected', [
    (['--runner=PrismRunner'], 1),
    (['--runner=runners.flink.runner.FlinkRunner'], 1),
    (['--runner=runners.flink.runner.FlinkRunner', '--parallelism=2'], 2),
    (['--runner=DataflowRunner'], None),
    (['--runner=PrismRunner', '--kafka_readers=0'], None),
    (['--runner=DataflowRunner', '--kafka_readers=3'], 3)])
def test_one_consumer_reads_every_partition_where_workers_run_in_one_place(
    flags, expected):
  assert kafka_io.readers(PipelineOptions(flags)) == expected


def test_event_time_from_json_field_or_none():
  def rec(value: bytes) -> kafka_io.KafkaRecord:
    return kafka_io.KafkaRecord('t', 0, 0, None, value, 5000)
  by_field = kafka_io.event_time_fn(EVENT_TIME_KEY)
  assert by_field(rec(b'{"trip_start_timestamp": 1400000000}')) == 1400000000
  assert by_field(rec(b'{"trip_start_timestamp": "1400000000"}')) is None
  assert by_field(rec(b'{"trip_start_timestamp": true}')) is None
  assert by_field(rec(b'{"fare": 1}')) is None
  assert by_field(rec(b'\xff\x00 not json')) is None
  assert by_field(rec(b'[1, 2]')) is None
  assert kafka_io.event_time_fn('kafka')(rec(b'')) == 5.0
  in_ms = kafka_io.JsonFieldEventTime('t_ms', unit_seconds=0.001)
  assert in_ms(rec(b'{"t_ms": 1500}')) == 1.5


def test_dead_letter_keeps_the_exact_bytes_and_the_reasons():
  garbage = b'\xff\xfe{"fare": \x00'
  record = kafka_io.KafkaRecord('trips', 3, 42, b'k\xff', garbage, 1234)
  with pytest.raises(decode.records.InvalidRecord) as e:
    decode.decode_event(TAXI, record)
  letter = kafka_io.dead_letter(record, e.value.to_dicts())
  assert json.loads(json.dumps(letter)) == letter  # valid JSON
  assert kafka_io.original_bytes(letter) == garbage
  assert kafka_io.original_bytes(letter, 'key') == b'k\xff'
  # Not UTF-8: kept once, as base64.
  assert letter['value'] is None and letter['value_size'] == len(garbage)
  assert base64.b64decode(letter['value_base64']) == garbage
  assert (letter['topic'], letter['partition'], letter['offset']) == (
      'trips', 3, 42)
  assert letter['errors'][0]['field'] == '*'
  assert letter['errors'][0]['reason'].startswith('not JSON')
  text = kafka_io.dead_letter(record._replace(value=b'{"a": 1'), [])
  assert text['value'] == '{"a": 1' and text['value_base64'] is None


def test_dead_letters_fit_in_a_kafka_request_whatever_the_input():
  from transforms.kafka_io import dead_letters
  limit = dead_letters.MAX_VALUE_BYTES
  # 1 MB of text whose cut falls inside a 3-byte character.
  value = ('€' * (limit // 3 + 1) + 'x' * 700_000).encode('utf-8')
  nested = [[[]]]
  for _ in range(5000):
    nested = [nested]
  errors = [{'field': 'fare', 'value': 'v' * 1_000_000, 'reason': 'bad'},
            {'field': 'x', 'value': nested, 'reason': 'r' * 100_000},
            {'field': 'y', 'value': 10**400, 'reason': 'huge'},
            {'field': 'z', 'value': float('inf'), 'reason': '\ud800'}]
  letter = kafka_io.dead_letter(
      kafka_io.KafkaRecord('t', 0, 1, b'k' * 100_000, value, 5), errors)
  from transforms.kafka_io import writer
  assert len(writer._to_bytes(letter)) < 400_000  # as WriteToKafka writes it
  # (Beam's own coders cannot carry a lone surrogate: the parser rejects it.)
  assert writer._to_bytes({'s': '\ud800', 'x': float('nan')}) == (
      b'{"s":"\\ud800","x":null}')
  assert letter['value_truncated'] and letter['value_size'] == len(value)
  assert value.startswith(kafka_io.original_bytes(letter))
  assert len(kafka_io.original_bytes(letter)) > limit - 3
  assert letter['key_truncated'] and letter['key_size'] == 100_000
  assert letter['errors'][2]['value'].startswith('1000')
  assert letter['errors'][3] == {'field': 'z', 'value': 'inf',
                                 'reason': '\\ud800'}


# ------------------------------------------------------ against the broker

@pytest.fixture
def taxi_events() -> list[tuple[str, dict[str, Any]]]:
  # File order is not event-time order: the data arrives out of order.
  return replay.load_events(TAXI, TAXI_CSV, limit=300)


@pytest.mark.parametrize('readers', [None, 1, 2])
def test_bounded_read_returns_exactly_the_records_produced(
    kafka_bootstrap, kafka_topic, taxi_events, readers):
  """One restriction per partition, all three in one, or dealt to two."""
  topic = kafka_topic(partitions=3)
  assert replay.replay(TAXI, taxi_events, topic, kafka_bootstrap) == 300
  produced = consume_all(kafka_bootstrap, topic, expected=300)
  expected = sorted(
      (m.topic, m.partition, m.offset, m.key, m.value, m.timestamp,
       json.loads(m.value)[EVENT_TIME_KEY]) for m in produced)
  assert len(expected) == 300

  class WithTimestamp(beam.DoFn):

    def process(self, r, ts=beam.DoFn.TimestampParam):
      yield (r.topic, r.partition, r.offset, r.key, r.value, r.timestamp_ms,
             int(ts.micros // 1_000_000))

  p = beam.Pipeline(options=direct_options())
  got = (p
         | 'ReadTrips' >> kafka_io.ReadFromKafka(
             kafka_bootstrap, topic, bounded=True, readers=readers,
             event_time=EVENT_TIME_KEY)
         | 'AttachTimestamp' >> beam.ParDo(WithTimestamp()))
  assert_that(got, equal_to(expected))
  result = p.run()
  assert result.wait_until_finish() == 'DONE'
  # One consumer per restriction, kept across its bundles.
  assert counter(result, 'consumers_opened') == {None: 3, 1: 1, 2: 2}[readers]


def test_bounded_read_between_offsets_and_timestamps(kafka_bootstrap,
                                                     kafka_topic):
  topic = kafka_topic(partitions=1)
  produce(kafka_bootstrap, topic,
          [(None, b'%d' % i, 0, 1_000_000 + i * 1000) for i in range(20)])
  with beam.Pipeline(options=direct_options()) as p:
    by_offset = (p
                 | 'ReadOffsets' >> kafka_io.ReadFromKafka(
                     kafka_bootstrap, topic, start_offsets=5, stop_offsets=9)
                 | 'OffsetValues' >> beam.Map(lambda r: int(r.value)))
    assert_that(by_offset, equal_to([5, 6, 7, 8]), label='CheckOffsets')
    by_time = (p
               | 'ReadTimes' >> kafka_io.ReadFromKafka(
                   kafka_bootstrap, topic, start_timestamp_ms=1_012_000,
                   stop_timestamp_ms=1_015_000)
               | 'TimeValues' >> beam.Map(lambda r: int(r.value)))
    assert_that(by_time, equal_to([12, 13, 14]), label='CheckTimes')


@pytest.mark.parametrize('readers', [None, 1])
def test_streaming_read_fixed_windows_on_direct_runner(
    kafka_bootstrap, kafka_topic, taxi_events, readers):
  """streaming=True, stopped at the end offsets: every event in its window
  (each partition's watermark, also when one consumer reads both)."""
  topic = kafka_topic(partitions=2)
  replay.replay(TAXI, taxi_events, topic, kafka_bootstrap)
  size = 30 * 86400
  expected = collections.Counter(
      e[EVENT_TIME_KEY] - e[EVENT_TIME_KEY] % size for _, e in taxi_events)

  class WindowStart(beam.DoFn):

    def process(self, count, w=beam.DoFn.WindowParam):
      yield int(w.start), count

  with beam.Pipeline(options=direct_options('--streaming')) as p:
    counts = (p
              | 'ReadTrips' >> kafka_io.ReadFromKafka(
                  kafka_bootstrap, topic, bounded=True, readers=readers,
                  event_time=EVENT_TIME_KEY,
                  watermark=kafka_io.WatermarkPolicy(
                      max_out_of_orderness_s=600))
              | 'Window30Days' >> beam.WindowInto(window.FixedWindows(size))
              | 'CountPerWindow' >> beam.CombineGlobally(
                  beam.combiners.CountCombineFn()).without_defaults()
              | 'KeyByWindow' >> beam.ParDo(WindowStart()))
    assert_that(counts, equal_to(sorted(expected.items())))


def _prism_options(*extra: str) -> PipelineOptions:
  """PrismRunner options; the binary is built once (``runners.prism``)."""
  from runners import options as runner_options
  return PipelineOptions(runner_options.resolve([
      '--runner=prism', *extra,
      # Beam shares one Prism job server per process; a DirectRunner test
      # that tried (and failed) to download prism must not hand us its own.
      '--experiments=disable_prism_server_singleton']))


def test_windows_fire_as_the_watermark_passes_them_on_prism(
    kafka_bootstrap, kafka_topic):
  """Real streaming: windows close while the pipeline runs, in order.

  Two partitions, 60 s windows, out-of-orderness bound 10 s, idle timeout
  10 s. Event times are base + the numbers below.
  """
  topic, out = kafka_topic(partitions=2), kafka_topic(suffix='out')
  assigned = kafka_topic(suffix='windows')
  base = 1_400_000_040  # a multiple of 60

  def send(partition: int, offsets: list[int]) -> None:
    produce(kafka_bootstrap, topic,
            [(None, json.dumps({'t': base + o}).encode(), partition)
             for o in offsets])

  class FormatPane(beam.DoFn):

    def process(self, count, w=beam.DoFn.WindowParam,
                pane=beam.DoFn.PaneInfoParam):
      yield None, {'window': int(w.start) - base, 'count': count,
                   'timing': pane.timing}

  class FormatAssignment(beam.DoFn):

    def process(self, r, w=beam.DoFn.WindowParam):
      yield None, {'t': json.loads(r.value)['t'] - base,
                   'window': int(w.start) - base}

  p = beam.Pipeline(options=_prism_options('--streaming'))
  windowed = (p
              | 'ReadEvents' >> kafka_io.ReadFromKafka(
                  kafka_bootstrap, topic,
                  event_time=kafka_io.JsonFieldEventTime('t'),
                  watermark=kafka_io.WatermarkPolicy(
                      max_out_of_orderness_s=10, idle_timeout_s=10),
                  poll_timeout_s=0.3, checkpoint_interval_s=0.5)
              | 'Window60s' >> beam.WindowInto(window.FixedWindows(60)))
  _ = (windowed
       | 'CountPerWindow' >> beam.CombineGlobally(
           beam.combiners.CountCombineFn()).without_defaults()
       | 'FormatPane' >> beam.ParDo(FormatPane())
       | 'WritePanes' >> kafka_io.WriteToKafka(kafka_bootstrap, out))
  _ = (windowed
       | 'FormatAssignment' >> beam.ParDo(FormatAssignment())
       | 'WriteAssignments' >> kafka_io.WriteToKafka(kafka_bootstrap, assigned))
  result = p.run()
  panes: dict[int, list[dict]] = collections.defaultdict(list)
  consumer = KafkaConsumer(out, bootstrap_servers=kafka_bootstrap,
                           auto_offset_reset='earliest',
                           enable_auto_commit=False)

  keepalive: list[int] = []  # p0's records while p1 goes idle

  def wait_for(windows: set[int], timeout_s: float = 60,
               keep_p0_busy: bool = False) -> None:
    deadline = time.monotonic() + timeout_s
    sent_at = time.monotonic()
    while not windows <= set(panes) and time.monotonic() < deadline:
      if keep_p0_busy and time.monotonic() - sent_at > 2:
        # p0 must not go idle too: its watermark would jump to the clock.
        send(0, [391])
        keepalive.append(391)
        sent_at = time.monotonic()
      for batch in consumer.poll(timeout_ms=200).values():
        for m in batch:
          pane = json.loads(m.value)
          panes[pane['window']].append(pane)
    assert windows <= set(panes), (windows, dict(panes))

  try:
    # Phase 1. Watermarks: p0 130-10=120, p1 125-10=115 -> 115: only
    # [0, 60) may close.
    send(0, [1, 5, 30, 61, 62, 130])
    send(1, [10, 70, 125])
    wait_for({0})
    assert set(panes) == {0}, dict(panes)  # [60, 120) waits for p1
    # Phase 2: out of order but within the bound (125 in p0, 150 in p1: on
    # time), one late event (30: behind the watermark), then p0 200 and p1
    # 190 move the watermark to 180: [60, 120) and [120, 180) close.
    send(0, [125, 30, 200])
    send(1, [150, 190])
    wait_for({60, 120})
    assert 180 not in panes, dict(panes)
    # Phase 3: p0 gets 400, p1 goes quiet; after the idle timeout p1 no
    # longer holds the watermark and [180, 240) closes on p0's 390. p0 keeps
    # getting records (391) meanwhile: were it idle too, its watermark would
    # jump to the clock and close [360, 420) as well (a race seen in CI).
    send(0, [400])
    wait_for({180}, keep_p0_busy=True)
    assert 360 not in panes, dict(panes)
  finally:
    consumer.close()
    result.cancel()

  on_time = {w: [(q['count'], q['timing']) for q in v]
             for w, v in panes.items()}
  on_time_timing = 1  # PaneInfoTiming.ON_TIME
  assert on_time == {0: [(4, on_time_timing)], 60: [(3, on_time_timing)],
                     120: [(4, on_time_timing)], 180: [(2, on_time_timing)]}
  # Every event, the late one included, is assigned to its own window.
  sent = [1, 5, 30, 61, 62, 130, 10, 70, 125, 125, 30, 200, 150, 190, 400,
          *keepalive]
  assignments = [json.loads(m.value) for m in consume_all(
      kafka_bootstrap, assigned, expected=len(sent))]
  assert sorted((a['t'], a['window']) for a in assignments) == sorted(
      (t, t - t % 60) for t in sent)


def test_partitions_added_while_running_are_read_on_prism(
    kafka_bootstrap, kafka_topic):
  """A topic grows from 1 to 3 partitions under a running unbounded read:
  records in the new partitions, those produced before the read found them
  included, are read once each."""
  from kafka import KafkaAdminClient
  from kafka.admin import NewPartitions
  topic, out = kafka_topic(partitions=1), kafka_topic(suffix='out')
  p = beam.Pipeline(options=_prism_options('--streaming'))
  _ = (p
       | 'ReadEvents' >> kafka_io.ReadFromKafka(
           kafka_bootstrap, topic, partition_discovery_s=1.0,
           poll_timeout_s=0.3, checkpoint_interval_s=0.5)
       | 'KeyValue' >> beam.Map(
           lambda r: (r.key, f'{r.partition}:{r.value.decode()}'.encode()))
       | 'WriteCopy' >> kafka_io.WriteToKafka(kafka_bootstrap, out))
  result = p.run()
  try:
    produce(kafka_bootstrap, topic,
            [(f'a{i}'.encode(), b'x', 0) for i in range(5)])
    assert len(consume_all(kafka_bootstrap, out, expected=5,
                           timeout_s=120)) == 5
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
      admin.create_partitions({topic: NewPartitions(total_count=3)})
    finally:
      admin.close()
    produce(kafka_bootstrap, topic,
            [(f'b{i}'.encode(), b'y', 1 + i % 2) for i in range(10)])
    copied = consume_all(kafka_bootstrap, out, expected=15, timeout_s=60)
  finally:
    result.cancel()
  got = collections.Counter((m.key.decode(), m.value.decode())
                            for m in copied)
  assert got == collections.Counter(
      [(f'a{i}', '0:x') for i in range(5)] +
      [(f'b{i}', f'{1 + i % 2}:y') for i in range(10)])


def test_restart_with_the_same_group_loses_nothing(
    kafka_bootstrap, kafka_topic, taxi_events):
  """Kill -9 a streaming copy job mid-topic; a restart resumes the group."""
  source, sink = kafka_topic(partitions=2), kafka_topic(suffix='copy')
  events = taxi_events[:240]
  replay.replay(TAXI, events, source, kafka_bootstrap)
  group = f'{source}-group'
  job = [sys.executable, '-m', 'tests.kafka_copy_job',
         '--runner=DirectRunner', '--streaming',
         f'--bootstrap_servers={kafka_bootstrap}', f'--source={source}',
         f'--sink={sink}', f'--group_id={group}', '--sleep_ms=20']
  proc = subprocess.Popen(job, cwd=REPO, start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    copied = consume_all(kafka_bootstrap, sink, expected=60, timeout_s=120)
    assert len(copied) >= 60, proc.stderr.read().decode()[-3000:]
  finally:
    os.killpg(proc.pid, signal.SIGKILL)  # a crash: no cleanup, no drain
    proc.wait()
  committed = [offset or 0 for offset in committed_offsets(
      kafka_bootstrap, group, source, (0, 1))]
  assert 0 < sum(committed) < len(events), committed  # killed mid-topic

  with beam.Pipeline(options=direct_options()) as p:
    _ = (p
         | 'ResumeGroup' >> kafka_io.ReadFromKafka(
             kafka_bootstrap, source, group_id=group, bounded=True)
         | 'KeyValue' >> beam.Map(lambda r: (r.key, r.value))
         | 'WriteCopy' >> kafka_io.WriteToKafka(kafka_bootstrap, sink))
  keys = collections.Counter(
      m.key.decode() for m in consume_all(kafka_bootstrap, sink))
  assert set(keys) == {eid for eid, _ in events}  # none lost
  # At least once: only what was read after the last commit is repeated.
  assert sum(keys.values()) - len(events) <= len(events) - sum(committed)


@pytest.mark.parametrize('batches', [False, True],
                         ids=['per-record', 'poll-batches'])
def test_malformed_records_go_to_the_dead_letter_topic(
    kafka_bootstrap, kafka_topic, taxi_events, batches):
  """Per record, and as serving reads (one ``KafkaBatch`` per poll): the
  good records of a poll stay together, each bad one is a dead letter."""
  topic, dlq = kafka_topic(partitions=2), kafka_topic(suffix='dlq')
  good = [(eid.encode(), json.dumps(e).encode()) for eid, e in taxi_events[:20]]
  trip = dict(taxi_events[0][1])
  bad = {
      b'bad-json': b'{"fare": 12.5,',
      b'garbage': bytes(range(256)),
      b'wrong-type': json.dumps({**trip, 'fare': '12.5'}).encode(),
      b'missing': json.dumps({'fare': 3.0}).encode(),
      b'not-object': b'[1, 2, 3]',
      b'nan': json.dumps({**trip, 'trip_miles': float('nan')}).encode(),
      b'out-of-domain': json.dumps({**trip, 'trip_start_hour': 25}).encode(),
      b'tombstone': None,
  }
  produce(kafka_bootstrap, topic, good + list(bad.items()))

  with beam.Pipeline(options=direct_options()) as p:
    decoded = (p
               | 'ReadTrips' >> kafka_io.ReadFromKafka(
                   kafka_bootstrap, topic, bounded=True, batches=batches)
               | 'DecodeTrips' >> decode.DecodeEvents(TAXI, with_keys=True,
                                                      batches=batches))
    records = (decoded.records | 'Unbatch' >> beam.FlatMap(lambda b: b)
               if batches else decoded.records)
    assert_that(records | 'Keys' >> beam.Map(lambda kv: kv[0]),
                equal_to([k.decode() for k, _ in good]))
    _ = decoded.dead_letters | 'WriteDeadLetters' >> kafka_io.WriteDeadLetters(
        kafka_bootstrap, dlq)
  result = p.result
  assert counter(result, 'events_decoded') == len(good)
  assert counter(result, 'events_dead_lettered') == len(bad)

  letters = {json.loads(m.value)['key']: json.loads(m.value)
             for m in consume_all(kafka_bootstrap, dlq, expected=len(bad))}
  assert set(letters) == {k.decode() for k in bad}
  for key, value in bad.items():
    letter = letters[key.decode()]
    assert letter['topic'] == topic and letter['errors'], letter
    assert kafka_io.original_bytes(letter) == value
  reasons = {k: {(e['field'], e['reason']) for e in v['errors']}
             for k, v in letters.items()}
  assert ('fare', 'expected a number, got str') in reasons['wrong-type']
  assert ('trip_miles', 'not a finite number') in reasons['nan']
  assert ('trip_start_hour',
          'out of domain [0, 23]') in reasons['out-of-domain']
  assert ('payment_type', 'missing') in reasons['missing']
  assert ('*', 'expected an object') in reasons['not-object']
  assert ('*', 'null value (tombstone)') in reasons['tombstone']
  assert all(r.startswith('not JSON') for _, r in reasons['garbage'])
  assert all(r.startswith('not JSON') for _, r in reasons['bad-json'])


def test_write_to_kafka_routes_records_kafka_refuses(kafka_bootstrap,
                                                    kafka_topic):
  """No silent drops and no failed job: a record the broker refuses for
  good, or one that cannot be encoded, comes out as ``Unwritable``."""
  topic = kafka_topic()
  from runners.kafka import create_topic
  small = topic + '-small'
  create_topic(kafka_bootstrap, small, 1, config={'max.message.bytes': '1024'})
  with beam.Pipeline(options=direct_options()) as p:
    _ = (p
         | 'Rows' >> beam.Create([('a', {'n': 1}), (b'b', b'raw'), ('c', 'x'),
                                  ('nan', {'x': float('nan'), 'y': [1.0]})])
         | 'Write' >> kafka_io.WriteToKafka(kafka_bootstrap, topic))
  got = {m.key: m.value for m in consume_all(kafka_bootstrap, topic, 4)}
  assert got == {b'a': b'{"n":1}', b'b': b'raw', b'c': b'x',
                 b'nan': b'{"x":null,"y":[1.0]}'}
  with beam.Pipeline(options=direct_options()) as p:
    unwritable = (
        p
        | 'Rows' >> beam.Create([('ok', 'small'), ('big', 'x' * 5000),
                                 ('huge', 'y' * 2_000_000),
                                 ('odd', object())])
        | 'Write' >> kafka_io.WriteToKafka(kafka_bootstrap, small))
    assert_that(unwritable | beam.Map(lambda u: (u.key, u.reason.split(':')[0])),
                equal_to([('big', 'refused by Kafka'),
                          ('huge', 'too large for Kafka'),
                          ('odd', 'cannot encode')]))
  got = {m.key: m.value for m in consume_all(kafka_bootstrap, small, 1)}
  assert got == {b'ok': b'small'}


def test_write_transactionally_dead_letters_what_kafka_cannot_take(
    kafka_bootstrap, kafka_topic):
  """Outputs and their offsets in one transaction; an output too large for
  Kafka becomes a dead letter naming its source, in the same transaction."""
  out, dlq, source = kafka_topic(), kafka_topic(), kafka_topic()
  group = f'tx-{source}'
  with beam.Pipeline(options=direct_options()) as p:
    _ = (p
         | 'Outputs' >> beam.Create([
             kafka_io.Output(out, 'a', {'n': 1}, (source, 0, 4)),
             kafka_io.Output(out, 'big', 'x' * 2_000_000, (source, 0, 5))])
         | 'Write' >> kafka_io.WriteTransactionally(kafka_bootstrap, group, dlq))
  got = consume_all(kafka_bootstrap, out, 1,
                    isolation_level='read_committed')
  assert [(m.key, m.value) for m in got] == [(b'a', b'{"n":1}')]
  letter, = [json.loads(m.value) for m in consume_all(
      kafka_bootstrap, dlq, 1, isolation_level='read_committed')]
  assert (letter['topic'], letter['partition'], letter['offset']) == (
      source, 0, 5)
  assert letter['stage'] == 'WriteTransactionally'
  assert letter['errors'][0]['reason'].startswith(f'writing to {out!r}')
  assert committed_offsets(kafka_bootstrap, group, source, (0,)) == [6]


def test_a_bundle_that_died_mid_transaction_is_never_committed(
    kafka_bootstrap, kafka_topic):
  """A bundle fails after sending (no finish_bundle) and the runner reuses
  the writer for its retry: the dead bundle's records are aborted, the
  retry's committed, with its offsets."""
  from transforms.kafka_io.transactions import _TransactionalWriteFn
  out, dlq, source = kafka_topic(), kafka_topic(), kafka_topic()
  group = f'tx-{source}'
  writer = _TransactionalWriteFn(kafka_bootstrap, group, dlq, {}, 60.0)
  writer.setup()
  try:
    writer.start_bundle()
    writer.process(kafka_io.Output(out, 'dead', 'x', (source, 0, 7)))
    writer.start_bundle()  # the retry, on the same instance
    writer.process(kafka_io.Output(out, 'retry', 'y', (source, 0, 7)))
    writer.finish_bundle()
  finally:
    writer.teardown()
  got = consume_all(kafka_bootstrap, out, isolation_level='read_committed')
  assert [m.key for m in got] == [b'retry']
  assert committed_offsets(kafka_bootstrap, group, source, (0,)) == [8]


def test_the_writers_of_one_bundle_commit_one_transaction(
    kafka_bootstrap, kafka_topic):
  """Predictions and dead letters have one writer each in the read's fused
  stage: a bundle's writers share one transaction, committed (with the
  offsets all of them saw) when the last one finishes; a bundle in which one
  writer died is committed by none, and its retry is."""
  from transforms.kafka_io.transactions import _TransactionalWriteFn
  out, dlq, source = kafka_topic(), kafka_topic(), kafka_topic()
  group = f'tx-{source}'
  writers = [_TransactionalWriteFn(kafka_bootstrap, group, dlq, {}, 60.0)
             for _ in range(2)]
  for writer in writers:
    writer.setup()
  try:
    for writer in writers:
      writer.start_bundle()
    writers[0].process(kafka_io.Output(out, 'dead', 'x', (source, 0, 0)))
    writers[1].process(kafka_io.Output(dlq, 'dead', 'y', (source, 0, 1)))
    writers[0].finish_bundle()  # the other writer dies: no finish_bundle
    for writer in writers:  # the retry, on the same instances
      writer.start_bundle()
    writers[0].process(kafka_io.Output(out, 'retry', 'x', (source, 0, 0)))
    writers[1].process(kafka_io.Output(dlq, 'retry', 'y', (source, 0, 1)))
    writers[1].finish_bundle()
    assert committed_offsets(kafka_bootstrap, group, source, (0,)) == [None]
    writers[0].finish_bundle()
  finally:
    for writer in writers:
      writer.teardown()
  for topic in (out, dlq):
    got = consume_all(kafka_bootstrap, topic, isolation_level='read_committed')
    assert [m.key for m in got] == [b'retry']
  assert committed_offsets(kafka_bootstrap, group, source, (0,)) == [2]


def test_secrets_are_references_resolved_where_the_client_is_made(
    tmp_path, monkeypatch):
  from transforms.kafka_io import clients
  secret = tmp_path / 'password'
  secret.write_text('from-a-file\n')
  monkeypatch.setenv('RTML_TEST_KAFKA_PASSWORD', 'from-the-env')
  config = {'sasl_plain_username': 'rtml',
            'sasl_plain_password': 'env:RTML_TEST_KAFKA_PASSWORD',
            'ssl_password': f'file:{secret}', 'retries': 3}
  assert clients.resolve_secrets(config) == {
      'sasl_plain_username': 'rtml', 'sasl_plain_password': 'from-the-env',
      'ssl_password': 'from-a-file', 'retries': 3}
  monkeypatch.delenv('RTML_TEST_KAFKA_PASSWORD')
  with pytest.raises(KeyError, match='RTML_TEST_KAFKA_PASSWORD'):
    clients.resolve_secrets(config)


def test_topics_command_creates_missing_topics_and_keeps_existing_ones(
    kafka_bootstrap, kafka_topic):
  """``python -m runners.kafka topics``: what a job's inputs need first."""
  import uuid
  from runners.kafka.__main__ import main
  existing = kafka_topic(partitions=1)
  new = f'topics-command-{uuid.uuid4().hex[:8]}'
  assert main(['topics', f'{new}:3', f'{existing}:5',
               '--bootstrap_servers', kafka_bootstrap]) == 0
  consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
  try:
    assert consumer.partitions_for_topic(new) == {0, 1, 2}
    assert consumer.partitions_for_topic(existing) == {0}
  finally:
    consumer.close()
