"""Live model monitoring: predictions and feature drift per window and model.

``pipelines.serve --training_stats`` attaches ``MonitorPredictions`` to its
scored events; ``pipelines.analytics`` to unscored ones (drift only)::

    scored = ... | beam.Map(lambda r: monitoring.Scored.of(
        problem, record, inference, model='taxi@3'))
    out = scored | monitoring.MonitorPredictions(
        problem, stats.read_stats('out/train/stats.json'), window_config)
    out['quality'], out['drift'], out['alerts'], out['late']

Per event-time window (``transforms.windowing``, late data to ``'late'``) and
model:

* ``quality``: the prediction distribution (binary: mean probability, a
  10-bin histogram and the predicted positive rate; multi-class: the share
  of each predicted class; regression: mean and std of the predictions) and,
  over the events whose label is known: binary: predicted and actual
  positive rates and accuracy; multi-class: accuracy; regression: MAE, RMSE,
  MAPE, mean prediction and mean actual. (Labels that come later are
  joined by ``pipelines.quality``.)
* ``drift``: per model feature, against the training statistics
  (``transforms.stats``): for measurements (numeric, bucketized) the mean
  shift and std shift in training-std units; for those and ids (identity)
  the share of values outside the training [min, max]; for ids and
  categoricals the share of values unseen in training (outside its
  vocabulary, i.e. what the model maps to out-of-vocabulary buckets); and
  for all the missing rate vs training;
* ``alerts``: one JSON record per crossed threshold (``DriftThresholds``),
  with feature, metric, value, threshold and window. EARLY panes report drift
  but do not alert (a partial window); neither does a window with fewer than
  ``min_count`` values of the feature.

The features are the problem's ``model_features``: the label and event time
are not model inputs (the label is covered by ``quality``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from transforms import flags
from transforms import records as R
from transforms import stats as S
from transforms import windowing
from transforms.problem import Kind, Problem, Task
from transforms.records import Record

_NAMESPACE = 'monitoring'
_GLOBAL_KEY = 'all'


class Scored(NamedTuple):
  """The monitor's input: a parsed event and the model's prediction.

  Attributes:
    record: the parsed raw event (values with defaults, and which were
      missing); its label source may be absent.
    predicted: the predicted class index (binary, multi-class) or value
      (regression); None for an unscored event (feature drift only).
    probability: binary: the predicted probability of class 1.
    model: which model scored it (``name@version``); the monitor reports per
      model. None: one report for all (``'all'``).
    event_id: the event's id (late records name it); default the record's.
  """
  record: Record
  predicted: Optional[float] = None
  probability: Optional[float] = None
  model: Optional[str] = None
  event_id: Optional[str] = None

  @classmethod
  def of(cls, problem: Problem, record: Record, inference: dict[str, Any],
         model: Optional[str] = None,
         event_id: Optional[str] = None) -> 'Scored':
    """From a serving handler's inference dict (``models.serving``)."""
    if problem.task is Task.REGRESSION:
      return cls(record, float(inference['prediction']), model=model,
                 event_id=event_id)
    return cls(record, int(inference['class']), inference.get('probability'),
               model, event_id)

  @classmethod
  def unscored(cls, record: Record) -> 'Scored':
    """An event without a prediction: only its features are monitored."""
    return cls(record)


@dataclasses.dataclass(frozen=True)
class DriftThresholds:
  """Alert when a window's metric is beyond these (absolute values).

  Attributes:
    mean_shift: |live mean - training mean| / training std.
    std_shift: |live std - training std| / training std.
    missing_rate_increase: live missing rate - training missing rate.
    out_of_range: share of present values outside training [min, max].
    unseen: share of present categorical values outside the training
      vocabulary.
    rate_gap: |predicted positive rate - actual positive rate| on labelled
      events.
    min_count: fewest values (events, for quality) a window needs to alert.
  """
  mean_shift: float = 1.0
  std_shift: float = 2.0
  missing_rate_increase: float = 0.2
  out_of_range: float = 0.05
  unseen: float = 0.05
  rate_gap: float = 0.2
  min_count: int = 30


