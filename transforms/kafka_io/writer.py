"""``WriteToKafka``: (key, value) pairs to a topic, at-least-once.

Writing (``WriteToKafka``): ``(key, value)`` pairs, value a dict/list (JSON),
``str`` or ``bytes``; idempotent producer with ``acks='all'``; each bundle
flushes in ``finish_bundle``: a record the broker did not acknowledge (e.g.
during an outage) is sent again until ``give_up_s``, then the bundle fails (to
be retried by the runner), so an acknowledged bundle never lost a record.

No element can fail the bundle: a value that cannot be encoded or is larger
than a request may be goes to the ``unwritable`` output (``Unwritable``:
key, value, reason), which a pipeline routes to its dead letters. JSON has
no NaN or infinity: non-finite floats are written as null.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Any, Mapping, NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from transforms.kafka_io.clients import (DEFAULT_GIVE_UP_S, producer_config,
                                         resolve_secrets, with_retry)
from transforms.kafka_io.event_time import _valid_event_seconds
from transforms.kafka_io.record import METRICS_NAMESPACE


_LOGGER = logging.getLogger(__name__)


class Unwritable(NamedTuple):
  """An element ``WriteToKafka`` could not write, and why."""
  key: Any
  value: Any
  reason: str


class _Sent(NamedTuple):
  """A record sent in this bundle, and the element it came from."""
  key: Optional[bytes]
  value: Optional[bytes]
  timestamp_ms: Optional[int]
  element: Any
  timestamp: Any  # the element's, for an Unwritable output
  window: Any


def log_unwritable(unwritable: Unwritable, topic: str) -> tuple[()]:
  """The last resort for an ``Unwritable`` a pipeline has nowhere to send
  (``beam.FlatMap(log_unwritable, topic)``): an error log line."""
  _LOGGER.error('A record for %r could not be written (%s): key %r', topic,
                unwritable.reason, unwritable.key)
  return ()


def _finite(value: Any) -> Any:
  """``value`` with non-finite floats as None (JSON has no NaN)."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  return value


