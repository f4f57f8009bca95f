"""How the Kafka clients of the connector ride out an unreachable broker.

Every client (source, sink, offset commits, partition discovery) reconnects
quickly once a broker is back (``CLIENT_DEFAULTS``: kafka-python's own
backoff grows to 30 s) and retries a failed connection with a log line per
attempt (``with_retry``) for up to ``give_up_s`` seconds, then fails with an
error that says so.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Mapping, Optional, TypeVar

_LOGGER = logging.getLogger(__name__)

CLIENT_DEFAULTS = {'reconnect_backoff_ms': 100,
                   'reconnect_backoff_max_ms': 2000}
# Long enough for a broker restart or a leader election; a pipeline flag
# (``--give_up_s``) sets it.
DEFAULT_GIVE_UP_S = 600.0

T = TypeVar('T')


def resolve_secrets(config: Mapping[str, Any]) -> dict[str, Any]:
  """``config`` with secret references resolved where the client is made.

  A value ``env:NAME`` is read from the environment variable ``NAME`` and
  ``file:/path`` from that file (trailing newline stripped), so the job's
  options and its pickled transforms carry the reference, not the secret:
  ``--consumer_config '{"sasl_plain_password": "env:KAFKA_PASSWORD"}'``.
  """
  out = dict(config)
  for key, value in config.items():
    if not isinstance(value, str):
      continue
    if value.startswith('env:'):
      name = value[4:]
      if name not in os.environ:
        raise KeyError(f'Kafka setting {key!r}: environment variable {name} '
                       'is not set')
      out[key] = os.environ[name]
    elif value.startswith('file:'):
      with open(value[5:]) as f:
        out[key] = f.read().rstrip('\n')
  return out


def producer_config(bootstrap_servers: str, client_id: str,
                    give_up_s: float = DEFAULT_GIVE_UP_S) -> dict[str, Any]:
  """The project's producer settings: idempotent, ``acks='all'``, waiting
  out an outage shorter than ``give_up_s`` (kafka-python names)."""
  return {
      'bootstrap_servers': bootstrap_servers,
      'acks': 'all',
      'enable_idempotence': True,
      'linger_ms': 5,
      'batch_size': 256 * 1024,
      'client_id': client_id,
      **CLIENT_DEFAULTS,
      'delivery_timeout_ms': int(give_up_s * 1000),
      'max_block_ms': int(give_up_s * 1000),
  }


def is_retriable(error: BaseException) -> bool:
  """A Kafka error that may go away by itself (broker down, no leader...)."""
  from kafka.errors import KafkaError
  return isinstance(error, KafkaError) and bool(error.retriable)


def with_retry(connect: Callable[[], T], give_up_s: float, what: str) -> T:
  """``connect()``, retried while it fails with a retriable Kafka error
  (e.g. 'Unable to bootstrap'), for up to ``give_up_s``."""
  deadline = time.monotonic() + give_up_s
  delay = 0.5
  while True:
    try:
      return connect()
    except Exception as e:  # pylint: disable=broad-except
      if not is_retriable(e):
        raise
      if time.monotonic() + delay > deadline:
        raise RuntimeError(f'{what}: no Kafka broker answered within '
                           f'{give_up_s:.0f}s ({e!r})') from e
      _LOGGER.warning('%s: Kafka broker unreachable (%r); retrying in %.1fs',
                      what, e, delay)
      time.sleep(delay)
      delay = min(delay * 2, 10.0)


def from_start(bootstrap_servers: str, topic: str,
               consumer_config: Optional[Mapping[str, Any]] = None):
  """(consumer, partitions): a group-less consumer assigned every partition
  of ``topic`` at its start, to read a compacted topic whole (the model
  registry, results, reference tables). Raises LookupError if the topic
  does not exist."""
  from kafka import KafkaConsumer, TopicPartition
  consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers,
                           enable_auto_commit=False, **CLIENT_DEFAULTS,
                           **resolve_secrets(consumer_config or {}))
  partitions = consumer.partitions_for_topic(topic)
  if not partitions:
    consumer.close()
    raise LookupError(f'topic {topic!r} does not exist')
  tps = [TopicPartition(topic, p) for p in sorted(partitions)]
  consumer.assign(tps)
  consumer.seek_to_beginning(*tps)
  return consumer, tps
