"""A problem as a value: the data, the label, the task, in one declaration.

A ``Problem`` says what a record is (the typed feature table), what to predict
(``Label``: binary, multi-class or regression), where event time comes from,
which field identifies an event and which groups events, what the windowed
analytics aggregate, and the default topic names. Every other view is derived
from it and passed around as an argument: the parser and validation
(``transforms.records``), the raw feature spec and schema, the
``preprocessing_fn``, the statistics and drift checks, the model head, the
export signature, the serving handler, the prediction record and analytics.
Nothing in ``transforms/``, ``models/`` or ``pipelines/`` names a column.

A user declares a problem in one Python file and picks it with ``--problem``::

    # my_problem.py
    from transforms.problem import *
    PROBLEM = Problem(
        name='wine',
        features=(Feature('alcohol', Kind.NUMERIC, DType.FLOAT, required=True),
                  Feature('quality', Kind.LABEL, DType.INT, required=True)),
        label=Label(Task.REGRESSION, 'quality'))

    python -m pipelines.train --problem my_problem.py --input wine.csv ...

``load('taxi')`` is a shipped problem (``problems/taxi.py``), ``load('pkg.mod:NAME')``
a module attribute, ``load('path/file.py[:NAME]')`` a file (default name
``PROBLEM``).
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import importlib
import importlib.util
import math
import os
import sys
from typing import Any, Callable, Mapping, Optional

from apache_beam.options.pipeline_options import PipelineOptions


class Kind(enum.Enum):
  """How a raw feature is preprocessed (and validated)."""
  NUMERIC = 'numeric'            # float, z-scored
  BUCKETIZED = 'bucketized'      # float, quantile buckets
  CATEGORICAL = 'categorical'    # string or id, vocabulary + OOV buckets
  IDENTITY = 'identity'          # small non-negative int with a known domain
  LABEL = 'label'                # label source: present for training only
  EVENT_TIME = 'event_time'      # event time, not a model input


class DType(enum.Enum):
  FLOAT = 'float'
  INT = 'int'
  STRING = 'string'


class Task(enum.Enum):
  BINARY = 'binary'
  MULTICLASS = 'multiclass'
  REGRESSION = 'regression'


@dataclasses.dataclass(frozen=True)
class Feature:
  """One raw feature (a CSV column, a JSON key).

  Attributes:
    name: column name in CSV files and key in JSON events.
    kind: how it is preprocessed.
    dtype: the raw type after parsing.
    required: a missing value makes the record invalid; otherwise ``default``
      is filled in.
    default: value used when the raw value is missing (not required).
    domain: inclusive (min, max) allowed range of a number (either may be
      None). Required for IDENTITY features, whose ids it defines. Values
      outside it are invalid, unlike string categoricals, whose unseen values
      are legal and fall into out-of-vocabulary buckets.
    buckets: number of quantile buckets for BUCKETIZED features.
  """
  name: str
  kind: Kind
  dtype: DType
  required: bool = False
  default: Any = None
  domain: Optional[tuple[Optional[float], Optional[float]]] = None
  buckets: int = 0


@dataclasses.dataclass(frozen=True)
class Label:
  """What to predict.

  Attributes:
    task: binary, multi-class or regression.
    column: the LABEL feature that carries the label (absent when serving).
    rule: binary only, optional: ``values -> bool`` over raw values, written
      once with operators that work on TF tensors (in the ``preprocessing_fn``)
      and on Python numbers (live quality), e.g.
      ``lambda v: v['tips'] > 0.2 * v['fare']``. Without a rule a binary
      label is the 0/1 value of ``column``, or its index in ``classes``.
    classes: the class vocabulary (multi-class; optional for binary): the
      label is the index of the column's value; other values are invalid.
    log_target: regression: train on log(1 + y), predict exp(.) - 1.
    name: name of the label in the transformed data.
    threshold: binary: a probability at or above it is class 1.
  """
  task: Task
  column: str
  rule: Optional[Callable[[Mapping[str, Any]], Any]] = None
  classes: tuple = ()
  log_target: bool = False
  name: str = 'label'
  threshold: float = 0.5

  def __post_init__(self):
    if self.task is Task.MULTICLASS and len(self.classes) < 2:
      raise ValueError('a multi-class label needs its classes')
    if self.classes and self.task is Task.BINARY and len(self.classes) != 2:
      raise ValueError('a binary label has exactly two classes')
    if self.rule is not None and self.task is not Task.BINARY:
      raise ValueError('a label rule is for binary labels')
    if self.log_target and self.task is not Task.REGRESSION:
      raise ValueError('log_target is for regression')

  @property
  def n_classes(self) -> int:
    """Number of model outputs: classes, or 1 (binary, regression)."""
    return len(self.classes) if self.task is Task.MULTICLASS else 1

  def value(self, values: Mapping[str, Any]) -> Any:
    """The label of parsed raw values in plain Python: int class or float."""
    if self.rule is not None:
      return int(bool(self.rule(values)))
    raw = values[self.column]
    if self.classes:
      return self.classes.index(raw)
    if self.task is Task.REGRESSION:
      return float(raw)
    return int(raw)

  def tensor(self, inputs: Mapping[str, Any]):
    """The same label as a TF tensor (int64 class, or float32 target)."""
    import tensorflow as tf
    if self.rule is not None:
      return tf.cast(self.rule(inputs), tf.int64)
    x = inputs[self.column]
    if self.classes:
      hits = tf.stack([tf.equal(x, c) for c in self.classes], axis=-1)
      return tf.argmax(tf.cast(hits, tf.int64), axis=-1)
    if self.task is Task.REGRESSION:
      y = tf.cast(x, tf.float32)
      return tf.math.log1p(y) if self.log_target else y
    return tf.cast(x, tf.int64)


class TimeUnit(enum.Enum):
  SECONDS = 's'
  MILLISECONDS = 'ms'
  FORMAT = 'format'     # a date-time string; parsed to Unix seconds


@dataclasses.dataclass(frozen=True)
class EventTime:
  """Where an event's time comes from.

  Attributes:
    field: the EVENT_TIME feature, or None: the Kafka timestamp (CSV rows
      then get no event time).
    unit: Unix seconds, milliseconds, or a date-time string in ``format``
      (read as UTC unless it carries an offset). The parser turns every kind
      into the field's value in that unit (a string into Unix seconds).
    format: ``datetime.strptime`` format for ``unit=FORMAT``.
  """
  field: Optional[str] = None
  unit: TimeUnit = TimeUnit.SECONDS
  format: str = '%Y-%m-%d %H:%M:%S'

  def parse_text(self, text: str) -> int:
    """A date-time string as Unix seconds; raises ValueError(reason)."""
    try:
      when = datetime.datetime.strptime(text, self.format)
    except (TypeError, ValueError):
      raise ValueError(f'not a date-time in the format {self.format}') from None
    if when.tzinfo is None:
      when = when.replace(tzinfo=datetime.timezone.utc)
    return int(when.timestamp())

  def seconds(self, value: Any) -> float:
    """Parsed field value -> Unix seconds."""
    return value / 1000.0 if self.unit is TimeUnit.MILLISECONDS else value

  def raw_seconds(self, value: Any) -> float:
    """A raw (JSON) field value -> Unix seconds; raises ValueError."""
    if self.unit is TimeUnit.FORMAT:
      if not isinstance(value, str):
        raise ValueError('expected a date-time string')
      return self.parse_text(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError('expected a number')
    return self.seconds(value)


class Op(enum.Enum):
  SUM = 'sum'
  MEAN = 'mean'
  MIN = 'min'
  MAX = 'max'


@dataclasses.dataclass(frozen=True)
class Aggregate:
  """Windowed aggregates of one numeric field: ``<field>_<op>`` columns.

  Every aggregate also reports ``<field>_count``, the records where the field
  was present (a label is absent on unlabelled events).
  """
  field: str
  ops: tuple[Op, ...] = (Op.SUM, Op.MEAN)


@dataclasses.dataclass(frozen=True)
class Ratio:
  """``sum(numerator) / sum(denominator)`` over records having both."""
  name: str
  numerator: str
  denominator: str


@dataclasses.dataclass(frozen=True)
class CsvFormat:
  """How the problem's CSV files are laid out.

  Attributes:
    columns: column names when the file has no usable header (then every line
      after ``skip_lines`` is data); None: the first line is the header.
    skip_lines: lines to skip before the header (or the data).
    delimiter: field separator.
    skip_initial_space: ignore spaces after the delimiter.
  """
  columns: Optional[tuple[str, ...]] = None
  skip_lines: int = 0
  delimiter: str = ','
  skip_initial_space: bool = False


class Missing(enum.Enum):
  """What enrichment does with an event whose key is not in the table."""
  DEFAULT = 'default'          # the fields keep their declared defaults
  DEAD_LETTER = 'dead_letter'  # the event is a dead letter, with a reason


@dataclasses.dataclass(frozen=True)
class ReferenceTable:
  """Reference data joined into events by key (``transforms.enrichment``).

  Attributes:
    name: the table's name (``--reference NAME=SOURCE`` picks its source).
    key: the event field it is keyed by (a feature).
    fields: the features it fills; declared in the feature table like any
      raw feature (typed, with a default), so they flow into the transform,
      the model signature, statistics and drift.
    source: default source: a CSV or JSON-lines file (local or ``gs://``)
      with the key column and the fields, or ``topic:NAME``, a compacted
      topic of upserts (JSON value) and deletes (null value) keyed by key.
    on_missing: an event whose key has no row: defaults, or a dead letter.
    valid_from: a column of a *file* table holding the time from which its
      row holds, in the form of the problem's event time: a key may then
      have several rows, and an event gets the newest one valid at its event
      time (an as-of join; none valid yet counts as missing). A topic table
      holds the newest row per key (a compacted topic keeps no history).
  """
  name: str
  key: str
  fields: tuple[str, ...]
  source: Optional[str] = None
  on_missing: Missing = Missing.DEFAULT
  valid_from: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Problem:
  """Everything the pipelines need to know about a dataset and its task.

  Attributes:
    name: short name; default topic names derive from it.
    features: the typed feature table: one entry per raw column used.
    label: what to predict.
    event_time: where event time comes from.
    event_id: field that identifies an event; None: the Kafka key, else
      topic-partition-offset.
    entity_key: field that groups events (analytics, sticky routing); None:
      one group.
    aggregates: numeric fields the windowed analytics sum/average.
    ratios: derived ratios of the analytics (e.g. a tip rate).
    csv: CSV layout of the training files.
    vocab_size: top-k of each categorical vocabulary.
    oov_buckets: out-of-vocabulary buckets of each categorical.
    hparams: model hyper-parameter overrides (``models.model.HParams`` fields).
    data: the problem's own CSV file, if it ships one (the default input of
      training, the demo and the benchmarks).
    references: reference tables joined into events before the transform,
      the same way in training and serving (``transforms.enrichment``).
  """
  name: str
  features: tuple[Feature, ...]
  label: Label
  event_time: EventTime = EventTime()
  event_id: Optional[str] = None
  entity_key: Optional[str] = None
  aggregates: tuple[Aggregate, ...] = ()
  ratios: tuple[Ratio, ...] = ()
  csv: CsvFormat = CsvFormat()
  vocab_size: int = 1000
  oov_buckets: int = 10
  hparams: Mapping[str, Any] = dataclasses.field(
      default_factory=dict, hash=False, compare=False)
  data: Optional[str] = None
  references: tuple[ReferenceTable, ...] = ()

  def __post_init__(self):
    names = [f.name for f in self.features]
    if len(set(names)) != len(names):
      raise ValueError(f'{self.name}: duplicate feature names')
    by_name = self.features_by_name
    label = by_name.get(self.label.column)
    if label is None or label.kind is not Kind.LABEL:
      raise ValueError(f'{self.name}: label column {self.label.column!r} '
                       'must be a Kind.LABEL feature')
    if sum(f.kind is Kind.LABEL for f in self.features) != 1:
      raise ValueError(f'{self.name}: exactly one Kind.LABEL feature')
    times = [f.name for f in self.features if f.kind is Kind.EVENT_TIME]
    if times != ([self.event_time.field] if self.event_time.field else []):
      raise ValueError(f'{self.name}: event_time.field must name the one '
                       f'Kind.EVENT_TIME feature (found {times})')
    for f in self.features:
      if f.kind is Kind.IDENTITY and (
          f.domain is None or None in f.domain or f.dtype is not DType.INT):
        raise ValueError(f'{f.name}: an IDENTITY feature is an INT with a '
                         'closed domain')
      if f.kind is Kind.BUCKETIZED and f.buckets < 2:
        raise ValueError(f'{f.name}: a BUCKETIZED feature needs buckets')
    fields = {a.field for a in self.aggregates} | {
        x for r in self.ratios for x in (r.numerator, r.denominator)}
    for name in [self.entity_key] + sorted(fields):
      if name is not None and name not in by_name:
        raise ValueError(f'{self.name}: {name!r} is not a feature')
    for name in fields:
      if by_name[name].dtype is DType.STRING:
        raise ValueError(f'{self.name}: cannot aggregate string {name!r}')
    if not self.model_features:
      raise ValueError(f'{self.name}: no model input feature')
    filled = [f for t in self.references for f in t.fields]
    if len(set(filled)) != len(filled):
      raise ValueError(f'{self.name}: two reference tables fill one field')
    for table in self.references:
      if table.key not in by_name:
        raise ValueError(f'{self.name}: reference {table.name!r} key '
                         f'{table.key!r} is not a feature')
      for name in table.fields:
        f = by_name.get(name)
        if f is None or f.kind in (Kind.LABEL, Kind.EVENT_TIME) or (
            f.required) or name == table.key:
          raise ValueError(f'{self.name}: reference field {name!r} must be '
                           'a model feature that is not required (it is '
                           'filled by the join)')

  # ----------------------------------------------------------------- views

  @property
  def features_by_name(self) -> dict[str, Feature]:
    return {f.name: f for f in self.features}

  @property
  def task(self) -> Task:
    return self.label.task

  @property
  def model_features(self) -> tuple[Feature, ...]:
    """Raw features the model consumes (all but the label and event time)."""
    return tuple(f for f in self.features
                 if f.kind not in (Kind.LABEL, Kind.EVENT_TIME))

  @property
  def serving_features(self) -> tuple[Feature, ...]:
    """Raw features the serving signature takes: all but the label source."""
    return tuple(f for f in self.features if f.kind is not Kind.LABEL)

  def raw_feature_spec(self, include_label: bool = True) -> dict[str, Any]:
    """tf.io feature spec of the raw (parsed, defaults filled) features."""
    import tensorflow as tf  # Imported lazily: parsing needs no TensorFlow.
    tf_dtype = {DType.FLOAT: tf.float32, DType.INT: tf.int64,
                DType.STRING: tf.string}
    return {
        f.name: tf.io.FixedLenFeature([], tf_dtype[f.dtype])
        for f in self.features
        if include_label or f.kind is not Kind.LABEL
    }

  def raw_schema(self, include_label: bool = True):
    """The raw ``schema_pb2.Schema`` (tf.Transform / TFXIO form)."""
    from tensorflow_transform.tf_metadata import schema_utils
    return schema_utils.schema_from_feature_spec(
        self.raw_feature_spec(include_label))

  def topic(self, role: str) -> str:
    """Default topic of a role: events, predictions, dead-letters, stats..."""
    return f'{self.name}-{role}'


def transformed_name(key: str) -> str:
  """Name of the transformed feature derived from raw feature ``key``."""
  return key + '_xf'


def is_finite_number(value: Any) -> bool:
  return (not isinstance(value, bool) and isinstance(value, (int, float))
          and math.isfinite(value))


# ------------------------------------------------------------------ loading

SHIPPED = ('taxi', 'houses', 'exasens', 'hcopd', 'houses_zip')
DEFAULT = 'taxi'


def load(spec: str | Problem = DEFAULT) -> Problem:
  """The problem named by ``spec`` (see the module docstring)."""
  if isinstance(spec, Problem):
    return spec
  name, _, attr = spec.partition(':')
  if name.endswith('.py') or os.sep in name:
    module = _load_file(name)
  else:
    module = importlib.import_module(
        f'problems.{name}' if name in SHIPPED else name)
  if attr:
    value = getattr(module, attr)
  elif isinstance(getattr(module, 'PROBLEM', None), Problem):
    value = module.PROBLEM
  else:
    found = [v for v in vars(module).values() if isinstance(v, Problem)]
    if len(found) != 1:
      raise ValueError(f'{spec}: name the problem (module:NAME); found '
                       f'{len(found)} Problem values')
    value = found[0]
  if not isinstance(value, Problem):
    raise ValueError(f'{spec} is a {type(value).__name__}, not a Problem')
  return value


def _load_file(path: str):
  path = os.path.abspath(path)
  module_name = 'rtml_problem_' + ''.join(
      c if c.isalnum() else '_' for c in path)
  if module_name in sys.modules:
    return sys.modules[module_name]
  spec = importlib.util.spec_from_file_location(module_name, path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f'no problem file at {path}')
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module
  spec.loader.exec_module(module)
  # Workers (Dataflow, remote Flink) cannot import a file from the launching
  # machine: its functions (label rules) are pickled by value instead.
  import cloudpickle
  cloudpickle.register_pickle_by_value(module)
  return module


class ProblemOptions(PipelineOptions):
  """``--problem``, shared by every pipeline (declared once for Beam)."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument(
        '--problem', default=DEFAULT,
        help=f'The problem: a shipped one ({", ".join(SHIPPED)}), '
        'package.module[:NAME] or path/to/file.py[:NAME].')


__all__ = ['Aggregate', 'CsvFormat', 'DType', 'EventTime', 'Feature', 'Kind',
           'Label', 'Op', 'Problem', 'Ratio', 'Task', 'TimeUnit', 'load',
           'transformed_name']
