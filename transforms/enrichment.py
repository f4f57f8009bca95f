"""Reference data joined into events by key, the same way in training and
serving.

A problem declares its reference tables (``transforms.problem.ReferenceTable``:
a key field, the fields it fills, a policy for a missing key); the fields are
ordinary features of the feature table, so they reach the transform, the
model signature, the statistics and drift like any raw feature. ``enrich`` is
the one join: training calls it on parsed records before tf.Transform,
serving and analytics on parsed events before scoring.

Sources (``--reference NAME=SOURCE``, else the table's own ``source``):

- a file, CSV with a header or JSON lines, local or ``gs://``: loaded once
  (``load_file``); its version is a hash of its contents;
- ``topic:NAME``: a compacted topic of upserts (JSON value) and deletes
  (null value), keyed by the key, e.g. written by a change-data-capture
  tool. Each worker follows it in a thread (``TopicTable``): the state is
  the topic read so far, updates visible within a poll (0.2 s); the version
  is the offset of the last message applied. The same design on Prism, Flink
  and Dataflow (no triggered side input, which Prism does not support).

As of the event time: a file table whose ``ReferenceTable.valid_from``
names a column may hold several rows per key; an event gets the newest row
valid at its event time (``Snapshot.row_at``), in training as in serving.

Memory: a topic table holds at most ``max_keys`` keys. Past that it stops
following and every event that needs it becomes a dead letter saying so (a
clear error rather than a silently partial table).

Every prediction records the version of each table it used.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import json
import logging
import threading
import time
import weakref
from typing import Any, Iterable, Mapping, NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from transforms import records as R
from transforms import windowing
from transforms.problem import Missing, Problem, ReferenceTable, TimeUnit

METRICS_NAMESPACE = 'rtml.enrich'
TOPIC_PREFIX = 'topic:'


class EnrichmentOptions(PipelineOptions):

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--reference', action='append', default=[],
                        help='NAME=SOURCE: where a reference table of the '
                        'problem comes from: a CSV/JSON-lines file or '
                        'topic:NAME (a compacted topic). Repeatable.')
    parser.add_argument('--reference_max_keys', type=int, default=1_000_000,
                        help='Most keys a topic reference table may hold '
                        'per worker; past it, events that need it are dead '
                        'letters saying so.')


class Snapshot(NamedTuple):
  """One table's rows (key -> typed fields: the newest) and its version;
  with ``valid_from``, each key's rows as (valid from seconds, fields), in
  time order (``history``)."""
  rows: Mapping[str, Mapping[str, Any]]
  version: str
  error: Optional[str] = None  # the table cannot be used (and why)
  history: Optional[Mapping[str, tuple[tuple[float, Mapping[str, Any]],
                                       ...]]] = None

  def row_at(self, key: str, seconds: Optional[float]
             ) -> Optional[Mapping[str, Any]]:
    """The key's row valid at ``seconds`` (as-of), else its newest."""
    if self.history is None or seconds is None:
      return self.rows.get(key)
    versions = self.history.get(key, ())
    at = bisect.bisect_right(versions, seconds, key=lambda tv: tv[0])
    return versions[at - 1][1] if at else None


def table_row(problem: Problem, table: ReferenceTable,
              raw: Mapping[str, Any], from_text: bool
              ) -> tuple[str, dict[str, Any]]:
  """(key, typed fields) of one reference record; ValueError if bad."""
  if raw.get(table.key) in (None, ''):
    raise ValueError(f'no {table.key!r}')
  key = str(raw[table.key])
  by_name = problem.features_by_name
  fields = {}
  for name in table.fields:
    value = raw.get(name)
    if value is None or value == '':
      fields[name] = by_name[name].default
      continue
    try:
      fields[name] = R.coerce_value(problem, by_name[name], value, from_text)
    except ValueError as e:
      raise ValueError(f'{name}={value!r}: {e}') from None
  return key, fields


def load_file(problem: Problem, table: ReferenceTable, path: str) -> Snapshot:
  """A CSV (with header) or JSON-lines reference file; raises ValueError
  naming the line of a bad record."""
  import tensorflow as tf
  with tf.io.gfile.GFile(path, 'rb') as f:
    data = f.read()
  text = data.decode('utf-8')
  rows = {}
  history: dict[str, list] = {}
  if path.endswith(('.json', '.jsonl')):
    lines = ((i, json.loads(line), False)
             for i, line in enumerate(text.splitlines(), 1) if line.strip())
  else:
    lines = ((i + 1, row, True)
             for i, row in enumerate(csv.DictReader(io.StringIO(text)), 1))
  for number, raw, from_text in lines:
    try:
      key, fields = table_row(problem, table, raw, from_text)
      if table.valid_from:
        history.setdefault(key, []).append(
            (_valid_from(problem, table, raw, from_text), fields))
    except ValueError as e:
      raise ValueError(f'{path}:{number}: {e}') from None
    rows[key] = fields
  version = f'file:{hashlib.sha1(data).hexdigest()[:12]}'
  if not table.valid_from:
    return Snapshot(rows, version)
  ordered = {k: tuple(sorted(v, key=lambda tv: tv[0]))
             for k, v in history.items()}
  return Snapshot({k: v[-1][1] for k, v in ordered.items()}, version,
                  history=ordered)