class MonitorOptions(PipelineOptions):
  """The drift monitor's flags, shared by the jobs that monitor (serve,
  analytics): one parser reads every imported options class, so a flag is
  declared once."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--training_stats', default=None,
                        help='stats.json of the training run: report drift '
                        'per window against it, and alert.')
    flags.add_flags(parser, DriftThresholds, prefix='drift_')


def drift_thresholds(options: PipelineOptions) -> DriftThresholds:
  return flags.from_flags(DriftThresholds, options.view_as(MonitorOptions),
                          prefix='drift_')


# ------------------------------------------------------------- plain logic

class _Plan(NamedTuple):
  """What to check per feature, from the training statistics."""
  name: str
  numeric: bool           # mean/std shift: measurements, not ids
  ranged: bool            # share outside the training [min, max]
  low: Optional[float]
  high: Optional[float]
  vocabulary: Optional[frozenset]


def drift_plan(problem: Problem, training_stats: dict[str, Any]
               ) -> tuple[_Plan, ...]:
  """Per model feature: its training range and vocabulary."""
  plans = []
  for feature in problem.model_features:
    st = training_stats['features'][feature.name]
    vocabulary = (frozenset(st['vocabulary'])
                  if S.has_vocabulary(feature) else None)
    # The mean of an id (a community area, an hour of the day) says nothing:
    # identity features are checked for range and unseen values only.
    plans.append(_Plan(
        feature.name, feature.kind in (Kind.NUMERIC, Kind.BUCKETIZED),
        S.has_numeric_stats(feature), st.get('min'), st.get('max'),
        vocabulary))
  return tuple(plans)


# Quality accumulator: events, scored, sum of predictions (positives for a
# binary task), labelled, sum of labels, labelled and scored, and among
# those: sum of predictions, sum of labels, correct, absolute errors, squared
# errors, absolute percentage errors (regression).
_QUALITY_FIELDS = 12
# Prediction accumulator: sum of squared predictions, sum of probabilities
# (binary), then counts per bin: PROBABILITY_BINS bins of the probability
# (binary), one per class (multi-class), none (regression).
PROBABILITY_BINS = 10
# Feature accumulator: missing, present, sum, sum of squares, out of range,
# unseen.
_FEATURE_FIELDS = 6


def _prediction_bins(problem: Problem) -> int:
  if problem.task is Task.BINARY:
    return PROBABILITY_BINS
  if problem.task is Task.MULTICLASS:
    return len(problem.label.classes)
  return 0


def new_accumulator(problem: Problem,
                    plans: tuple[_Plan, ...]) -> list[list[float]]:
  return ([[0] * _QUALITY_FIELDS, [0] * (2 + _prediction_bins(problem))]
          + [[0] * _FEATURE_FIELDS for _ in plans])


def add_scored(problem: Problem, acc: list[list[float]],
               plans: tuple[_Plan, ...], scored: Scored) -> list[list[float]]:
  """Adds one scored event to a window accumulator."""
  record = scored.record
  quality = acc[0]
  quality[0] += 1
  is_scored = scored.predicted is not None
  if is_scored:
    quality[1] += 1
    quality[2] += scored.predicted
    _add_prediction(problem, acc[1], scored)
  label = R.label_value(problem, record)
  if label is not None:
    quality[3] += 1
    quality[4] += label
    if is_scored:
      quality[5] += 1
      quality[6] += scored.predicted
      quality[7] += label
      quality[8] += int(scored.predicted == label)
      error = scored.predicted - label
      quality[9] += abs(error)
      quality[10] += error * error
      quality[11] += abs(error) / abs(label) if label else 0.0
  for plan, f_acc in zip(plans, acc[2:]):
    if R.is_missing(record, plan.name):
      f_acc[0] += 1
      continue
    value = record.values[plan.name]
    f_acc[1] += 1
    if plan.numeric:
      x = float(value)
      f_acc[2] += x
      f_acc[3] += x * x
    if plan.ranged and plan.low is not None and not (
        plan.low <= value <= plan.high):
      f_acc[4] += 1
    if plan.vocabulary is not None and value not in plan.vocabulary:
      f_acc[5] += 1
  return acc


def _add_prediction(problem: Problem, into: list[float], scored: Scored):
  into[0] += scored.predicted * scored.predicted
  if problem.task is Task.BINARY and scored.probability is not None:
    p = float(scored.probability)
    into[1] += p
    into[2 + min(max(int(p * PROBABILITY_BINS), 0), PROBABILITY_BINS - 1)] += 1
  elif problem.task is Task.MULTICLASS and 0 <= scored.predicted < len(
      into) - 2:
    into[2 + int(scored.predicted)] += 1


def merge_accumulators(accs: Iterable[list[list[float]]]
                       ) -> list[list[float]]:
  accs = iter(accs)
  merged = next(accs)
  for acc in accs:
    for into, part in zip(merged, acc):
      for i, v in enumerate(part):
        into[i] += v
  return merged


def _ratio(num: float, den: float) -> Optional[float]:
  return num / den if den else None


def quality_summary(problem: Problem, acc: list[list[float]]
                    ) -> dict[str, Any]:
  """Live quality of a window, per the problem's task (module docstring)."""
  (n, n_scored, predicted, labelled, actual, both, predicted_both,
   actual_both, correct, abs_err, sq_err, ape) = acc[0]
  out = {'task': problem.task.value, 'count': n, 'scored': n_scored,
         'labelled': labelled, 'labelled_scored': both}
  squares, probabilities, *bins = acc[1]
  if problem.task is Task.REGRESSION:
    mean = _ratio(predicted, n_scored)
    out.update(
        mean_prediction=mean,
        prediction_std=(math.sqrt(max(squares / n_scored - mean * mean, 0.0))
                        if n_scored else None),
        mean_actual=_ratio(actual, labelled),
        mae=_ratio(abs_err, both),
        rmse=math.sqrt(sq_err / both) if both else None,
        mape=_ratio(ape, both))
    return out
  out['accuracy'] = _ratio(correct, both)
  if problem.task is Task.MULTICLASS:
    out['predicted_class_shares'] = {
        name: _ratio(count, n_scored)
        for name, count in zip(problem.label.classes, bins)}
  if problem.task is Task.BINARY:
    out.update(
        mean_probability=_ratio(probabilities, sum(bins)),
        probability_histogram=bins,
        predicted_positive_rate=_ratio(predicted, n_scored),
        actual_positive_rate=_ratio(actual, labelled),
        # On the events that have both, so the two rates are comparable.
        predicted_positive_rate_labelled=_ratio(predicted_both, both),
        actual_positive_rate_scored=_ratio(actual_both, both))
  return out


