"""Parsing and validation of raw rows: every kind of good and bad input."""

import json
import math

import pytest

from tests import taxi
from transforms import records as R
from tests.taxi import TAXI

# A real row of data/taxi_trips.csv.
GOOD_CSV = taxi.row(2)  # line 4: a Cash trip with missing dropoff fields


def _errors(exc_info):
  return {(e.field, e.reason) for e in exc_info.value.errors}


def test_good_csv_row_is_typed_and_defaults_filled():
  record = R.parse_csv_row(TAXI, GOOD_CSV)
  assert record.values['fare'] == 27.05
  assert record.values['trip_start_hour'] == 2
  assert isinstance(record.values['trip_start_hour'], int)
  assert record.values['payment_type'] == 'Cash'
  # Missing optional fields get their declared default and are remembered.
  assert record.values['dropoff_latitude'] == 0.0
  assert record.values['dropoff_community_area'] == 0
  assert set(record.missing) == {
      'dropoff_latitude', 'dropoff_longitude', 'pickup_census_tract',
      'dropoff_census_tract', 'dropoff_community_area'}
  assert set(record.values) == set(TAXI.features_by_name)


def test_json_event_equals_csv_row_after_round_trip():
  event = R.csv_row_to_event(TAXI, GOOD_CSV)
  assert 'dropoff_latitude' not in event  # '' -> absent, not 0
  assert json.loads(json.dumps(event)) == event
  assert R.parse_json(TAXI, event) == R.parse_csv_row(TAXI, GOOD_CSV)


def test_missing_required_field():
  row = dict(GOOD_CSV)
  del row['fare']
  with pytest.raises(R.InvalidRecord) as e:
    R.parse_csv_row(TAXI, row)
  assert _errors(e) == {('fare', 'missing')}


def test_empty_string_in_required_field_is_missing():
  with pytest.raises(R.InvalidRecord) as e:
    R.parse_csv_row(TAXI, dict(GOOD_CSV, payment_type=''))
  assert _errors(e) == {('payment_type', 'missing')}


def test_wrong_type():
  with pytest.raises(R.InvalidRecord) as e:
    R.parse_csv_row(TAXI, dict(GOOD_CSV, trip_miles='twelve'))
  assert _errors(e) == {('trip_miles', 'not a number')}
  with pytest.raises(R.InvalidRecord) as e:
    R.parse_json(TAXI, dict(R.csv_row_to_event(TAXI, GOOD_CSV), fare='27.05'))
  assert _errors(e) == {('fare', 'expected a number, got str')}
  with pytest.raises(R.InvalidRecord) as e:
    R.parse_json(TAXI, dict(R.csv_row_to_event(TAXI, GOOD_CSV), payment_type=3))
  assert _errors(e) == {('payment_type', 'expected a string, got int')}


def test_nan_and_infinity_are_rejected():
  with pytest.raises(R.InvalidRecord) as e:
    R.parse_csv_row(TAXI, dict(GOOD_CSV, fare='NaN', trip_seconds='inf'))
  assert _errors(e) == {('fare', 'not a finite number'),
                        ('trip_seconds', 'not a finite number')}
  with pytest.raises(R.InvalidRecord) as e:
    R.parse_json(TAXI, dict(R.csv_row_to_event(TAXI, GOOD_CSV), fare=math.nan))
  assert _errors(e) == {('fare', 'not a finite number')}
  # The error serializes to valid JSON for dead letters.
  assert json.loads(json.dumps(e.value.to_dicts()))[0]['value'] == 'nan'


def test_integer_feature_rejects_fractions_and_out_of_domain():
  with pytest.raises(R.InvalidRecord) as e:
    R.parse_csv_row(TAXI, dict(GOOD_CSV, trip_start_hour='2.5',
                         trip_start_day='8', pickup_community_area='-1'))
  assert _errors(e) == {('trip_start_hour', 'not an integer'),
                        ('trip_start_day', 'out of domain [1, 7]'),
                        ('pickup_community_area', 'out of domain [0, 77]')}


def test_unknown_string_category_is_valid():
  # Unseen categories are legal: the model maps them to OOV buckets and the
  # drift monitor counts them.
  record = R.parse_csv_row(TAXI, dict(GOOD_CSV, payment_type='Bitcoin'))
  assert record.values['payment_type'] == 'Bitcoin'


