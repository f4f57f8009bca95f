"""Kafka records -> validated ``records.Record``s, or dead letters.

The decoding half of the Kafka path: the connector (``transforms.kafka_io``)
moves bytes and knows nothing of records; this module parses a record's value
with the same parser as training and routes every failure to a dead letter
that keeps the original bytes and the reasons.
"""

from __future__ import annotations

import json
from typing import Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import kafka_io
from transforms import records
from transforms.kafka_io import KafkaRecord, dead_letter
from transforms.problem import Problem

METRICS_NAMESPACE = kafka_io.METRICS_NAMESPACE


def decode_event(problem: Problem, record: KafkaRecord,
                 require_label: bool = False) -> records.Record:
  """A Kafka record's value as a validated ``records.Record``.

  Raises:
    records.InvalidRecord: with the reasons, field by field.
  """
  if record.value is None:
    raise records.InvalidRecord(
        [records.FieldError('*', None, 'null value (tombstone)')])
  return records.parse_json_bytes(problem, record.value,
                                  require_label=require_label)


class _DecodeEventsFn(beam.DoFn):

  def __init__(self, problem: Problem, require_label: bool, with_keys: bool,
               metrics_namespace: str, with_source: bool = False):
    self._problem = problem
    self._require_label = require_label
    self._with_keys = with_keys
    self._with_source = with_source
    self._decoded = Metrics.counter(metrics_namespace, 'events_decoded')
    self._dead = Metrics.counter(metrics_namespace, 'events_dead_lettered')

  def process(self, record: KafkaRecord):
    try:
      parsed = decode_event(self._problem, record, self._require_label)
    except records.InvalidRecord as e:
      errors = e.to_dicts()
    except Exception as e:  # pylint: disable=broad-except
      # Nothing may crash the pipeline or vanish: unexpected failures are
      # dead letters too, with the exception as the reason.
      errors = [{'field': '*', 'value': None,
                 'reason': f'{type(e).__name__}: {e}'}]
    else:
      self._decoded.inc()
      if self._with_source:
        yield record, parsed
      elif self._with_keys:
        key = (record.key.decode('utf-8', errors='replace')
               if record.key is not None else None)
        yield key, parsed
      else:
        yield parsed
      return
    self._dead.inc()
    yield beam.pvalue.TaggedOutput(DecodeEvents.DEAD_LETTERS,
                                   dead_letter(record, errors))


class DecodeEvents(beam.PTransform):
  """KafkaRecords -> ``records.Record``s, plus a ``dead_letters`` output.

  Every input lands in exactly one output (``events_decoded`` +
  ``events_dead_lettered`` = records in). Dead letters are dicts from
  ``dead_letter`` (JSON-serializable) and keep the input's event time.

  Args:
    problem: what a record is (``transforms.problem``).
    require_label: events without a valid label are dead letters.
    with_keys: emit ``(kafka key as str, Record)`` instead of ``Record``.
    with_source: emit ``(KafkaRecord, Record)``: the key, topic, partition,
      offset and timestamp travel with the record (serving stamps them on
      predictions), and the original bytes (for a later dead letter).

  Returns (from ``expand``): a tuple with ``.records`` and ``.dead_letters``.
  """
  RECORDS = 'records'
  DEAD_LETTERS = 'dead_letters'

  def __init__(self, problem: Problem, require_label: bool = False,
               with_keys: bool = False, with_source: bool = False):
    super().__init__()
    self._problem = problem
    self._require_label = require_label
    self._with_keys = with_keys
    self._with_source = with_source

  def expand(self, pcoll):
    return pcoll | 'ParseJson' >> beam.ParDo(_DecodeEventsFn(
        self._problem, self._require_label, self._with_keys, METRICS_NAMESPACE,
        with_source=self._with_source)).with_outputs(
            self.DEAD_LETTERS, main=self.RECORDS)


class ProblemEventTime:
  """The Kafka source's event time of a problem's JSON events, in seconds."""

  def __init__(self, problem: Problem):
    self._event_time = problem.event_time

  def __call__(self, record: KafkaRecord) -> Optional[float]:
    try:
      return self._event_time.raw_seconds(
          json.loads(record.value)[self._event_time.field])
    except Exception:  # pylint: disable=broad-except
      return None      # the source falls back to the Kafka timestamp


def event_time(problem: Problem):
  """The Kafka source's ``event_time``: the problem's field, else the Kafka
  timestamp."""
  return 'kafka' if problem.event_time.field is None else ProblemEventTime(
      problem)
