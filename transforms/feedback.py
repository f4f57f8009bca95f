"""Delayed labels joined to the predictions that were made, and live quality.

Labels usually come later than the event (a taxi's tip is known when the trip
ends, a house's price when it sells). A feedback record names the event and
its true label::

    {"event_id": "taxi_trips-17", "label": 1, "label_time_ms": 1368735300000}

``label`` is what the problem predicts: 0/1 (or false/true, or one of the two
class names) for binary, a class index or name for multi-class, a number for
regression. ``label_time_ms`` is when the label became known (event time).

``JoinFeedback(problem, ttl_s)`` joins ``(event id, prediction)`` and
``(event id, feedback)`` in event time, a stateful join keyed by event id:

* either may arrive first; the pair is emitted as soon as both are there,
  timestamped at the later of the event time and the label time;
* a label counts only if it is known within ``ttl_s`` of the event
  (``label_time - event_time <= ttl_s``, judged on the data's times, so the
  result does not depend on arrival order);
* duplicates are ignored: a second label for an event, and a second
  prediction of the same event by the same model (an at-least-once replay);
  predictions of one event by several models (shadow, A/B) each get the label;
* outputs ``'unlabelled'``: a prediction without a label known within the
  TTL (once the watermark passed it); ``'late'``: a label known after its
  prediction's TTL (that prediction is also unlabelled), or whose prediction
  never came within the label's own TTL. Each
  carries a ``reason``; all are counted (``Metrics`` namespace ``feedback``).

The state of an event is kept until the watermark passes twice the TTL after
its first record (the second TTL tells a label that is too late from one
whose prediction never came), then cleared.

``LiveQuality(problem, config)`` windows the joined pairs (by the time each
pair was complete: the quality of the labels known in that window), per model
and version, with late pairs as an explicit output (``transforms.windowing``),
and reports per task: binary AUC, accuracy, log loss, mean predicted
probability against the observed positive rate and the expected calibration
error (10 bins); multi-class accuracy and log loss; regression MAE, RMSE,
MAPE (over non-zero labels) and the mean prediction and label; always the
number of labelled events.
``quality_alerts`` turns a window whose metric crosses a threshold into an
alert record with its evidence.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Optional

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms import window as W
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (ReadModifyWriteStateSpec,
                                              TimerSpec, on_timer)
from apache_beam.utils.timestamp import Timestamp

from transforms import windowing
from transforms.problem import Problem, Task

_NAMESPACE = 'feedback'
PREDICTION, LABEL = 'prediction', 'label'
UNLABELLED, LATE = 'unlabelled', 'late'
_EPS = 1e-7


class InvalidFeedback(ValueError):
  """A feedback record that cannot be used, with the reason."""


def label_of(problem: Problem, raw: Any) -> Any:
  """A feedback label as the problem's label value: class index or float."""
  label = problem.label
  if isinstance(raw, bool):
    raw = int(raw)
  if label.task is Task.REGRESSION:
    if isinstance(raw, (int, float)) and math.isfinite(raw):
      return float(raw)
    raise InvalidFeedback(f'a regression label is a finite number, not {raw!r}')
  if isinstance(raw, str) and raw in label.classes:
    return label.classes.index(raw)
  n = len(label.classes) if label.task is Task.MULTICLASS else 2
  if isinstance(raw, (int, float)) and float(raw).is_integer() and (
      0 <= raw < n):
    return int(raw)
  raise InvalidFeedback(f'not a label of this problem: {raw!r}')


def feedback_record(problem: Problem, value: Any) -> dict[str, Any]:
  """A decoded feedback JSON value, checked: event id, label, label time."""
  if not isinstance(value, dict):
    raise InvalidFeedback('a feedback record is a JSON object')
  event_id = value.get('event_id')
  if not isinstance(event_id, str) or not event_id:
    raise InvalidFeedback('no event_id')
  if 'label' not in value:
    raise InvalidFeedback('no label')
  label_ms = value.get('label_time_ms')
  if isinstance(label_ms, bool) or not isinstance(label_ms, (int, float)) or (
      not math.isfinite(label_ms)):
    raise InvalidFeedback('no label_time_ms (epoch milliseconds)')
  return {'event_id': event_id, 'label': label_of(problem, value['label']),
          'label_time_ms': int(label_ms)}


def model_key(prediction: dict[str, Any]) -> str:
  """Which model made a prediction: ``name@version`` (name: the problem's
  when the record has no ``model``)."""
  name = prediction.get('model') or prediction.get('problem') or 'model'
  return f"{name}@{prediction.get('model_version')}"