def _to_bytes(value: Any) -> Optional[bytes]:
  """bytes as is, str as UTF-8, anything else as JSON (UTF-8)."""
  if value is None or isinstance(value, bytes):
    return value
  if isinstance(value, str):
    # A lone surrogate cannot be UTF-8: written escaped, not lost.
    return value.encode('utf-8', errors='backslashreplace')
  if isinstance(value, (bytearray, memoryview)):
    return bytes(value)
  try:
    return json.dumps(value, separators=(',', ':'), allow_nan=False,
                      ensure_ascii=False).encode('utf-8')
  except ValueError:  # NaN/inf, or a lone surrogate (UnicodeEncodeError)
    return json.dumps(_finite(value), separators=(',', ':'), allow_nan=False,
                      ensure_ascii=True).encode('ascii')


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

  UNWRITABLE = 'unwritable'

  def __init__(self, bootstrap_servers: str, topic: str,
               producer_config: Mapping[str, Any], event_timestamps: bool,
               give_up_s: float, metrics_namespace: str):
    self._bootstrap_servers = bootstrap_servers
    self._topic = topic
    self._producer_config = dict(producer_config)
    self._event_timestamps = event_timestamps
    self._give_up_s = give_up_s
    self._written = Metrics.counter(metrics_namespace, 'records_written')
    self._unwritable = Metrics.counter(metrics_namespace, 'records_unwritable')
    self._resent = Metrics.counter(metrics_namespace, 'records_resent')
    self._producer = None
    self._sent: list[_Sent] = []  # this bundle's records
    self._failed: dict[int, BaseException] = {}  # index in _sent -> error
    self._completed = 0
    self._lock = None  # created in setup(): locks do not pickle

  def setup(self):
    self._lock = threading.Lock()
    self._connect()

  def _connect(self):
    from kafka import KafkaProducer
    config = producer_config(self._bootstrap_servers, 'rtml-beam-writer',
                             self._give_up_s)
    config.update(self._producer_config)
    config = resolve_secrets(config)
    self._producer = with_retry(
        lambda: KafkaProducer(**config), self._give_up_s,
        f'producer for {self._topic!r}')

  def start_bundle(self):
    self._sent = []
    self._failed = {}
    self._completed = 0

  def _send(self, index: int) -> None:
    sent = self._sent[index]
    future = self._producer.send(self._topic, key=sent.key, value=sent.value,
                                 timestamp_ms=sent.timestamp_ms)

    def on_error(exc, index=index):
      self._failed[index] = exc  # dict assignment is atomic

    def on_done(_):  # on the producer's I/O thread
      with self._lock:
        self._completed += 1

    future.add_errback(on_error)
    future.add_both(on_done)

  def process(self, element, timestamp=beam.DoFn.TimestampParam,
              window=beam.DoFn.WindowParam):
    from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError
    if self._producer is None:
      # Seen on Prism: an upstream finish_bundle can hand this DoFn elements
      # after its teardown. Reconnect rather than fail (and duplicate) the
      # whole bundle.
      self._connect()
    try:
      key, value = element
      sent = _Sent(_to_bytes(key), _to_bytes(value),
                   _kafka_timestamp_ms(timestamp) if self._event_timestamps
                   else None, element, timestamp, window)
    except Exception as e:  # pylint: disable=broad-except
      self._unwritable.inc()
      yield beam.pvalue.TaggedOutput(self.UNWRITABLE, Unwritable(
          *_key_value(element), f'cannot encode: {type(e).__name__}: {e}'))
      return
    self._sent.append(sent)
    try:
      self._send(len(self._sent) - 1)
    except MessageSizeTooLargeError as e:
      self._sent.pop()
      self._unwritable.inc()
      yield beam.pvalue.TaggedOutput(self.UNWRITABLE, Unwritable(
          *_key_value(element), f'too large for Kafka: {e}'))
    except KafkaTimeoutError as e:
      # No metadata for the topic within give_up_s: the broker is gone.
      raise RuntimeError(
          f'{self._topic!r}: no broker answered within {self._give_up_s}s '
          f'({e}); failing the bundle so it is retried') from e

  def finish_bundle(self):
    from kafka.errors import KafkaError
    if not self._sent:
      return
    deadline = time.monotonic() + self._give_up_s
    warned = False
    refused = 0
    while True:
      try:
        self._producer.flush(timeout=max(0.0, deadline - time.monotonic()))
      except KafkaError:
        pass  # the futures say which records failed
      with self._lock:
        done = self._completed >= len(self._sent)
      if done and not self._failed:
        break
      if time.monotonic() >= deadline:
        raise RuntimeError(
            f'{len(self._failed) or len(self._sent) - self._completed} of '
            f'{len(self._sent)} records to {self._topic!r} were not '
            f'acknowledged within {self._give_up_s}s; failing the bundle so '
            f'it is retried. First error: '
            f'{next(iter(self._failed.values()), None)!r}')
      if done:
        # Every record has an answer and some failed. The broker refused
        # some for good (too large, not authorized...): those are
        # unwritable. Others failed for a while (an outage longer than the
        # producer's delivery timeout): send those again.
        for index, exc in sorted(self._failed.items()):
          if not getattr(exc, 'retriable', False):
            del self._failed[index]
            refused += 1
            self._unwritable.inc()
            sent = self._sent[index]
            yield beam.pvalue.TaggedOutput(self.UNWRITABLE, WindowedValue(
                Unwritable(*_key_value(sent.element),
                           f'refused by Kafka: {exc!r}'),
                sent.timestamp, [sent.window]))
        first_error = next(iter(self._failed.values()), None)
        failed, self._failed = sorted(self._failed), {}
        if not failed:
          break
        if not warned:
          _LOGGER.warning('%d records to %r failed (%r); sending them again '
                          'until %.0fs have passed', len(failed), self._topic,
                          first_error, self._give_up_s)
          warned = True
        with self._lock:
          self._completed -= len(failed)
        self._resent.inc(len(failed))
        for index in failed:
          self._send(index)
      else:
        # flush() waits for the batches it saw; a batch the producer split
        # (record too large for the batch) completes later: wait for it.
        time.sleep(0.005)
    self._written.inc(len(self._sent) - refused)
    self._sent = []

  def teardown(self):
    if self._producer is not None:
      self._producer.close(timeout=10)
      self._producer = None


def _key_value(element: Any) -> tuple[Any, Any]:
  try:
    key, value = element
    return key, value
  except (TypeError, ValueError):
    return None, element


class WriteToKafka(beam.PTransform):
  """Writes ``(key, value)`` pairs to a topic; at-least-once.

  Keys and values may be ``bytes``, ``str`` (UTF-8) or JSON-serializable
  objects (dicts are JSON-encoded); None stays null. The producer is
  idempotent with ``acks='all'`` and every bundle is flushed and checked in
  ``finish_bundle``: an unacknowledged record is sent again until
  ``give_up_s``, then fails the bundle (the runner retries it, which may
  write duplicates - never drops); a record Kafka refuses for good, or that
  cannot be encoded, comes out as ``Unwritable``.

  Args:
    bootstrap_servers: 'host:port[,host:port]'.
    topic: target topic.
    producer_config: extra kafka-python producer settings (security,
      compression...). Overrides the defaults.
    event_timestamps: Kafka timestamp = the element's event time (when it is
      a real time); else the producer's clock.
    give_up_s: how long a bundle waits out an unreachable broker before it
      fails (with a clear error).

  Returns (from ``expand``): the ``Unwritable`` elements.
  """

  def __init__(self, bootstrap_servers: str, topic: str, *,
               producer_config: Optional[Mapping[str, Any]] = None,
               event_timestamps: bool = True,
               give_up_s: float = DEFAULT_GIVE_UP_S):
    super().__init__()
    self._fn = _WriteFn(bootstrap_servers, topic, producer_config or {},
                        event_timestamps, give_up_s, METRICS_NAMESPACE)

  def expand(self, pcoll):
    return (pcoll | 'Produce' >> beam.ParDo(self._fn).with_outputs(
        _WriteFn.UNWRITABLE, main='written'))[_WriteFn.UNWRITABLE]
