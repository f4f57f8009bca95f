"""Event formats on Kafka: JSON, CSV lines, Avro, Avro in the Confluent wire
format. One decoder per format, each giving the same typed records.

- ``json``: a JSON object per message (the default);
- ``csv``: one CSV line per message in the problem's column order (its
  ``csv.columns``, else the feature table's order), as Kafka-ML's ``RAW``;
- ``avro``: Avro binary of one record, schema given (``--avro_schema``, an
  ``.avsc`` file) or derived from the problem (``avro_schema``);
- ``avro_confluent``: a zero byte, a 4-byte big-endian schema id, then Avro
  binary (what Confluent serializers write). The schema is the given one;
  with ``--avro_schema_id`` a message that names another id is a dead letter.

Decoding never raises anything but ``records.InvalidRecord`` (with the
reason), so every bad message becomes a dead letter with its bytes. The
encoders are for producers (``tools.datasource``, tests).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import struct
from typing import Any, Mapping, Optional

from apache_beam.options.pipeline_options import PipelineOptions

from transforms import records as R
from transforms.problem import DType, Kind, Problem, TimeUnit

JSON, CSV, AVRO, AVRO_CONFLUENT = 'json', 'csv', 'avro', 'avro_confluent'
FORMATS = (JSON, CSV, AVRO, AVRO_CONFLUENT)
_CONFLUENT_MAGIC = 0


class FormatOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--input_format', choices=FORMATS, default=JSON,
                        help='How events are encoded on the input topic.')
    parser.add_argument('--avro_schema', default=None,
                        help='Avro schema (.avsc file, or JSON); default: '
                        'derived from the problem (transforms.formats).')
    parser.add_argument('--avro_schema_id', type=int, default=None,
                        help='avro_confluent: the schema id messages must '
                        'carry (default: any).')


def columns(problem: Problem) -> tuple[str, ...]:
  """The column order of a CSV-line event."""
  if problem.csv.columns:
    return tuple(problem.csv.columns)
  return tuple(f.name for f in problem.features)


def avro_schema(problem: Problem) -> dict[str, Any]:
  """An Avro record schema for the problem's raw events: every feature
  nullable (missing values are null), numbers as double or long, strings
  and date-time strings as string."""
  fields = []
  if problem.event_id and problem.event_id not in {
      f.name for f in problem.features}:
    fields.append({'name': problem.event_id, 'type': ['null', 'string'],
                   'default': None})
  for f in problem.features:
    if f.dtype is DType.STRING or (
        f.kind is Kind.EVENT_TIME
        and problem.event_time.unit is TimeUnit.FORMAT):
      kind = 'string'
    elif f.dtype is DType.INT:
      kind = 'long'
    else:
      kind = 'double'
    fields.append({'name': f.name, 'type': ['null', kind], 'default': None})
  return {'type': 'record', 'name': f'{problem.name}_event'.replace('-', '_'),
          'namespace': 'rtml', 'fields': fields}


def load_schema(text: Optional[str], problem: Problem) -> dict[str, Any]:
  """A schema from an ``.avsc`` path or JSON text; default the problem's."""
  if not text:
    return avro_schema(problem)
  if text.lstrip().startswith('{'):
    return json.loads(text)
  with open(text) as f:
    return json.load(f)