def joined_pair(prediction: dict[str, Any],
                feedback: dict[str, Any]) -> dict[str, Any]:
  """A prediction with its label: what live quality is computed from."""
  out = {k: v for k, v in prediction.items()
         if k not in ('label', 'source', 'ingest_ms', 'predicted_ms')}
  out['model_key'] = model_key(prediction)
  out['label'] = feedback['label']
  out['label_time_ms'] = feedback['label_time_ms']
  return out


class _Entry:
  """What the join holds for one event id."""

  def __init__(self, first_ms: int):
    self.first_ms = first_ms
    self.predictions: dict[str, dict] = {}
    self.joined: set[str] = set()
    self.feedback: Optional[dict] = None
    self.expired = False


class _JoinFn(beam.DoFn):
  """(event id, (kind, record)) in the global window -> joined pairs, and
  ``unlabelled`` / ``late`` records (see module doc)."""

  ENTRY = ReadModifyWriteStateSpec('entry', PickleCoder())
  TTL = TimerSpec('ttl', TimeDomain.WATERMARK)

  def __init__(self, ttl_s: float):
    self._ttl_ms = int(ttl_s * 1000)
    self._joined = Metrics.counter(_NAMESPACE, 'joined')
    self._duplicates = Metrics.counter(_NAMESPACE, 'duplicates')
    self._unlabelled = Metrics.counter(_NAMESPACE, 'unlabelled')
    self._late = Metrics.counter(_NAMESPACE, 'late_labels')

  def _join(self, entry: _Entry, key: str, prediction: dict, feedback: dict):
    """The pair if the label came within the TTL, else a late record (and
    the prediction will be reported unlabelled at its TTL)."""
    event_ms = prediction.get('event_time_ms') or 0
    if feedback['label_time_ms'] - event_ms > self._ttl_ms:
      self._late.inc()
      return beam.pvalue.TaggedOutput(LATE, _at(dict(
          feedback, model_key=model_key(prediction), event_time_ms=event_ms,
          reason=f'label known {(feedback["label_time_ms"] - event_ms) / 1000:g}'
                 f' s after the event, over the {self._ttl_ms / 1000:g} s TTL'),
          feedback['label_time_ms']))
    self._joined.inc()
    entry.joined.add(key)
    return _at(joined_pair(prediction, feedback),
                       max(event_ms, feedback['label_time_ms']))

  def process(self, element, timestamp=beam.DoFn.TimestampParam,
              entry_state=beam.DoFn.StateParam(ENTRY),
              ttl=beam.DoFn.TimerParam(TTL)):
    _, (kind, record) = element
    entry: Optional[_Entry] = entry_state.read()
    if entry is None:
      entry = _Entry(timestamp.micros // 1000)
      ttl.set(Timestamp(micros=(entry.first_ms + self._ttl_ms) * 1000))
    if kind == PREDICTION:
      key = model_key(record)
      if key in entry.predictions:
        self._duplicates.inc()
        return
      if entry.expired:  # late data: the watermark passed its TTL
        entry.predictions[key] = record
        entry_state.write(entry)
        self._unlabelled.inc()
        yield beam.pvalue.TaggedOutput(UNLABELLED, _at(dict(
            record, model_key=key, reason='the prediction came after the '
            'watermark passed the TTL of its event'), timestamp))
        return
      entry.predictions[key] = record
      if entry.feedback is not None:
        yield self._join(entry, key, record, entry.feedback)
    else:
      if entry.feedback is not None:
        self._duplicates.inc()
        return
      entry.feedback = record
      if entry.expired:  # its predictions were reported unlabelled
        self._late.inc()
        yield beam.pvalue.TaggedOutput(LATE, _at(dict(record, reason=(
            'the label came after the TTL of its prediction'
            if entry.predictions else
            'no prediction of this event within the TTL')), timestamp))
      else:
        for key, prediction in entry.predictions.items():
          yield self._join(entry, key, prediction, record)
    entry_state.write(entry)

  @on_timer(TTL)
  def on_ttl(self, entry_state=beam.DoFn.StateParam(ENTRY),
             ttl=beam.DoFn.TimerParam(TTL),
             timestamp=beam.DoFn.TimestampParam):
    entry: Optional[_Entry] = entry_state.read()
    if entry is None:
      return
    if entry.expired:  # the second TTL: forget the event
      entry_state.clear()
      return
    entry.expired = True
    for key, prediction in entry.predictions.items():
      if key not in entry.joined:
        self._unlabelled.inc()
        yield beam.pvalue.TaggedOutput(UNLABELLED, _at(dict(
            prediction, model_key=key,
            reason=f'no label within the {self._ttl_ms / 1000:g} s TTL'),
            timestamp))
    if entry.feedback is not None and not entry.predictions:
      self._late.inc()
      yield beam.pvalue.TaggedOutput(LATE, _at(dict(
          entry.feedback,
          reason='no prediction of this event within the TTL'), timestamp))
    entry_state.write(entry)
    ttl.set(Timestamp(micros=(entry.first_ms + 2 * self._ttl_ms) * 1000))


def _at(value: Any, at: Any) -> beam.window.TimestampedValue:
  """``value`` at ``at`` (epoch ms, or a Beam timestamp)."""
  if not isinstance(at, Timestamp):
    at = Timestamp(micros=int(at) * 1000)
  return beam.window.TimestampedValue(value, at)


class JoinFeedback(beam.PTransform):
  """``{'predictions': (event id, prediction), 'feedback': (event id,
  feedback)}`` -> ``{'joined', 'unlabelled', 'late'}`` (see module doc).

  Args:
    ttl_s: how long after an event its label may come.
  """

  def __init__(self, ttl_s: float):
    super().__init__()
    if ttl_s <= 0:
      raise ValueError('the label TTL must be positive')
    self._ttl_s = ttl_s

  def expand(self, inputs):
    keyed = beam.typehints.Tuple[str, Any]  # a deterministic key coder
    tagged = (
        (inputs['predictions'] | 'TagPredictions' >> beam.Map(
            lambda kv: (kv[0], (PREDICTION, kv[1]))).with_output_types(keyed),
         inputs['feedback'] | 'TagFeedback' >> beam.Map(
             lambda kv: (kv[0], (LABEL, kv[1]))).with_output_types(keyed))
        | 'Merge' >> beam.Flatten()
        | 'Rewindow' >> beam.WindowInto(W.GlobalWindows()))
    out = tagged | 'Join' >> beam.ParDo(_JoinFn(self._ttl_s)).with_outputs(
        UNLABELLED, LATE, main='joined')
    return {'joined': out.joined, 'unlabelled': out[UNLABELLED],
            'late': out[LATE]}


# -- live quality -------------------------------------------------------------

def new_quality() -> dict[str, Any]:
  return {'n': 0, 'correct': 0, 'log_loss': 0.0, 'log_loss_n': 0,
          'abs': 0.0, 'sq': 0.0, 'ape': 0.0, 'ape_n': 0, 'pred': 0.0,
          'label': 0.0, 'scores': []}


def add_pair(problem: Problem, acc: dict[str, Any],
             pair: dict[str, Any]) -> dict[str, Any]:
  """Adds one joined pair to a quality accumulator."""
  task, y = problem.label.task, pair['label']
  acc['n'] += 1
  if task is Task.REGRESSION:
    p = float(pair['prediction'])
    acc['abs'] += abs(p - y)
    acc['sq'] += (p - y) ** 2
    if y:
      acc['ape'] += abs(p - y) / abs(y)
      acc['ape_n'] += 1
    acc['pred'] += p
    acc['label'] += y
    return acc
  acc['correct'] += int(pair['class'] == y)
  acc['label'] += y
  if task is Task.BINARY:
    p = min(max(float(pair['probability']), _EPS), 1 - _EPS)
    acc['scores'].append((p, int(y)))
    acc['pred'] += p
    acc['log_loss'] -= math.log(p if y == 1 else 1 - p)
    acc['log_loss_n'] += 1
  elif pair.get('probabilities') is not None:
    p = min(max(float(pair['probabilities'][y]), _EPS), 1.0)
    acc['log_loss'] -= math.log(p)
    acc['log_loss_n'] += 1
  return acc


def merge_quality(accs: Iterable[dict[str, Any]]) -> dict[str, Any]:
  out = new_quality()
  for acc in accs:
    for k, v in acc.items():
      out[k] = out[k] + v
  return out


def auc(scores: list[tuple[float, int]]) -> Optional[float]:
  """Exact ROC AUC (ties count one half); None without both classes."""
  positives = sum(y for _, y in scores)
  negatives = len(scores) - positives
  if not positives or not negatives:
    return None
  ranked = sorted(scores)
  rank_sum, i = 0.0, 0
  while i < len(ranked):
    j = i
    while j < len(ranked) and ranked[j][0] == ranked[i][0]:
      j += 1
    mean_rank = (i + 1 + j) / 2  # 1-based ranks i+1..j
    rank_sum += mean_rank * sum(y for _, y in ranked[i:j])
    i = j
  return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def calibration_error(scores: list[tuple[float, int]], bins: int = 10
                      ) -> Optional[float]:
  """Expected calibration error over equal-width probability bins."""
  if not scores:
    return None
  totals = [[0, 0.0, 0] for _ in range(bins)]
  for p, y in scores:
    b = totals[min(int(p * bins), bins - 1)]
    b[0] += 1
    b[1] += p
    b[2] += y
  return sum(abs(s - pos) for n, s, pos in totals if n) / len(scores)


def quality_summary(problem: Problem, acc: dict[str, Any]) -> dict[str, Any]:
  """The live quality metrics of an accumulator (see module doc)."""
  n = acc['n']
  out: dict[str, Any] = {'labelled': n}
  if not n:
    return out
  if problem.label.task is Task.REGRESSION:
    out.update(mae=acc['abs'] / n, rmse=math.sqrt(acc['sq'] / n),
               mape=acc['ape'] / acc['ape_n'] if acc['ape_n'] else None,
               mean_prediction=acc['pred'] / n, mean_label=acc['label'] / n)
    return out
  out['accuracy'] = acc['correct'] / n
  if acc['log_loss_n']:
    out['log_loss'] = acc['log_loss'] / acc['log_loss_n']
  if problem.label.task is Task.BINARY:
    out.update(auc=auc(acc['scores']), mean_probability=acc['pred'] / n,
               positive_rate=acc['label'] / n,
               calibration_error=calibration_error(acc['scores']))
  return out


class QualityFn(beam.CombineFn):
  """Joined pairs -> the quality summary of a window."""

  def __init__(self, problem: Problem):
    self._problem = problem

  def create_accumulator(self):
    return new_quality()

  def add_input(self, acc, pair):
    return add_pair(self._problem, acc, pair)

  def merge_accumulators(self, accs):
    return merge_quality(accs)

  def extract_output(self, acc):
    return quality_summary(self._problem, acc)


@dataclasses.dataclass(frozen=True)
class QualityThresholds:
  """Alert when a window's metric crosses one of these (None: off).

  ``min_labelled``: a window with fewer labelled events never alerts.
  """
  min_auc: Optional[float] = None
  min_accuracy: Optional[float] = None
  max_log_loss: Optional[float] = None
  max_calibration_error: Optional[float] = None
  max_mae: Optional[float] = None
  max_rmse: Optional[float] = None
  min_labelled: int = 30


def quality_alerts(row: dict[str, Any], thresholds: QualityThresholds
                   ) -> list[dict[str, Any]]:
  """Alerts for one window's quality row (its EARLY panes never alert)."""
  if row.get('timing') == 'EARLY' or (
      row.get('labelled', 0) < thresholds.min_labelled):
    return []
  alerts = []
  for field in dataclasses.fields(thresholds):
    if field.name == 'min_labelled':
      continue
    threshold = getattr(thresholds, field.name)
    bound, metric = field.name.split('_', 1)
    value = row.get(metric)
    if threshold is None or value is None:
      continue
    if (value < threshold) if bound == 'min' else (value > threshold):
      alerts.append({
          'type': 'alert', 'kind': 'quality', 'model_key': row['model_key'],
          'metric': metric, 'value': value, 'threshold': threshold,
          'bound': bound, 'labelled': row['labelled'],
          **{k: row[k] for k in ('window_start', 'window_end',
                                 'window_start_s', 'window_end_s', 'timing')
             if k in row}})
  return alerts


class _FormatQualityFn(beam.DoFn):

  def process(self, element, window=beam.DoFn.WindowParam,
              pane=beam.DoFn.PaneInfoParam):
    key, summary = element
    yield {'type': 'quality', 'model_key': key, **summary,
           **windowing.window_fields(window), **windowing.pane_fields(pane)}


class LiveQuality(beam.PTransform):
  """Joined pairs -> ``{'quality': rows, 'late': pairs too late for their
  window}``; one row per model, window and pane (see module doc)."""

  def __init__(self, problem: Problem, config: windowing.WindowConfig):
    super().__init__()
    self._problem = problem
    self._config = config

  def expand(self, joined):
    windowed = joined | 'Window' >> windowing.WindowWithLateOutput(
        self._config, key_fn=lambda pair: pair['model_key'],
        key_name='model_key', describe=dict)
    quality = (windowed['windowed']
               | 'Quality' >> beam.CombinePerKey(QualityFn(self._problem))
               | 'NonEmpty' >> windowing.DropEmptyPanes(
                   lambda summary: summary['labelled'])
               | 'Format' >> beam.ParDo(_FormatQualityFn()))
    return {'quality': quality, 'late': windowed['late']}
