"""``ReadFromKafka``: Kafka topics as event-timestamped ``KafkaRecord``s.

Reading::

    Impulse -> DiscoverPartitions -> Reshuffle -> ReadPartitions (SDF)

One element per partition (or per group of partitions, ``readers``) carries
each partition's start offset resolved at launch
(explicit offsets, a start timestamp, the group's committed offset, or
``auto_offset_reset``) and an optional stop offset (explicit, a stop
timestamp, or the end offsets at launch when ``bounded=True``); see
``read_partitions`` for how a partition is read.

Partitions added while an unbounded read of whole topics runs are read too
(``partition_discovery_s``; see ``discovery``)::

    Impulse -> WatchPartitions (SDF) -> Reshuffle -> ReadPartitions (SDF)

Delivery: with a ``group_id`` (and ``commit_offsets=True``) a restarted
pipeline resumes from the group's committed offsets. An offset is committed
only after the runner has committed the bundle that read the records before
it: in a bundle-finalization callback (``DoFn.BundleFinalizerParam``; the
FnApiRunner and Prism call it - tested - as does Dataflow) and, for runners
that never finalize bundles (the Python BundleBasedDirectRunner) or only at
their next checkpoint (Flink, where no finalization callback is asked for),
when a checkpointed partition is resumed (the residual only exists once the
bundle before it is committed). This is at-least-once: records read after
the last commit are read again after a restart (``tests/test_kafka_io.py``
kills a job with SIGKILL and checks none is lost). Records a runner holds in
memory downstream (e.g. an unfired window on Prism or the DirectRunner) are
only as durable as that runner: a cancelled in-memory job loses them
although their offsets are committed, so keep the sink in the same fused
stage as the read (as ``WriteToKafka`` and the dead-letter path do) when the
runner's state is not durable. Offsets are committed with the simple
(generation-less) commit API, so do not share the group id with subscribing
consumers.

Broker outages: discovery waits for the broker; a partition whose broker
is unreachable checkpoints and is retried (log line, ``broker_unreachable``
metric) without advancing its watermark, for up to ``give_up_s``; nothing is
claimed that was not emitted, so nothing is skipped. Offsets that go out of
range (topic recreated, retention) reset to the earliest offset; records
below what was already read are skipped and counted (``offsets_reset``).
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import apache_beam as beam

from transforms.kafka_io.clients import DEFAULT_GIVE_UP_S
from transforms.kafka_io.discovery import DiscoverPartitions, WatchPartitions
from transforms.kafka_io.event_time import EventTimeFn
from transforms.kafka_io.options import finalizes_promptly
from transforms.kafka_io.partitions import _ReadConfig
from transforms.kafka_io.read_partitions import (
    _CommittingReadPartitionsFn, _CommittingReadUnboundedPartitionsFn,
    _ReadPartitionsFn, _ReadUnboundedPartitionsFn)
from transforms.kafka_io.record import (METRICS_NAMESPACE, KafkaBatch,
                                       KafkaRecord)
from transforms.kafka_io.watermarks import WatermarkPolicy


class ReadFromKafka(beam.PTransform):
  """Reads Kafka topics as ``KafkaRecord``s (or ``KafkaBatch``es) with
  event-time timestamps.

  Args:
    bootstrap_servers: 'host:port[,host:port]'.
    topics: topic names (all their partitions at launch are read).
    partitions: explicit (topic, partition) pairs instead of all partitions.
    group_id: consumer group whose committed offsets are the start offsets
      and to which offsets are committed (see module docstring).
    commit_offsets: commit offsets to ``group_id`` as bundles complete.
    commit_in_finalize: also commit them in a bundle-finalization callback
      (not only when a partition resumes). None (default): unless the
      pipeline runs on Flink, which finalizes bundles only at its next
      checkpoint and meanwhile has the Python worker set up new DoFns (a new
      consumer) for every bundle (``options.finalizes_promptly``).
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
    end_bundle_when_caught_up: such a read also checkpoints as soon as it
      has emitted everything the partition held (its position reached the
      log end), instead of waiting in the next poll: the bundle ends, so
      what batches per bundle downstream (RunInference, the producer's
      flush) finishes now rather than after ``checkpoint_interval_s``. Low
      latency at low rates; under a backlog bundles stay long.
    batches: emit one ``KafkaBatch`` per poll and partition (the records
      one poll returned, each with its event time; the batch's timestamp is
      the earliest) instead of one ``KafkaRecord`` per record: what follows
      in the fused stage handles a poll at once, as a hand-written consumer
      loop does (``pipelines.serve`` feeds them to RunInference unbatched),
      and nothing waits for the bundle to end to form a batch.
    max_poll_records: records per poll (with ``batches``, the largest
      batch).
    readers: None (default): each partition is read by its own restriction
      (one consumer each), as Java KafkaIO's splittable DoFn does; the
      runner spreads them and checkpoints them one by one. N: the
      partitions are dealt to N restrictions, each read by one consumer
      polling all of its partitions, as a hand-written loop does. For
      runners that process one bundle at a time per worker, such as Flink:
      there a restriction per partition makes each partition wait while
      another reads, up to ``checkpoint_interval_s``. Partitions found
      while running (``partition_discovery_s``) get a restriction each.
    consumer_config: extra kafka-python consumer settings (security...).
    decode: optional ``KafkaRecord -> value`` applied to every record.
    give_up_s: how long an unreachable broker is waited out (reconnecting,
      with log lines, the watermark held) before the read fails.
    partition_discovery_s: an unbounded read of whole topics looks for new
      partitions this often (seconds; None or 0: only those at launch, as
      Java KafkaIO without ``withDynamicRead``). Needs a runner that resumes
      a checkpointed splittable DoFn while the pipeline runs (Prism, Flink,
      Dataflow), not the BundleBasedDirectRunner.
  """

  def __init__(
      self,
      bootstrap_servers: str,
      topics: Union[str, Sequence[str]] = (),
      *,
      partitions: Optional[Sequence[tuple[str, int]]] = None,
      group_id: Optional[str] = None,
      commit_offsets: bool = True,
      commit_in_finalize: Optional[bool] = None,
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
      end_bundle_when_caught_up: bool = False,
      batches: bool = False,
      max_poll_records: int = 1000,
      readers: Optional[int] = None,
      consumer_config: Optional[Mapping[str, Any]] = None,
      decode: Optional[Callable[[KafkaRecord], Any]] = None,
      give_up_s: float = DEFAULT_GIVE_UP_S,
      partition_discovery_s: Optional[float] = None):
    super().__init__()
    if isinstance(topics, str):
      topics = [topics]
    if not topics and not partitions:
      raise ValueError('ReadFromKafka needs topics or partitions')
    if readers is not None and readers < 1:
      raise ValueError(f'ReadFromKafka: readers must be at least 1 (or '
                       f'None: one per partition), got {readers}')
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
        end_bundle_when_caught_up=end_bundle_when_caught_up,
        batches=batches,
        max_poll_records=max_poll_records,
        readers=readers,
        consumer_config=dict(consumer_config or {}),
        metrics_namespace=METRICS_NAMESPACE,
        reader_id=uuid.uuid4().hex,
        give_up_s=give_up_s,
        partition_discovery_s=partition_discovery_s)
    self._decode = decode
    self._commit_in_finalize = commit_in_finalize

  def expand(self, pbegin):
    config = self._config
    finalize = self._commit_in_finalize
    if finalize is None:
      finalize = finalizes_promptly(pbegin.pipeline.options)
    reader_cls = {
        (True, False): _ReadPartitionsFn,
        (False, False): _ReadUnboundedPartitionsFn,
        (True, True): _CommittingReadPartitionsFn,
        (False, True): _CommittingReadUnboundedPartitionsFn,
    }[(config.finite, config.commits and finalize)]
    reader = reader_cls(config)
    discover = (WatchPartitions if config.watches_partitions
                else DiscoverPartitions)
    read = (pbegin
            | 'Impulse' >> beam.Impulse()
            | discover.__name__ >> beam.ParDo(discover(config))
            | 'SpreadPartitions' >> beam.Reshuffle()
            | 'ReadPartitions' >> beam.ParDo(reader).with_output_types(
                KafkaBatch if config.batches else KafkaRecord))
    if self._decode is not None:
      if config.batches:
        raise ValueError('ReadFromKafka: decode= needs batches=False')
      read = read | 'DecodeRecords' >> beam.Map(self._decode)
    return read
