"""Writing and reading topics in tests."""

from __future__ import annotations

import json
import time
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition


class TopicReader:
  """Reads a topic from its start, across calls, into ``self.items``."""

  def __init__(self, bootstrap: str, topic: str, **consumer_config):
    from kafka import KafkaConsumer
    self.items = []
    self._consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap,
                                   auto_offset_reset='earliest',
                                   consumer_timeout_ms=500, **consumer_config)

  def until(self, expected: int, timeout_s: float, done=None) -> list:
    """Reads until ``expected`` items, ``done(items)`` or the timeout."""
    deadline = time.monotonic() + timeout_s
    while len(self.items) < expected and time.monotonic() < deadline:
      for message in self._consumer:
        self.items.append(json.loads(message.value))
        # Not only when the topic pauses: a steady stream would otherwise
        # be read to its end before the caller sees ``expected``.
        if len(self.items) >= expected or time.monotonic() >= deadline or (
            done is not None and done(self.items)):
          break
      if done is not None and done(self.items):
        break
    return self.items

  def close(self) -> None:
    self._consumer.close()


def every(ids, field: str = 'event_id'):
  """A ``done`` for ``TopicReader.until``: every one of ``ids`` was read
  (duplicates do not count towards it)."""
  wanted = set(ids)
  return lambda items: wanted <= {item.get(field) for item in items}


def consume_all(bootstrap: str, topic: str, expected: int | None = None,
                timeout_s: float = 30.0, **consumer_config) -> list[Any]:
  """Every record of ``topic``: up to the end offsets, or until ``expected``
  records arrived (for topics still being written)."""
  consumer = KafkaConsumer(bootstrap_servers=bootstrap,
                           auto_offset_reset='earliest',
                           enable_auto_commit=False, **consumer_config)
  tps = [TopicPartition(topic, p)
         for p in sorted(consumer.partitions_for_topic(topic) or [])]
  consumer.assign(tps)
  consumer.seek_to_beginning()
  out: list[Any] = []
  deadline = time.monotonic() + timeout_s
  try:
    while time.monotonic() < deadline:
      if expected is None:
        end = consumer.end_offsets(tps)
        if all(consumer.position(tp) >= end[tp] for tp in tps):
          break
      elif len(out) >= expected:
        break
      for batch in consumer.poll(timeout_ms=200).values():
        out.extend(batch)
  finally:
    consumer.close()
  return out


def produce(bootstrap: str, topic: str, messages, **kwargs) -> None:
  """Sends (key, value[, partition[, timestamp_ms]]) tuples and flushes."""
  producer = KafkaProducer(bootstrap_servers=bootstrap, **kwargs)
  for message in messages:
    key, value, partition, ts = (tuple(message) + (None, None))[:4]
    producer.send(topic, key=key, value=value, partition=partition,
                  timestamp_ms=ts)
  producer.flush()
  producer.close()


def committed_offsets(bootstrap: str, group: str, topic: str,
                      partitions) -> list:
  """The offsets ``group`` has committed for ``topic``'s ``partitions``
  (None where it has none)."""
  consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                           enable_auto_commit=False)
  try:
    return [consumer.committed(TopicPartition(topic, p)) for p in partitions]
  finally:
    consumer.close()
