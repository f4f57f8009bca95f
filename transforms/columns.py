"""Records as columnar batches: numpy columns and Arrow RecordBatches.

Training feeds tf.Transform Arrow RecordBatches through tfx-bsl's TFXIO
format (TFT warns that instance dicts are slow); serving and notebooks feed
the exported model numpy columns. Both come from the same ``Record`` values
and the same raw feature spec.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import pyarrow as pa

from transforms import features as F
from transforms.records import Record

_NUMPY_DTYPE = {F.DType.FLOAT: np.float32, F.DType.INT: np.int64,
                F.DType.STRING: object}


def _features(include_label: bool) -> tuple[F.Feature, ...]:
  return F.FEATURES if include_label else F.serving_features()


def to_columns(records: Sequence[Record],
               include_label: bool = False) -> dict[str, np.ndarray]:
  """Dense numpy columns, one per raw (serving) feature."""
  columns = {}
  for feature in _features(include_label):
    values = [r.values[feature.name] for r in records]
    if feature.dtype is F.DType.STRING:
      columns[feature.name] = np.array(
          [v.encode('utf-8') for v in values], dtype=object)
    else:
      columns[feature.name] = np.asarray(values,
                                         dtype=_NUMPY_DTYPE[feature.dtype])
  return columns


@functools.lru_cache(maxsize=2)
def _tfxio(include_label: bool):
  from tfx_bsl.public import tfxio
  return tfxio.TFExampleBeamRecord(
      physical_format='inmem', telemetry_descriptors=['rtml'],
      schema=F.raw_schema(include_label))


def arrow_schema(include_label: bool = True) -> pa.Schema:
  return _tfxio(include_label).ArrowSchema()


def tensor_adapter_config(include_label: bool = True):
  """The TFXIO TensorAdapterConfig matching ``to_record_batch``."""
  return _tfxio(include_label).TensorAdapterConfig()


def to_record_batch(records: Sequence[Record],
                    include_label: bool = True) -> pa.RecordBatch:
  """An Arrow RecordBatch in the TFXIO layout (one-value large lists)."""
  schema = arrow_schema(include_label)
  offsets = pa.array(np.arange(len(records) + 1, dtype=np.int64))
  arrays = []
  for field in schema:
    feature = F.FEATURES_BY_NAME[field.name]
    values = [r.values[feature.name] for r in records]
    if feature.dtype is F.DType.STRING:
      flat = pa.array([v.encode('utf-8') for v in values], pa.large_binary())
    else:
      flat = pa.array(np.asarray(values, dtype=_NUMPY_DTYPE[feature.dtype]))
    arrays.append(pa.LargeListArray.from_arrays(offsets, flat))
  return pa.RecordBatch.from_arrays(arrays, schema=schema)
