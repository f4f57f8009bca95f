"""``WriteToKafka``: (key, value) pairs to a topic, at-least-once.

Writing (``WriteToKafka``): ``(key, value)`` pairs, value a dict/list (JSON),
``str`` or ``bytes``; idempotent producer with ``acks='all'``; each bundle
flushes in ``finish_bundle`` and fails (to be retried by the runner) if any
record was not acknowledged, so an acknowledged bundle never lost a record.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Mapping, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.kafka_io.event_time import _valid_event_seconds
from transforms.kafka_io.record import METRICS_NAMESPACE


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