def drift_summary(acc: list[list[float]], plans: tuple[_Plan, ...],
                  training_stats: dict[str, Any]) -> list[dict[str, Any]]:
  """One drift row per model feature for a window."""
  rows = []
  for plan, (missing, present, total, squares, out_of_range, unseen) in zip(
      plans, acc[2:]):
    st = training_stats['features'][plan.name]
    n = missing + present
    row = {'feature': plan.name, 'kind': st['kind'], 'count': n,
           'present': present, 'missing_rate': _ratio(missing, n),
           'train_missing_rate': st['missing_rate']}
    if plan.numeric:
      mean = _ratio(total, present)
      std = (math.sqrt(max(squares / present - mean * mean, 0.0))
             if present else None)
      train_std = st['std']
      scale = train_std if train_std else None
      row.update(
          mean=mean, train_mean=st['mean'], std=std, train_std=train_std,
          mean_shift=(_ratio(mean - st['mean'], scale)
                      if mean is not None and scale else None),
          std_shift=(_ratio(std - train_std, scale)
                     if std is not None and scale else None))
    if plan.ranged:
      row['out_of_range_share'] = _ratio(out_of_range, present)
    if plan.vocabulary is not None:
      row['unseen_share'] = _ratio(unseen, present)
    rows.append(row)
  return rows


def alerts_for(problem: Problem, quality: dict[str, Any],
               drift: list[dict[str, Any]],
               thresholds: DriftThresholds) -> list[dict[str, Any]]:
  """Alert dicts (feature, metric, value, threshold) for crossed thresholds."""
  alerts = []

  def check(feature, metric, value, threshold, signed=True):
    if value is not None and (abs(value) if signed else value) > threshold:
      alerts.append({'feature': feature, 'metric': metric, 'value': value,
                     'threshold': threshold})

  for row in drift:
    if row['present'] >= thresholds.min_count:
      check(row['feature'], 'mean_shift', row.get('mean_shift'),
            thresholds.mean_shift)
      check(row['feature'], 'std_shift', row.get('std_shift'),
            thresholds.std_shift)
      check(row['feature'], 'out_of_range_share',
            row.get('out_of_range_share'), thresholds.out_of_range)
      check(row['feature'], 'unseen_share', row.get('unseen_share'),
            thresholds.unseen)
    if row['count'] >= thresholds.min_count and row['missing_rate'] is not None:
      check(row['feature'], 'missing_rate_increase',
            row['missing_rate'] - row['train_missing_rate'],
            thresholds.missing_rate_increase, signed=False)
  if (problem.task is Task.BINARY
      and quality['labelled_scored'] >= thresholds.min_count):
    check(problem.label.name, 'positive_rate_gap',
          quality['predicted_positive_rate_labelled']
          - quality['actual_positive_rate_scored'], thresholds.rate_gap)
  return alerts


