"""``WriteTransactionally``: exactly-once output for a read-process-write job.

Each bundle's outputs (to any number of topics) and the consumer-group
offsets of the input records they came from are committed in one Kafka
transaction (``send_offsets_to_transaction``): either the outputs become
visible to ``read_committed`` consumers *and* the group moves past their
inputs, or neither happens. A bundle that fails is aborted and retried; a
job that is killed leaves an open transaction the broker aborts after
``transaction_timeout_ms`` (60 s: ``read_committed`` readers wait that long
for it), and the restarted job resumes from the group's last committed
offsets. Outputs are therefore written once, with no duplicates, as seen by
``read_committed`` consumers.

Element: ``Output(topic, key, value, source)``, ``source`` the
``(topic, partition, offset)`` of the input record it came from. Every input
record must produce at least one output (a prediction or a dead letter),
since the offsets committed are those the outputs name.

Requirement: the read and every write run in the same fused stage, so that
a bundle writes the outputs of exactly the records it read (the reader of
``ReadFromKafka`` reads a partition's offsets in order, one bundle after
another). Several ``WriteTransactionally`` of one stage with the same
``group_id`` (e.g. predictions and each dead-letter stream, written without a
``Flatten``: Prism ends a fused stage at a Flatten) share one transaction per
bundle, committed when the last of them finishes the bundle. A shuffle between
the read and the writes (e.g. batching with state) breaks this; the serving
pipeline has none (it scores the source's poll batches), and a write found
running in a bundle that read nothing is logged and counted
(``transactions_unfused``). Read with
``commit_offsets=False``: the transactions commit the offsets.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Mapping, NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.runners.worker.statesampler import get_current_instruction_id

from transforms.kafka_io.clients import (DEFAULT_GIVE_UP_S, producer_config,
                                         resolve_secrets, with_retry)
from transforms.kafka_io.dead_letters import dead_letter
from transforms.kafka_io.read_partitions import last_read_bundle
from transforms.kafka_io.record import METRICS_NAMESPACE, KafkaRecord
from transforms.kafka_io.writer import _to_bytes

_LOGGER = logging.getLogger(__name__)


class Output(NamedTuple):
  """One record to write, and the input record it came from."""
  topic: str
  key: Any
  value: Any
  source: Optional[tuple[str, int, int]]  # (topic, partition, offset)


class _Producers:
  """Transactional producers kept per writer configuration and reused by
  the bundles that follow (``init_transactions`` costs a round trip)."""

  def __init__(self):
    self.idle: list = []
    self.writers = 0  # live writer instances of this configuration


class _BundleTransaction:
  """The open transaction of one bundle: every writer of the bundle's stage
  sends into it, and the last to finish the bundle commits it with the
  offsets all of them saw."""

  def __init__(self, key: tuple, slot: tuple):
    self.key = key
    self.slot = slot
    self.producer = None
    self.writers: set[str] = set()
    self.finished: set[str] = set()
    self.offsets: dict[tuple[str, int], int] = {}
    self.count = 0
    self.open = False


_LOCK = threading.Lock()
_PRODUCERS: dict[tuple, _Producers] = {}
_BUNDLES: dict[tuple, _BundleTransaction] = {}  # (thread, bundle, key) → tx
_JOINED: dict[str, _BundleTransaction] = {}  # writer id → its open tx


def _forget(tx: _BundleTransaction) -> None:
  """Drops ``tx`` from the registry (under ``_LOCK``)."""
  if _BUNDLES.get(tx.slot) is tx:
    del _BUNDLES[tx.slot]
  for writer in tx.writers:
    if _JOINED.get(writer) is tx:
      del _JOINED[writer]


class _TransactionalWriteFn(beam.DoFn):

  def __init__(self, bootstrap_servers: str, group_id: str,
               unwritable_topic: str, producer_config: Mapping[str, Any],
               give_up_s: float):
    self._bootstrap_servers = bootstrap_servers
    self._group_id = group_id
    self._unwritable_topic = unwritable_topic
    self._producer_config = dict(producer_config)
    self._give_up_s = give_up_s
    self._committed = Metrics.counter(METRICS_NAMESPACE,
                                      'transactions_committed')
    self._aborted = Metrics.counter(METRICS_NAMESPACE, 'transactions_aborted')
    self._written = Metrics.counter(METRICS_NAMESPACE, 'records_written')
    self._unwritable = Metrics.counter(METRICS_NAMESPACE,
                                       'records_unwritable')
    self._unfused = Metrics.counter(METRICS_NAMESPACE,
                                    'transactions_unfused')
    # Writers of one configuration share transactions and producers.
    self._key = (bootstrap_servers, group_id,
                 repr(sorted(self._producer_config.items())))
    self._id = ''
    self._tx: Optional[_BundleTransaction] = None
    self._warned = False

  def setup(self):
    self._id = uuid.uuid4().hex  # per instance, even of one pickled DoFn
    with _LOCK:
      _PRODUCERS.setdefault(self._key, _Producers()).writers += 1

  def _new_producer(self):
    from kafka import KafkaProducer
    config = producer_config(self._bootstrap_servers,
                             'rtml-beam-transactional-writer',
                             self._give_up_s)
    # One id per producer: a killed job's open transaction is aborted by the
    # broker after transaction_timeout_ms.
    config['transactional_id'] = f'rtml-{self._group_id}-{uuid.uuid4().hex}'
    config.update(self._producer_config)
    config = resolve_secrets(config)
    producer = with_retry(lambda: KafkaProducer(**config), self._give_up_s,
                          'transactional producer')
    producer.init_transactions()
    return producer

  def _release(self, tx: _BundleTransaction, reusable: bool) -> None:
    producer, tx.producer = tx.producer, None
    if producer is None:
      return
    if reusable:
      with _LOCK:
        pool = _PRODUCERS.get(self._key)
        if pool is not None and pool.writers > 0:
          pool.idle.append(producer)
          return
    _close(producer)

  def _abort(self, tx: _BundleTransaction) -> None:
    """Aborts what ``tx`` sent; its producer is reused if that worked."""
    reusable = True
    if tx.open:
      self._aborted.inc()
      try:
        tx.producer.abort_transaction()
      except Exception:  # pylint: disable=broad-except
        reusable = False  # a fenced or broken producer: start afresh
      tx.open = False
    self._release(tx, reusable)

  def start_bundle(self):
    slot = (threading.get_ident(), get_current_instruction_id(), self._key)
    with _LOCK:
      # A transaction this writer still belongs to was left by a bundle that
      # failed before every writer finished it: what it sent must never be
      # committed (the runner retries that bundle).
      stale = _JOINED.get(self._id)
      if stale is not None:
        _forget(stale)
      tx = _BUNDLES.get(slot)
      if tx is None:
        tx = _BUNDLES[slot] = _BundleTransaction(self._key, slot)
      tx.writers.add(self._id)
      _JOINED[self._id] = tx
    if stale is not None:
      self._abort(stale)
    self._tx = tx

  def _send(self, tx: _BundleTransaction, output: Output) -> None:
    from kafka.errors import MessageSizeTooLargeError
    try:
      tx.producer.send(output.topic, key=_to_bytes(output.key),
                       value=_to_bytes(output.value))
    except (MessageSizeTooLargeError, TypeError, ValueError) as e:
      self._unwritable.inc()
      topic, partition, offset = output.source or (None, None, None)
      key = _to_bytes(output.key)
      tx.producer.send(self._unwritable_topic, key=key, value=_to_bytes(
          dead_letter(KafkaRecord(topic, partition, offset, key, None, -1),
                      [{'field': '*', 'value': None,
                        'reason': f'writing to {output.topic!r} failed: '
                                  f'{type(e).__name__}: {e}'}],
                      stage='WriteTransactionally')))

  def process(self, element: Output):
    tx = self._tx
    if not tx.open:
      if tx.producer is None:
        with _LOCK:
          pool = _PRODUCERS[self._key]
          tx.producer = pool.idle.pop() if pool.idle else None
        if tx.producer is None:
          tx.producer = self._new_producer()
      tx.producer.begin_transaction()
      tx.open = True
    self._send(tx, element)
    tx.count += 1
    if element.source is not None:
      topic, partition, offset = element.source
      if offset is not None and offset >= tx.offsets.get(
          (topic, partition), -1):
        tx.offsets[(topic, partition)] = offset

  def finish_bundle(self):
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata
    tx, self._tx = self._tx, None
    with _LOCK:
      tx.finished.add(self._id)
      last = tx.finished >= tx.writers
      if last:
        _forget(tx)
    if not last:
      return
    if not tx.open:
      self._release(tx, True)
      return
    if tx.offsets and tx.slot[1] is not None and (
        last_read_bundle() != tx.slot[1]):
      self._unfused.inc()
      log = _LOGGER.error if not self._warned else _LOGGER.debug
      self._warned = True
      log(
          'exactly-once is not guaranteed: the transactional writes of group '
          '%r ran in a bundle that read no Kafka records; the runner did not '
          'fuse them with the read', self._group_id)
    try:
      if tx.offsets:
        tx.producer.send_offsets_to_transaction(
            {TopicPartition(t, p): OffsetAndMetadata(o + 1, '', -1)
             for (t, p), o in tx.offsets.items()}, self._group_id)
      started = time.monotonic()
      tx.producer.commit_transaction()
      _LOGGER.debug('committed %d records in %.3fs', tx.count,
                    time.monotonic() - started)
    except Exception as e:
      self._abort(tx)
      raise RuntimeError(f'the transaction of {tx.count} records failed '
                         f'and was aborted ({e!r}); the bundle is retried'
                         ) from e
    tx.open = False
    self._release(tx, True)
    self._committed.inc()
    self._written.inc(tx.count)

  def teardown(self):
    with _LOCK:
      stale = _JOINED.get(self._id)
      if stale is not None:
        _forget(stale)
      pool = _PRODUCERS.get(self._key)
      idle = []
      if pool is not None:
        pool.writers -= 1
        if pool.writers <= 0:
          idle, pool.idle = pool.idle, []
          del _PRODUCERS[self._key]
    if stale is not None:
      self._abort(stale)
    for producer in idle:
      _close(producer)


def _close(producer) -> None:
  try:
    producer.close(timeout=10)
  except Exception:  # pylint: disable=broad-except
    pass


class WriteTransactionally(beam.PTransform):
  """Writes ``Output``s and commits their inputs' offsets to ``group_id``,
  one Kafka transaction per bundle (see module doc).

  Args:
    bootstrap_servers: 'host:port[,host:port]'.
    group_id: the consumer group the read resumes from.
    unwritable_topic: where the dead letter of an output that cannot be
      written (cannot be encoded, too large) goes, in the same transaction.
    producer_config: extra kafka-python producer settings.
    give_up_s: how long an unreachable broker is waited out.
  """

  def __init__(self, bootstrap_servers: str, group_id: str,
               unwritable_topic: str, *,
               producer_config: Optional[Mapping[str, Any]] = None,
               give_up_s: float = DEFAULT_GIVE_UP_S):
    super().__init__()
    self._fn = _TransactionalWriteFn(bootstrap_servers, group_id,
                                     unwritable_topic, producer_config or {},
                                     give_up_s)

  def expand(self, outputs):
    return outputs | 'ProduceInTransactions' >> beam.ParDo(self._fn)
