"""Reading a job's output topic in tests."""

import json
import time


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
      if done is not None and done(self.items):
        break
    return self.items

  def close(self) -> None:
    self._consumer.close()
