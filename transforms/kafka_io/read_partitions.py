"""The splittable DoFn of ``ReadFromKafka``: reads partitions' offsets.

Each element is one (topic, partition, start offset, stop offset) from
``partitions.resolve_partitions``. Its restriction is an ``OffsetRange`` of
offsets: ``[start, 2**63-1)`` when unbounded. The reader polls, claims each
offset, and checkpoints (``defer_remainder``) when nothing arrived within
``poll_timeout_s`` or after ``checkpoint_interval_s`` of reading, so the
runner commits the output and resumes the partition later.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from typing import Any, Iterator

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange
from apache_beam.metrics import Metrics
from apache_beam.runners.worker.statesampler import get_current_instruction_id
from apache_beam.transforms.core import (RestrictionProvider,
                                         WatermarkEstimatorProvider)
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms.kafka_io.clients import is_retriable
from transforms.kafka_io.event_time import (_MAX_EVENT_MS, event_time_fn,
                                            kafka_timestamp,
                                            safe_event_seconds)
from transforms.kafka_io.partitions import (UNBOUNDED_STOP, _OffsetCommitter,
                                            _PartitionOffsetTracker, _peers,
                                            _ReadConfig)
from transforms.kafka_io.record import KafkaBatch, _new_record
from transforms.kafka_io.watermarks import PartitionWatermarkEstimator

_LOGGER = logging.getLogger(__name__)
_GLOBAL_WINDOWS = (GlobalWindow(),)


_READS = threading.local()


def last_read_bundle():
  """The bundle (instruction id) that last read records on this thread: a
  writer fused with the read runs in the same bundle, on the same thread."""
  return getattr(_READS, 'bundle', None)


def _closed_by_teardown(error: Exception) -> bool:
  """kafka-python's error for a consumer closed while it was polled."""
  from kafka.errors import IllegalStateError
  return isinstance(error, IllegalStateError) and 'closed' in str(error)


