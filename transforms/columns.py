"""Records as columnar batches: numpy columns and Arrow RecordBatches.

Training feeds tf.Transform Arrow RecordBatches through tfx-bsl's TFXIO
format (TFT warns that instance dicts are slow); serving and notebooks feed
the exported model numpy columns. Both come from the same ``Record`` values
and the same raw feature spec of the problem.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import pyarrow as pa

from transforms.problem import DType, Feature, Problem
from transforms.records import Record

_NUMPY_DTYPE = {DType.FLOAT: np.float32, DType.INT: np.int64,
                DType.STRING: object}


def _features(problem: Problem, include_label: bool) -> tuple[Feature, ...]:
  return problem.features if include_label else problem.serving_features


def column(feature: Feature, values: Sequence) -> np.ndarray:
  """One dense numpy column of raw values (strings as UTF-8 bytes)."""
  if feature.dtype is DType.STRING:
    return np.array([v.encode('utf-8') for v in values], dtype=object)
  return np.asarray(values, dtype=_NUMPY_DTYPE[feature.dtype])


def to_columns(problem: Problem, records: Sequence[Record],
               include_label: bool = False) -> dict[str, np.ndarray]:
  """Dense numpy columns, one per raw (serving) feature."""
  return {f.name: column(f, [r.values[f.name] for r in records])
          for f in _features(problem, include_label)}


@functools.lru_cache(maxsize=8)
def _tfxio(problem: Problem, include_label: bool):
  from tfx_bsl.public import tfxio
  return tfxio.TFExampleBeamRecord(
      physical_format='inmem', telemetry_descriptors=['rtml'],
      schema=problem.raw_schema(include_label))


def arrow_schema(problem: Problem, include_label: bool = True) -> pa.Schema:
  return _tfxio(problem, include_label).ArrowSchema()


def tensor_adapter_config(problem: Problem, include_label: bool = True):
  """The TFXIO TensorAdapterConfig matching ``to_record_batch``."""
  return _tfxio(problem, include_label).TensorAdapterConfig()


def to_record_batch(problem: Problem, records: Sequence[Record],
                    include_label: bool = True) -> pa.RecordBatch:
  """An Arrow RecordBatch in the TFXIO layout (one-value large lists)."""
  schema = arrow_schema(problem, include_label)
  by_name = problem.features_by_name
  offsets = pa.array(np.arange(len(records) + 1, dtype=np.int64))
  arrays = []
  for field in schema:
    feature = by_name[field.name]
    values = [r.values[feature.name] for r in records]
    if feature.dtype is DType.STRING:
      flat = pa.array([v.encode('utf-8') for v in values], pa.large_binary())
    else:
      flat = pa.array(np.asarray(values, dtype=_NUMPY_DTYPE[feature.dtype]))
    arrays.append(pa.LargeListArray.from_arrays(offsets, flat))
  return pa.RecordBatch.from_arrays(arrays, schema=schema)

