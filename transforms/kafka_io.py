"""A Python-native Kafka source and sink for Beam, built on kafka-python.

Why not ``apache_beam.io.kafka``: that is a cross-language transform that
needs a Java expansion service and a Java SDK harness on every worker. This
module is plain Python (a splittable ``DoFn`` plus a producer ``DoFn``), so it
runs unchanged on the DirectRunner, Prism, Flink (portable) and Dataflow.

Reading (``ReadFromKafka``)::

    Impulse -> DiscoverPartitions -> Reshuffle -> ReadPartitions (SDF)

One element per (topic, partition) carries the start offset resolved at launch
(explicit offsets, a start timestamp, the group's committed offset, or
``auto_offset_reset``) and an optional stop offset (explicit, a stop
timestamp, or the end offsets at launch when ``bounded=True``). Its
restriction is an ``OffsetRange`` of offsets: ``[start, 2**63-1)`` when
unbounded. The reader polls, claims each offset, and checkpoints
(``defer_remainder``) when nothing arrived within ``poll_timeout_s`` or after
``checkpoint_interval_s`` of reading, so the runner commits the output and
resumes the partition later.

Event time and watermark (per partition, see ``WatermarkPolicy``):

* each record is timestamped from ``event_time``: the Kafka record timestamp
  (``'kafka'``, default), a top-level JSON field in Unix seconds (e.g.
  ``'trip_start_timestamp'``), or any callable. A record whose event time
  cannot be read keeps its Kafka timestamp and is counted
  (``event_time_fallback``); it is decoded (and dead-lettered) downstream.
* watermark = max event time seen in the partition - ``max_out_of_orderness_s``
  (never moves backwards). Records older than the watermark are *late*: they
  are still emitted with their own timestamp and windowing decides (allowed
  lateness, late panes, a late output) - the source never drops or retimes
  them.
* an idle partition - caught up with the log end and no record for
  ``idle_timeout_s`` of wall time - advances its watermark to
  ``wall clock - max_out_of_orderness_s``, like Java KafkaIO's
  ``withCreateTime(maxDelay)``: without that, an empty or quiet partition
  would hold the pipeline watermark (the minimum over partitions) forever.
  This assumes new records carry event times near wall-clock time. When
  replaying *historical* data keep producers busy (a pause longer than
  ``idle_timeout_s`` makes the rest of the replay late) or pass
  ``idle_timeout_s=None`` (then an idle partition holds the watermark at its
  last max - bound until it receives data).
* event times more than ``max_future_s`` ahead of the wall clock are emitted
  but do not advance the watermark (``event_time_in_future``): one corrupt
  timestamp must not make every later record late.
* each partition reports min(its watermark, the other partitions' in this
  worker) - see ``PeerWatermarks``: Prism, the DirectRunner's engine, takes a
  splittable stage's watermark from the last bundle only.
* runners: Prism (tested), Dataflow and Flink follow these per-partition
  watermarks while reading. The FnApiRunner (the DirectRunner when Prism is
  unavailable) runs stage after stage: windows fire when a bounded read
  ends, and an unbounded read never returns from ``run()``. The
  BundleBasedDirectRunner holds the watermark until the read ends.

Delivery: with a ``group_id`` (and ``commit_offsets=True``) a restarted
pipeline resumes from the group's committed offsets. An offset is committed
only after the runner has committed the bundle that read the records before
it: in a bundle-finalization callback (``DoFn.BundleFinalizerParam``; the
FnApiRunner and Prism call it - tested - as does Dataflow) and, for runners
that never finalize bundles (the Python BundleBasedDirectRunner), when a
checkpointed partition is resumed (the residual only exists once the bundle
before it is committed). This is at-least-once: records read after the last
commit are read again after a restart (``tests/test_kafka_io.py`` kills a
job with SIGKILL and checks none is lost). Records a runner holds in memory
downstream (e.g. an unfired window on Prism or the DirectRunner) are only as
durable as that runner: a cancelled in-memory job loses them although their
offsets are committed, so keep the sink in the same fused stage as the read
(as ``WriteToKafka`` and the dead-letter path do) when the runner's state is
not durable. Offsets are committed with the simple (generation-less) commit
API, so do not share the group id with subscribing consumers.

Writing (``WriteToKafka``): ``(key, value)`` pairs, value a dict/list (JSON),
``str`` or ``bytes``; idempotent producer with ``acks='all'``; each bundle
flushes in ``finish_bundle`` and fails (to be retried by the runner) if any
record was not acknowledged, so an acknowledged bundle never lost a record.

Dead letters (``DecodeEvents``): ``KafkaRecord`` -> ``records.Record`` via
``records.parse_json_bytes``; anything that fails goes to the
``dead_letters`` output as a JSON-ready dict (``dead_letter``) with the
reasons. ``WriteDeadLetters`` writes them to a topic.

Security: ``consumer_config`` / ``producer_config`` are passed to kafka-python
as is, e.g. ``{'security_protocol': 'SASL_SSL', 'sasl_mechanism':
'SCRAM-SHA-512', 'sasl_plain_username': ..., 'sasl_plain_password': ...,
'ssl_cafile': '/path/ca.pem'}``. They are pickled with the pipeline: pass file
paths, not ``ssl_context`` objects, and keep secrets out of logs.

Example::

    events = (p
              | 'ReadTrips' >> kafka_io.ReadFromKafka(
                  'broker:9092', ['trips'], group_id='serve',
                  event_time=features.EVENT_TIME_KEY)
              | 'DecodeTrips' >> kafka_io.DecodeEvents())
    events.dead_letters | 'WriteDeadLetters' >> kafka_io.WriteDeadLetters(
        'broker:9092', 'trips-dead-letters')
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import logging
import math
import os
import threading
import time
import uuid
from typing import (Any, Callable, Iterable, Iterator, Mapping, NamedTuple,
                    Optional, Sequence, Union)

import apache_beam as beam
from apache_beam.io.iobase import WatermarkEstimator
from apache_beam.io.restriction_trackers import (OffsetRange,
                                                 OffsetRestrictionTracker)
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import (KafkaStreamsRunnerOptions,
                                                  PipelineOptions)
from apache_beam.transforms.core import (RestrictionProvider,
                                         WatermarkEstimatorProvider)
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import (MAX_TIMESTAMP, MIN_TIMESTAMP,
                                         Duration, Timestamp)
from apache_beam.utils.windowed_value import WindowedValue


_LOGGER = logging.getLogger(__name__)

METRICS_NAMESPACE = 'rtml.kafka'
# Restriction end of an unbounded partition: offsets never get near it.
UNBOUNDED_STOP = 2**63 - 1
# Event times outside [1970, 9999] cannot be real and are not Beam-safe.
_MAX_EVENT_SECONDS = 253402300799
_MAX_EVENT_MS = _MAX_EVENT_SECONDS * 1000
_BEAM_DEFAULT_BOOTSTRAP = 'localhost:9092'
_GLOBAL_WINDOWS = (GlobalWindow(),)


class KafkaRecord(NamedTuple):
  """One Kafka message, as the source emits it (value not decoded)."""
  topic: str
  partition: int
  offset: int
  key: Optional[bytes]
  value: Optional[bytes]
  timestamp_ms: int


beam.coders.registry.register_coder(KafkaRecord, beam.coders.RowCoder)
# Builds a KafkaRecord from a tuple without NamedTuple.__new__'s argument
# handling: the reader makes one per message.
_new_record = functools.partial(tuple.__new__, KafkaRecord)


def bootstrap_servers(options: PipelineOptions) -> str:
  """The brokers a pipeline uses: Beam's own ``--bootstrap_servers`` flag.

  Beam already defines ``--bootstrap_servers`` (in
  ``KafkaStreamsRunnerOptions``, default ``localhost:9092``), so pipeline
  options cannot declare a flag of that name; they read it here. When the
  flag is left at its default, ``$KAFKA_BOOTSTRAP_SERVERS`` wins if set.
  """
  flag = options.view_as(KafkaStreamsRunnerOptions).bootstrap_servers
  if flag == _BEAM_DEFAULT_BOOTSTRAP and os.environ.get(
      'KAFKA_BOOTSTRAP_SERVERS'):
    return os.environ['KAFKA_BOOTSTRAP_SERVERS']
  return flag


class KafkaOptions(PipelineOptions):
  """The Kafka flags every pipeline of the project shares.

  Declared once, here: Beam parses the flags of every registered options
  class together, and argparse rejects a flag declared twice, so a pipeline
  that redeclared ``--input_topic`` could not be imported next to another.
  Defaults marked "per pipeline" are filled in by each pipeline.
  """

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--input_topic', default='trips',
                        help='Topic of raw JSON trip events.')
    parser.add_argument('--output_topic', default=None,
                        help='Topic the job writes (default per pipeline).')
    parser.add_argument('--dead_letter_topic', default='trips-dlq',
                        help='Topic of events that failed, with reasons.')
    parser.add_argument('--group_id', default=None,
                        help='Consumer group whose committed offsets a '
                        'restarted job resumes from (default per pipeline).')
    parser.add_argument('--start', choices=['earliest', 'latest'],
                        default='earliest',
                        help='Where to start without a committed offset.')
    parser.add_argument('--max_out_of_orderness', type=float, default=None,
                        help='Seconds: a partition\'s watermark is the max '
                        'event time seen minus this (default per pipeline).')
    parser.add_argument('--consumer_config', type=json.loads, default={},
                        help='JSON of extra kafka-python consumer settings '
                        '(security_protocol, sasl_*, ssl_*...).')
    parser.add_argument('--producer_config', type=json.loads, default={},
                        help='JSON of extra kafka-python producer settings.')


# ---------------------------------------------------------------- event time

class JsonFieldEventTime:
  """Event time from a top-level JSON field of the value, in seconds.

  Args:
    field: e.g. ``features.EVENT_TIME_KEY`` ('trip_start_timestamp').
    unit_seconds: seconds per unit of the field (0.001 for milliseconds).
  """

  def __init__(self, field: str, unit_seconds: float = 1.0):
    self.field = field
    self.unit_seconds = unit_seconds

  def __call__(self, record: KafkaRecord) -> float | None:
    try:
      value = json.loads(record.value)[self.field]
    except (TypeError, ValueError, KeyError, IndexError):
      return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return None
    return value * self.unit_seconds


def kafka_timestamp(record: KafkaRecord) -> float | None:
  """Event time = the Kafka record timestamp (CreateTime or LogAppendTime)."""
  return record.timestamp_ms / 1000.0 if record.timestamp_ms >= 0 else None


EventTimeFn = Callable[[KafkaRecord], Optional[float]]


def event_time_fn(event_time: Union[str, EventTimeFn]) -> EventTimeFn:
  """'kafka' -> Kafka timestamp; another string -> JSON field in seconds."""
  if callable(event_time):
    return event_time
  if event_time == 'kafka':
    return kafka_timestamp
  return JsonFieldEventTime(event_time)


def _valid_event_seconds(seconds: Any) -> bool:
  return (isinstance(seconds, (int, float)) and math.isfinite(seconds) and
          0 <= seconds <= _MAX_EVENT_SECONDS)


# ----------------------------------------------------------------- watermark

@dataclasses.dataclass(frozen=True)
class WatermarkPolicy:
  """How a partition's watermark follows its records (see module docstring).

  Attributes:
    max_out_of_orderness_s: how far behind the newest event time seen in a
      partition a record may be and still be on time.
    idle_timeout_s: a caught-up partition without records for this long
      advances its watermark to wall clock - max_out_of_orderness_s; None
      disables that.
    max_future_s: event times further than this ahead of the wall clock do
      not advance the watermark.
  """
  max_out_of_orderness_s: float = 10.0
  idle_timeout_s: Optional[float] = 30.0
  max_future_s: float = 3600.0


class PeerWatermarks:
  """The watermarks of the partitions of one read in this worker process.

  Why: Prism (the DirectRunner's engine in Beam 2.7x) sets a splittable
  stage's watermark from the residuals of the *last* bundle only, instead of
  the minimum over all partitions' restrictions, so a partition ahead of the
  others would make their records late. Each partition therefore reports
  min(its own watermark, the other partitions' watermarks in this process),
  which is never later than its own: safe on every runner.

  A partition's report becomes visible to the others only when its next
  bundle starts (``resume``): its residual, hence that next bundle, exists
  only once the runner committed the bundle - and the records - behind the
  report. Entries not refreshed for ``ttl_s`` stop counting (a finished
  partition, or one moved to another worker). The partition discovery
  registers every partition (at the minimum) before any is read, when it
  runs in the same process.
  """
  # reader id -> partition -> [visible micros, pending micros, refreshed at]
  _by_reader: dict[str, dict[tuple[str, int], list]] = {}
  _lock = threading.Lock()

  def __init__(self, reader_id: str, ttl_s: float,
               clock: Callable[[], float] = time.monotonic):
    self._reader_id = reader_id
    self._ttl_s = ttl_s
    self._clock = clock

  def _entries(self) -> dict[tuple[str, int], list]:
    return self._by_reader.setdefault(self._reader_id, {})

  def register(self, partitions: Iterable[tuple[str, int]]) -> None:
    now = self._clock()
    with self._lock:
      entries = self._entries()
      for tp in partitions:
        entries[tp] = [MIN_TIMESTAMP.micros, MIN_TIMESTAMP.micros, now]

  def resume(self, tp: tuple[str, int]) -> None:
    """``tp`` starts a bundle: its previous report is committed, publish it."""
    with self._lock:
      entry = self._entries().get(tp)
      if entry is not None:
        entry[0] = entry[1]
        entry[2] = self._clock()

  def report(self, tp: tuple[str, int], micros: int) -> int:
    """Records ``tp``'s watermark (pending); returns the minimum visible
    watermark of the other live partitions (MAX if there is none)."""
    now = self._clock()
    with self._lock:
      entries = self._entries()
      entry = entries.setdefault(
          tp, [MIN_TIMESTAMP.micros, MIN_TIMESTAMP.micros, now])
      entry[1] = micros
      entry[2] = now
      return min((visible for other, (visible, _, seen) in entries.items()
                  if other != tp and now - seen <= self._ttl_s),
                 default=MAX_TIMESTAMP.micros)


class PartitionWatermarkEstimator(WatermarkEstimator):
  """Watermark of one partition: max event time - bound; idle -> wall clock.

  The SDK calls ``observe_timestamp`` with the timestamp of every record the
  reader outputs; the reader calls ``on_empty_poll`` when a poll returned
  nothing. The reported watermark is min(own, ``peers``) and never goes
  back. State (carried across checkpoints): ``(partition, watermark_micros,
  max_event_micros, last_activity_wall_s, reported_micros)``.
  """

  def __init__(self, state: tuple | None, policy: WatermarkPolicy,
               peers: Optional[PeerWatermarks] = None,
               clock: Callable[[], float] = time.time):
    self._policy = policy
    self._peers = peers
    self._clock = clock
    (self._partition, self._watermark, self._max_event, self._last_activity,
     self._reported) = state or (None, None, None, None, None)
    if self._last_activity is None:
      self._last_activity = clock()
    self._bound_micros = int(policy.max_out_of_orderness_s * 1e6)
    self._future_events = 0
    self._future_limit: Optional[int] = None

  @staticmethod
  def initial_state(partition: tuple[str, int]) -> tuple:
    return (partition, None, None, None, None)

  def begin_batch(self) -> None:
    """The reader got records: read the clock once for all of them."""
    self._last_activity = self._clock()
    self._future_limit = int(
        (self._last_activity + self._policy.max_future_s) * 1e6)

  def observe_timestamp(self, timestamp: Timestamp) -> None:
    micros = timestamp.micros
    if self._future_limit is None:  # not called by our reader: no batches
      self.begin_batch()
    if micros > self._future_limit:
      self._future_events += 1
      return
    if self._max_event is None or micros > self._max_event:
      self._max_event = micros

  def on_empty_poll(self, caught_up: bool) -> None:
    """Advances an idle, caught-up partition's watermark to the wall clock."""
    idle_timeout = self._policy.idle_timeout_s
    now = self._clock()
    if not caught_up:
      self._last_activity = now  # behind the log end: not idle, just slow
      return
    if idle_timeout is not None and now - self._last_activity >= idle_timeout:
      self._advance(int(now * 1e6) - self._bound_micros)

  def begin_read(self) -> None:
    """The reader starts a bundle of this partition (see PeerWatermarks)."""
    if self._peers is not None and self._partition is not None:
      self._peers.resume(self._partition)

  def take_future_events(self) -> int:
    """How many observed event times were too far ahead (then resets)."""
    count, self._future_events = self._future_events, 0
    return count

  def _advance(self, micros: int) -> None:
    if self._watermark is None or micros > self._watermark:
      self._watermark = micros

  def own_watermark(self) -> Timestamp:
    """This partition's watermark alone (max event time - bound, or idle)."""
    if self._max_event is not None:
      self._advance(self._max_event - self._bound_micros)
    return Timestamp(micros=max(self._watermark or MIN_TIMESTAMP.micros,
                                MIN_TIMESTAMP.micros))

  def current_watermark(self) -> Timestamp:
    candidate = self.own_watermark().micros
    if self._peers is not None and self._partition is not None:
      candidate = min(candidate,
                      self._peers.report(self._partition, candidate))
    if self._reported is None or candidate > self._reported:
      self._reported = candidate
    return Timestamp(micros=self._reported)

  def get_estimator_state(self) -> tuple:
    self.current_watermark()
    return (self._partition, self._watermark, self._max_event,
            self._last_activity, self._reported)


# ------------------------------------------------------------ offsets, config

@dataclasses.dataclass(frozen=True)
class _ReadConfig:
  bootstrap_servers: str
  topics: tuple[str, ...]
  partitions: Optional[tuple[tuple[str, int], ...]]
  group_id: Optional[str]
  commit_offsets: bool
  auto_offset_reset: str
  start_offsets: Optional[Mapping[tuple[str, int], int]]
  start_timestamp_ms: Optional[int]
  stop_offsets: Optional[Mapping[tuple[str, int], int]]
  stop_timestamp_ms: Optional[int]
  bounded: bool
  event_time: Any
  watermark: WatermarkPolicy
  poll_timeout_s: float
  resume_delay_s: float
  checkpoint_interval_s: float
  max_poll_records: int
  consumer_config: Mapping[str, Any]
  metrics_namespace: str
  reader_id: str  # unique per ReadFromKafka: keys its PeerWatermarks

  @property
  def commits(self) -> bool:
    return bool(self.group_id) and self.commit_offsets

  @property
  def finite(self) -> bool:
    return (self.bounded or self.stop_offsets is not None or
            self.stop_timestamp_ms is not None)

  def consumer(self, defaults: Optional[Mapping[str, Any]] = None,
               **overrides) -> Any:
    """A kafka-python consumer that never joins a group or auto-commits.

    Precedence: ``overrides`` > ``consumer_config`` > ``defaults``.
    """
    from kafka import KafkaConsumer
    config = {
        'bootstrap_servers': self.bootstrap_servers,
        'enable_auto_commit': False,
        'client_id': 'rtml-beam-reader',
    }
    config.update(defaults or {})
    config.update(self.consumer_config)
    config.update(overrides)
    return KafkaConsumer(**config)


def _per_partition(value: Any, tp: tuple[str, int]) -> Optional[int]:
  if value is None:
    return None
  if isinstance(value, Mapping):
    return value.get(tp)
  return int(value)


def resolve_partitions(config: _ReadConfig) -> list[tuple[str, int, int, int]]:
  """(topic, partition, start offset, stop offset) for every partition.

  Runs once at pipeline launch (in the ``DiscoverPartitions`` step). The
  stop offset is ``UNBOUNDED_STOP`` for an unbounded read.
  """
  from kafka import TopicPartition
  consumer = config.consumer(group_id=config.group_id,
                             client_id='rtml-beam-discovery')
  try:
    if config.partitions is not None:
      tps = [TopicPartition(t, p) for t, p in config.partitions]
    else:
      tps = []
      for topic in config.topics:
        found = _wait_for_partitions(consumer, topic)
        tps.extend(TopicPartition(topic, p) for p in sorted(found))
    beginning = consumer.beginning_offsets(tps)
    end = consumer.end_offsets(tps)
    committed = {}
    if config.group_id:
      for tp in tps:
        committed[tp] = consumer.committed(tp)
    start_times = stop_times = {}
    if config.start_timestamp_ms is not None:
      start_times = consumer.offsets_for_times(
          {tp: config.start_timestamp_ms for tp in tps})
    if config.stop_timestamp_ms is not None:
      stop_times = consumer.offsets_for_times(
          {tp: config.stop_timestamp_ms for tp in tps})
  finally:
    consumer.close()

  specs = []
  for tp in tps:
    key = (tp.topic, tp.partition)
    start = _per_partition(config.start_offsets, key)
    if start is None and config.start_timestamp_ms is not None:
      found = start_times.get(tp)
      start = found.offset if found is not None else end[tp]
    if start is None and committed.get(tp) is not None:
      start = committed[tp]
    if start is None:
      start = (beginning[tp] if config.auto_offset_reset == 'earliest'
               else end[tp])
    start = max(start, beginning[tp])  # older records were deleted
    stop = _per_partition(config.stop_offsets, key)
    if stop is None and config.stop_timestamp_ms is not None:
      found = stop_times.get(tp)
      stop = found.offset if found is not None else end[tp]
    if stop is None and config.bounded:
      stop = end[tp]
    if stop is None:
      stop = UNBOUNDED_STOP
    specs.append((tp.topic, tp.partition, start, max(start, stop)))
  return specs


def _wait_for_partitions(consumer: Any, topic: str,
                         timeout_s: float = 30.0) -> set[int]:
  deadline = time.monotonic() + timeout_s
  while True:
    found = consumer.partitions_for_topic(topic)
    if found:
      return found
    if time.monotonic() > deadline:
      raise ValueError(f'Kafka topic {topic!r} does not exist (or has no '
                       f'partitions) on {consumer.config["bootstrap_servers"]}')
    time.sleep(0.2)


def _peers(config: _ReadConfig) -> PeerWatermarks:
  # A partition reports at least every poll + checkpoint; allow for slow
  # scheduling before a silent partition stops holding the others back.
  ttl = max(60.0, 20 * (config.poll_timeout_s + config.checkpoint_interval_s +
                        config.resume_delay_s))
  return PeerWatermarks(config.reader_id, ttl)


class _OffsetCommitter:
  """Commits group offsets; one per (brokers, group) per worker process.

  Commits only move forward, so a late finalization callback cannot rewind
  a partition that a later bundle already committed further.
  """
  _instances: dict[tuple, '_OffsetCommitter'] = {}
  _instances_lock = threading.Lock()

  def __init__(self, config: _ReadConfig):
    self._config = config
    self._consumer = None
    self._committed: dict[tuple[str, int], int] = {}
    self._lock = threading.Lock()

  @classmethod
  def get(cls, config: _ReadConfig) -> '_OffsetCommitter':
    key = (config.bootstrap_servers, config.group_id,
           json.dumps(config.consumer_config, sort_keys=True, default=repr))
    with cls._instances_lock:
      if key not in cls._instances:
        cls._instances[key] = cls(config)
      return cls._instances[key]

  @classmethod
  def close_all(cls) -> None:
    """Closes idle commit consumers (they reconnect on the next commit)."""
    with cls._instances_lock:
      committers = list(cls._instances.values())
    for committer in committers:
      committer.close()

  def close(self) -> None:
    with self._lock:
      if self._consumer is not None:
        self._consumer.close(autocommit=False)
        self._consumer = None

  def commit(self, topic: str, partition: int, offset: int) -> bool:
    """Commits ``offset`` (the next offset to read); False if not newer."""
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata
    with self._lock:
      if self._committed.get((topic, partition), -1) >= offset:
        return False
      if self._consumer is None:
        self._consumer = self._config.consumer(
            group_id=self._config.group_id, client_id='rtml-beam-committer')
      self._consumer.commit({
          TopicPartition(topic, partition): OffsetAndMetadata(offset, '', -1)})
      self._committed[(topic, partition)] = offset
      return True


# ----------------------------------------------------------------- the source

class _PartitionOffsetTracker(OffsetRestrictionTracker):
  """Offsets of one partition, split only to checkpoint.

  A fractional split of ``[n, 2**63-1)`` would invent offsets far beyond the
  log; sub-ranges of one partition read in parallel could commit a later
  offset before an earlier range finished, and would break the one bundle
  after another order ``PeerWatermarks`` relies on. Kafka's unit of
  parallelism is the partition, so ranges only accept checkpoints
  (``fraction_of_remainder == 0``).
  """

  def try_split(self, fraction_of_remainder):
    if fraction_of_remainder > 0:
      return None
    return super().try_split(fraction_of_remainder)

  def is_bounded(self) -> bool:
    return self.current_restriction().stop != UNBOUNDED_STOP


class _DiscoverPartitions(beam.DoFn):

  def __init__(self, config: _ReadConfig):
    self._config = config

  def process(self, unused_impulse) -> Iterator[tuple[str, int, int, int]]:
    specs = resolve_partitions(self._config)
    _LOGGER.info('Reading %d Kafka partitions: %s', len(specs), specs)
    _peers(self._config).register((t, p) for t, p, _, _ in specs)
    yield from specs


@dataclasses.dataclass
class _ReadProgress:
  next_offset: int
  emitted: int = 0
  fallbacks: int = 0


class _ReadPartitionsFn(beam.DoFn, RestrictionProvider,
                        WatermarkEstimatorProvider):
  """Reads the offsets of one partition (element: topic, partition, start,
  stop) as ``KafkaRecord``s, timestamped by event time."""

  # Consumers kept per DoFn instance, by partition: a resumed partition
  # usually finds its consumer positioned with records prefetched.
  MAX_CONSUMERS = 32

  def __init__(self, config: _ReadConfig):
    self._config = config
    self._event_time = event_time_fn(config.event_time)
    ns = config.metrics_namespace
    self._records = Metrics.counter(ns, 'records_read')
    self._fallbacks = Metrics.counter(ns, 'event_time_fallback')
    self._future = Metrics.counter(ns, 'event_time_in_future')
    self._commit_failures = Metrics.counter(ns, 'offset_commit_failures')
    self._consumers: dict[tuple[str, int], Any] = {}
    self._leftovers: dict[tuple[str, int], list] = {}

  # RestrictionProvider
  def initial_restriction(self, element) -> OffsetRange:
    _, _, start, stop = element
    return OffsetRange(start, stop)

  def create_tracker(self, restriction) -> _PartitionOffsetTracker:
    return _PartitionOffsetTracker(restriction)

  def restriction_size(self, element, restriction) -> float:
    if restriction.stop != UNBOUNDED_STOP:
      return max(0, restriction.stop - restriction.start)
    consumer = self._consumers.get((element[0], element[1]))
    if consumer is not None:  # backlog from the last fetch, best effort
      from kafka import TopicPartition
      high = consumer.highwater(TopicPartition(element[0], element[1]))
      if high is not None:
        return max(0, high - restriction.start)
    return 1

  # WatermarkEstimatorProvider
  def initial_estimator_state(self, element, restriction):
    return PartitionWatermarkEstimator.initial_state((element[0], element[1]))

  def create_watermark_estimator(self, estimator_state):
    return PartitionWatermarkEstimator(
        estimator_state, self._config.watermark, _peers(self._config))

  def setup(self):
    self._consumers = {}
    self._leftovers = {}

  def teardown(self):
    self._leftovers = {}
    for consumer in self._consumers.values():
      try:
        consumer.close(autocommit=False)
      except Exception:  # pylint: disable=broad-except
        pass
    self._consumers = {}
    if self._config.commits:
      _OffsetCommitter.close_all()

  def _consumer_at(self, topic: str, partition: int, offset: int) -> Any:
    from kafka import TopicPartition
    tp = TopicPartition(topic, partition)
    consumer = self._consumers.get((topic, partition))
    if consumer is None:
      if len(self._consumers) >= self.MAX_CONSUMERS:
        _, oldest = self._consumers.popitem()
        oldest.close(autocommit=False)
      consumer = self._config.consumer(
          # kafka-python sleeps retry_backoff_ms whenever a poll finds
          # nothing in flight (e.g. the first polls of a new consumer).
          defaults={'retry_backoff_ms': 20},
          group_id=None, auto_offset_reset='earliest',
          max_poll_records=self._config.max_poll_records)
      consumer.assign([tp])
      consumer.seek(tp, offset)
      self._consumers[(topic, partition)] = consumer
    elif consumer.position(tp) != offset:
      consumer.seek(tp, offset)
    return consumer

  def process(self, element, tracker=beam.DoFn.RestrictionParam(),
              watermark=beam.DoFn.WatermarkEstimatorParam()):
    yield from self._read(element, tracker, watermark, None)

  def _read(self, element, tracker, watermark, finalizer):
    """Reads from the restriction's start until it ends or checkpoints."""
    topic, partition, initial_start, _ = element
    restriction = tracker.current_restriction()
    committer = (_OffsetCommitter.get(self._config)
                 if self._config.commits else None)
    if committer and restriction.start > initial_start:
      # Resumed from a checkpoint: the bundle that read everything before
      # `start` is committed (works where bundles are never finalized).
      self._commit(committer, topic, partition, restriction.start)
    watermark.begin_read()
    progress = _ReadProgress(next_offset=restriction.start)
    try:
      yield from self._poll(topic, partition, tracker, watermark, progress)
    finally:
      self._records.inc(progress.emitted)
      if progress.fallbacks:
        self._fallbacks.inc(progress.fallbacks)
      future = watermark.take_future_events()
      if future:
        self._future.inc(future)
    if finalizer is not None:
      # Only reached when the read ended normally. Registered for every
      # bundle (Prism finalizes them all); commits only move forward.
      finalizer.register(functools.partial(
          self._commit, committer, topic, partition, progress.next_offset))

  def _poll(self, topic: str, partition: int, tracker, watermark,
            progress: '_ReadProgress') -> Iterator[WindowedValue]:
    from kafka import TopicPartition
    config = self._config
    restriction = tracker.current_restriction()
    tp = TopicPartition(topic, partition)
    batch = self._take_leftover(topic, partition, restriction.start)
    consumer = self._consumer_at(
        topic, partition, batch[-1].offset + 1 if batch else restriction.start)
    event_time = self._event_time
    kafka_time = event_time is kafka_timestamp
    timeout_ms = int(config.poll_timeout_s * 1000)
    checkpoints = config.commits or not tracker.is_bounded()
    deadline = time.monotonic() + config.checkpoint_interval_s
    while True:
      if not batch:
        if consumer.position(tp) >= restriction.stop:
          # Range done (checked before polling: a poll at the end of a
          # bounded range would only wait out its timeout).
          tracker.try_claim(restriction.stop)
          return
        batch = consumer.poll(timeout_ms=timeout_ms).get(tp)
      if not batch:
        position = consumer.position(tp)
        high = consumer.highwater(tp)
        watermark.on_empty_poll(high is not None and position >= high)
        tracker.defer_remainder(Duration.of(config.resume_delay_s))
        return
      watermark.begin_batch()
      for i, msg in enumerate(batch):
        if not tracker.try_claim(msg.offset):
          return
        record = _new_record((msg.topic, msg.partition, msg.offset, msg.key,
                              msg.value, msg.timestamp))
        if kafka_time and 0 <= msg.timestamp <= _MAX_EVENT_MS:
          seconds = msg.timestamp / 1000.0  # the common case, inlined
        else:
          seconds = event_time(record)
          if not _valid_event_seconds(seconds):
            progress.fallbacks += 1
            seconds = (msg.timestamp / 1000.0
                       if 0 <= msg.timestamp <= _MAX_EVENT_MS else time.time())
        # A WindowedValue skips the per-element window assignment of a
        # TimestampedValue: the read starts from an Impulse, in the global
        # window.
        yield WindowedValue(record, seconds, _GLOBAL_WINDOWS)
        progress.next_offset = msg.offset + 1
        progress.emitted += 1
        if checkpoints and time.monotonic() >= deadline:
          # Let the runner commit the output (and finalize: commit the
          # offsets) before reading on; keep the rest of the batch for the
          # resumed restriction (usually on this DoFn instance).
          self._leftovers[(topic, partition)] = batch[i + 1:]
          tracker.defer_remainder()
          return
      batch = None

  def _take_leftover(self, topic: str, partition: int, start: int) -> list:
    """Records fetched but not emitted before a checkpoint, if they are the
    next ones of this restriction."""
    batch = self._leftovers.pop((topic, partition), None)
    return batch if batch and batch[0].offset == start else []

  def _commit(self, committer: _OffsetCommitter, topic: str, partition: int,
              offset: int) -> None:
    try:
      committer.commit(topic, partition, offset)
    except Exception as e:  # pylint: disable=broad-except
      # A failed commit loses nothing: those records are read again later.
      self._commit_failures.inc()
      _LOGGER.warning('Committing offset %d of %s-%d failed: %s', offset,
                      topic, partition, e)


class _ReadUnboundedPartitionsFn(_ReadPartitionsFn):
  """The same reader, declaring an unbounded output (streaming)."""

  @beam.DoFn.unbounded_per_element()
  def process(self, element, tracker=beam.DoFn.RestrictionParam(),
              watermark=beam.DoFn.WatermarkEstimatorParam()):
    yield from self._read(element, tracker, watermark, None)


# Only readers that commit offsets ask for bundle finalization: Prism sends a
# FinalizeBundle for every bundle of a DoFn that declares it.
# The finalizer must precede the restriction and watermark parameters: the
# SDK passes those two by keyword and the placeholders by position.

class _CommittingReadPartitionsFn(_ReadPartitionsFn):

  def process(self, element, finalizer=beam.DoFn.BundleFinalizerParam,
              tracker=beam.DoFn.RestrictionParam(),
              watermark=beam.DoFn.WatermarkEstimatorParam()):
    yield from self._read(element, tracker, watermark, finalizer)


class _CommittingReadUnboundedPartitionsFn(_ReadPartitionsFn):

  @beam.DoFn.unbounded_per_element()
  def process(self, element, finalizer=beam.DoFn.BundleFinalizerParam,
              tracker=beam.DoFn.RestrictionParam(),
              watermark=beam.DoFn.WatermarkEstimatorParam()):
    yield from self._read(element, tracker, watermark, finalizer)


class ReadFromKafka(beam.PTransform):
  """Reads Kafka topics as ``KafkaRecord``s with event-time timestamps.

  Args:
    bootstrap_servers: 'host:port[,host:port]'.
    topics: topic names (all their partitions at launch are read).
    partitions: explicit (topic, partition) pairs instead of all partitions.
    group_id: consumer group whose committed offsets are the start offsets
      and to which offsets are committed (see module docstring).
    commit_offsets: commit offsets to ``group_id`` as bundles complete.
    auto_offset_reset: 'earliest' or 'latest': where to start a partition
      with no explicit start and no committed offset.
    start_offsets: an offset for every partition, or {(topic, partition):
      offset}; wins over everything else.
    start_timestamp_ms: start at the first record with a timestamp >= this.
    stop_offsets: stop before this offset (int or per-partition mapping).
    stop_timestamp_ms: stop before the first record with timestamp >= this
      (resolved at launch; the end offset if there is none yet).
    bounded: stop at the end offsets at launch (a batch read).
    event_time: 'kafka', a JSON field name (Unix seconds), or a callable
      ``KafkaRecord -> seconds | None``.
    watermark: the per-partition ``WatermarkPolicy``.
    poll_timeout_s: how long one poll waits for records.
    resume_delay_s: after an empty poll, when the runner resumes the
      partition.
    checkpoint_interval_s: an unbounded (or committing) read checkpoints this
      often, so output is committed and offsets are committed.
    max_poll_records: records per poll.
    consumer_config: extra kafka-python consumer settings (security...).
    decode: optional ``KafkaRecord -> value`` applied to every record.
  """

  def __init__(
      self,
      bootstrap_servers: str,
      topics: Union[str, Sequence[str]] = (),
      *,
      partitions: Optional[Sequence[tuple[str, int]]] = None,
      group_id: Optional[str] = None,
      commit_offsets: bool = True,
      auto_offset_reset: str = 'earliest',
      start_offsets: Union[int, Mapping[tuple[str, int], int], None] = None,
      start_timestamp_ms: Optional[int] = None,
      stop_offsets: Union[int, Mapping[tuple[str, int], int], None] = None,
      stop_timestamp_ms: Optional[int] = None,
      bounded: bool = False,
      event_time: Union[str, EventTimeFn] = 'kafka',
      watermark: WatermarkPolicy = WatermarkPolicy(),
      poll_timeout_s: float = 1.0,
      resume_delay_s: float = 0.0,
      checkpoint_interval_s: float = 2.0,
      max_poll_records: int = 1000,
      consumer_config: Optional[Mapping[str, Any]] = None,
      decode: Optional[Callable[[KafkaRecord], Any]] = None):
    super().__init__()
    if isinstance(topics, str):
      topics = [topics]
    if not topics and not partitions:
      raise ValueError('ReadFromKafka needs topics or partitions')
    if auto_offset_reset not in ('earliest', 'latest'):
      raise ValueError(f'auto_offset_reset must be earliest or latest, got '
                       f'{auto_offset_reset!r}')
    self._config = _ReadConfig(
        bootstrap_servers=bootstrap_servers,
        topics=tuple(topics),
        partitions=(tuple((t, int(p)) for t, p in partitions)
                    if partitions is not None else None),
        group_id=group_id,
        commit_offsets=commit_offsets,
        auto_offset_reset=auto_offset_reset,
        start_offsets=(dict(start_offsets) if isinstance(start_offsets, Mapping)
                       else start_offsets),
        start_timestamp_ms=start_timestamp_ms,
        stop_offsets=(dict(stop_offsets) if isinstance(stop_offsets, Mapping)
                      else stop_offsets),
        stop_timestamp_ms=stop_timestamp_ms,
        bounded=bounded,
        event_time=event_time,
        watermark=watermark,
        poll_timeout_s=poll_timeout_s,
        resume_delay_s=resume_delay_s,
        checkpoint_interval_s=checkpoint_interval_s,
        max_poll_records=max_poll_records,
        consumer_config=dict(consumer_config or {}),
        metrics_namespace=METRICS_NAMESPACE,
        reader_id=uuid.uuid4().hex)
    self._decode = decode

  def expand(self, pbegin):
    config = self._config
    reader_cls = {
        (True, False): _ReadPartitionsFn,
        (False, False): _ReadUnboundedPartitionsFn,
        (True, True): _CommittingReadPartitionsFn,
        (False, True): _CommittingReadUnboundedPartitionsFn,
    }[(config.finite, config.commits)]
    reader = reader_cls(config)
    read = (pbegin
            | 'Impulse' >> beam.Impulse()
            | 'DiscoverPartitions' >> beam.ParDo(_DiscoverPartitions(config))
            | 'SpreadPartitions' >> beam.Reshuffle()
            | 'ReadPartitions' >> beam.ParDo(reader).with_output_types(
                KafkaRecord))
    if self._decode is not None:
      read = read | 'DecodeRecords' >> beam.Map(self._decode)
    return read


# ------------------------------------------------------------------- the sink

def _to_bytes(value: Any) -> Optional[bytes]:
  if value is None or isinstance(value, bytes):
    return value
  if isinstance(value, str):
    return value.encode('utf-8')
  if isinstance(value, (bytearray, memoryview)):
    return bytes(value)
  return json.dumps(value, separators=(',', ':'), allow_nan=False,
                    ensure_ascii=False).encode('utf-8')


def _kafka_timestamp_ms(timestamp: Any) -> Optional[int]:
  """Kafka timestamp of an element: its event time, if it is a real one."""
  try:
    seconds = float(timestamp)
  except (TypeError, ValueError, OverflowError):
    return None
  if not _valid_event_seconds(seconds) or seconds == 0:
    return None  # e.g. MIN_TIMESTAMP of un-timestamped data: broker time
  return int(round(seconds * 1000))


class _WriteFn(beam.DoFn):
  """Sends (key, value) pairs; a bundle succeeds only if all were acked."""

  def __init__(self, bootstrap_servers: str, topic: str,
               producer_config: Mapping[str, Any], event_timestamps: bool,
               flush_timeout_s: float, metrics_namespace: str):
    self._bootstrap_servers = bootstrap_servers
    self._topic = topic
    self._producer_config = dict(producer_config)
    self._event_timestamps = event_timestamps
    self._flush_timeout_s = flush_timeout_s
    self._written = Metrics.counter(metrics_namespace, 'records_written')
    self._producer = None
    self._errors: list[BaseException] = []
    self._pending = 0
    self._completed = 0
    self._lock = None  # created in setup(): locks do not pickle

  def setup(self):
    self._lock = threading.Lock()
    self._connect()

  def _connect(self):
    from kafka import KafkaProducer
    config = {
        'bootstrap_servers': self._bootstrap_servers,
        'acks': 'all',
        'enable_idempotence': True,
        'linger_ms': 5,
        'batch_size': 256 * 1024,
        'client_id': 'rtml-beam-writer',
    }
    config.update(self._producer_config)
    self._producer = KafkaProducer(**config)

  def start_bundle(self):
    self._errors = []
    self._pending = 0
    self._completed = 0

  def _on_error(self, exc: BaseException) -> None:
    self._errors.append(exc)  # list.append is atomic; read after flush()

  def _on_done(self, _) -> None:  # on the producer's I/O thread
    with self._lock:
      self._completed += 1

  def process(self, element, timestamp=beam.DoFn.TimestampParam):
    key, value = element
    if self._producer is None:
      # Seen on Prism: an upstream finish_bundle can hand this DoFn elements
      # after its teardown. Reconnect rather than fail (and duplicate) the
      # whole bundle.
      self._connect()
    future = self._producer.send(
        self._topic, key=_to_bytes(key), value=_to_bytes(value),
        timestamp_ms=(_kafka_timestamp_ms(timestamp)
                      if self._event_timestamps else None))
    self._pending += 1
    future.add_errback(self._on_error)
    future.add_both(self._on_done)

  def finish_bundle(self):
    from kafka.errors import KafkaError, KafkaTimeoutError
    if not self._pending:
      return
    deadline = time.monotonic() + self._flush_timeout_s
    while True:
      try:
        self._producer.flush(timeout=max(0.0, deadline - time.monotonic()))
      except KafkaTimeoutError:
        pass  # reported below, with the count
      except KafkaError as e:
        raise RuntimeError(
            f'flushing records to {self._topic!r} failed ({e!r}); failing '
            'the bundle so it is retried') from e
      if self._errors:
        raise RuntimeError(
            f'{len(self._errors)} of {self._pending} records to '
            f'{self._topic!r} failed; failing the bundle so it is retried. '
            f'First error: {self._errors[0]!r}') from self._errors[0]
      with self._lock:
        completed = self._completed
      if completed >= self._pending:
        break
      # flush() waits for the batches it saw; a batch the producer split
      # (record too large for the batch) completes later: wait for it too.
      if time.monotonic() >= deadline:
        raise RuntimeError(
            f'{self._pending - completed} of {self._pending} records to '
            f'{self._topic!r} were not acknowledged within '
            f'{self._flush_timeout_s}s; failing the bundle so it is retried')
      time.sleep(0.005)
    self._written.inc(self._pending)
    self._pending = 0

  def teardown(self):
    if self._producer is not None:
      self._producer.close(timeout=self._flush_timeout_s)
      self._producer = None


class WriteToKafka(beam.PTransform):
  """Writes ``(key, value)`` pairs to a topic; at-least-once.

  Keys and values may be ``bytes``, ``str`` (UTF-8) or JSON-serializable
  objects (dicts are JSON-encoded); None stays null. The producer is
  idempotent with ``acks='all'`` and every bundle is flushed and checked in
  ``finish_bundle``: any unacknowledged record fails the bundle (the runner
  retries it, which may write duplicates - never drops).

  Args:
    bootstrap_servers: 'host:port[,host:port]'.
    topic: target topic.
    producer_config: extra kafka-python producer settings (security,
      compression...). Overrides the defaults.
    event_timestamps: Kafka timestamp = the element's event time (when it is
      a real time); else the producer's clock.
    flush_timeout_s: how long finish_bundle waits for acknowledgements.
  """

  def __init__(self, bootstrap_servers: str, topic: str, *,
               producer_config: Optional[Mapping[str, Any]] = None,
               event_timestamps: bool = True, flush_timeout_s: float = 120.0):
    super().__init__()
    self._fn = _WriteFn(bootstrap_servers, topic, producer_config or {},
                        event_timestamps, flush_timeout_s, METRICS_NAMESPACE)

  def expand(self, pcoll):
    return pcoll | 'Produce' >> beam.ParDo(self._fn)


# --------------------------------------------------------------- dead letters

def _text_and_base64(data: Optional[bytes]) -> tuple[Optional[str],
                                                     Optional[str]]:
  if data is None:
    return None, None
  return (data.decode('utf-8', errors='replace'),
          base64.b64encode(data).decode('ascii'))


def dead_letter(record: KafkaRecord, errors: Iterable[Mapping[str, Any]],
                stage: str = 'DecodeEvents') -> dict[str, Any]:
  """The JSON-ready dead letter of a record that could not be used.

  ``value``/``key`` are UTF-8 with undecodable bytes replaced (readable);
  ``value_base64``/``key_base64`` are the exact original bytes.
  """
  value, value_b64 = _text_and_base64(record.value)
  key, key_b64 = _text_and_base64(record.key)
  return {
      'topic': record.topic,
      'partition': record.partition,
      'offset': record.offset,
      'timestamp_ms': record.timestamp_ms,
      'key': key,
      'key_base64': key_b64,
      'value': value,
      'value_base64': value_b64,
      'errors': [_json_safe(dict(e)) for e in errors],
      'stage': stage,
  }


def _json_safe(error: dict[str, Any]) -> dict[str, Any]:
  try:
    json.dumps(error, allow_nan=False)
    return error
  except (TypeError, ValueError):
    return {**error, 'value': repr(error.get('value'))}


class WriteDeadLetters(beam.PTransform):
  """Writes dead-letter dicts to a topic, keyed ``topic-partition-offset``."""

  def __init__(self, bootstrap_servers: str, topic: str, *,
               producer_config: Optional[Mapping[str, Any]] = None):
    super().__init__()
    self._write = WriteToKafka(bootstrap_servers, topic,
                               producer_config=producer_config)

  def expand(self, dead_letters):
    return (dead_letters
            | 'KeyBySource' >> beam.Map(
                lambda d: (f"{d['topic']}-{d['partition']}-{d['offset']}", d))
            | 'WriteDeadLetterTopic' >> self._write)


__all__ = [
    'JsonFieldEventTime', 'KafkaRecord',
    'PartitionWatermarkEstimator', 'PeerWatermarks', 'ReadFromKafka',
    'WatermarkPolicy', 'WriteDeadLetters', 'WriteToKafka', 'bootstrap_servers',
    'dead_letter', 'event_time_fn', 'kafka_timestamp',
    'resolve_partitions',
]
