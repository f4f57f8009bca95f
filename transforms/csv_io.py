"""CSV files as validated records: the batch input of training and analytics.

``ReadCsvRows`` reads every file of a pattern (local or ``gs://``) in the
problem's CSV layout, and ``ParseRow`` turns each row into a
``records.Record`` or a dead letter with the reasons, so both jobs accept and
reject exactly the same rows.

    rows = p | 'ReadCsv' >> csv_io.ReadCsvRows(problem, 'data/*.csv')
    parsed = rows | 'ParseRows' >> beam.ParDo(
        csv_io.ParseRow(problem)).with_outputs(
            csv_io.ParseRow.DEAD_LETTER, main='records')
"""

from __future__ import annotations

import io
from typing import Iterable

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

from transforms import records as R
from transforms.problem import Problem

METRICS_NAMESPACE = 'rtml.csv'


class ReadCsvRows(beam.PTransform):
  """CSV files → (source, row dict) with ``source`` = ``path:line``."""

  def __init__(self, problem: Problem, file_pattern: str):
    super().__init__()
    self._problem = problem
    self._file_pattern = file_pattern

  def expand(self, pbegin):
    problem = self._problem
    return (pbegin
            | 'MatchFiles' >> fileio.MatchFiles(self._file_pattern)
            | 'ReadMatches' >> fileio.ReadMatches()
            | 'ReadRows' >> beam.FlatMap(
                lambda f: _read_csv_file(problem, f)))


def _read_csv_file(problem: Problem, readable_file
                   ) -> Iterable[tuple[str, dict[str, str]]]:
  path = readable_file.metadata.path
  with readable_file.open() as raw:
    lines = io.TextIOWrapper(raw, encoding='utf-8', newline='')
    for line_number, row in R.csv_rows(problem, lines):
      # Ragged rows: extra values go under the key None, missing ones are
      # None; the parser reports both.
      yield f'{path}:{line_number}', row


class ParseRow(beam.DoFn):
  """(source, CSV row) → (record key, Record), or a dead-letter dict.

  Dead letters (tagged ``DEAD_LETTER``) are ``{'source', 'row', 'errors'}``
  with one ``{'field', 'value', 'reason'}`` per bad field. Counters
  ``rows_valid`` and ``rows_invalid`` add up to the rows read.
  """
  DEAD_LETTER = 'dead_letter'

  def __init__(self, problem: Problem):
    self._problem = problem
    self._valid = Metrics.counter(METRICS_NAMESPACE, 'rows_valid')
    self._invalid = Metrics.counter(METRICS_NAMESPACE, 'rows_invalid')

  def process(self, element):
    source, row = element
    row = dict(row)  # Beam elements are immutable
    try:
      extra = row.pop(None, None)
      if extra is not None:
        raise R.InvalidRecord([R.FieldError('*', extra, 'too many columns')])
      record = R.parse_csv_row(self._problem, row)
    except R.InvalidRecord as e:
      self._invalid.inc()
      yield beam.pvalue.TaggedOutput(self.DEAD_LETTER, {
          'source': source, 'row': row, 'errors': e.to_dicts()})
      return
    self._valid.inc()
    yield R.record_key(self._problem, row), record
