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

Requirement: the read and this write run in the same fused stage, so that a
bundle writes the outputs of exactly the records it read (the reader of
``ReadFromKafka`` reads a partition's offsets in order, one bundle after
another). A shuffle between them (e.g. RunInference with
``max_batch_duration_secs``, which batches with state) breaks this; the
serving pipeline refuses that combination. Read with ``commit_offsets=False``:
the transactions commit the offsets.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Mapping, NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.kafka_io.clients import (DEFAULT_GIVE_UP_S, producer_config,
                                         resolve_secrets, with_retry)
from transforms.kafka_io.dead_letters import dead_letter
from transforms.kafka_io.record import METRICS_NAMESPACE, KafkaRecord
from transforms.kafka_io.writer import _to_bytes

_LOGGER = logging.getLogger(__name__)


class Output(NamedTuple):
  """One record to write, and the input record it came from."""
  topic: str
  key: Any
  value: Any
  source: Optional[tuple[str, int, int]]  # (topic, partition, offset)


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
    self._producer = None
    self._offsets: dict[tuple[str, int], int] = {}
    self._count = 0
    self._open = False

  def setup(self):
    from kafka import KafkaProducer
    config = producer_config(self._bootstrap_servers,
                             'rtml-beam-transactional-writer',
                             self._give_up_s)
    # One id per writer instance: a killed job's open transaction is
    # aborted by the broker after transaction_timeout_ms.
    config['transactional_id'] = f'rtml-{self._group_id}-{uuid.uuid4().hex}'
    config.update(self._producer_config)
    config = resolve_secrets(config)
    self._producer = with_retry(lambda: KafkaProducer(**config),
                                self._give_up_s, 'transactional producer')
    self._producer.init_transactions()

  def start_bundle(self):
    if self._open:
      # The previous bundle failed before finish_bundle (the runner retries
      # it): what it sent must never be committed.
      self._abort()
    self._offsets = {}
    self._count = 0
    self._open = False

  def _abort(self) -> None:
    self._aborted.inc()
    try:
      self._producer.abort_transaction()
    except Exception:  # pylint: disable=broad-except
      self._close()   # a fenced or broken producer: start afresh
      self.setup()
    self._open = False

  def _send(self, output: Output) -> None:
    from kafka.errors import MessageSizeTooLargeError
    try:
      self._producer.send(output.topic, key=_to_bytes(output.key),
                          value=_to_bytes(output.value))
    except (MessageSizeTooLargeError, TypeError, ValueError) as e:
      self._unwritable.inc()
      topic, partition, offset = output.source or (None, None, None)
      key = _to_bytes(output.key)
      self._producer.send(self._unwritable_topic, key=key, value=_to_bytes(
          dead_letter(KafkaRecord(topic, partition, offset, key, None, -1),
                      [{'field': '*', 'value': None,
                        'reason': f'writing to {output.topic!r} failed: '
                                  f'{type(e).__name__}: {e}'}],
                      stage='WriteTransactionally')))

  def process(self, element: Output):
    if not self._open:
      self._producer.begin_transaction()
      self._open = True
    self._send(element)
    self._count += 1
    if element.source is not None:
      topic, partition, offset = element.source
      if offset is not None and offset >= self._offsets.get(
          (topic, partition), -1):
        self._offsets[(topic, partition)] = offset

  def finish_bundle(self):
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata
    if not self._open:
      return
    try:
      if self._offsets:
        self._producer.send_offsets_to_transaction(
            {TopicPartition(t, p): OffsetAndMetadata(o + 1, '', -1)
             for (t, p), o in self._offsets.items()}, self._group_id)
      started = time.monotonic()
      self._producer.commit_transaction()
      _LOGGER.debug('committed %d records in %.3fs', self._count,
                    time.monotonic() - started)
    except Exception as e:
      self._abort()
      raise RuntimeError(f'the transaction of {self._count} records failed '
                         f'and was aborted ({e!r}); the bundle is retried'
                         ) from e
    finally:
      self._open = False
    self._committed.inc()
    self._written.inc(self._count)

  def _close(self):
    if self._producer is not None:
      try:
        self._producer.close(timeout=10)
      except Exception:  # pylint: disable=broad-except
        pass
      self._producer = None

  def teardown(self):
    self._close()


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
