"""Raw record parsing and validation, shared by training and serving.

A CSV row (a dict of strings, as ``csv.DictReader`` yields) or a JSON event (a
dict decoded from a Kafka message) becomes a typed ``Record`` whose values
match ``problem.raw_feature_spec()``, or an ``InvalidRecord`` error that
lists every bad field with its value and a reason. Training and serving call
the same functions, so a value that is invalid for one is invalid for both.

Rules (derived from the problem's feature table, ``transforms.problem``):

* missing (absent, JSON ``null``, or empty string) -> the declared default, or
  an error ``missing`` if the feature is required;
* a float that is not a finite number -> ``not a finite number``;
* a number beyond its tensor type (float32, int64) -> ``out of range``;
* an int feature given a non-integral value -> ``not an integer``;
* an event time outside the years 1970-9999 -> ``not a plausible event time``;
* a string that is not valid Unicode (a lone surrogate) -> ``not valid
  Unicode``;
* JSON nested too deeply to parse -> ``not JSON``;
* a number outside its declared domain -> ``out of domain``;
* a date-time event time not in its format -> a reason naming the format;
* a label outside the declared classes -> ``not one of the classes``;
* an unseen string category is *valid*: it maps to an out-of-vocabulary
  bucket in the model and is counted by the drift monitor;
* JSON values must have JSON types matching the feature: a number for numeric
  features (a numeric string is rejected), a string for string features.

Example (no pipeline needed)::

    from transforms import problem, records
    taxi = problem.load('taxi')
    rec = records.parse_json(taxi, {'fare': 12.5, ...})
    rec.values['fare']  # 12.5
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import reprlib
from typing import Any, Iterable, Mapping, NamedTuple, Optional

from transforms.problem import DType, Feature, Kind, Problem, TimeUnit


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
    # reprlib: a value may be huge or nested thousands of levels deep.
    super().__init__('; '.join(
        f'{e.field}={reprlib.repr(e.value)}: {e.reason}' for e in errors))

  def to_dicts(self) -> list[dict[str, Any]]:
    return [e.to_dict() for e in self.errors]


class Record(NamedTuple):
  """A valid raw record.

  Attributes:
    values: feature name -> typed value, defaults filled in (dense).
    missing: names of features that were missing and got their default; the
      training statistics and drift checks count them.
    event_id: the value of the problem's ``event_id`` field, if any.
  """
  values: dict[str, Any]
  missing: tuple[str, ...]
  event_id: Optional[str] = None


_MISSING = object()
# The largest float32 (serving feeds the model float32 tensors).
_FLOAT32_MAX = 3.4028234663852886e38
_INT64_MIN, _INT64_MAX = -2**63, 2**63 - 1
# Event times the whole stack can hold: 1970-01-01 .. 9999-12-31.
_MAX_EVENT_SECONDS = 253402300799
MAX_EVENT_ID_CHARS = 1024


def _is_missing(value: Any) -> bool:
  return value is _MISSING or value is None or value == ''


def _check_domain(feature: Feature, number: float) -> None:
  if feature.domain is None:
    return
  low, high = feature.domain
  if (low is not None and number < low) or (high is not None and number > high):
    low_text = '-inf' if low is None else f'{low:g}'
    high_text = 'inf' if high is None else f'{high:g}'
    raise ValueError(f'out of domain [{low_text}, {high_text}]')


def _check_text(value: str) -> str:
  try:
    value.encode('utf-8')
  except UnicodeEncodeError:
    raise ValueError('not valid Unicode (a lone surrogate)') from None
  return value


def _coerce(problem: Problem, feature: Feature, value: Any,
            from_text: bool) -> Any:
  """Converts one present raw value; raises ValueError(reason)."""
  if feature.dtype is DType.STRING:
    if not from_text and not isinstance(value, str):
      raise ValueError(f'expected a string, got {type(value).__name__}')
    return _check_text(value)
  if (feature.kind is Kind.EVENT_TIME
      and problem.event_time.unit is TimeUnit.FORMAT):
    if not isinstance(value, str):
      raise ValueError(f'expected a date-time string, got '
                       f'{type(value).__name__}')
    return _check_event_time(problem, problem.event_time.parse_text(
        _check_text(value)))
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
    try:
      number = float(value)
    except OverflowError:  # an int of hundreds of digits
      raise ValueError('out of range') from None
  if not math.isfinite(number):
    raise ValueError('not a finite number')
  if feature.dtype is DType.FLOAT:
    if abs(number) > _FLOAT32_MAX:
      raise ValueError('out of range (float32)')
    _check_domain(feature, number)
    return _check_event_time(problem, number, feature)
  if number != int(number):
    raise ValueError('not an integer')
  integer = value if isinstance(value, int) else int(number)
  if not _INT64_MIN <= integer <= _INT64_MAX:
    raise ValueError('out of range (int64)')
  _check_domain(feature, integer)
  return _check_event_time(problem, integer, feature)


def coerce_value(problem: Problem, feature: Feature, value: Any,
                 from_text: bool) -> Any:
  """One present raw value as the feature's type; raises ValueError(reason)
  (reference tables use the same rules as events)."""
  return _coerce(problem, feature, value, from_text)


def _check_event_time(problem: Problem, value: Any,
                      feature: Optional[Feature] = None) -> Any:
  if feature is not None and feature.kind is not Kind.EVENT_TIME:
    return value
  seconds = problem.event_time.seconds(value)
  if not 0 <= seconds <= _MAX_EVENT_SECONDS:
    raise ValueError('not a plausible event time (outside 1970-9999)')
  return value


def _check_class(problem: Problem, feature: Feature, value: Any) -> None:
  classes = problem.label.classes
  if classes and feature.name == problem.label.column and (
      value not in classes):
    raise ValueError(f'not one of the classes {list(classes)}')


def _parse(problem: Problem, raw: Mapping[str, Any], from_text: bool,
           require_label: bool) -> Record:
  if not isinstance(raw, Mapping):
    raise InvalidRecord([FieldError('*', raw, 'expected an object')])
  values: dict[str, Any] = {}
  missing: list[str] = []
  errors: list[FieldError] = []
  for feature in problem.features:
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
      values[feature.name] = _coerce(problem, feature, value, from_text)
      _check_class(problem, feature, values[feature.name])
    except ValueError as e:
      errors.append(FieldError(feature.name, value, str(e)))
  if errors:
    raise InvalidRecord(errors)
  event_id = None
  if problem.event_id is not None:
    given = raw.get(problem.event_id)
    if not _is_missing(given):
      event_id = _event_id(problem.event_id, given)
  return Record(values, tuple(missing), event_id)


def _event_id(field: str, given: Any) -> str:
  if isinstance(given, bool) or not isinstance(given, (str, int, float)):
    reason = f'expected a string or number, got {type(given).__name__}'
  elif isinstance(given, str) and len(given) > MAX_EVENT_ID_CHARS:
    reason = f'longer than {MAX_EVENT_ID_CHARS} characters'
  else:
    try:
      return _check_text(str(given))
    except ValueError as e:  # a lone surrogate, or an int of 5,000 digits
      reason = str(e)
  raise InvalidRecord([FieldError(field, given, reason)])


def parse_csv_row(problem: Problem, row: Mapping[str, str],
                  require_label: bool = True) -> Record:
  """Parses a CSV row (strings; '' is missing). Raises InvalidRecord."""
  return _parse(problem, row, from_text=True, require_label=require_label)


def parse_json(problem: Problem, event: Any,
               require_label: bool = False) -> Record:
  """Parses a decoded JSON event. Raises InvalidRecord.

  Serving events usually carry no label, so it is optional by default; when
  present it is validated and kept (for live quality).
  """
  return _parse(problem, event, from_text=False, require_label=require_label)


def parse_json_bytes(problem: Problem, payload: bytes,
                     require_label: bool = False) -> Record:
  """Decodes and parses a Kafka message value. Raises InvalidRecord."""
  try:
    event = json.loads(payload)
  except (UnicodeDecodeError, ValueError) as e:
    raise InvalidRecord([FieldError('*', None, f'not JSON: {e}')]) from None
  except RecursionError:
    raise InvalidRecord([FieldError('*', None,
                                    'not JSON: nested too deeply')]) from None
  return parse_json(problem, event, require_label=require_label)


def event_seconds(problem: Problem, record: Record) -> Optional[float]:
  """The record's event time in Unix seconds (None: no event-time field)."""
  field = problem.event_time.field
  if field is None:
    return None
  return problem.event_time.seconds(record.values[field])


