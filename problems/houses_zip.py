"""House prices with each zip code's reference figures joined in.

The houses problem plus a reference table keyed by ``statezip``
(``data/houses_statezip.csv``: per zip code, the median sale price and the
number of sales *in the training split only*, zips with at least 5; built
by ``python -m tools.reference``). A zip not in the table (too few training
sales, or new) gets the defaults: the overall training median and 0 sales.
The same join runs in training and in serving (``transforms.enrichment``);
in serving the table may instead follow a compacted topic
(``--reference statezip=topic:houses-statezip``).

Data: ``data/houses.csv`` and ``data/houses_statezip.csv``.
"""

import dataclasses

from problems.houses import PROBLEM as HOUSES
from transforms.problem import DType, Feature, Kind, ReferenceTable

PROBLEM = dataclasses.replace(
    HOUSES,
    name='houses_zip',
    features=HOUSES.features + (
        Feature('zip_median_price', Kind.NUMERIC, DType.FLOAT,
                default=465000.0),
        Feature('zip_count', Kind.NUMERIC, DType.FLOAT, default=0.0),
    ),
    references=(ReferenceTable(
        'statezip', key='statezip', fields=('zip_median_price', 'zip_count'),
        source='data/houses_statezip.csv'),),
)
