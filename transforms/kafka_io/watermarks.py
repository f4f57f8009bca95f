"""Per-partition watermarks of the Kafka source.

Event time and watermark (per partition, see ``WatermarkPolicy``); each record
is timestamped with its event time (see ``event_time``), then:

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
* a read of several partitions with one consumer (``readers``) reports the
  minimum of its partitions' watermarks (``GroupWatermarkEstimator``).
* each read (a partition, or such a group) reports min(its watermark, the
  other reads' in this worker) - see ``PeerWatermarks``: Prism, the
  DirectRunner's engine, takes a splittable stage's watermark from the last
  bundle only.
* runners: Prism (tested), Dataflow and Flink follow these per-partition
  watermarks while reading. The FnApiRunner (the DirectRunner when Prism is
  unavailable) runs stage after stage: windows fire when a bounded read
  ends, and an unbounded read never returns from ``run()``. The
  BundleBasedDirectRunner holds the watermark until the read ends.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Hashable, Iterable, Optional

from apache_beam.io.iobase import WatermarkEstimator
from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP, Timestamp

from transforms.kafka_io.options import KafkaOptions

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


def policy_from_flags(kafka: KafkaOptions,
                      default_max_out_of_orderness_s: float
                      ) -> WatermarkPolicy:
  """The policy ``--max_out_of_orderness`` (else the job's default) and
  ``--idle_timeout_s`` describe."""
  return WatermarkPolicy(
      max_out_of_orderness_s=(kafka.max_out_of_orderness or
                              default_max_out_of_orderness_s),
      idle_timeout_s=kafka.idle_timeout_s)


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

  def register(self, partitions: Iterable[Hashable]) -> None:
    """Counts these reads (their keys: a group's partitions) from now."""
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
  nothing for the partition. It never goes back. The read reports it through
  a ``GroupWatermarkEstimator`` (with the read's other partitions and its
  peers). State (carried across checkpoints): ``(partition,
  watermark_micros, max_event_micros, last_activity_wall_s)``.
  """

  def __init__(self, state: tuple | None, policy: WatermarkPolicy,
               clock: Callable[[], float] = time.time):
    self._policy = policy
    self._clock = clock
    (self._partition, self._watermark, self._max_event,
     self._last_activity) = state or (None, None, None, None)
    if self._last_activity is None:
      self._last_activity = clock()
    self._bound_micros = int(policy.max_out_of_orderness_s * 1e6)
    self._future_events = 0
    self._future_limit: Optional[int] = None

  @staticmethod
  def initial_state(partition: tuple[str, int]) -> tuple:
    return (partition, None, None, None)

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

  def take_future_events(self) -> int:
    """How many observed event times were too far ahead (then resets)."""
    count, self._future_events = self._future_events, 0
    return count

  def finish(self) -> None:
    """The partition's range is read: it holds nothing back any more."""
    self._watermark = MAX_TIMESTAMP.micros

  def _advance(self, micros: int) -> None:
    if self._watermark is None or micros > self._watermark:
      self._watermark = micros

  def current_watermark(self) -> Timestamp:
    """Max event time - bound, or the idle advance; never goes back."""
    if self._max_event is not None:
      self._advance(self._max_event - self._bound_micros)
    return Timestamp(micros=max(self._watermark or MIN_TIMESTAMP.micros,
                                MIN_TIMESTAMP.micros))

  def get_estimator_state(self) -> tuple:
    self.current_watermark()
    return (self._partition, self._watermark, self._max_event,
            self._last_activity)


class GroupWatermarkEstimator(WatermarkEstimator):
  """Watermark of a read of several partitions (one consumer's group): the
  minimum of its partitions' ``PartitionWatermarkEstimator``s, then of its
  ``peers`` (the read's other groups), never going back.

  The reader calls ``select(partition)`` before it emits (and observes) a
  partition's records: the SDK's own ``observe_timestamp`` of each output
  goes to the partition selected. State (carried across checkpoints):
  ``(group key, each partition's estimator state, reported_micros)``.
  """

  def __init__(self, state: tuple, policy: WatermarkPolicy,
               peers: Optional[PeerWatermarks] = None,
               clock: Callable[[], float] = time.time):
    self._key, partition_states, self._reported = state
    self._parts = {partition_state[0]: PartitionWatermarkEstimator(
        partition_state, policy, clock)
                   for partition_state in partition_states}
    self._peers = peers
    self._current = next(iter(self._parts.values()))

  @staticmethod
  def initial_state(key: tuple[tuple[str, int], ...]) -> tuple:
    return (key, tuple(PartitionWatermarkEstimator.initial_state(tp)
                       for tp in key), None)

  def select(self, partition: tuple[str, int]) -> None:
    self._current = self._parts[partition]

  def begin_batch(self) -> None:
    self._current.begin_batch()

  def observe_timestamp(self, timestamp: Timestamp) -> None:
    self._current.observe_timestamp(timestamp)

  def on_empty_poll(self, partition: tuple[str, int], caught_up: bool) -> None:
    self._parts[partition].on_empty_poll(caught_up)

  def finish(self, partition: tuple[str, int]) -> None:
    self._parts[partition].finish()

  def begin_read(self) -> None:
    """The reader starts a bundle of this group (see PeerWatermarks)."""
    if self._peers is not None:
      self._peers.resume(self._key)

  def take_future_events(self) -> int:
    return sum(part.take_future_events() for part in self._parts.values())

  def own_watermark(self) -> Timestamp:
    """The slowest of the group's partitions, without the peers."""
    return min(part.current_watermark() for part in self._parts.values())

  def current_watermark(self) -> Timestamp:
    candidate = self.own_watermark().micros
    if self._peers is not None:
      candidate = min(candidate, self._peers.report(self._key, candidate))
    if self._reported is None or candidate > self._reported:
      self._reported = candidate
    return Timestamp(micros=self._reported)

  def get_estimator_state(self) -> tuple:
    self.current_watermark()
    return (self._key, tuple(part.get_estimator_state()
                             for part in self._parts.values()),
            self._reported)
