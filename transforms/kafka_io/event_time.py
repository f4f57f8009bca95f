"""A Kafka record's event time, in Unix seconds.

Each record is timestamped from ``event_time``: the Kafka record timestamp
(``'kafka'``, default), a top-level JSON field in Unix seconds (e.g.
``'created_at'``), or any callable. A record whose event time
cannot be read keeps its Kafka timestamp and is counted
(``event_time_fallback``); it is decoded (and dead-lettered) downstream.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Optional, Union

from transforms.kafka_io.record import KafkaRecord

# Event times outside [1970, 9999] cannot be real and are not Beam-safe.
_MAX_EVENT_SECONDS = 253402300799
_MAX_EVENT_MS = _MAX_EVENT_SECONDS * 1000


class JsonFieldEventTime:
  """Event time from a top-level JSON field of the value, in seconds.

  Args:
    field: e.g. ``'created_at'``, or a problem's ``event_time.field``.
    unit_seconds: seconds per unit of the field (0.001 for milliseconds).
  """

  def __init__(self, field: str, unit_seconds: float = 1.0):
    self.field = field
    self.unit_seconds = unit_seconds

  def __call__(self, record: KafkaRecord) -> float | None:
    try:
      value = json.loads(record.value)[self.field]
    except Exception:  # pylint: disable=broad-except
      return None  # not JSON, nested too deeply, no such field...
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return None
    return value * self.unit_seconds


def kafka_timestamp(record: KafkaRecord) -> float | None:
  """Event time = the Kafka record timestamp (CreateTime or LogAppendTime)."""
  return record.timestamp_ms / 1000.0 if record.timestamp_ms >= 0 else None


EventTimeFn = Callable[[KafkaRecord], Optional[float]]


def event_time_fn(event_time: Union[str, EventTimeFn]) -> EventTimeFn:
  """'kafka' -> Kafka timestamp; another string -> JSON field in seconds."""
  if callable(event_time):
    return event_time
  if event_time == 'kafka':
    return kafka_timestamp
  return JsonFieldEventTime(event_time)


def _valid_event_seconds(seconds: Any) -> bool:
  # Compared without float(): an int of 400 digits has no float.
  return (isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
          and not (isinstance(seconds, float) and math.isnan(seconds))
          and 0 <= seconds <= _MAX_EVENT_SECONDS)


def safe_event_seconds(event_time: EventTimeFn, record: KafkaRecord
                       ) -> Optional[float]:
  """``event_time(record)`` if it is a usable time, else None: no record
  and no user function can fail the read."""
  try:
    seconds = event_time(record)
  except Exception:  # pylint: disable=broad-except
    return None
  return float(seconds) if _valid_event_seconds(seconds) else None
