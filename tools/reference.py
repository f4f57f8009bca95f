"""Build a reference table from a problem's training split: per key, the
median and count of a numeric field.

    python -m tools.reference --problem houses --input data/houses.csv \\
        --key statezip --field price --min_count 5 \\
        --output data/houses_statezip.csv

Only rows of the training split (the same hash split as ``pipelines.train``)
count, so a model evaluated on the eval split never sees its own labels
through the table; keys with fewer than ``--min_count`` training rows are
left out (a median of one sale is that sale's price) and get the table's
defaults when joined. Prints the median over all training rows (a sensible
default for the field).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from typing import Optional, Sequence

from transforms import problem as problem_lib
from transforms import records as R


def build(problem, path: str, key: str, field: str, min_count: int = 5,
          eval_percent: int = 20) -> tuple[dict[str, tuple[float, int]],
                                           float]:
  """{key value: (median, count)} over the training rows, and the median
  over all of them."""
  groups: dict[str, list[float]] = {}
  for row in R.read_csv(problem, path):
    if R.is_eval(R.record_key(problem, row), eval_percent):
      continue
    try:
      record = R.parse_csv_row(problem, row)
    except R.InvalidRecord:
      continue
    groups.setdefault(str(record.values[key]), []).append(
        float(record.values[field]))
  everything = [v for values in groups.values() for v in values]
  table = {k: (statistics.median(v), len(v)) for k, v in groups.items()
           if len(v) >= min_count}
  return table, statistics.median(everything)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m tools.reference',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--problem', required=True)
  parser.add_argument('--input', required=True)
  parser.add_argument('--key', required=True)
  parser.add_argument('--field', required=True)
  parser.add_argument('--min_count', type=int, default=5)
  parser.add_argument('--eval_percent', type=int, default=20)
  parser.add_argument('--prefix', default=None,
                      help='Column prefix (default: the key): '
                      '<prefix>_median_<field>, <prefix>_count.')
  parser.add_argument('--output', required=True)
  args = parser.parse_args(argv)
  problem = problem_lib.load(args.problem)
  table, overall = build(problem, args.input, args.key, args.field,
                         args.min_count, args.eval_percent)
  prefix = args.prefix or args.key
  with open(args.output, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow([args.key, f'{prefix}_median_{args.field}',
                     f'{prefix}_count'])
    for key in sorted(table):
      median, count = table[key]
      writer.writerow([key, f'{median:.1f}', count])
  print(f'[reference] {len(table)} keys with >= {args.min_count} training '
        f'rows to {args.output}; overall training median {args.field} '
        f'{overall:.1f}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