@dataclasses.dataclass(frozen=True)
class EventFormat:
  """How the events of a topic are encoded."""
  name: str = JSON
  schema: Optional[Mapping[str, Any]] = None  # Avro
  schema_id: Optional[int] = None             # avro_confluent

  def __post_init__(self):
    if self.name not in FORMATS:
      raise ValueError(f'format {self.name!r} is not one of {FORMATS}')

  @classmethod
  def from_options(cls, options: PipelineOptions,
                   problem: Problem) -> 'EventFormat':
    flags = options.view_as(FormatOptions)
    return cls.of(problem, flags.input_format, flags.avro_schema,
                  flags.avro_schema_id)

  @classmethod
  def of(cls, problem: Problem, name: str = JSON,
         schema: Optional[str] = None,
         schema_id: Optional[int] = None) -> 'EventFormat':
    avro = name in (AVRO, AVRO_CONFLUENT)
    return cls(name, load_schema(schema, problem) if avro else None,
               schema_id)

  def _parsed_schema(self):
    # fastavro's parsed schemas are cached per process (not pickled).
    import fastavro
    key = json.dumps(self.schema, sort_keys=True)
    if key not in _PARSED:
      _PARSED[key] = fastavro.parse_schema(dict(self.schema))
    return _PARSED[key]

  def decode(self, problem: Problem, payload: Optional[bytes],
             require_label: bool = False) -> R.Record:
    """A message value as a validated record. Raises InvalidRecord."""
    if payload is None:
      raise R.InvalidRecord([R.FieldError('*', None,
                                          'null value (tombstone)')])
    if self.name == JSON:
      return R.parse_json_bytes(problem, payload, require_label)
    if self.name == CSV:
      return R.parse_csv_row(problem, self._csv_row(problem, payload),
                             require_label=require_label)
    event = self._avro_event(payload)
    return R.parse_json(problem, {k: v for k, v in event.items()
                                  if v is not None}, require_label)

  def raw_event(self, problem: Problem, payload: bytes) -> dict[str, Any]:
    """The decoded message before validation (for event time). Raises
    InvalidRecord."""
    if self.name == JSON:
      try:
        event = json.loads(payload)
      except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise R.InvalidRecord([R.FieldError('*', None, f'not JSON: {e}')])
      if not isinstance(event, dict):
        raise R.InvalidRecord([R.FieldError('*', None, 'not an object')])
      return event
    if self.name == CSV:
      return self._csv_row(problem, payload)
    return self._avro_event(payload)

  def _csv_row(self, problem: Problem, payload: bytes) -> dict[str, str]:
    try:
      text = payload.decode('utf-8')
    except UnicodeDecodeError as e:
      raise R.InvalidRecord([R.FieldError('*', None, f'not UTF-8: {e}')])
    names = columns(problem)
    rows = list(csv.reader(io.StringIO(text), delimiter=problem.csv.delimiter,
                           skipinitialspace=problem.csv.skip_initial_space))
    if len(rows) != 1:
      raise R.InvalidRecord([R.FieldError(
          '*', text[:200], f'not one CSV line ({len(rows)} lines)')])
    values = rows[0]
    if len(values) != len(names):
      raise R.InvalidRecord([R.FieldError(
          '*', text[:200], f'{len(values)} columns, not {len(names)}')])
    return dict(zip(names, values))

  def _avro_event(self, payload: bytes) -> dict[str, Any]:
    import fastavro
    body = payload
    if self.name == AVRO_CONFLUENT:
      if len(payload) < 5 or payload[0] != _CONFLUENT_MAGIC:
        raise R.InvalidRecord([R.FieldError(
            '*', None, 'not the Confluent wire format (magic byte 0 and a '
            'schema id)')])
      (schema_id,) = struct.unpack('>I', payload[1:5])
      if self.schema_id is not None and schema_id != self.schema_id:
        raise R.InvalidRecord([R.FieldError(
            '*', schema_id, f'schema id {schema_id}, expected '
            f'{self.schema_id}')])
      body = payload[5:]
    stream = io.BytesIO(body)
    try:
      event = fastavro.schemaless_reader(stream, self._parsed_schema(), None)
    except Exception as e:  # pylint: disable=broad-except
      raise R.InvalidRecord([R.FieldError(
          '*', None, f'not Avro of the schema: {type(e).__name__}: {e}')])
    if stream.tell() != len(body):
      raise R.InvalidRecord([R.FieldError(
          '*', None, f'{len(body) - stream.tell()} bytes after the Avro '
          'record')])
    if not isinstance(event, dict):
      raise R.InvalidRecord([R.FieldError('*', None, 'not an Avro record')])
    return event

  def encode(self, problem: Problem, event: Mapping[str, Any]) -> bytes:
    """A raw event (as ``records.csv_row_to_event`` gives) as a message."""
    if self.name == JSON:
      return json.dumps(dict(event)).encode()
    if self.name == CSV:
      out = io.StringIO()
      csv.writer(out, delimiter=problem.csv.delimiter,
                 lineterminator='').writerow(
                     ['' if event.get(c) is None else event.get(c)
                      for c in columns(problem)])
      return out.getvalue().encode()
    import fastavro
    names = {f['name']: f for f in self.schema['fields']}
    record = {}
    for name, field in names.items():
      value = event.get(name)
      types = field['type'] if isinstance(field['type'], list) else [
          field['type']]
      if value is not None and 'long' in types and isinstance(value, float) \
          and value.is_integer():
        value = int(value)
      elif value is not None and 'double' in types and isinstance(value, int):
        value = float(value)
      elif value is not None and 'string' in types and not isinstance(
          value, str):
        value = str(value)
      record[name] = value
    out = io.BytesIO()
    if self.name == AVRO_CONFLUENT:
      out.write(struct.pack('>bI', _CONFLUENT_MAGIC, self.schema_id or 1))
    fastavro.schemaless_writer(out, self._parsed_schema(), record)
    return out.getvalue()


_PARSED: dict[str, Any] = {}