def _valid_from(problem: Problem, table: ReferenceTable,
                raw: Mapping[str, Any], from_text: bool) -> float:
  """A reference row's ``valid_from`` time in Unix seconds."""
  if problem.event_time.field is None:
    raise ValueError(f'table {table.name!r} has valid_from, but the problem '
                     'has no event-time field to join as of')
  value = raw.get(table.valid_from)
  if value in (None, ''):
    raise ValueError(f'no {table.valid_from!r}')
  try:
    if from_text and problem.event_time.unit is not TimeUnit.FORMAT:
      value = float(value)
    return problem.event_time.raw_seconds(value)
  except ValueError as e:
    raise ValueError(f'{table.valid_from}={value!r}: {e}') from None


def enrich(problem: Problem, record: R.Record,
           tables: Mapping[str, Snapshot]) -> R.Record:
  """The record with its reference fields filled. Raises InvalidRecord for
  a missing key under ``Missing.DEAD_LETTER`` or an unusable table."""
  values = dict(record.values)
  missing = set(record.missing)
  for table in problem.references:
    snapshot = tables[table.name]
    key = values.get(table.key)
    if snapshot.error:
      raise R.InvalidRecord([R.FieldError(table.key, key, snapshot.error)])
    seconds = R.event_seconds(problem, record) if table.valid_from else None
    row = snapshot.row_at(str(key), seconds)
    if row is None:
      if table.on_missing is Missing.DEAD_LETTER:
        when = (f' valid at {windowing.iso(int(seconds * 1e6))}'
                if snapshot.history is not None and seconds is not None
                else '')
        raise R.InvalidRecord([R.FieldError(
            table.key, key, f'no {table.name} reference for {key!r}{when} '
            f'({snapshot.version})')])
      continue
    values.update(row)
    missing.difference_update(table.fields)
  return R.Record(values, tuple(f for f in record.missing if f in missing),
                  record.event_id)


def sources(problem: Problem, flags: Iterable[str] = ()) -> dict[str, str]:
  """Each table's source: ``--reference NAME=SOURCE`` flags, else its own."""
  given = {}
  for flag in flags or ():
    name, sep, source = flag.partition('=')
    if not sep:
      raise ValueError(f'--reference {flag!r} is not NAME=SOURCE')
    given[name] = source
  known = {t.name for t in problem.references}
  unknown = set(given) - known
  if unknown:
    raise ValueError(f'no reference table {sorted(unknown)} in problem '
                     f'{problem.name!r} (it has {sorted(known)})')
  out = {}
  for table in problem.references:
    source = given.get(table.name) or table.source
    if not source:
      raise ValueError(f'reference table {table.name!r} has no source: '
                       f'pass --reference {table.name}=FILE or =topic:NAME')
    out[table.name] = source
  return out


class TopicTable:
  """A reference table that follows a compacted topic from its start, in a
  daemon thread that ends with the table."""

  def __init__(self, problem: Problem, table: ReferenceTable,
               bootstrap: str, topic: str, max_keys: int = 1_000_000,
               consumer_config: Optional[Mapping[str, Any]] = None):
    self._lock = threading.Lock()
    self._snapshot = Snapshot({}, f'{topic}@-1')
    self.caught_up = threading.Event()
    threading.Thread(target=TopicTable._follow, args=(
        weakref.ref(self), problem, table, bootstrap, topic, max_keys,
        dict(consumer_config or {})), name=f'reference-{table.name}',
        daemon=True).start()

  def snapshot(self) -> Snapshot:
    with self._lock:
      return self._snapshot

  def _set(self, snapshot: Snapshot) -> None:
    with self._lock:
      self._snapshot = snapshot

  @staticmethod
  def _follow(ref, problem, table, bootstrap, topic, max_keys, config):
    from transforms.kafka_io import clients
    rows: dict[str, dict] = {}
    skipped = Metrics.counter(METRICS_NAMESPACE, 'reference_records_invalid')
    while ref() is not None:
      try:
        consumer, tps = clients.from_start(bootstrap, topic, config)
        end = consumer.end_offsets(tps)
        break
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Reference table %s: %r; retrying', table.name, e)
        time.sleep(1.0)
    else:
      return
    last = -1
    try:
      while True:
        changed = False
        for batch in consumer.poll(timeout_ms=200).values():
          for m in batch:
            last = max(last, m.offset)
            changed = True
            key = m.key.decode('utf-8', 'replace') if m.key else None
            if m.value is None:
              rows.pop(key, None)
              continue
            try:
              raw = json.loads(m.value)
              if key is not None and table.key not in raw:
                raw = dict(raw, **{table.key: key})
              row_key, fields = table_row(problem, table, raw, False)
            except Exception as e:  # pylint: disable=broad-except
              skipped.inc()
              logging.warning('Reference %s offset %d ignored: %s',
                              table.name, m.offset, e)
              continue
            rows[row_key] = fields
        owner = ref()
        if owner is None:
          return
        if len(rows) > max_keys:
          owner._set(Snapshot({}, f'{topic}@{last}', (
              f'reference table {table.name!r} holds more than its budget '
              f'of {max_keys} keys (--reference_max_keys)')))
          owner.caught_up.set()
          logging.error('Reference table %s exceeds %d keys: not followed '
                        'further', table.name, max_keys)
          return
        if changed or not owner.caught_up.is_set():
          owner._set(Snapshot(dict(rows), f'{topic}@{last}'))
        if not owner.caught_up.is_set() and all(
            consumer.position(tp) >= end[tp] for tp in tps):
          owner.caught_up.set()
        del owner
    finally:
      consumer.close()


