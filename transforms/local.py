"""tf.Transform outside a pipeline: for notebooks, tests and debugging.

Load the ``transform/`` directory a training run wrote and apply it to a few
raw rows, a list of dicts or a pandas DataFrame::

    from transforms import local, problem
    taxi = problem.load('taxi')
    tft_out = local.load('out/transform')
    local.transform_rows(taxi, tft_out, [{'fare': 12.5, 'trip_miles': 2.0, ...}])
    local.transform_dataframe(taxi, tft_out,
                              pandas.read_csv('data/taxi_trips.csv'))

``analyze_and_transform`` runs tf.Transform's analysis itself on rows in
memory (no pipeline, no files): the quickest way to see what a new problem's
``preprocessing_fn`` does.

Rows go through the same parser as the pipelines (``transforms.records``), so
a bad row raises ``records.InvalidRecord`` with the reason.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from transforms import columns
from transforms import records as R
from transforms.problem import Problem


def load(transform_dir: str):
  """The ``tft.TFTransformOutput`` of a training run's ``transform/`` dir."""
  import tensorflow_transform as tft
  return tft.TFTransformOutput(transform_dir)


def parse_rows(problem: Problem, rows: Iterable[Mapping[str, Any]],
               from_csv: bool = False,
               require_label: bool = False) -> list[R.Record]:
  """Parses JSON-typed dicts (or CSV string dicts) into records."""
  parse = R.parse_csv_row if from_csv else R.parse_json
  return [parse(problem, row, require_label=require_label) for row in rows]


def transform_records(problem: Problem, tf_transform_output,
                      records: list[R.Record],
                      include_label: bool = False) -> dict[str, np.ndarray]:
  """Transformed features of parsed records, as numpy arrays."""
  import tensorflow as tf
  raw = {name: tf.constant(values) for name, values in
         columns.to_columns(problem, records, include_label).items()}
  transformed = tf_transform_output.transform_raw_features(raw)
  return {name: t.numpy() for name, t in transformed.items()}


def transform_rows(problem: Problem, tf_transform_output,
                   rows: Iterable[Mapping[str, Any]],
                   from_csv: bool = False) -> dict[str, np.ndarray]:
  """Transformed features of raw dict rows (label not needed)."""
  return transform_records(problem, tf_transform_output,
                           parse_rows(problem, rows, from_csv))


def analyze_and_transform(problem: Problem, records: list[R.Record]
                          ) -> dict[str, np.ndarray]:
  """Analyzes ``records`` with the problem's ``preprocessing_fn`` and
  transforms them, in memory: what training would feed the model."""
  import tempfile
  import tensorflow_transform.beam as tft_beam
  from transforms import preprocessing
  batch = columns.to_record_batch(problem, records)
  with tempfile.TemporaryDirectory() as tmp, tft_beam.Context(temp_dir=tmp):
    (transformed, _), _ = (
        ([batch], columns.tensor_adapter_config(problem))
        | tft_beam.AnalyzeAndTransformDataset(
            preprocessing.preprocessing_fn(problem),
            output_record_batches=True))
  out: dict[str, list] = {}
  for record_batch, _ in transformed:
    for name, column in zip(record_batch.schema.names, record_batch.columns):
      out.setdefault(name, []).extend(
          v[0] if isinstance(v, list) else v for v in column.to_pylist())
  return {name: np.asarray(values) for name, values in out.items()}


def transform_dataframe(problem: Problem, tf_transform_output,
                        frame) -> dict[str, np.ndarray]:
  """Transformed features of a pandas DataFrame of raw columns.

  Missing values (NaN, None, '') take the declared defaults, as in the
  pipelines; numeric NaN in a required column is an error.
  """
  rows = []
  for row in frame.to_dict(orient='records'):
    rows.append({k: ('' if v is None or (isinstance(v, float) and np.isnan(v))
                     else str(v)) for k, v in row.items()})
  return transform_rows(problem, tf_transform_output, rows, from_csv=True)
