"""The one declaration of every raw feature of a taxi trip.

Every other view of the data is derived from ``FEATURES`` below: the raw
feature spec and schema used by tf.Transform, the CSV and JSON parsers in
``transforms.records``, the ``preprocessing_fn``, the serving signature of the
exported model (raw features minus the label source), the training statistics
and the drift checks. A feature name is typed here and nowhere else; other
modules refer to the constants (``LABEL_KEY``, ``EVENT_TIME_KEY``...) or loop
over ``FEATURES``.

The declaration follows the TFX Chicago taxi example
(``tfx/examples/chicago_taxi_pipeline/taxi_utils.py``), with two decisions of
our own:

* Missing values are filled when a record is *parsed* (see
  ``transforms.records``), so every raw feature is a dense scalar
  ``tf.io.FixedLenFeature([])``. Serving then takes plain dense tensors, which is
  what RunInference batches best, and the same fill happens for training and
  serving because both use the same parser.
* Census tracts are 11-digit ids, not small integers: they go through a
  vocabulary like the string categoricals instead of an identity column.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping


class Kind(enum.Enum):
  """How a raw feature is preprocessed (and validated)."""
  NUMERIC = 'numeric'            # float, z-scored
  BUCKETIZED = 'bucketized'      # float, quantile buckets
  CATEGORICAL = 'categorical'    # string or id, vocabulary + OOV buckets
  IDENTITY = 'identity'          # small non-negative int with a known domain
  LABEL = 'label'                # label source: present for training only
  EVENT_TIME = 'event_time'      # Unix seconds; event time, not a model input


class DType(enum.Enum):
  FLOAT = 'float'
  INT = 'int'
  STRING = 'string'


@dataclasses.dataclass(frozen=True)
class Feature:
  """One raw feature.

  Attributes:
    name: column name in CSV files and key in JSON events.
    kind: how it is preprocessed.
    dtype: the raw type after parsing.
    required: a missing value makes the record invalid; otherwise ``default``
      is filled in.
    default: value used when the raw value is missing (not required).
    domain: for IDENTITY features, the inclusive (min, max) allowed range.
      Values outside it are invalid, unlike string categoricals, whose unseen
      values are legal and fall into out-of-vocabulary buckets.
    buckets: number of quantile buckets for BUCKETIZED features.
  """
  name: str
  kind: Kind
  dtype: DType
  required: bool = False
  default: Any = None
  domain: tuple[int, int] | None = None
  buckets: int = 0


FEATURES: tuple[Feature, ...] = (
    Feature('trip_miles', Kind.NUMERIC, DType.FLOAT, required=True),
    Feature('fare', Kind.NUMERIC, DType.FLOAT, required=True),
    Feature('trip_seconds', Kind.NUMERIC, DType.FLOAT, default=0.0),
    Feature('pickup_latitude', Kind.BUCKETIZED, DType.FLOAT, default=0.0,
            buckets=10),
    Feature('pickup_longitude', Kind.BUCKETIZED, DType.FLOAT, default=0.0,
            buckets=10),
    Feature('dropoff_latitude', Kind.BUCKETIZED, DType.FLOAT, default=0.0,
            buckets=10),
    Feature('dropoff_longitude', Kind.BUCKETIZED, DType.FLOAT, default=0.0,
            buckets=10),
    Feature('trip_start_hour', Kind.IDENTITY, DType.INT, required=True,
            domain=(0, 23)),
    Feature('trip_start_day', Kind.IDENTITY, DType.INT, required=True,
            domain=(1, 7)),
    Feature('trip_start_month', Kind.IDENTITY, DType.INT, required=True,
            domain=(1, 12)),
    # Community areas are 1..77 in Chicago; 0 stands for "unknown".
    Feature('pickup_community_area', Kind.IDENTITY, DType.INT, default=0,
            domain=(0, 77)),
    Feature('dropoff_community_area', Kind.IDENTITY, DType.INT, default=0,
            domain=(0, 77)),
    Feature('pickup_census_tract', Kind.CATEGORICAL, DType.INT, default=0),
    Feature('dropoff_census_tract', Kind.CATEGORICAL, DType.INT, default=0),
    Feature('payment_type', Kind.CATEGORICAL, DType.STRING, required=True),
    # Not '': tf.Transform vocabularies drop empty strings, which would send
    # "missing" into the out-of-vocabulary buckets with unseen companies.
    Feature('company', Kind.CATEGORICAL, DType.STRING, default='(missing)'),
    Feature('trip_start_timestamp', Kind.EVENT_TIME, DType.INT, required=True),
    Feature('tips', Kind.LABEL, DType.FLOAT, required=True),
)

FEATURES_BY_NAME: Mapping[str, Feature] = {f.name: f for f in FEATURES}

# The label is derived, as in TFX: a big tipper tips more than 20 % of fare.
LABEL_KEY = next(f.name for f in FEATURES if f.kind is Kind.LABEL)
EVENT_TIME_KEY = next(f.name for f in FEATURES if f.kind is Kind.EVENT_TIME)
FARE_KEY = 'fare'
assert FARE_KEY in FEATURES_BY_NAME
# Default grouping key of the windowed analytics (transforms.windowing).
COMMUNITY_AREA_KEY = 'pickup_community_area'
assert COMMUNITY_AREA_KEY in FEATURES_BY_NAME
BIG_TIPPER_FRACTION = 0.2
# Name of the derived label in the transformed data.
TRANSFORMED_LABEL_KEY = 'big_tipper'

# String categoricals: vocabulary sizes as in the TFX taxi example.
VOCAB_SIZE = 1000
OOV_BUCKETS = 10


def transformed_name(key: str) -> str:
  """Name of the transformed feature derived from raw feature ``key``."""
  return key + '_xf'


def model_features() -> tuple[Feature, ...]:
  """Raw features the model consumes (everything but label and event time)."""
  return tuple(f for f in FEATURES
               if f.kind not in (Kind.LABEL, Kind.EVENT_TIME))


def serving_features() -> tuple[Feature, ...]:
  """Raw features the serving signature takes: all but the label source."""
  return tuple(f for f in FEATURES if f.kind is not Kind.LABEL)


def is_big_tipper(tips: float, fare: float) -> bool:
  """The label rule, in plain Python (for evaluation of streamed labels)."""
  return tips > BIG_TIPPER_FRACTION * fare


def raw_feature_spec(include_label: bool = True) -> dict[str, Any]:
  """tf.io feature spec of the raw (parsed, defaults filled) features."""
  import tensorflow as tf  # Imported lazily: parsing needs no TensorFlow.
  tf_dtype = {DType.FLOAT: tf.float32, DType.INT: tf.int64,
              DType.STRING: tf.string}
  return {
      f.name: tf.io.FixedLenFeature([], tf_dtype[f.dtype])
      for f in FEATURES
      if include_label or f.kind is not Kind.LABEL
  }


def raw_schema(include_label: bool = True):
  """The raw ``schema_pb2.Schema`` (tf.Transform / TFXIO form)."""
  from tensorflow_transform.tf_metadata import schema_utils
  return schema_utils.schema_from_feature_spec(raw_feature_spec(include_label))