class Tables:
  """The problem's reference tables for one worker: files loaded once,
  topics followed (``snapshots()`` before each element)."""

  def __init__(self, problem: Problem, sources_: Mapping[str, str],
               bootstrap: Optional[str] = None, max_keys: int = 1_000_000,
               consumer_config: Optional[Mapping[str, Any]] = None,
               wait_s: float = 120.0):
    self._static: dict[str, Snapshot] = {}
    self._topics: dict[str, TopicTable] = {}
    for table in problem.references:
      source = sources_[table.name]
      if source.startswith(TOPIC_PREFIX):
        if not bootstrap:
          raise ValueError(f'reference {table.name!r} is a topic: a broker '
                           'is needed')
        self._topics[table.name] = TopicTable(
            problem, table, bootstrap, source[len(TOPIC_PREFIX):], max_keys,
            consumer_config)
      else:
        self._static[table.name] = load_file(problem, table, source)
    deadline = time.monotonic() + wait_s
    for follower in self._topics.values():
      follower.caught_up.wait(max(0.0, deadline - time.monotonic()))

  def snapshots(self) -> dict[str, Snapshot]:
    out = dict(self._static)
    for name, follower in self._topics.items():
      out[name] = follower.snapshot()
    return out


def _record_itself(element):
  return element


def _replace_record(element, record, versions):
  del element, versions
  return record


class Enrich(beam.DoFn):
  """Elements holding a record -> the same with the record enriched, or dead
  letters (``DEAD_LETTERS`` output).

  Args:
    problem: whose reference tables to join.
    sources_: table name -> file path or ``topic:NAME`` (``sources``).
    dead_letter: ``(element, errors) -> dead letter``.
    record_of: ``element -> Record`` (default: the element is the record).
    with_record: ``(element, enriched record, {table: version}) -> output``
      (default: the enriched record).
    bootstrap, max_keys, consumer_config: for topic tables.
    batches: each element is a list of such elements (one poll's events):
      the output is the list of those joined (one element, none when all
      failed), each failure a dead letter.
  """
  DEAD_LETTERS = 'dead_letters'

  def __init__(self, problem: Problem, sources_: Mapping[str, str],
               dead_letter, record_of=_record_itself,
               with_record=_replace_record, bootstrap: Optional[str] = None,
               max_keys: int = 1_000_000, consumer_config=None,
               batches: bool = False):
    self._problem = problem
    self._batches = batches
    self._sources = dict(sources_)
    self._dead_letter = dead_letter
    self._record_of = record_of
    self._with_record = with_record
    self._bootstrap = bootstrap
    self._max_keys = max_keys
    self._config = dict(consumer_config or {})
    self._tables: Optional[Tables] = None
    self._hits = Metrics.counter(METRICS_NAMESPACE, 'events_enriched')
    self._dead = Metrics.counter(METRICS_NAMESPACE, 'events_dead_lettered')

  def setup(self):
    self._tables = Tables(self._problem, self._sources, self._bootstrap,
                          self._max_keys, self._config)

  def process(self, element):
    snapshots = self._tables.snapshots()
    versions = {name: s.version for name, s in snapshots.items()}
    joined = []
    for one in (element if self._batches else (element,)):
      try:
        enriched = enrich(self._problem, self._record_of(one), snapshots)
      except R.InvalidRecord as e:
        self._dead.inc()
        yield beam.pvalue.TaggedOutput(
            self.DEAD_LETTERS, self._dead_letter(one, e.to_dicts()))
        continue
      self._hits.inc()
      joined.append(self._with_record(one, enriched, versions))
    if self._batches:
      if joined:
        yield joined
    else:
      yield from joined
