"""The record the source emits, and the connector's metrics namespace.

Shared by every other module of the package; imports none of them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import apache_beam as beam

METRICS_NAMESPACE = 'rtml.kafka'


class KafkaRecord(NamedTuple):
  """One Kafka message, as the source emits it (value not decoded)."""
  topic: str
  partition: int
  offset: int
  key: Optional[bytes]
  value: Optional[bytes]
  timestamp_ms: int


class KafkaBatch(NamedTuple):
  """The records one poll returned from one partition, in offset order, and
  each one's event time in seconds (what the source timestamps it with
  when it emits records one by one); ``ReadFromKafka(batches=True)``."""
  records: Sequence[KafkaRecord]
  event_seconds: Sequence[float]


beam.coders.registry.register_coder(KafkaRecord, beam.coders.RowCoder)
beam.coders.registry.register_coder(KafkaBatch, beam.coders.PickleCoder)
# Builds a KafkaRecord from a tuple without NamedTuple.__new__'s argument
# handling: the reader makes one per message.
_new_record = functools.partial(tuple.__new__, KafkaRecord)
