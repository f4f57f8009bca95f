"""Event formats: JSON, CSV lines, Avro and the Confluent wire format give
the same records for the same rows, and name what is wrong otherwise."""

import struct

import pytest

from problems.exasens import PROBLEM as EXASENS
from problems.houses import PROBLEM as HOUSES
from tests.taxi import TAXI
from tools import replay
from transforms import formats
from transforms import records as R

DATA = {'taxi': (TAXI, 'data/taxi_trips.csv'),
        'houses': (HOUSES, 'data/houses.csv'),
        'exasens': (EXASENS, 'data/exasens.csv')}


@pytest.mark.parametrize('name', sorted(DATA))
@pytest.mark.parametrize('fmt', [formats.CSV, formats.AVRO,
                                 formats.AVRO_CONFLUENT])
def test_every_format_decodes_to_the_json_records(name, fmt):
  problem, path = DATA[name]
  events = replay.load_events(problem, path, limit=300)
  codec = formats.EventFormat.of(problem, fmt, schema_id=7)
  as_json = formats.EventFormat.of(problem)
  checked = 0
  for _, event in events:
    try:
      expected = as_json.decode(problem, as_json.encode(problem, event))
    except R.InvalidRecord:
      with pytest.raises(R.InvalidRecord):
        codec.decode(problem, codec.encode(problem, event))
      continue
    assert codec.decode(problem, codec.encode(problem, event)) == expected
    checked += 1
  assert checked > 200


def test_confluent_wire_format_checks_magic_and_schema_id():
  codec = formats.EventFormat.of(TAXI, formats.AVRO_CONFLUENT, schema_id=7)
  _, event = replay.load_events(TAXI, 'data/taxi_trips.csv', limit=1)[0]
  payload = codec.encode(TAXI, event)
  assert payload[0] == 0 and struct.unpack('>I', payload[1:5]) == (7,)
  with pytest.raises(R.InvalidRecord, match='schema id 8, expected 7'):
    codec.decode(TAXI, payload[:1] + struct.pack('>I', 8) + payload[5:])
  with pytest.raises(R.InvalidRecord, match='Confluent wire format'):
    codec.decode(TAXI, b'\x01' + payload[1:])
  any_id = formats.EventFormat.of(TAXI, formats.AVRO_CONFLUENT)
  assert any_id.decode(TAXI, payload) == codec.decode(TAXI, payload)


@pytest.mark.parametrize('payload, reason', [
    (b'\x02\x04', 'not Avro of the schema'),
    (None, 'tombstone'),
])
def test_bad_avro_is_named(payload, reason):
  codec = formats.EventFormat.of(TAXI, formats.AVRO)
  with pytest.raises(R.InvalidRecord) as e:
    codec.decode(TAXI, payload)
  assert reason in e.value.to_dicts()[0]['reason']


def test_avro_with_trailing_bytes_is_refused():
  codec = formats.EventFormat.of(TAXI, formats.AVRO)
  _, event = replay.load_events(TAXI, 'data/taxi_trips.csv', limit=1)[0]
  with pytest.raises(R.InvalidRecord, match='bytes after'):
    codec.decode(TAXI, codec.encode(TAXI, event) + b'\x00\x00')


def test_csv_lines_with_the_wrong_columns_are_refused():
  codec = formats.EventFormat.of(TAXI, formats.CSV)
  n = len(formats.columns(TAXI))
  with pytest.raises(R.InvalidRecord, match=f'3 columns, not {n}'):
    codec.decode(TAXI, b'1,2,3')
  with pytest.raises(R.InvalidRecord, match='not one CSV line'):
    codec.decode(TAXI, b'1,2\n3,4')
  with pytest.raises(R.InvalidRecord, match='not UTF-8'):
    codec.decode(TAXI, b'\xff\xfe')


def test_a_given_schema_is_used(tmp_path):
  import json
  path = tmp_path / 'taxi.avsc'
  schema = formats.avro_schema(TAXI)
  path.write_text(json.dumps(schema))
  assert formats.EventFormat.of(TAXI, formats.AVRO, str(path)).schema == (
      schema)