def test_label_required_for_training_optional_for_serving():
  event = R.csv_row_to_event(TAXI, GOOD_CSV)
  del event['tips']
  record = R.parse_json(TAXI, event)
  assert TAXI.label.column not in record.values
  with pytest.raises(R.InvalidRecord) as e:
    R.parse_json(TAXI, event, require_label=True)
  assert _errors(e) == {('tips', 'missing')}


def test_not_json_and_not_an_object():
  with pytest.raises(R.InvalidRecord) as e:
    R.parse_json_bytes(TAXI, b'\xff\xfe{garbage')
  assert [x.field for x in e.value.errors] == ['*']
  assert e.value.errors[0].reason.startswith('not JSON')
  with pytest.raises(R.InvalidRecord) as e:
    R.parse_json_bytes(TAXI, b'[1, 2, 3]')
  assert _errors(e) == {('*', 'expected an object')}


def test_every_error_of_a_row_is_reported():
  with pytest.raises(R.InvalidRecord) as e:
    R.parse_csv_row(TAXI, dict(GOOD_CSV, fare='', trip_miles='x', trip_start_day='0'))
  assert {f for f, _ in _errors(e)} == {'fare', 'trip_miles', 'trip_start_day'}


def test_split_is_deterministic_and_close_to_the_requested_share():
  rows = list(R.read_csv(TAXI, 'data/taxi_trips.csv'))
  keys = [R.record_key(TAXI, r) for r in rows]
  assert keys == [R.record_key(TAXI, dict(r)) for r in rows]
  share = sum(R.is_eval(k, 20) for k in keys) / len(keys)
  assert 0.18 < share < 0.22
  # Identical rows share a key, hence a split.
  assert R.record_key(TAXI, rows[0]) == R.record_key(TAXI, dict(rows[0]))


def test_poison_values_are_rejected_with_a_reason_not_an_exception():
  """Values that crashed stages downstream are invalid at the parser."""
  good = R.csv_row_to_event(TAXI, GOOD_CSV)
  cases = {
      # An int of 400 digits has no float: OverflowError before.
      'trip_start_timestamp': (10**400, 'out of range'),
      'fare': (1e308, 'out of range (float32)'),        # inf as float32
      'pickup_census_tract': (1e19, 'out of range (int64)'),
      'dropoff_census_tract': (-2**63 - 1, 'out of range (int64)'),
      'company': ('\ud800', 'not valid Unicode (a lone surrogate)'),
  }
  for field, (value, reason) in cases.items():
    with pytest.raises(R.InvalidRecord) as e:
      R.parse_json(TAXI, dict(good, **{field: value}))
    assert _errors(e) == {(field, reason)}, field
  for seconds in (10**12, -1):
    with pytest.raises(R.InvalidRecord) as e:
      R.parse_json(TAXI, dict(good, trip_start_timestamp=seconds))
    assert _errors(e) == {('trip_start_timestamp',
                           'not a plausible event time (outside 1970-9999)')}
  # The largest values that fit are fine, and ints stay exact.
  record = R.parse_json(TAXI, dict(good, fare=3.4e38,
                                   pickup_census_tract=2**63 - 1))
  assert record.values['pickup_census_tract'] == 2**63 - 1


def test_json_nested_too_deeply_is_invalid_not_a_crash():
  deep = b'[' * 100_000 + b']' * 100_000
  with pytest.raises(R.InvalidRecord) as e:
    R.parse_json_bytes(TAXI, deep)
  assert _errors(e) == {('*', 'not JSON: nested too deeply')}
  nested = json.loads(b'[' * 500 + b']' * 500)
  with pytest.raises(R.InvalidRecord) as e:
    R.parse_json(TAXI, dict(R.csv_row_to_event(TAXI, GOOD_CSV), fare=nested))
  assert len(str(e.value)) < 500  # the message stays short


def test_event_id_must_be_a_short_string_or_number():
  from transforms import problem as problem_lib
  exasens = problem_lib.load('exasens')
  event = {'id': 'p-1', 'diagnosis': 'COPD', 'gender': 1, 'age': 50.0,
           'smoking': 2}
  assert R.parse_json(exasens, event).event_id == 'p-1'
  assert R.parse_json(exasens, dict(event, id=17)).event_id == '17'
  for bad in ([1] * 3, {'a': 1}, 'x' * 5000, '\ud800', True):
    try:
      R.parse_json(exasens, dict(event, id=bad))
    except R.InvalidRecord as e:
      assert [x.field for x in e.errors] == ['id'], e
    else:
      raise AssertionError(f'id {bad!r} accepted')
