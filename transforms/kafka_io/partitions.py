"""What a read covers: its config, its partitions and their offsets.

``resolve_partitions`` turns a ``_ReadConfig`` into one (topic, partition,
start, stop) spec per partition at launch; ``group_specs`` deals them into
the groups one consumer each reads (the reading DoFn's elements);
``_GroupOffsetTracker`` tracks the offsets of one group while it is read,
``_OffsetCommitter`` commits the consumer group's offsets behind it, and
``_peers`` is the ``PeerWatermarks`` of the read's groups.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import threading
import time
from typing import Any, Mapping, Optional

from apache_beam.io.iobase import RestrictionProgress, RestrictionTracker

from transforms.kafka_io.clients import (CLIENT_DEFAULTS, DEFAULT_GIVE_UP_S,
                                         resolve_secrets, with_retry)
from transforms.kafka_io.watermarks import PeerWatermarks, WatermarkPolicy

# Restriction end of an unbounded partition: offsets never get near it.
UNBOUNDED_STOP = 2**63 - 1

Spec = tuple[str, int, int, int]  # topic, partition, start, stop offsets
# The element (and restriction) of the reading DoFn: the partitions one
# consumer reads, each with its offsets.
Group = tuple[Spec, ...]


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
  give_up_s: float = DEFAULT_GIVE_UP_S
  partition_discovery_s: Optional[float] = None
  end_bundle_when_caught_up: bool = False
  batches: bool = False
  readers: Optional[int] = None  # None: one read per partition

  @property
  def watches_partitions(self) -> bool:
    """Partitions added to the topics while the read runs are read too."""
    return (bool(self.partition_discovery_s) and not self.finite and
            self.partitions is None)

  @property
  def commits(self) -> bool:
    return bool(self.group_id) and self.commit_offsets

  @property
  def finite(self) -> bool:
    return (self.bounded or self.stop_offsets is not None or
            self.stop_timestamp_ms is not None)

  def consumer(self, defaults: Optional[Mapping[str, Any]] = None,
               retry: bool = True, **overrides) -> Any:
    """A kafka-python consumer that never joins a group or auto-commits.

    Precedence: ``overrides`` > ``consumer_config`` > ``defaults``. With
    ``retry``, an unreachable broker is waited for (``give_up_s``); without,
    the (retriable) Kafka error is raised at once.
    """
    from kafka import KafkaConsumer
    config = {
        'bootstrap_servers': self.bootstrap_servers,
        'enable_auto_commit': False,
        'client_id': 'rtml-beam-reader',
        **CLIENT_DEFAULTS,
    }
    config.update(defaults or {})
    config.update(self.consumer_config)
    config.update(overrides)
    config = resolve_secrets(config)
    if not retry:
      return KafkaConsumer(**config)
    return with_retry(lambda: KafkaConsumer(**config), self.give_up_s,
                      f'consumer {config["client_id"]}')


def _per_partition(value: Any, tp: tuple[str, int]) -> Optional[int]:
  if value is None:
    return None
  if isinstance(value, Mapping):
    return value.get(tp)
  return int(value)


def resolve_partitions(config: _ReadConfig) -> list[tuple[str, int, int, int]]:
  """(topic, partition, start offset, stop offset) for every partition.

  Runs at pipeline launch (in the ``DiscoverPartitions`` step), and for the
  partitions a running read discovers later (``WatchPartitions``). The
  stop offset is ``UNBOUNDED_STOP`` for an unbounded read. An unreachable
  broker is waited for, up to ``config.give_up_s``.
  """
  return with_retry(lambda: _resolve_partitions(config), config.give_up_s,
                    'discovering partitions')


def _resolve_partitions(config: _ReadConfig
                        ) -> list[tuple[str, int, int, int]]:
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


def list_partitions(config: _ReadConfig) -> set[tuple[str, int]]:
  """The (topic, partition) pairs the brokers have now for the topics.

  Asks the brokers (a new short-lived client, so the metadata is fresh);
  a retriable Kafka error (broker unreachable) is raised at once.
  """
  consumer = config.consumer(retry=False, client_id='rtml-beam-discovery')
  try:
    return {(topic, p) for topic in config.topics
            for p in consumer.partitions_for_topic(topic) or ()}
  finally:
    consumer.close()


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

  ``commit`` only records the offset: a background thread sends what is
  pending, all partitions in one request, so no bundle waits for the broker
  (a synchronous commit at each bundle's start and end was most of an
  event's latency at 1,000 events/s, ``benchmarks/serve_bench.py``). This
  keeps at-least-once: an offset is handed over only once the bundle that
  read the records before it is done, and a commit that is late or lost
  only means those records are read again after a restart. A failed commit
  is retried (the newest offset of each partition) after a second, until a
  newer one replaces it. At most one request goes every ``INTERVAL_S``, so
  a restart may read up to that much again. Commits only move forward, so
  a late finalization callback cannot rewind a partition that a later
  bundle already committed further. ``close`` (and the process's exit)
  sends what is pending first.
  """
  _instances: dict[tuple, '_OffsetCommitter'] = {}
  _instances_lock = threading.Lock()
  RETRY_S = 1.0
  # At most one commit request per interval (Kafka's own consumer commits
  # every 5 s by default): a request per short bundle cost broker CPU that
  # the events needed.
  INTERVAL_S = 0.5

  def __init__(self, config: _ReadConfig):
    self._config = config
    self._consumer = None
    self._committed: dict[tuple[str, int], int] = {}
    self._pending: dict[tuple[str, int], int] = {}
    self._failures = 0
    self._last_error: Optional[BaseException] = None
    self._lock = threading.Condition()
    self._send_lock = threading.Lock()  # one request at a time
    self._thread: Optional[threading.Thread] = None

  @classmethod
  def get(cls, config: _ReadConfig) -> '_OffsetCommitter':
    key = (config.bootstrap_servers, config.group_id,
           json.dumps(config.consumer_config, sort_keys=True, default=repr))
    with cls._instances_lock:
      if not cls._instances:
        atexit.register(cls.close_all)
      if key not in cls._instances:
        cls._instances[key] = cls(config)
      return cls._instances[key]

  @classmethod
  def close_all(cls) -> None:
    """Sends pending commits and closes idle commit consumers (they
    reconnect on the next commit)."""
    with cls._instances_lock:
      committers = list(cls._instances.values())
    for committer in committers:
      committer.close()

  def close(self) -> None:
    try:
      self._send_pending()  # now, on this thread
    except Exception:  # pylint: disable=broad-except
      pass  # pending offsets are kept; the records are read again if lost
    with self._send_lock:
      if self._consumer is not None:
        self._consumer.close(autocommit=False)
        self._consumer = None

  def commit(self, topic: str, partition: int, offset: int) -> bool:
    """Hands ``offset`` (the next offset to read) to the sending thread;
    False if it is not newer than what is committed or pending."""
    tp = (topic, partition)
    with self._lock:
      if max(self._committed.get(tp, -1), self._pending.get(tp, -1)) >= offset:
        return False
      self._pending[tp] = offset
      if self._thread is None or not self._thread.is_alive():
        self._thread = threading.Thread(
            target=self._run, daemon=True, name='rtml-offset-committer')
        self._thread.start()
      self._lock.notify_all()
      return True

  def take_failures(self) -> tuple[int, Optional[BaseException]]:
    """(failed commit requests since the last call, the last error)."""
    with self._lock:
      taken = self._failures, self._last_error
      self._failures, self._last_error = 0, None
      return taken

  def _run(self) -> None:
    while True:
      with self._lock:
        while not self._pending:
          self._lock.wait()
      try:
        self._send_pending()
      except Exception:  # pylint: disable=broad-except
        time.sleep(self.RETRY_S)  # the offsets stay pending
        continue
      # What arrives meanwhile goes in the next request: one request per
      # interval, however short the bundles.
      time.sleep(self.INTERVAL_S)

  def _send_pending(self) -> None:
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata
    with self._send_lock:
      with self._lock:
        batch, self._pending = self._pending, {}
      if not batch:
        return
      try:
        if self._consumer is None:
          self._consumer = self._config.consumer(
              retry=False,  # a failed commit is retried by the thread
              group_id=self._config.group_id,
              client_id='rtml-beam-committer')
        self._consumer.commit(
            {TopicPartition(t, p): OffsetAndMetadata(o, '', -1)
             for (t, p), o in batch.items()}, timeout_ms=10_000)
      except Exception as e:
        # E.g. the broker is down: keep the offsets (unless newer ones came)
        # and start afresh with a new consumer.
        if self._consumer is not None:
          try:
            self._consumer.close(autocommit=False)
          except Exception:  # pylint: disable=broad-except
            pass
          self._consumer = None
        with self._lock:
          for tp, offset in batch.items():
            if self._pending.get(tp, -1) < offset:
              self._pending[tp] = offset
          self._failures += 1
          self._last_error = e
        raise
      with self._lock:
        for tp, offset in batch.items():
          if self._committed.get(tp, -1) < offset:
            self._committed[tp] = offset


