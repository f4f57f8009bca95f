"""Training statistics of every raw feature, for validation and drift checks.

The statistics are computed from parsed ``records.Record`` values, so they
describe exactly what the model was trained on (defaults filled by the parser
are counted as *missing*, not as values). The same code is available two ways
with identical results:

* ``compute_stats(records)``: a plain function, for notebooks and tests;
* ``ComputeFeatureStats()``: a Beam ``PTransform`` (``PCollection[Record]`` ->
  one dict) for the training pipeline.

Both fold records into the accumulator of ``FeatureStatsFn``. Sums are kept as
exact floating-point expansions (Shewchuk's algorithm, the one behind
``math.fsum``), so the result does not depend on how Beam splits and merges
bundles: the pure function and the combine agree to the last bit.

Format (JSON-serializable, written as ``stats.json``)::

    {"count": N,
     "features": {
       name: {"kind": "numeric", "dtype": "float", "count": N, "missing": k,
              "missing_rate": k / N,
              # numeric, bucketized, label, event_time, identity:
              "min": .., "max": .., "mean": .., "std": ..,
              # categorical, identity:
              "top_values": [{"value": v, "count": c}, ...],   # <= 20
              "vocabulary_size": V,
              "vocabulary": [v, ...],      # most frequent first, <= 1000
              "vocabulary_truncated": false}}}

``min``/``max``/``mean``/``std`` (population std) cover present values only and
are ``null`` when every value is missing. ``vocabulary`` is the full set of
seen values up to the problem's ``vocab_size`` (the size of the model's own
vocabulary), so the drift monitor can judge an unseen category the way the
model does: anything outside it is out of vocabulary.

Example::

    from transforms import problem, records, stats
    taxi = problem.load('taxi')
    rows = records.read_csv(taxi, 'data/taxi_trips.csv')
    s = stats.compute_stats(taxi, (records.parse_csv_row(taxi, r) for r in rows))
    s['features']['fare']['mean']
"""

from __future__ import annotations

import fractions
import json
import math
from typing import Any, Iterable

import apache_beam as beam

from transforms.problem import DType, Feature, Kind, Problem
from transforms.records import Record, is_missing

TOP_VALUES = 20

# Kinds that get min/max/mean/std, and kinds that get value counts.
_NUMERIC_KINDS = frozenset({Kind.NUMERIC, Kind.BUCKETIZED, Kind.LABEL,
                            Kind.EVENT_TIME, Kind.IDENTITY})
_COUNTED_KINDS = frozenset({Kind.CATEGORICAL, Kind.IDENTITY})


def has_numeric_stats(feature: Feature) -> bool:
  """Whether ``feature`` gets min/max/mean/std in the statistics."""
  return feature.kind in _NUMERIC_KINDS and feature.dtype is not DType.STRING


def has_vocabulary(feature: Feature) -> bool:
  """Whether ``feature`` gets top values and a vocabulary."""
  return feature.kind in _COUNTED_KINDS or (
      feature.kind is Kind.LABEL and feature.dtype is DType.STRING)


# Exact sums: a list of non-overlapping floats whose exact sum is the total.
def _add_exact(partials: list[float], x: float) -> None:
  i = 0
  for y in partials:
    if abs(x) < abs(y):
      x, y = y, x
    hi = x + y
    lo = y - (hi - x)
    if lo:
      partials[i] = lo
      i += 1
    x = hi
  partials[i:] = [x]


def _exact(partials: list[float]) -> fractions.Fraction:
  return sum((fractions.Fraction(p) for p in partials), fractions.Fraction(0))


# Accumulator of one feature: [missing, present, min, max, sum, sum of squares,
# value counts]. Plain lists and dicts keep Beam's pickling cheap.
_MISSING, _PRESENT, _MIN, _MAX, _SUM, _SUMSQ, _VALUES = range(7)


def _new_feature_acc() -> list[Any]:
  return [0, 0, None, None, [], [], {}]


