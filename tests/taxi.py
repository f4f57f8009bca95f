"""The taxi problem and real rows of data/taxi_trips.csv for tests."""

import csv
import functools
import itertools

from transforms import problem

TAXI = problem.load('taxi')

TAXI_CSV = 'data/taxi_trips.csv'


@functools.lru_cache(maxsize=None)
def _row(index: int) -> tuple:
  with open(TAXI_CSV, newline='', encoding='utf-8') as f:
    return tuple(next(itertools.islice(csv.DictReader(f), index, None)).items())


def row(index: int) -> dict[str, str]:
  """Data row ``index`` (0-based) as csv.DictReader yields it (a fresh dict)."""
  return dict(_row(index))

