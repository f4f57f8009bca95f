"""Training statistics: the pure function and the Beam combine agree exactly."""

import functools
import json

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from transforms.problem import Kind
from transforms import records as R
from transforms import stats as S
from tests.taxi import TAXI


@functools.lru_cache(maxsize=1)
def real_records(n=3000):
  rows = list(R.read_csv(TAXI, 'data/taxi_trips.csv'))[:n]
  return [R.parse_csv_row(TAXI, r) for r in rows]


def test_beam_combine_equals_pure_function_on_real_rows():
  records = real_records()
  expected = S.compute_stats(TAXI, records)
  p = beam.Pipeline(options=PipelineOptions(['--runner=FnApiRunner']))
  got = (p | beam.Create(records, reshuffle=True)
         | S.ComputeFeatureStats(TAXI))
  assert_that(got, equal_to([expected]))
  p.run().wait_until_finish()


def test_merge_order_does_not_change_a_bit():
  records = real_records()
  fn = S.FeatureStatsFn(TAXI)
  chunks = [records[i::7] for i in range(7)]

  def accumulate(chunk):
    acc = fn.create_accumulator()
    for record in chunk:
      acc = fn.add_input(acc, record)
    return acc

  forward = fn.extract_output(fn.merge_accumulators(
      [accumulate(c) for c in chunks]))
  backward = fn.extract_output(fn.merge_accumulators(
      [accumulate(c) for c in reversed(chunks)]))
  assert forward == backward == S.compute_stats(TAXI, records)


def test_format_per_kind():
  stats = S.compute_stats(TAXI, real_records())
  assert stats['count'] == 3000
  assert set(stats['features']) == set(TAXI.features_by_name)
  numeric = {'kind', 'dtype', 'count', 'missing', 'missing_rate', 'min',
             'max', 'mean', 'std'}
  counted = {'kind', 'dtype', 'count', 'missing', 'missing_rate',
             'top_values', 'vocabulary_size', 'vocabulary',
             'vocabulary_truncated'}
  for feature in TAXI.features:
    got = stats['features'][feature.name]
    assert got['kind'] == feature.kind.value
    assert got['dtype'] == feature.dtype.value
    if feature.kind is Kind.IDENTITY:
      assert set(got) == numeric | counted
    elif feature.kind is Kind.CATEGORICAL:
      assert set(got) == counted
    else:
      assert set(got) == numeric
  payment = stats['features']['payment_type']
  assert payment['top_values'][0]['value'] == 'Cash'
  assert payment['vocabulary_size'] == len(payment['vocabulary'])
  assert len(stats['features']['company']['top_values']) == S.TOP_VALUES
  json.dumps(stats, allow_nan=False)   # JSON-serializable as it is


def test_missing_counts_come_from_record_missing():
  rows = list(R.read_csv(TAXI, 'data/taxi_trips.csv'))[:3]
  # Row 1 lacks the pickup area; an unlabelled event has no tips at all.
  unlabelled = R.parse_json(TAXI, R.csv_row_to_event(TAXI, 
      {k: v for k, v in rows[2].items() if k != TAXI.label.column}))
  stats = S.compute_stats(TAXI, [R.parse_csv_row(TAXI, r) for r in rows] + [unlabelled])
  area = stats['features'][TAXI.entity_key]
  assert (area['count'], area['missing']) == (4, 2)
  assert area['missing_rate'] == 0.5
  # Defaults (0) are not values: min/mean cover the present ones only.
  assert area['min'] == area['max'] == area['mean'] == 60
  assert area['std'] == 0.0
  tips = stats['features'][TAXI.label.column]
  assert (tips['count'], tips['missing']) == (4, 1)


def test_fare_matches_plain_python():
  records = real_records()
  fares = [r.values['fare'] for r in records]
  fare = S.compute_stats(TAXI, records)['features']['fare']
  mean = sum(fares) / len(fares)
  std = (sum((x - mean) ** 2 for x in fares) / len(fares)) ** 0.5
  assert (fare['min'], fare['max']) == (min(fares), max(fares))
  assert abs(fare['mean'] - mean) < 1e-12 * mean
  assert abs(fare['std'] - std) < 1e-9 * std


def test_write_and_read_round_trip(tmp_path):
  stats = S.compute_stats(TAXI, real_records()[:50])
  path = str(tmp_path / 'stats.json')
  S.write_stats(stats, path)
  assert S.read_stats(path) == stats


def test_tfdv_statistics_proto_carries_the_same_figures(tmp_path):
  """stats.tfdv.pb: TFDV's DatasetFeatureStatisticsList, read back from the
  file, with the counts, moments and top values of stats.json."""
  import statistics
  from tensorflow_metadata.proto.v0 import statistics_pb2
  records = real_records(500)
  stats = S.compute_stats(TAXI, records)
  path = S.write_feature_statistics(TAXI, stats, str(tmp_path / 's.pb'))
  got = statistics_pb2.DatasetFeatureStatisticsList()
  with open(path, 'rb') as f:
    got.ParseFromString(f.read())
  dataset, = got.datasets
  assert dataset.num_examples == 500
  by_name = {f.path.step[0]: f for f in dataset.features}
  assert set(by_name) == {f.name for f in TAXI.features}
  fares = [r.values['fare'] for r in records]
  fare = by_name['fare']
  assert fare.type == statistics_pb2.FeatureNameStatistics.FLOAT
  assert fare.num_stats.common_stats.num_non_missing == 500
  assert abs(fare.num_stats.mean - statistics.fmean(fares)) < 1e-9
  assert abs(fare.num_stats.std_dev - statistics.pstdev(fares)) < 1e-9
  assert fare.num_stats.max == max(fares)
  company = by_name['company']
  values = [r.values['company'] for r in records
            if not R.is_missing(r, 'company')]
  assert company.string_stats.common_stats.num_missing == 500 - len(values)
  assert company.string_stats.unique == len(set(values))
  top = company.string_stats.top_values[0]
  assert top.frequency == max(values.count(v) for v in set(values))
  assert values.count(top.value) == top.frequency
