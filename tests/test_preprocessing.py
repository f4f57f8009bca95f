"""preprocessing_fn: three raw rows in, expected transformed rows out."""

import math
import tempfile

import apache_beam as beam
import pytest
import tensorflow_transform.beam as tft_beam
from apache_beam.testing.util import assert_that

from transforms import columns
from transforms.problem import transformed_name
from transforms import preprocessing
from transforms import records as R
from tests.taxi import TAXI


def _event(fare, miles, seconds, payment, company, hour, lat, tips):
  return {'fare': fare, 'trip_miles': miles, 'trip_seconds': seconds,
          'payment_type': payment, 'company': company,
          'trip_start_hour': hour, 'trip_start_day': 2, 'trip_start_month': 3,
          'pickup_community_area': 8, 'dropoff_community_area': 32,
          'pickup_latitude': lat, 'pickup_longitude': -87.6,
          'dropoff_latitude': 41.88, 'dropoff_longitude': -87.62,
          'trip_start_timestamp': 1400000000, 'tips': tips}


ROWS = [
    _event(10.0, 1.0, 300.0, 'Cash', 'X', 0, 41.80, 0.0),      # not a big tipper
    _event(20.0, 2.0, 600.0, 'Cash', 'X', 12, 41.90, 5.0),     # 5 > 0.2 * 20
    _event(30.0, 6.0, None, 'Credit Card', None, 23, 42.00, 6.0),  # 6 == 0.2*30
]


def _z(values):
  mean = sum(values) / len(values)
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
  return [(v - mean) / std for v in values]


def _expected():
  fares, miles, seconds = [10., 20., 30.], [1., 2., 6.], [300., 600., 0.]
  payment = {'Cash': 0, 'Credit Card': 1}  # vocabulary: most frequent first
  company = {'X': 0, '(missing)': 1}        # the filled-in default
  rows = []
  for i, row in enumerate(ROWS):
    rows.append({
        transformed_name('fare'): _z(fares)[i],
        transformed_name('trip_miles'): _z(miles)[i],
        transformed_name('trip_seconds'): _z(seconds)[i],
        transformed_name('payment_type'): payment[row['payment_type']],
        transformed_name('company'): company[row['company'] or '(missing)'],
        transformed_name('trip_start_hour'): row['trip_start_hour'],
        transformed_name('trip_start_day'): 2 - 1,    # domain starts at 1
        transformed_name('trip_start_month'): 3 - 1,
        transformed_name('pickup_community_area'): 8,
        transformed_name('dropoff_community_area'): 32,
        transformed_name('pickup_census_tract'): 0,   # one value: id 0
        transformed_name('dropoff_census_tract'): 0,
        TAXI.label.name: [0, 1, 0][i],
    })
  return rows


def _check(got):
  """Matcher run inside the pipeline (assert_that raises on failure)."""
  expected = _expected()
  assert len(got) == 3, got
  # Beam gives no order guarantee; the fare z-score identifies the row.
  got = sorted(got, key=lambda r: r[transformed_name('fare')])
  for got_row, want_row in zip(got, expected):
    for name, want in want_row.items():
      assert got_row[name] == pytest.approx(want, abs=1e-5), (name, got_row)
  # Buckets: ordered like the raw latitudes, within [0, buckets).
  lat_buckets = [r[transformed_name('pickup_latitude')] for r in got]
  assert lat_buckets == sorted(lat_buckets) and len(set(lat_buckets)) == 3
  assert all(0 <= b < 10 for b in lat_buckets), lat_buckets
  # Every model feature is produced, and nothing else but the label.
  assert set(got[0]) == {transformed_name(f.name)
                         for f in TAXI.model_features} | {
                             TAXI.label.name}


def test_three_rows_in_expected_rows_out():
  records = [R.parse_json(TAXI, r, require_label=True) for r in ROWS]
  with tempfile.TemporaryDirectory() as tmp:
    with beam.Pipeline() as p, tft_beam.Context(temp_dir=tmp):
      batches = p | beam.Create([columns.to_record_batch(TAXI, records)])
      (transformed, _), _ = (
          (batches, columns.tensor_adapter_config(TAXI))
          | tft_beam.AnalyzeAndTransformDataset(preprocessing.preprocessing_fn(TAXI)))
      assert_that(transformed, _check)
