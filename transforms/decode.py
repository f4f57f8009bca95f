"""Kafka records -> validated ``records.Record``s, or dead letters.

The decoding half of the Kafka path: the connector (``transforms.kafka_io``)
moves bytes and knows nothing of records; this module parses a record's value
with the same parser as training and routes every failure to a dead letter
that keeps the original bytes and the reasons.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import formats
from transforms import kafka_io
from transforms import records
from transforms.kafka_io import KafkaBatch, KafkaRecord, dead_letter
from transforms.problem import Problem, TimeUnit

METRICS_NAMESPACE = kafka_io.METRICS_NAMESPACE


def decode_event(problem: Problem, record: KafkaRecord,
                 require_label: bool = False,
                 event_format: formats.EventFormat = formats.EventFormat()
                 ) -> records.Record:
  """A Kafka record's value (in ``event_format``, default JSON) as a
  validated ``records.Record``.

  Raises:
    records.InvalidRecord: with the reasons, field by field.
  """
  return event_format.decode(problem, record.value, require_label)


class _DecodeEventsFn(beam.DoFn):

  def __init__(self, problem: Problem, require_label: bool, with_keys: bool,
               metrics_namespace: str, with_source: bool = False,
               event_format: formats.EventFormat = formats.EventFormat()):
    self._problem = problem
    self._format = event_format
    self._require_label = require_label
    self._with_keys = with_keys
    self._with_source = with_source
    self._decoded = Metrics.counter(metrics_namespace, 'events_decoded')
    self._dead = Metrics.counter(metrics_namespace, 'events_dead_lettered')

  def _decode(self, record: KafkaRecord) -> tuple[Any, Optional[list]]:
    """(the output for a good record, None) or (None, the errors)."""
    try:
      parsed = decode_event(self._problem, record, self._require_label,
                            self._format)
    except records.InvalidRecord as e:
      return None, e.to_dicts()
    except Exception as e:  # pylint: disable=broad-except
      # Nothing may crash the pipeline or vanish: unexpected failures are
      # dead letters too, with the exception as the reason.
      return None, [{'field': '*', 'value': None,
                     'reason': f'{type(e).__name__}: {e}'}]
    if self._with_source:
      return (record, parsed), None
    if self._with_keys:
      key = (record.key.decode('utf-8', errors='replace')
             if record.key is not None else None)
      return (key, parsed), None
    return parsed, None

  def process(self, record: KafkaRecord):
    good, errors = self._decode(record)
    if errors is None:
      self._decoded.inc()
      yield good
      return
    self._dead.inc()
    yield beam.pvalue.TaggedOutput(DecodeEvents.DEAD_LETTERS,
                                   dead_letter(record, errors))


class _DecodeBatchesFn(_DecodeEventsFn):
  """A ``KafkaBatch`` -> the list of its good records' outputs (one
  element, none when all are bad), and a dead letter per bad record at that
  record's own event time."""

  def process(self, batch: KafkaBatch):
    good = []
    for record, seconds in zip(batch.records, batch.event_seconds):
      output, errors = self._decode(record)
      if errors is None:
        good.append(output)
        continue
      self._dead.inc()
      yield beam.pvalue.TaggedOutput(
          DecodeEvents.DEAD_LETTERS, beam.window.TimestampedValue(
              dead_letter(record, errors), seconds))
    if good:
      self._decoded.inc(len(good))
      yield good


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
    event_format: how values are encoded (``transforms.formats``; JSON by
      default).
    batches: the input is ``KafkaBatch``es (``ReadFromKafka(batches=True)``)
      and ``records`` holds one list per batch.

  Returns (from ``expand``): a tuple with ``.records`` and ``.dead_letters``.
  """
  RECORDS = 'records'
  DEAD_LETTERS = 'dead_letters'

  def __init__(self, problem: Problem, require_label: bool = False,
               with_keys: bool = False, with_source: bool = False,
               event_format: formats.EventFormat = formats.EventFormat(),
               batches: bool = False):
    super().__init__()
    self._problem = problem
    self._format = event_format
    self._require_label = require_label
    self._with_keys = with_keys
    self._with_source = with_source
    self._batches = batches

  def expand(self, pcoll):
    fn = _DecodeBatchesFn if self._batches else _DecodeEventsFn
    return pcoll | 'ParseJson' >> beam.ParDo(fn(
        self._problem, self._require_label, self._with_keys, METRICS_NAMESPACE,
        with_source=self._with_source, event_format=self._format)
    ).with_outputs(
            self.DEAD_LETTERS, main=self.RECORDS)


class ProblemEventTime:
  """The Kafka source's event time of a problem's events, in seconds."""

  def __init__(self, problem: Problem,
               event_format: formats.EventFormat = formats.EventFormat()):
    self._problem = problem
    self._event_time = problem.event_time
    self._format = event_format

  def __call__(self, record: KafkaRecord) -> Optional[float]:
    try:
      if self._format.name == formats.JSON:
        value = json.loads(record.value)[self._event_time.field]
      else:
        value = self._format.raw_event(self._problem,
                                       record.value)[self._event_time.field]
        if isinstance(value, str) and value.strip() and (
            self._event_time.unit is not TimeUnit.FORMAT):
          value = float(value)
      return self._event_time.raw_seconds(value)
    except Exception:  # pylint: disable=broad-except
      return None      # the source falls back to the Kafka timestamp


def event_time(problem: Problem,
               event_format: formats.EventFormat = formats.EventFormat()):
  """The Kafka source's ``event_time``: the problem's field, else the Kafka
  timestamp."""
  return 'kafka' if problem.event_time.field is None else ProblemEventTime(
      problem, event_format)