def _add_value(acc: list[Any], feature: Feature, value: Any) -> None:
  acc[_PRESENT] += 1
  if has_numeric_stats(feature):
    x = float(value)
    acc[_MIN] = x if acc[_MIN] is None else min(acc[_MIN], x)
    acc[_MAX] = x if acc[_MAX] is None else max(acc[_MAX], x)
    _add_exact(acc[_SUM], x)
    _add_exact(acc[_SUMSQ], x * x)
  if has_vocabulary(feature):
    acc[_VALUES][value] = acc[_VALUES].get(value, 0) + 1


def _merge_feature(into: list[Any], other: list[Any]) -> None:
  into[_MISSING] += other[_MISSING]
  into[_PRESENT] += other[_PRESENT]
  for i, pick in ((_MIN, min), (_MAX, max)):
    if other[i] is not None:
      into[i] = other[i] if into[i] is None else pick(into[i], other[i])
  for i in (_SUM, _SUMSQ):
    for p in other[i]:
      _add_exact(into[i], p)
  for value, count in other[_VALUES].items():
    into[_VALUES][value] = into[_VALUES].get(value, 0) + count


def _feature_output(feature: Feature, acc: list[Any], total: int,
                    vocabulary_cap: int) -> dict[str, Any]:
  out: dict[str, Any] = {
      'kind': feature.kind.value,
      'dtype': feature.dtype.value,
      'count': total,
      'missing': acc[_MISSING],
      'missing_rate': acc[_MISSING] / total if total else 0.0,
  }
  n = acc[_PRESENT]
  if has_numeric_stats(feature):
    if n:
      s, q = _exact(acc[_SUM]), _exact(acc[_SUMSQ])
      out.update(min=acc[_MIN], max=acc[_MAX], mean=float(s / n),
                 std=math.sqrt(max(float((q * n - s * s) / (n * n)), 0.0)))
    else:
      out.update(min=None, max=None, mean=None, std=None)
  if has_vocabulary(feature):
    # Most frequent first; ties by value so the order is deterministic.
    ranked = sorted(acc[_VALUES].items(), key=lambda vc: (-vc[1], str(vc[0])))
    out.update(
        top_values=[{'value': v, 'count': c} for v, c in ranked[:TOP_VALUES]],
        vocabulary_size=len(ranked),
        vocabulary=[v for v, _ in ranked[:vocabulary_cap]],
        vocabulary_truncated=len(ranked) > vocabulary_cap)
  return out


class FeatureStatsFn(beam.CombineFn):
  """Combines ``Record``s into the statistics dict (see module docstring)."""

  def __init__(self, problem: Problem):
    self._problem = problem

  def create_accumulator(self) -> list[Any]:
    return [0, [_new_feature_acc() for _ in self._problem.features]]

  def add_input(self, accumulator: list[Any], record: Record) -> list[Any]:
    accumulator[0] += 1
    for feature, acc in zip(self._problem.features, accumulator[1]):
      if is_missing(record, feature.name):
        acc[_MISSING] += 1
      else:
        _add_value(acc, feature, record.values[feature.name])
    return accumulator

  def merge_accumulators(self, accumulators: Iterable[list[Any]]
                         ) -> list[Any]:
    accumulators = iter(accumulators)
    merged = next(accumulators)
    for other in accumulators:
      merged[0] += other[0]
      for into, acc in zip(merged[1], other[1]):
        _merge_feature(into, acc)
    return merged

  def extract_output(self, accumulator: list[Any]) -> dict[str, Any]:
    total = accumulator[0]
    return {
        'count': total,
        'features': {
            f.name: _feature_output(f, acc, total, self._problem.vocab_size)
            for f, acc in zip(self._problem.features, accumulator[1])
        },
    }


def compute_stats(problem: Problem, records: Iterable[Record]
                  ) -> dict[str, Any]:
  """Statistics of ``records``; identical to ``ComputeFeatureStats``."""
  fn = FeatureStatsFn(problem)
  accumulator = fn.create_accumulator()
  for record in records:
    accumulator = fn.add_input(accumulator, record)
  return fn.extract_output(accumulator)


