"""Chicago taxi trips: will the rider tip more than 20 % of the fare? (binary)

The declaration follows the TFX Chicago taxi example
(``tfx/examples/chicago_taxi_pipeline/taxi_utils.py``), with two decisions of
our own:

* Missing values are filled when a record is *parsed*, so every raw feature is
  a dense scalar. Serving then takes plain dense tensors, which is what
  RunInference batches best, and the same fill happens for training and
  serving because both use the same parser.
* Census tracts are 11-digit ids, not small integers: they go through a
  vocabulary like the string categoricals instead of an identity column.

Data: ``data/taxi_trips.csv`` (see ``data/README.md``).
"""

from transforms.problem import (Aggregate, DType, EventTime, Feature, Kind,
                                Label, Problem, Ratio, Task)

BIG_TIPPER_FRACTION = 0.2


def big_tipper(values):
  """The label rule, as in TFX: a big tipper tips more than 20 % of fare.

  Runs on TF tensors (training, in the transform graph) and on Python
  numbers (live quality of streamed events).
  """
  return values['tips'] > BIG_TIPPER_FRACTION * values['fare']


PROBLEM = Problem(
    name='taxi',
    features=(
        Feature('trip_miles', Kind.NUMERIC, DType.FLOAT, required=True),
        Feature('fare', Kind.NUMERIC, DType.FLOAT, required=True),
        Feature('trip_seconds', Kind.NUMERIC, DType.FLOAT, default=0.0),
        Feature('pickup_latitude', Kind.BUCKETIZED, DType.FLOAT, default=0.0,
                buckets=10),
        Feature('pickup_longitude', Kind.BUCKETIZED, DType.FLOAT, default=0.0,
                buckets=10),
        Feature('dropoff_latitude', Kind.BUCKETIZED, DType.FLOAT, default=0.0,
                buckets=10),
        Feature('dropoff_longitude', Kind.BUCKETIZED, DType.FLOAT,
                default=0.0, buckets=10),
        Feature('trip_start_hour', Kind.IDENTITY, DType.INT, required=True,
                domain=(0, 23)),
        Feature('trip_start_day', Kind.IDENTITY, DType.INT, required=True,
                domain=(1, 7)),
        Feature('trip_start_month', Kind.IDENTITY, DType.INT, required=True,
                domain=(1, 12)),
        # Community areas are 1..77 in Chicago; 0 stands for "unknown".
        Feature('pickup_community_area', Kind.IDENTITY, DType.INT, default=0,
                domain=(0, 77)),
        Feature('dropoff_community_area', Kind.IDENTITY, DType.INT,
                default=0, domain=(0, 77)),
        Feature('pickup_census_tract', Kind.CATEGORICAL, DType.INT,
                default=0),
        Feature('dropoff_census_tract', Kind.CATEGORICAL, DType.INT,
                default=0),
        Feature('payment_type', Kind.CATEGORICAL, DType.STRING,
                required=True),
        # Not '': tf.Transform vocabularies drop empty strings, which would
        # send "missing" into the out-of-vocabulary buckets with unseen
        # companies.
        Feature('company', Kind.CATEGORICAL, DType.STRING,
                default='(missing)'),
        Feature('trip_start_timestamp', Kind.EVENT_TIME, DType.INT,
                required=True),
        Feature('tips', Kind.LABEL, DType.FLOAT, required=True),
    ),
    label=Label(Task.BINARY, 'tips', rule=big_tipper, name='big_tipper'),
    event_time=EventTime('trip_start_timestamp'),
    entity_key='pickup_community_area',
    aggregates=(Aggregate('fare'), Aggregate('tips')),
    ratios=(Ratio('tip_rate', 'tips', 'fare'),),
    # Chosen on the eval split of data/taxi_trips.csv: validation AUC peaks
    # after 2-3 epochs and declines after (over-fitting).
    hparams={'epochs': 3},
    data='data/taxi_trips.csv',
)
