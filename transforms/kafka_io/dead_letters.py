"""Dead letters: records that could not be used, as JSON-ready dicts.

Dead letters (``transforms.decode.DecodeEvents``): ``KafkaRecord`` ->
``records.Record`` via ``records.parse_json_bytes``; anything that fails goes
to the ``dead_letters`` output as a JSON-ready dict (``dead_letter``) with the
reasons. ``WriteDeadLetters`` writes them to a topic.

A dead letter always fits in one Kafka request: the original value is kept
once (as text when it is UTF-8, else as base64), cut to
``MAX_VALUE_BYTES`` with its full size recorded, and every error value is
cut to ``MAX_ERROR_VALUE_CHARS``. ``original_bytes`` gives the bytes back.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any, Iterable, Mapping, Optional

import apache_beam as beam

from transforms.kafka_io.clients import DEFAULT_GIVE_UP_S
from transforms.kafka_io.record import KafkaRecord
from transforms.kafka_io.writer import WriteToKafka

# Well under the 1 MiB default request size of brokers and producers, even
# as base64 (4/3) with the JSON around it.
MAX_VALUE_BYTES = 256 * 1024
MAX_KEY_BYTES = 16 * 1024
MAX_ERROR_VALUE_CHARS = 1024
MAX_REASON_CHARS = 2048


def _kept(data: Optional[bytes], limit: int, name: str) -> dict[str, Any]:
  """``name`` (UTF-8 text) or ``name_base64``, cut to ``limit`` bytes, and
  the original size."""
  if data is None:
    return {name: None, f'{name}_base64': None, f'{name}_size': None,
            f'{name}_truncated': False}
  kept = data[:limit]
  try:
    text = kept.decode('utf-8')
  except UnicodeDecodeError as e:
    # Cut inside a multi-byte character: drop the partial character.
    cut_char = len(data) > limit and e.start >= len(kept) - 3
    text = kept[:e.start].decode('utf-8') if cut_char else None
  return {name: text,
          f'{name}_base64': (None if text is not None
                             else base64.b64encode(kept).decode('ascii')),
          f'{name}_size': len(data),
          f'{name}_truncated': len(data) > limit}


def original_bytes(letter: Mapping[str, Any], name: str = 'value'
                   ) -> Optional[bytes]:
  """The original bytes a dead letter kept (cut if ``<name>_truncated``)."""
  if letter.get(f'{name}_base64') is not None:
    return base64.b64decode(letter[f'{name}_base64'])
  text = letter.get(name)
  return None if text is None else text.encode('utf-8')


def dead_letter(record: KafkaRecord, errors: Iterable[Mapping[str, Any]],
                stage: str = 'DecodeEvents') -> dict[str, Any]:
  """The JSON-ready dead letter of a record that could not be used.

  ``value`` is the original value when it is UTF-8 text, else
  ``value_base64`` holds its bytes (likewise ``key``); see
  ``original_bytes``. ``stage`` names the step that rejected it.
  """
  return {
      'topic': record.topic,
      'partition': record.partition,
      'offset': record.offset,
      'timestamp_ms': record.timestamp_ms,
      **_kept(record.key, MAX_KEY_BYTES, 'key'),
      **_kept(record.value, MAX_VALUE_BYTES, 'value'),
      'errors': [json_safe_error(e) for e in errors],
      'stage': stage,
  }


def _short(text: str, limit: int) -> str:
  return text if len(text) <= limit else (
      f'{text[:limit]}... ({len(text)} chars)')


def json_safe_error(error: Mapping[str, Any]) -> dict[str, Any]:
  """An error dict that JSON-encodes, as UTF-8, at a bounded size."""
  out = {}
  for name, value in error.items():
    limit = MAX_REASON_CHARS if name == 'reason' else MAX_ERROR_VALUE_CHARS
    if isinstance(value, str):
      # backslashreplace: a lone surrogate cannot be encoded as UTF-8.
      value = _short(value.encode('utf-8', errors='backslashreplace')
                     .decode('utf-8'), limit)
    elif isinstance(value, float) and not math.isfinite(value):
      value = repr(value)
    elif value is None or isinstance(value, (bool, float)) or (
        isinstance(value, int) and abs(value) < 2**63):
      pass
    else:  # containers, huge ints, other objects
      value = _short(_safe_repr(value), limit)
    out[str(name)] = value
  return out


def _safe_repr(value: Any) -> str:
  try:
    text = json.dumps(value, allow_nan=True, ensure_ascii=True)
  except (TypeError, ValueError, RecursionError):
    try:
      text = repr(value)
    except (RecursionError, ValueError):  # e.g. a list nested too deeply
      text = f'<{type(value).__name__}>'
  if len(text) > 4 * MAX_ERROR_VALUE_CHARS:
    text = text[:4 * MAX_ERROR_VALUE_CHARS]
  return text.encode('utf-8', errors='backslashreplace').decode('utf-8')


class WriteDeadLetters(beam.PTransform):
  """Writes dead-letter dicts to a topic, keyed ``topic-partition-offset``;
  returns the ``Unwritable`` ones (see ``WriteToKafka``)."""

  def __init__(self, bootstrap_servers: str, topic: str, *,
               producer_config: Optional[Mapping[str, Any]] = None,
               give_up_s: float = DEFAULT_GIVE_UP_S):
    super().__init__()
    self._write = WriteToKafka(bootstrap_servers, topic,
                               producer_config=producer_config,
                               give_up_s=give_up_s)

  def expand(self, dead_letters):
    return (dead_letters
            | 'KeyBySource' >> beam.Map(
                lambda d: (f"{d['topic']}-{d['partition']}-{d['offset']}", d))
            | 'WriteDeadLetterTopic' >> self._write)