class ComputeFeatureStats(beam.PTransform):
  """``PCollection[Record]`` -> a single statistics dict.

  Args:
    problem: whose features to describe.
    windowed: set for a windowed (e.g. streaming) input: one dict per window
      and no output for empty windows. By default the input is in the global
      window and an empty input still yields a dict with ``count`` 0.
  """

  def __init__(self, problem: Problem, windowed: bool = False):
    super().__init__()
    self._problem = problem
    self._windowed = windowed

  def expand(self, records):
    combine = beam.CombineGlobally(FeatureStatsFn(self._problem))
    if self._windowed:
      combine = combine.without_defaults()
    return records | 'CombineFeatureStats' >> combine


def dumps(stats: dict[str, Any]) -> str:
  """``stats.json`` text: sorted keys, so runs diff cleanly."""
  return json.dumps(stats, indent=1, sort_keys=True)


def write_stats(stats: dict[str, Any], path: str) -> None:
  """Writes ``stats.json`` to ``path`` (local or any Beam filesystem)."""
  from apache_beam.io.filesystems import FileSystems
  with FileSystems.create(path) as f:
    f.write(dumps(stats).encode('utf-8'))


def read_stats(path: str) -> dict[str, Any]:
  """Reads a ``stats.json`` written by ``write_stats``."""
  from apache_beam.io.filesystems import FileSystems
  with FileSystems.open(path) as f:
    return json.loads(f.read().decode('utf-8'))


def to_feature_statistics(problem: Problem, stats: dict[str, Any],
                          name: str = 'train'):
  """The statistics as TFDV's ``DatasetFeatureStatisticsList`` proto
  (``tensorflow_metadata``), which Facets and ``tfdv.visualize_statistics``
  open. Numbers get ``num_stats`` (count, missing, mean, std, min, max);
  categorical values ``string_stats`` (unique values, top values, counts)."""
  from tensorflow_metadata.proto.v0 import statistics_pb2 as pb
  types = {DType.FLOAT: pb.FeatureNameStatistics.FLOAT,
           DType.INT: pb.FeatureNameStatistics.INT,
           DType.STRING: pb.FeatureNameStatistics.STRING}
  dataset = pb.DatasetFeatureStatistics(name=name, num_examples=stats['count'])
  for feature in problem.features:
    st = stats['features'][feature.name]
    out = dataset.features.add(type=types[feature.dtype])
    out.path.step.append(feature.name)
    present = st['count'] - st['missing']
    common = pb.CommonStatistics(
        num_non_missing=present, num_missing=st['missing'],
        min_num_values=1 if present else 0, max_num_values=1 if present else 0,
        avg_num_values=1.0 if present else 0.0, tot_num_values=present)
    if has_numeric_stats(feature) and not has_vocabulary(feature):
      numbers = pb.NumericStatistics(common_stats=common)
      for field, key in (('mean', 'mean'), ('std_dev', 'std'),
                         ('min', 'min'), ('max', 'max')):
        if st.get(key) is not None:
          setattr(numbers, field, st[key])
      out.num_stats.CopyFrom(numbers)
    else:
      strings = pb.StringStatistics(common_stats=common,
                                    unique=st.get('vocabulary_size', 0))
      for top in st.get('top_values', []):
        strings.top_values.add(value=str(top['value']),
                               frequency=top['count'])
        strings.rank_histogram.buckets.add(
            low_rank=len(strings.rank_histogram.buckets),
            high_rank=len(strings.rank_histogram.buckets),
            label=str(top['value']), sample_count=top['count'])
      out.string_stats.CopyFrom(strings)
  return pb.DatasetFeatureStatisticsList(datasets=[dataset])


def write_feature_statistics(problem: Problem, stats: dict[str, Any],
                             path: str) -> str:
  """Writes ``to_feature_statistics`` as a binary proto (what
  ``tfdv.load_stats_binary`` reads) to ``path``, local or remote."""
  from apache_beam.io.filesystems import FileSystems
  with FileSystems.create(path) as f:
    f.write(to_feature_statistics(problem, stats).SerializeToString())
  return path