def is_missing(record: Record, name: str) -> bool:
  """A feature is missing if the parser filled its default or left it out.

  An absent label (serving events) is left out of ``values`` entirely.
  """
  return name in record.missing or name not in record.values


def label_value(problem: Problem, record: Record) -> Any:
  """The record's label (class index or target), None when it has none."""
  if is_missing(record, problem.label.column):
    return None
  return problem.label.value(record.values)


def csv_row_to_event(problem: Problem,
                     row: Mapping[str, str]) -> dict[str, Any]:
  """A CSV row as a JSON event, losslessly: '' -> absent, numbers as numbers.

  Values that do not convert stay strings, so a bad row stays bad and is
  rejected by the consumer rather than repaired by the producer.
  """
  event: dict[str, Any] = {}
  if problem.event_id is not None and row.get(problem.event_id):
    event[problem.event_id] = row[problem.event_id]
  for feature in problem.features:
    value = row.get(feature.name, '')
    if value == '' or value is None:
      continue
    if feature.dtype is DType.STRING or (
        feature.kind is Kind.EVENT_TIME
        and problem.event_time.unit is TimeUnit.FORMAT):
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


def record_key(problem: Problem, raw: Mapping[str, Any]) -> str:
  """A stable id of a raw record, from its feature values only.

  Identical trips get the same key, so they land in the same split and
  duplicates cannot leak from train to eval.
  """
  # Fields a reference table fills are not the row's own: the same row
  # splits alike with or without the join.
  joined = {f for table in problem.references for f in table.fields}
  canonical = json.dumps(
      [str(raw.get(f.name, '')) for f in problem.features
       if f.name not in joined], separators=(',', ':'))
  return hashlib.sha1(canonical.encode('utf-8')).hexdigest()[:16]


def is_eval(key: str, eval_percent: int) -> bool:
  """Deterministic train/eval split on a record key."""
  return int(key[:8], 16) % 100 < eval_percent


def csv_rows(problem: Problem, lines: Iterable[str]
             ) -> Iterable[tuple[int, dict[str, str]]]:
  """(line number, row dict) of CSV text lines in the problem's layout.

  Ragged rows: extra values go under the key None, missing ones are None.
  """
  import csv
  fmt = problem.csv
  lines = iter(lines)
  for _ in range(fmt.skip_lines):
    next(lines, None)
  reader = csv.DictReader(lines, fieldnames=fmt.columns,
                          delimiter=fmt.delimiter,
                          skipinitialspace=fmt.skip_initial_space)
  for row in reader:
    yield reader.line_num + fmt.skip_lines, row


def read_csv(problem: Problem, path: str) -> Iterable[dict[str, str]]:
  """Rows of a local CSV file as dicts of strings."""
  with open(path, newline='', encoding='utf-8') as f:
    for _, row in csv_rows(problem, f):
      yield row
