"""The splittable DoFn of ``ReadFromKafka``: reads partitions' offsets.

Each element is a group of partitions (``partitions.Group``: one
(topic, partition, start offset, stop offset) spec each, ``[start,
2**63-1)`` when unbounded), read by one consumer; the restriction is the
same shape, tracked by ``partitions._GroupOffsetTracker``. The reader polls,
claims each offset, and checkpoints (``defer_remainder``) when nothing
arrived within ``poll_timeout_s`` or after ``checkpoint_interval_s`` of
reading, so the runner commits the output and resumes the group later.

By default a group is one partition (as Java KafkaIO's ``ReadFromKafkaDoFn``
reads one partition per restriction). ``ReadFromKafka(readers=N)`` deals
the partitions to N groups: a runner that runs one bundle at a time per
worker (Flink) then still reads every partition at once, as a hand-written
consumer loop does, instead of one partition's read holding the others
back until it checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from typing import Any, Iterator

import apache_beam as beam
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
from transforms.kafka_io.partitions import (UNBOUNDED_STOP, Group,
                                            _GroupOffsetTracker,
                                            _OffsetCommitter, _peers,
                                            _ReadConfig, group_key)
from transforms.kafka_io.record import KafkaBatch, _new_record
from transforms.kafka_io.watermarks import GroupWatermarkEstimator

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
  next_offsets: dict  # (topic, partition) -> next offset to emit
  emitted: int = 0
  fallbacks: int = 0
  refused: bool = False  # the tracker refused a claim (a split)
  # Partitions whose range ended at a record past its stop.
  finished: set = dataclasses.field(default_factory=set)


class _ReadPartitionsFn(beam.DoFn, RestrictionProvider,
                        WatermarkEstimatorProvider):
  """Reads the offsets of a group of partitions (element: a tuple of
  (topic, partition, start, stop) specs, ``partitions.Group``) with one
  consumer, as ``KafkaRecord``s timestamped by event time."""

  # Consumers kept per DoFn instance, by group: a resumed group usually
  # finds its consumer positioned with records prefetched.
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
    # A reader keeps its consumers between bundles; a count growing with the
    # bundles means the runner sets up new DoFns for each (reader.py).
    self._opened = Metrics.counter(ns, 'consumers_opened')
    self._outage_since: dict[tuple, float] = {}
    self._consumers: dict[tuple, Any] = {}
    self._leftovers: dict[tuple, dict] = {}

  # RestrictionProvider
  def initial_restriction(self, element: Group) -> Group:
    return tuple(element)

  def create_tracker(self, restriction: Group) -> _GroupOffsetTracker:
    return _GroupOffsetTracker(restriction)

  def restriction_size(self, element, restriction: Group) -> float:
    consumer = self._consumers.get(group_key(element))
    size = 0
    for topic, partition, start, stop in restriction:
      if stop != UNBOUNDED_STOP:
        size += max(0, stop - start)
        continue
      if consumer is not None:  # backlog from the last fetch, best effort
        from kafka import TopicPartition
        high = consumer.highwater(TopicPartition(topic, partition))
        if high is not None:
          size += max(0, high - start)
    return max(size, 1)

  # WatermarkEstimatorProvider
  def initial_estimator_state(self, element, restriction):
    return GroupWatermarkEstimator.initial_state(group_key(element))

  def create_watermark_estimator(self, estimator_state):
    return GroupWatermarkEstimator(
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

  def _consumer_at(self, key: tuple, positions: dict) -> Any:
    """The group's consumer, assigned exactly ``positions``' partitions, each
    at its position."""
    from kafka import TopicPartition
    tps = {tp: TopicPartition(*tp) for tp in positions}
    consumer = self._consumers.get(key)
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
      self._opened.inc()
      self._consumers[key] = consumer
    if consumer.assignment() != set(tps.values()):
      consumer.assign(list(tps.values()))  # e.g. a partition of it finished
    for tp, offset in positions.items():
      if consumer.position(tps[tp]) != offset:
        consumer.seek(tps[tp], offset)
    return consumer

  def _drop_consumer(self, key: tuple) -> None:
    consumer = self._consumers.pop(key, None)
    self._leftovers.pop(key, None)
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
    key = group_key(element)
    _READS.bundle = get_current_instruction_id()
    restriction = tracker.current_restriction()
    committer = (_OffsetCommitter.get(self._config)
                 if self._config.commits else None)
    if committer:
      initial = {(t, p): start for t, p, start, _ in element}
      for topic, partition, start, _ in restriction:
        if start > initial[(topic, partition)]:
          # Resumed from a checkpoint: the bundle that read everything
          # before `start` is committed (works where bundles are never
          # finalized).
          self._commit(committer, topic, partition, start)
    watermark.begin_read()
    progress = _ReadProgress(
        next_offsets={(t, p): start for t, p, start, _ in restriction})
    try:
      yield from self._poll(key, tracker, watermark, progress)
      self._outage_since.pop(key, None)
    except Exception as e:  # pylint: disable=broad-except
      if _closed_by_teardown(e):
        # The runner tore this reader down (a cancelled job, a worker being
        # shut down) while the bundle read: hand the rest back quietly.
        self._consumers.pop(key, None)
        tracker.defer_remainder(Duration.of(1.0))
        return
      if not is_retriable(e):
        raise
      # The broker is unreachable (or a partition has no leader): wait it
      # out. Everything claimed was emitted, so checkpointing here skips
      # nothing; the watermark is left alone.
      self._on_outage(key, e)
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
      for (topic, partition), offset in progress.next_offsets.items():
        finalizer.register(functools.partial(
            self._commit, committer, topic, partition, offset))

  def _poll(self, key: tuple, tracker, watermark,
            progress: '_ReadProgress') -> Iterator[WindowedValue]:
    from kafka import TopicPartition
    config = self._config
    stops = {(t, p): stop for t, p, _, stop in tracker.current_restriction()}
    polled = self._take_leftovers(key, progress.next_offsets)
    consumer = self._consumer_at(key, {
        tp: (polled[tp][-1].offset + 1 if tp in polled else offset)
        for tp, offset in progress.next_offsets.items()})
    tps = {tp: TopicPartition(*tp) for tp in progress.next_offsets}
    timeout_ms = int(config.poll_timeout_s * 1000)
    checkpoints = config.commits or not tracker.is_bounded()
    deadline = time.monotonic() + config.checkpoint_interval_s
    while True:
      if not polled:
        for tp in [tp for tp in tps if tp in progress.finished or
                   consumer.position(tps[tp]) >= stops[tp]]:
          # Range done (checked before polling: a poll at the end of a
          # bounded range would only wait out its timeout).
          tracker.try_claim((*tp, stops[tp]))
          watermark.finish(tp)
          consumer.pause(tps.pop(tp))
        if not tps:
          return
        polled = {(tp_.topic, tp_.partition): batch for tp_, batch in
                  consumer.poll(timeout_ms=timeout_ms).items() if batch}
      for tp in tps:
        if tp not in polled:
          # Idle only if the log end is known *now*: while the leader is
          # unreachable the last highwater is stale, and an idle watermark
          # would jump to the wall clock and turn the backlog late.
          watermark.on_empty_poll(tp, _caught_up(consumer, tps[tp]) and
                                  _leader_reachable(consumer, tps[tp]))
      if not polled:
        tracker.defer_remainder(Duration.of(config.resume_delay_s))
        return
      if config.batches:
        # One KafkaBatch per poll; the watermark sees every record's time,
        # the batch carries the earliest.
        records, seconds_of = [], []
        for tp, batch in polled.items():
          watermark.select(tp)
          watermark.begin_batch()
          for _, record, seconds in self._claimed(tp, batch, tracker,
                                                  stops, progress):
            watermark.observe_timestamp(Timestamp.of(seconds))
            records.append(record)
            seconds_of.append(seconds)
            progress.next_offsets[tp] = record.offset + 1
          if progress.refused:
            break
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
        pending = list(polled.items())
        for n, (tp, batch) in enumerate(pending):
          watermark.select(tp)
          watermark.begin_batch()
          for i, record, seconds in self._claimed(tp, batch, tracker,
                                                  stops, progress):
            # A WindowedValue skips the per-element window assignment of a
            # TimestampedValue: the read starts from an Impulse, in the
            # global window.
            yield WindowedValue(record, seconds, _GLOBAL_WINDOWS)
            progress.next_offsets[tp] = record.offset + 1
            progress.emitted += 1
            if checkpoints and time.monotonic() >= deadline:
              # Let the runner commit the output (and finalize: commit the
              # offsets) before reading on; keep the rest of the poll for
              # the resumed restriction (usually on this DoFn instance).
              leftovers = {tp: batch[i + 1:], **dict(pending[n + 1:])}
              self._leftovers[key] = {t: b for t, b in leftovers.items()
                                      if b}
              tracker.defer_remainder()
              return
          if progress.refused:
            return
      polled = {}
      if checkpoints and config.end_bundle_when_caught_up and all(
          _caught_up(consumer, tp_) for tp_ in tps.values()):
        # Everything the partitions held is emitted: end the bundle now, so
        # batches downstream flush, instead of waiting in the next poll.
        tracker.defer_remainder()
        return

  def _claimed(self, tp: tuple[str, int], batch: list, tracker,
               stops: dict, progress: '_ReadProgress'
               ) -> Iterator[tuple[int, Any, float]]:
    """(index in ``batch``, ``KafkaRecord``, event seconds) of each polled
    message of partition ``tp`` this restriction claims, in order. Skips
    offsets already read (the consumer reset to an earlier offset: the
    topic was recreated); stops at the partition's end (``stops``, as the
    read began: ``progress.finished``) and at a claim the tracker refuses
    before it (the runner split the restriction: ``progress.refused``)."""
    kafka_time = self._event_time is kafka_timestamp
    topic, partition = tp
    for i, msg in enumerate(batch):
      if msg.offset < progress.next_offsets[tp]:
        self._resets.inc()
        continue
      if not tracker.try_claim((topic, partition, msg.offset)):
        if msg.offset >= stops[tp]:
          progress.finished.add(tp)
        else:
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

  def _on_outage(self, key: tuple, error: Exception) -> None:
    self._unreachable.inc()
    self._drop_consumer(key)
    now = time.monotonic()
    since = self._outage_since.setdefault(key, now)
    names = ', '.join(f'{t}-{p}' for t, p in key)
    if now - since > self._config.give_up_s:
      raise RuntimeError(
          f'Kafka partition(s) {names}: broker unreachable for '
          f'{now - since:.0f}s (more than give_up_s='
          f'{self._config.give_up_s:.0f}); last error: {error!r}') from error
    _LOGGER.warning('Kafka partition(s) %s: broker unreachable for %.0fs '
                    '(%r); retrying', names, now - since, error)

  def _take_leftovers(self, key: tuple, next_offsets: dict) -> dict:
    """Records fetched but not emitted before a checkpoint, if they are the
    next ones of this restriction's partitions."""
    leftovers = self._leftovers.pop(key, None) or {}
    if all(tp in next_offsets and batch[0].offset == next_offsets[tp]
           for tp, batch in leftovers.items()):
      return leftovers
    return {}

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


# Only readers that commit offsets ask for bundle finalization (not on Flink:
# ReadFromKafka's commit_in_finalize): Prism sends a FinalizeBundle for every
# bundle of a DoFn that declares it.
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