# ---------------------------------------------------------------- transforms

class MonitorFn(beam.CombineFn):
  """Scored events of a window -> its accumulator (report in a DoFn)."""

  def __init__(self, problem: Problem, training_stats: dict[str, Any]):
    self._problem = problem
    self._plans = drift_plan(problem, training_stats)

  def create_accumulator(self):
    return new_accumulator(self._problem, self._plans)

  def add_input(self, acc, scored: Scored):
    return add_scored(self._problem, acc, self._plans, scored)

  def merge_accumulators(self, accs):
    accs = list(accs)  # none: an empty pane (windowing.DropEmptyPanes)
    return (merge_accumulators(accs) if accs
            else new_accumulator(self._problem, self._plans))

  def extract_output(self, acc):
    return acc


class _ReportFn(beam.DoFn):
  """Window accumulator -> quality row, drift rows and alerts."""

  def __init__(self, problem: Problem, training_stats: dict[str, Any],
               thresholds: DriftThresholds, alert_on_early: bool):
    self._problem = problem
    self._stats = training_stats
    self._plans = drift_plan(problem, training_stats)
    self._thresholds = thresholds
    self._alert_on_early = alert_on_early
    self._alerts = Metrics.counter(_NAMESPACE, 'alerts')

  def process(self, element, window=beam.DoFn.WindowParam,
              pane=beam.DoFn.PaneInfoParam):
    model, acc = element
    where = {'model_key': model, **windowing.window_fields(window),
             **windowing.pane_fields(pane)}
    quality = quality_summary(self._problem, acc)
    drift = drift_summary(acc, self._plans, self._stats)
    yield beam.pvalue.TaggedOutput('quality', {**where, **quality})
    for row in drift:
      yield beam.pvalue.TaggedOutput('drift', {**where, **row})
    if where['timing'] == 'EARLY' and not self._alert_on_early:
      return
    for alert in alerts_for(self._problem, quality, drift, self._thresholds):
      self._alerts.inc()
      kind = 'quality' if alert['metric'] == 'positive_rate_gap' else 'drift'
      yield beam.pvalue.TaggedOutput(
          'alerts', {'type': 'alert', 'kind': kind, **alert, **where})


def describe(scored: Scored) -> dict[str, Any]:
  """A scored event as JSON (late records)."""
  return {'event_id': scored.event_id or scored.record.event_id,
          **scored.record.values,
          'probability': scored.probability, 'predicted': scored.predicted}


def model_of(scored: Scored) -> str:
  return scored.model or _GLOBAL_KEY


class MonitorPredictions(beam.PTransform):
  """Timestamped ``Scored`` events -> quality, drift, alerts, late; per
  window and per model (``Scored.model``, ``'all'`` when unnamed): every row
  and alert carries its ``model_key``.

  Args:
    problem: the events' problem (task, features).
    training_stats: the ``stats.json`` dict of the model's training run.
    config: windowing (its ``key`` is unused: the monitor is per window).
    thresholds: when to alert.
    alert_on_early: also alert on EARLY (partial) panes.
  """

  def __init__(self, problem: Problem, training_stats: dict[str, Any],
               config: windowing.WindowConfig = windowing.WindowConfig(),
               thresholds: DriftThresholds = DriftThresholds(),
               alert_on_early: bool = False):
    super().__init__()
    self._problem = problem
    self._stats = training_stats
    self._config = config
    self._thresholds = thresholds
    self._alert_on_early = alert_on_early

  def expand(self, scored):
    split = scored | 'WindowScored' >> windowing.WindowWithLateOutput(
        self._config, key_fn=model_of, key_name='model_key',
        describe=describe)
    reports = (
        split['windowed']
        | 'CombineWindow' >> beam.CombinePerKey(
            MonitorFn(self._problem, self._stats))
        | 'NonEmpty' >> windowing.DropEmptyPanes(lambda acc: acc[0][0])
        | 'Report' >> beam.ParDo(_ReportFn(
            self._problem, self._stats, self._thresholds,
            self._alert_on_early)
        ).with_outputs('quality', 'drift', 'alerts'))
    return {'quality': reports.quality, 'drift': reports.drift,
            'alerts': reports.alerts, 'late': split['late']}


