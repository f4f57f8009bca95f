"""Raw record parsing and validation, shared by training and serving.

A CSV row (a dict of strings, as ``csv.DictReader`` yields) or a JSON event (a
dict decoded from a Kafka message) becomes a typed ``Record`` whose values
match ``features.raw_feature_spec()``, or an ``InvalidRecord`` error that
lists every bad field with its value and a reason. Training and serving call
the same functions, so a value that is invalid for one is invalid for both.

Rules (derived from ``features.FEATURES``):

* missing (absent, JSON ``null``, or empty string) -> the declared default, or
  an error ``missing`` if the feature is required;
* a float that is not a finite number -> ``not a finite number``;
* an int feature given a non-integral value -> ``not an integer``;
* an IDENTITY feature outside its domain -> ``out of domain``;
* an unseen string category is *valid*: it maps to an out-of-vocabulary
  bucket in the model and is counted by the drift monitor;
* JSON values must have JSON types matching the feature: a number for numeric
  features (a numeric string is rejected), a string for string features.

Example (no pipeline needed)::

    from transforms import records
    rec = records.parse_json({'fare': 12.5, ...})
    rec.values['fare']  # 12.5
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Iterable, Mapping, NamedTuple

from transforms.features import DType, FEATURES, Feature, Kind


@dataclasses.dataclass(frozen=True)
class FieldError:
  field: str
  value: Any
  reason: str

  def to_dict(self) -> dict[str, Any]:
    value = self.value
    if isinstance(value, float) and not math.isfinite(value):
      value = str(value)  # keep the JSON of dead letters valid
    return {'field': self.field, 'value': value, 'reason': self.reason}


class InvalidRecord(ValueError):
  """A raw record that cannot be used; ``errors`` says why, field by field."""

  def __init__(self, errors: list[FieldError]):
    self.errors = errors
    super().__init__('; '.join(
        f'{e.field}={e.value!r}: {e.reason}' for e in errors))

  def to_dicts(self) -> list[dict[str, Any]]:
    return [e.to_dict() for e in self.errors]


class Record(NamedTuple):
  """A valid raw record.

  Attributes:
    values: feature name -> typed value, defaults filled in (dense).
    missing: names of features that were missing and got their default; the
      training statistics and drift checks count them.
  """
  values: dict[str, Any]
  missing: tuple[str, ...]


_MISSING = object()


def _is_missing(value: Any) -> bool:
  return value is _MISSING or value is None or value == ''


def _coerce(feature: Feature, value: Any, from_text: bool) -> Any:
  """Converts one present raw value; raises ValueError(reason)."""
  if feature.dtype is DType.STRING:
    if not from_text and not isinstance(value, str):
      raise ValueError(f'expected a string, got {type(value).__name__}')
    return value
  if isinstance(value, bool):
    raise ValueError('expected a number, got bool')
  if from_text:
    try:
      number = float(value)
    except (TypeError, ValueError):
      raise ValueError('not a number') from None
  else:
    if not isinstance(value, (int, float)):
      raise ValueError(f'expected a number, got {type(value).__name__}')
    number = float(value)
  if not math.isfinite(number):
    raise ValueError('not a finite number')
  if feature.dtype is DType.FLOAT:
    return number
  if number != int(number):
    raise ValueError('not an integer')
  integer = int(number)
  if feature.domain is not None:
    low, high = feature.domain
    if not low <= integer <= high:
      raise ValueError(f'out of domain [{low}, {high}]')
  return integer


def _parse(raw: Mapping[str, Any], from_text: bool,
           require_label: bool) -> Record:
  if not isinstance(raw, Mapping):
    raise InvalidRecord([FieldError('*', raw, 'expected an object')])
  values: dict[str, Any] = {}
  missing: list[str] = []
  errors: list[FieldError] = []
  for feature in FEATURES:
    value = raw.get(feature.name, _MISSING)
    if _is_missing(value):
      required = feature.required and (
          feature.kind is not Kind.LABEL or require_label)
      if required:
        errors.append(FieldError(
            feature.name, None if value is _MISSING else value, 'missing'))
      elif feature.kind is not Kind.LABEL:
        values[feature.name] = feature.default
        missing.append(feature.name)
      continue
    try:
      values[feature.name] = _coerce(feature, value, from_text)
    except ValueError as e:
      errors.append(FieldError(feature.name, value, str(e)))
  if errors:
    raise InvalidRecord(errors)
  return Record(values, tuple(missing))


def parse_csv_row(row: Mapping[str, str], require_label: bool = True) -> Record:
  """Parses a CSV row (strings; '' is missing). Raises InvalidRecord."""
  return _parse(row, from_text=True, require_label=require_label)


def parse_json(event: Any, require_label: bool = False) -> Record:
  """Parses a decoded JSON event. Raises InvalidRecord.

  Serving events usually carry no label, so it is optional by default; when
  present it is validated and kept (for live accuracy).
  """
  return _parse(event, from_text=False, require_label=require_label)


def parse_json_bytes(payload: bytes, require_label: bool = False) -> Record:
  """Decodes and parses a Kafka message value. Raises InvalidRecord."""
  try:
    event = json.loads(payload)
  except (UnicodeDecodeError, ValueError) as e:
    raise InvalidRecord([FieldError('*', None, f'not JSON: {e}')]) from None
  return parse_json(event, require_label=require_label)


def csv_row_to_event(row: Mapping[str, str]) -> dict[str, Any]:
  """A CSV row as a JSON event, losslessly: '' -> absent, numbers as numbers.

  Values that do not convert stay strings, so a bad row stays bad and is
  rejected by the consumer rather than repaired by the producer.
  """
  event: dict[str, Any] = {}
  for feature in FEATURES:
    value = row.get(feature.name, '')
    if value == '':
      continue
    if feature.dtype is DType.STRING:
      event[feature.name] = value
      continue
    try:
      number = float(value)
    except ValueError:
      event[feature.name] = value
      continue
    if feature.dtype is DType.INT and math.isfinite(number) and (
        number == int(number)):
      event[feature.name] = int(number)
    else:
      event[feature.name] = number
  return event


def record_key(raw: Mapping[str, Any]) -> str:
  """A stable id of a raw record, from its feature values only.

  Identical trips get the same key, so they land in the same split and
  duplicates cannot leak from train to eval.
  """
  canonical = json.dumps(
      [str(raw.get(f.name, '')) for f in FEATURES], separators=(',', ':'))
  return hashlib.sha1(canonical.encode('utf-8')).hexdigest()[:16]


def is_eval(key: str, eval_percent: int) -> bool:
  """Deterministic train/eval split on a record key."""
  return int(key[:8], 16) % 100 < eval_percent


def read_csv(path: str) -> Iterable[dict[str, str]]:
  """Rows of a local CSV file as dicts of strings."""
  import csv
  with open(path, newline='', encoding='utf-8') as f:
    yield from csv.DictReader(f)
