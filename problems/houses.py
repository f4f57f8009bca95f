"""House sales in Washington state: what price will a house sell for? (regression)

4,600 sales from May to July 2014 (Kaggle "shree1992/housedata", as used by
Alexis Seigneurin's Kafka + H2O tutorial; ``data/README.md``). The model is
trained on log(1 + price), so errors are relative, and serves the price.
49 rows have a price of 0 (a quirk of the file): the parser rejects them with
a reason, and training sends them to its dead letters.

Data: ``data/houses.csv``.
"""

from transforms.problem import (Aggregate, DType, EventTime, Feature, Kind,
                                Label, Op, Problem, Ratio, Task, TimeUnit)

PROBLEM = Problem(
    name='houses',
    features=(
        Feature('bedrooms', Kind.NUMERIC, DType.FLOAT, required=True),
        Feature('bathrooms', Kind.NUMERIC, DType.FLOAT, required=True),
        Feature('sqft_living', Kind.NUMERIC, DType.FLOAT, required=True),
        Feature('sqft_lot', Kind.NUMERIC, DType.FLOAT, default=0.0),
        Feature('floors', Kind.NUMERIC, DType.FLOAT, default=1.0),
        Feature('sqft_above', Kind.NUMERIC, DType.FLOAT, default=0.0),
        Feature('sqft_basement', Kind.NUMERIC, DType.FLOAT, default=0.0),
        Feature('yr_built', Kind.BUCKETIZED, DType.FLOAT, required=True,
                buckets=10),
        # 0 means never renovated: buckets keep it apart from the years.
        Feature('yr_renovated', Kind.BUCKETIZED, DType.FLOAT, default=0.0,
                buckets=5),
        Feature('waterfront', Kind.IDENTITY, DType.INT, default=0,
                domain=(0, 1)),
        Feature('view', Kind.IDENTITY, DType.INT, default=0, domain=(0, 4)),
        Feature('condition', Kind.IDENTITY, DType.INT, default=3,
                domain=(1, 5)),
        Feature('city', Kind.CATEGORICAL, DType.STRING, required=True),
        Feature('statezip', Kind.CATEGORICAL, DType.STRING, required=True),
        Feature('date', Kind.EVENT_TIME, DType.INT, required=True),
        # A sale at price 0 is not a sale: invalid, with a reason.
        Feature('price', Kind.LABEL, DType.FLOAT, required=True,
                domain=(1.0, None)),
    ),
    label=Label(Task.REGRESSION, 'price', log_target=True),
    event_time=EventTime('date', TimeUnit.FORMAT, '%Y-%m-%d %H:%M:%S'),
    entity_key='city',
    aggregates=(Aggregate('price', (Op.SUM, Op.MEAN, Op.MIN, Op.MAX)),
                Aggregate('sqft_living', (Op.MEAN,))),
    ratios=(Ratio('price_per_sqft', 'price', 'sqft_living'),),
    # Chosen on the eval split: validation MAPE is lowest near 8 epochs.
    hparams={'epochs': 8, 'batch_size': 64, 'learning_rate': 3e-3},
    data='data/houses.csv',
)