@dataclasses.dataclass
class _ReadProgress:
  next_offset: int
  emitted: int = 0
  fallbacks: int = 0
  refused: bool = False  # the tracker refused a claim (a split)


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
    self._unreachable = Metrics.counter(ns, 'broker_unreachable')
    self._resets = Metrics.counter(ns, 'offsets_reset')
    self._outage_since: dict[tuple[str, int], float] = {}
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
    self._outage_since = {}

  def teardown(self):
    self._leftovers = {}
    # A snapshot: the runner may tear down while a bundle on another thread
    # still reads and adds or drops consumers ("dictionary changed size
    # during iteration", seen when a worker shut down during the outage test).
    consumers, self._consumers = list(self._consumers.values()), {}
    for consumer in consumers:
      try:
        consumer.close(autocommit=False)
      except Exception:  # pylint: disable=broad-except
        pass
    if self._config.commits:
      _OffsetCommitter.close_all()

  def _consumer_at(self, topic: str, partition: int, offset: int) -> Any:
    from kafka import TopicPartition
    tp = TopicPartition(topic, partition)
    consumer = self._consumers.get((topic, partition))
    if consumer is None:
      if len(self._consumers) >= self.MAX_CONSUMERS:
        oldest = next(iter(self._consumers))  # dicts keep insertion order
        self._drop_consumer(oldest)
      consumer = self._config.consumer(
          retry=False,  # an outage is waited out by checkpointing (_read)
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

  def _drop_consumer(self, partition: tuple[str, int]) -> None:
    consumer = self._consumers.pop(partition, None)
    self._leftovers.pop(partition, None)
    if consumer is not None:
      try:
        consumer.close(autocommit=False)
      except Exception:  # pylint: disable=broad-except
        pass

  def process(self, element, tracker=beam.DoFn.RestrictionParam(),
              watermark=beam.DoFn.WatermarkEstimatorParam()):
    yield from self._read(element, tracker, watermark, None)

  def _read(self, element, tracker, watermark, finalizer):
    """Reads from the restriction's start until it ends or checkpoints."""
    topic, partition, initial_start, _ = element
    _READS.bundle = get_current_instruction_id()
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
      self._outage_since.pop((topic, partition), None)
    except Exception as e:  # pylint: disable=broad-except
      if _closed_by_teardown(e):
        # The runner tore this reader down (a cancelled job, a worker being
        # shut down) while the bundle read: hand the rest back quietly.
        self._consumers.pop((topic, partition), None)
        tracker.defer_remainder(Duration.of(1.0))
        return
      if not is_retriable(e):
        raise
      # The broker is unreachable (or the partition has no leader): wait it
      # out. Everything claimed was emitted, so checkpointing here skips
      # nothing; the watermark is left alone.
      self._on_outage(topic, partition, e)
      tracker.defer_remainder(Duration.of(1.0))
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
        # Idle only if the log end is known *now*: while the leader is
        # unreachable the last highwater is stale, and an idle watermark
        # would jump to the wall clock and turn the backlog late.
        watermark.on_empty_poll(high is not None and position >= high and
                                _leader_reachable(consumer, tp))
        tracker.defer_remainder(Duration.of(config.resume_delay_s))
        return
      watermark.begin_batch()
      if config.batches:
        # One KafkaBatch per poll; the watermark sees every record's time,
        # the batch carries the earliest.
        records, seconds_of = [], []
        for _, record, seconds in self._claimed(batch, tracker, progress):
          watermark.observe_timestamp(Timestamp.of(seconds))
          records.append(record)
          seconds_of.append(seconds)
          progress.next_offset = record.offset + 1
        if records:
          progress.emitted += len(records)
          yield WindowedValue(KafkaBatch(records, seconds_of),
                              min(seconds_of), _GLOBAL_WINDOWS)
        if progress.refused:
          return  # the runner split the restriction: the rest is not ours
        if checkpoints and time.monotonic() >= deadline:
          tracker.defer_remainder()
          return
      else:
        for i, record, seconds in self._claimed(batch, tracker, progress):
          # A WindowedValue skips the per-element window assignment of a
          # TimestampedValue: the read starts from an Impulse, in the
          # global window.
          yield WindowedValue(record, seconds, _GLOBAL_WINDOWS)
          progress.next_offset = record.offset + 1
          progress.emitted += 1
          if checkpoints and time.monotonic() >= deadline:
            # Let the runner commit the output (and finalize: commit the
            # offsets) before reading on; keep the rest of the batch for
            # the resumed restriction (usually on this DoFn instance).
            self._leftovers[(topic, partition)] = batch[i + 1:]
            tracker.defer_remainder()
            return
        if progress.refused:
          return
      batch = None
      if checkpoints and config.end_bundle_when_caught_up and _caught_up(
          consumer, tp):
        # Everything the partition held is emitted: end the bundle now, so
        # batches downstream flush, instead of waiting in the next poll.
        tracker.defer_remainder()
        return

  def _claimed(self, batch: list, tracker, progress: '_ReadProgress'
               ) -> Iterator[tuple[int, Any, float]]:
    """(index in ``batch``, ``KafkaRecord``, event seconds) of each polled
    message this restriction claims, in order. Skips offsets already read
    (the consumer reset to an earlier offset: the topic was recreated);
    stops at a claim the tracker refuses (``progress.refused``)."""
    kafka_time = self._event_time is kafka_timestamp
    for i, msg in enumerate(batch):
      if msg.offset < progress.next_offset:
        self._resets.inc()
        continue
      if not tracker.try_claim(msg.offset):
        progress.refused = True
        return
      record = _new_record((msg.topic, msg.partition, msg.offset, msg.key,
                            msg.value, msg.timestamp))
      if kafka_time and 0 <= msg.timestamp <= _MAX_EVENT_MS:
        seconds = msg.timestamp / 1000.0  # the common case, inlined
      else:
        seconds = self._event_seconds(record, progress)
      yield i, record, seconds

  def _event_seconds(self, record, progress: '_ReadProgress') -> float:
    """A record's event time from ``event_time``; when that cannot be
    read, its Kafka timestamp (else now), counted as a fallback."""
    seconds = safe_event_seconds(self._event_time, record)
    if seconds is None:
      progress.fallbacks += 1
      ms = record.timestamp_ms
      seconds = ms / 1000.0 if 0 <= ms <= _MAX_EVENT_MS else time.time()
    return seconds

  def _on_outage(self, topic: str, partition: int, error: Exception) -> None:
    self._unreachable.inc()
    self._drop_consumer((topic, partition))
    now = time.monotonic()
    since = self._outage_since.setdefault((topic, partition), now)
    if now - since > self._config.give_up_s:
      raise RuntimeError(
          f'Kafka partition {topic}-{partition}: broker unreachable for '
          f'{now - since:.0f}s (more than give_up_s='
          f'{self._config.give_up_s:.0f}); last error: {error!r}') from error
    _LOGGER.warning('Kafka partition %s-%d: broker unreachable for %.0fs '
                    '(%r); retrying', topic, partition, now - since, error)

  def _take_leftover(self, topic: str, partition: int, start: int) -> list:
    """Records fetched but not emitted before a checkpoint, if they are the
    next ones of this restriction."""
    batch = self._leftovers.pop((topic, partition), None)
    return batch if batch and batch[0].offset == start else []

  def _commit(self, committer: _OffsetCommitter, topic: str, partition: int,
              offset: int) -> None:
    committer.commit(topic, partition, offset)  # sent by a thread
    # A failed commit loses nothing: those records are read again later,
    # and the committer retries with the newest offset.
    failures, error = committer.take_failures()
    if failures:
      self._commit_failures.inc(failures)
      _LOGGER.warning('%d offset commit(s) to group %s failed (retried): %s',
                      failures, self._config.group_id, error)


def _caught_up(consumer: Any, tp: Any) -> bool:
  """Whether the consumer's position is at the partition's log end (as of
  the last fetch)."""
  high = consumer.highwater(tp)
  return high is not None and consumer.position(tp) >= high


def _leader_reachable(consumer: Any, tp: Any) -> bool:
  """Whether the consumer is connected to the partition's leader (True when
  the client cannot tell: kafka-python internals)."""
  try:
    client = consumer._client  # pylint: disable=protected-access
    leader = client.cluster.leader_for_partition(tp)
    return leader is not None and leader >= 0 and client.connected(leader)
  except Exception:  # pylint: disable=broad-except
    return True


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

