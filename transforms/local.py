"""tf.Transform outside a pipeline: for notebooks, tests and debugging.

Load the ``transform/`` directory a training run wrote and apply it to a few
raw rows, a list of dicts or a pandas DataFrame::

    from transforms import local
    tft_out = local.load('out/transform')
    local.transform_rows(tft_out, [{'fare': 12.5, 'trip_miles': 2.0, ...}])
    local.transform_dataframe(tft_out, pandas.read_csv('data/taxi_trips.csv'))

Rows go through the same parser as the pipelines (``transforms.records``), so
a bad row raises ``records.InvalidRecord`` with the reason.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from transforms import columns
from transforms import records as R


def load(transform_dir: str):
  """The ``tft.TFTransformOutput`` of a training run's ``transform/`` dir."""
  import tensorflow_transform as tft
  return tft.TFTransformOutput(transform_dir)


def parse_rows(rows: Iterable[Mapping[str, Any]],
               from_csv: bool = False) -> list[R.Record]:
  """Parses JSON-typed dicts (or CSV string dicts) into records."""
  parse = R.parse_csv_row if from_csv else R.parse_json
  return [parse(row, require_label=False) for row in rows]


def transform_records(tf_transform_output, records: list[R.Record],
                      include_label: bool = False) -> dict[str, np.ndarray]:
  """Transformed features of parsed records, as numpy arrays."""
  import tensorflow as tf
  raw = {name: tf.constant(values) for name, values in
         columns.to_columns(records, include_label).items()}
  transformed = tf_transform_output.transform_raw_features(raw)
  return {name: t.numpy() for name, t in transformed.items()}


def transform_rows(tf_transform_output, rows: Iterable[Mapping[str, Any]],
                   from_csv: bool = False) -> dict[str, np.ndarray]:
  """Transformed features of raw dict rows (label not needed)."""
  return transform_records(tf_transform_output, parse_rows(rows, from_csv))


def transform_dataframe(tf_transform_output, frame) -> dict[str, np.ndarray]:
  """Transformed features of a pandas DataFrame of raw columns.

  Missing values (NaN, None, '') take the declared defaults, as in the
  pipelines; numeric NaN in a required column is an error.
  """
  rows = []
  for row in frame.to_dict(orient='records'):
    rows.append({k: ('' if v is None or (isinstance(v, float) and np.isnan(v))
                     else str(v)) for k, v in row.items()})
  return transform_rows(tf_transform_output, rows, from_csv=True)
