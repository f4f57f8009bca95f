"""Dead letters: records that could not be used, as JSON-ready dicts.

Dead letters (``transforms.decode.DecodeEvents``): ``KafkaRecord`` ->
``records.Record`` via ``records.parse_json_bytes``; anything that fails goes
to the ``dead_letters`` output as a JSON-ready dict (``dead_letter``) with the
reasons. ``WriteDeadLetters`` writes them to a topic.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Iterable, Mapping, Optional

import apache_beam as beam

from transforms.kafka_io.record import KafkaRecord
from transforms.kafka_io.writer import WriteToKafka


def _text_and_base64(data: Optional[bytes]) -> tuple[Optional[str],
                                                     Optional[str]]:
  if data is None:
    return None, None
  return (data.decode('utf-8', errors='replace'),
          base64.b64encode(data).decode('ascii'))


def dead_letter(record: KafkaRecord, errors: Iterable[Mapping[str, Any]],
                stage: str = 'DecodeEvents') -> dict[str, Any]:
  """The JSON-ready dead letter of a record that could not be used.

  ``value``/``key`` are UTF-8 with undecodable bytes replaced (readable);
  ``value_base64``/``key_base64`` are the exact original bytes.
  """
  value, value_b64 = _text_and_base64(record.value)
  key, key_b64 = _text_and_base64(record.key)
  return {
      'topic': record.topic,
      'partition': record.partition,
      'offset': record.offset,
      'timestamp_ms': record.timestamp_ms,
      'key': key,
      'key_base64': key_b64,
      'value': value,
      'value_base64': value_b64,
      'errors': [_json_safe(dict(e)) for e in errors],
      'stage': stage,
  }


def _json_safe(error: dict[str, Any]) -> dict[str, Any]:
  try:
    json.dumps(error, allow_nan=False)
    return error
  except (TypeError, ValueError):
    return {**error, 'value': repr(error.get('value'))}


class WriteDeadLetters(beam.PTransform):
  """Writes dead-letter dicts to a topic, keyed ``topic-partition-offset``."""

  def __init__(self, bootstrap_servers: str, topic: str, *,
               producer_config: Optional[Mapping[str, Any]] = None):
    super().__init__()
    self._write = WriteToKafka(bootstrap_servers, topic,
                               producer_config=producer_config)

  def expand(self, dead_letters):
    return (dead_letters
            | 'KeyBySource' >> beam.Map(
                lambda d: (f"{d['topic']}-{d['partition']}-{d['offset']}", d))
            | 'WriteDeadLetterTopic' >> self._write)