class _FormatCountFn(beam.DoFn):

  def process(self, element, window=beam.DoFn.WindowParam,
              pane=beam.DoFn.PaneInfoParam):
    stage, count = element
    yield {'type': 'dead_letters', 'stage': stage, 'count': count,
           **windowing.window_fields(window), **windowing.pane_fields(pane)}


def _stage_of(keyed_letter: tuple[Any, dict[str, Any]]) -> str:
  return str(keyed_letter[1].get('stage') or 'unknown')


def _describe_letter(keyed_letter: tuple[Any, dict[str, Any]]
                     ) -> dict[str, Any]:
  letter = keyed_letter[1]
  return {k: letter.get(k) for k in ('topic', 'partition', 'offset',
                                     'timestamp_ms', 'stage')}


class DeadLetterCounts(beam.PTransform):
  """Timestamped ``(key, dead letter)`` -> ``{'counts': one row per stage,
  window and pane, 'late': letters too late for their window}``.

  A dead letter's time is its event's, or the Kafka timestamp when the
  event had no readable time. The letters themselves are on the dead-letter
  topic; this counts them beside the drift rows of the same windows.
  """

  def __init__(self, config: windowing.WindowConfig):
    super().__init__()
    self._config = config

  def expand(self, letters):
    split = letters | 'WindowLetters' >> windowing.WindowWithLateOutput(
        self._config, key_fn=_stage_of, key_name='stage',
        describe=_describe_letter)
    counts = (split['windowed']
              | 'Count' >> beam.combiners.Count.PerKey()
              | 'NonEmpty' >> windowing.DropEmptyPanes(lambda n: n)
              | 'Format' >> beam.ParDo(_FormatCountFn()))
    return {'counts': counts, 'late': split['late']}


class AgreementFn(beam.CombineFn):
  """Shadow-vs-live agreements -> n, share of equal classes, mean |Δ|."""

  def create_accumulator(self) -> list:
    return [0, 0, 0, 0.0]  # n, n with a class, same class, sum |Δ|

  def add_input(self, acc: list, agreement: dict[str, Any]) -> list:
    acc[0] += 1
    if agreement['same_class'] is not None:
      acc[1] += 1
      acc[2] += int(agreement['same_class'])
    acc[3] += agreement['abs_diff']
    return acc

  def merge_accumulators(self, accs: Iterable[list]) -> list:
    out = self.create_accumulator()
    for acc in accs:
      out = [a + b for a, b in zip(out, acc)]
    return out

  def extract_output(self, acc: list) -> dict[str, Any]:
    n, n_class, same, total = acc
    return {'n': n,
            'same_class_share': same / n_class if n_class else None,
            'mean_abs_diff': total / n if n else None}


class _FormatAgreementFn(beam.DoFn):

  def process(self, element, window=beam.DoFn.WindowParam,
              pane=beam.DoFn.PaneInfoParam):
    key, summary = element
    live, _, shadow = key.partition('|')
    yield {'type': 'agreement', 'model_key': key, 'live': live,
           'shadow': shadow, **summary, **windowing.window_fields(window),
           **windowing.pane_fields(pane)}


def _agreement_key(agreement: dict[str, Any]) -> str:
  return f"{agreement['live']}|{agreement['shadow']}"


class ShadowAgreement(beam.PTransform):
  """Timestamped ``{'live', 'shadow', 'same_class', 'abs_diff'}`` (one per
  event and shadow, from serving) -> ``{'rows': per live/shadow pair, window
  and pane: n, same_class_share, mean_abs_diff; 'late': too late}``."""

  def __init__(self, config: windowing.WindowConfig):
    super().__init__()
    self._config = config

  def expand(self, agreements):
    split = agreements | 'WindowAgreements' >> windowing.WindowWithLateOutput(
        self._config, key_fn=_agreement_key, key_name='model_key',
        describe=dict)
    rows = (split['windowed']
            | 'Combine' >> beam.CombinePerKey(AgreementFn())
            | 'NonEmpty' >> windowing.DropEmptyPanes(lambda s: s['n'])
            | 'Format' >> beam.ParDo(_FormatAgreementFn()))
    return {'rows': rows, 'late': split['late']}