class _GroupOffsetTracker(RestrictionTracker):
  """The offsets of a read's partitions, split only to checkpoint.

  The restriction is a group (``Group``): ``[start, stop)`` per partition.
  ``try_claim((topic, partition, offset))`` claims one partition's offset;
  an offset at or past that partition's stop ends the partition (False)
  and leaves the others readable, as ``OffsetRestrictionTracker`` does for
  its one range. The checkpoint split (``fraction_of_remainder == 0``)
  keeps ``[start, next)`` of every partition in the primary and gives
  ``[next, stop)`` of those not done to the residual.

  No fractional splits: one of ``[n, 2**63-1)`` would invent offsets far
  beyond the log, and sub-ranges of one partition read in parallel could
  commit a later offset before an earlier range finished, breaking the one
  bundle after another order ``PeerWatermarks`` relies on. Kafka's unit of
  parallelism is the partition; how many reads share them is the
  ``readers`` choice of ``ReadFromKafka``.
  """

  def __init__(self, restriction: Group):
    self._group = tuple(restriction)
    self._next = {(t, p): start for t, p, start, _ in self._group}
    self._stop = {(t, p): stop for t, p, _, stop in self._group}
    self._done: set[tuple[str, int]] = set()

  def current_restriction(self) -> Group:
    return tuple((t, p, start, self._stop[(t, p)])
                 for t, p, start, _ in self._group)

  def try_claim(self, position: tuple[str, int, int]) -> bool:
    topic, partition, offset = position
    tp = (topic, partition)
    if tp not in self._stop:
      raise ValueError(f'{tp} is not in the restriction {self._group}')
    if offset < self._next[tp]:
      raise ValueError(f'Offset {offset} of {tp} claimed after '
                       f'{self._next[tp] - 1}')
    if tp in self._done or offset >= self._stop[tp]:
      self._done.add(tp)
      return False
    self._next[tp] = offset + 1
    return True

  def try_split(self, fraction_of_remainder):
    if fraction_of_remainder > 0:
      return None
    residual = tuple((t, p, self._next[(t, p)], stop)
                     for t, p, _, stop in self.current_restriction()
                     if (t, p) not in self._done
                     and self._next[(t, p)] < stop)
    if not residual:
      return None
    for tp in self._stop:
      self._stop[tp] = min(self._stop[tp], self._next[tp])
    return self.current_restriction(), residual

  def current_progress(self) -> RestrictionProgress:
    completed = sum(self._next[(t, p)] - start
                    for t, p, start, _ in self._group)
    remaining = sum(max(0, stop - self._next[tp])
                    for tp, stop in self._stop.items()
                    if tp not in self._done)
    return RestrictionProgress(completed=completed, remaining=remaining)

  def check_done(self) -> None:
    left = [(tp, self._next[tp], stop) for tp, stop in self._stop.items()
            if tp not in self._done and self._next[tp] < stop]
    if left:
      raise ValueError(f'Offsets left unclaimed (partition, next, stop): '
                       f'{left}')

  def is_bounded(self) -> bool:
    return all(stop != UNBOUNDED_STOP for stop in self._stop.values())


def group_key(group: Group) -> tuple[tuple[str, int], ...]:
  """The (topic, partition) pairs of a group: its consumer's and its
  watermark's key."""
  return tuple((t, p) for t, p, _, _ in group)


def group_specs(specs: list[Spec], readers: Optional[int]) -> list[Group]:
  """The read's elements: one group per partition (``readers`` None), or the
  partitions dealt round-robin to ``readers`` groups."""
  if not readers:
    return [(spec,) for spec in specs]
  groups: list[list[Spec]] = [[] for _ in range(min(readers, len(specs)))]
  for i, spec in enumerate(specs):
    groups[i % len(groups)].append(spec)
  return [tuple(group) for group in groups]
