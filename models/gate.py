"""The promotion gate: a shadow that is clearly better on the same live
events is promoted through the registry, with the evidence.

The serving job writes the live model's predictions and each shadow's
answers to the same events (``pipelines.serve``, shadow topic). Labels come
with the events (``label`` in both records) or later on a feedback topic
(``{"event_id", "label"}``, as ``pipelines.quality`` reads). The gate keeps,
per (live, shadow) pair, the events that have all three: the live answer, the
shadow's and the label; once there are ``min_labelled`` of them it computes
the rule's metric for both models *on those same events* and, if the shadow
is better by the margin, writes the promotion to the registry
(``registry.promote_messages``: blue/green, rollback-able) and a
``promoted`` record with the evidence to the model-events topic.

Rules: ``auc:0.005`` (AUC higher by at least 0.005), ``accuracy:0.01``,
``log_loss:0.01`` (lower by), ``mae:2%`` (lower by 2 %), ``rmse:2%``,
``mape:1%``: the metric, then the gain in its better direction, absolute or
relative with ``%``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any, Optional

import numpy as np

from models import metrics as metrics_lib
from models import registry
from transforms import feedback
from transforms.problem import Problem, Task

LOWER_IS_BETTER = ('log_loss', 'mae', 'rmse', 'mape')
METRICS = {Task.BINARY: ('auc', 'accuracy', 'log_loss'),
           Task.MULTICLASS: ('accuracy', 'macro_f1', 'log_loss'),
           Task.REGRESSION: ('mae', 'rmse', 'mape')}


@dataclasses.dataclass(frozen=True)
class PromotionRule:
  metric: str
  gain: float
  relative: bool = False
  min_labelled: int = 2000

  @classmethod
  def parse(cls, text: str, min_labelled: int = 2000) -> 'PromotionRule':
    metric, _, gain = text.partition(':')
    relative = gain.endswith('%')
    try:
      value = float(gain.rstrip('%')) / (100 if relative else 1)
    except ValueError:
      raise registry.InvalidMessage(
          f'promotion rule {text!r} is not METRIC:GAIN[%] '
          '(e.g. auc:0.005, mae:2%)') from None
    if value < 0 or min_labelled < 1:
      raise registry.InvalidMessage(f'promotion rule {text!r}: the gain is '
                                    '>= 0 and min_labelled >= 1')
    return cls(metric, value, relative, min_labelled)

  def check(self, task: Task) -> None:
    if self.metric not in METRICS[task]:
      raise registry.InvalidMessage(
          f'{self.metric} is not a {task.value} metric {METRICS[task]}')

  def __str__(self) -> str:
    gain = f'{self.gain * 100:g}%' if self.relative else f'{self.gain:g}'
    return f'{self.metric} better by {gain} on >= {self.min_labelled} events'


@dataclasses.dataclass(frozen=True)
class Verdict:
  promote: bool
  live: str
  shadow: str
  n: int
  metric: str
  live_value: float
  shadow_value: float
  gain: float  # in the metric's better direction (relative when the rule is)
  rule: str

  def evidence(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _output(problem: Problem, record: dict[str, Any]) -> Any:
  if problem.task is Task.BINARY:
    return record['probability']
  if problem.task is Task.MULTICLASS:
    return record['probabilities']
  return record['prediction']


def judge(problem: Problem, rule: PromotionRule, live: str, shadow: str,
          triples: list[tuple[Any, Any, Any]]) -> Verdict:
  """(label, live output, shadow output) of the same events -> verdict."""
  y = np.asarray([t[0] for t in triples])
  threshold = problem.label.threshold if problem.task is Task.BINARY else 0.5
  live_m = metrics_lib.for_task(problem.task, y, np.asarray(
      [t[1] for t in triples]), threshold)[rule.metric]
  shadow_m = metrics_lib.for_task(problem.task, y, np.asarray(
      [t[2] for t in triples]), threshold)[rule.metric]
  gain = (live_m - shadow_m) if rule.metric in LOWER_IS_BETTER else (
      shadow_m - live_m)
  if rule.relative:
    gain = gain / abs(live_m) if live_m else float('inf') if gain > 0 else 0.0
  promote = bool(np.isfinite(live_m) and np.isfinite(shadow_m)
                 and gain >= rule.gain and gain > 0)
  return Verdict(promote, live, shadow, len(triples), rule.metric,
                 float(live_m), float(shadow_m), float(gain), str(rule))


class PairBook:
  """Labelled live and shadow answers to the same events.

  Bounded: past ``max_events`` event ids the oldest answers and labels are
  forgotten (a gate that follows a topic for months keeps its memory).
  """

  def __init__(self, problem: Problem, max_events: int = 1_000_000):
    self._problem = problem
    self._max = max_events
    self._live: dict[str, tuple[str, Any]] = {}  # event id -> (ref, output)
    self._shadow: dict[str, dict[str, Any]] = {}  # id -> {shadow ref: out}
    self._labels: dict[str, Any] = {}
    self._pairs: dict[tuple[str, str], set[str]] = {}

  def _ref(self, record: dict[str, Any]) -> str:
    return feedback.model_key(record)

  def add_prediction(self, record: dict[str, Any]) -> None:
    event_id = record['event_id']
    self._live[event_id] = (self._ref(record), _output(self._problem, record))
    self._label(event_id, record.get('label'))
    self._pair(event_id)

  def add_shadow(self, record: dict[str, Any]) -> None:
    event_id = record['event_id']
    self._shadow.setdefault(event_id, {})[self._ref(record)] = _output(
        self._problem, record)
    self._label(event_id, record.get('label'))
    self._pair(event_id)

  def add_feedback(self, value: Any) -> None:
    fb = feedback.feedback_record(self._problem, value)
    self._label(fb['event_id'], fb['label'])
    self._pair(fb['event_id'])

  def _label(self, event_id: str, label: Any) -> None:
    if label is not None:
      self._labels[event_id] = label

  def _forget_oldest(self) -> None:
    for book in (self._live, self._shadow, self._labels):
      while len(book) > self._max:
        old = next(iter(book))
        del book[old]
        for ids in self._pairs.values():
          ids.discard(old)

  def _pair(self, event_id: str) -> None:
    self._forget_oldest()
    if event_id not in self._labels or event_id not in self._live:
      return
    live = self._live[event_id][0]
    for shadow in self._shadow.get(event_id, {}):
      if shadow != live:
        self._pairs.setdefault((live, shadow), set()).add(event_id)

  def counts(self) -> dict[tuple[str, str], int]:
    return {pair: len(ids) for pair, ids in self._pairs.items()}

  def triples(self, live: str, shadow: str) -> list[tuple[Any, Any, Any]]:
    return [(self._labels[i], self._live[i][1], self._shadow[i][shadow])
            for i in sorted(self._pairs.get((live, shadow), ()))]


def promote(bootstrap: str, model_topic: str, problem: Problem,
            verdict: Verdict, consumer_config=None, producer_config=None
            ) -> list[tuple[str, dict]]:
  """Writes the shadow's promotion to the registry; the messages."""
  name, version = registry.parse_ref(verdict.shadow)
  state = registry.read(bootstrap, model_topic, problem.name, consumer_config)
  messages = registry.promote_messages(state, name, int(version))
  registry.publish(bootstrap, model_topic, messages, producer_config)
  return messages


def _current(bootstrap: str, model_topic: str, problem: Problem,
             pair: tuple[str, str], consumer_config) -> bool:
  """Whether the pair's live model is still live and its shadow is in the
  registry and not retired (a restarted gate reads old answers too)."""
  state = registry.read(bootstrap, model_topic, problem.name, consumer_config)
  live, shadow = (state.resolve(ref) for ref in pair)
  if live is None or shadow is None:
    return False
  name = registry.parse_ref(pair[0])[0]
  current = state.live(name)
  return (current is not None and current.ref == live.ref
          and shadow.state != registry.RETIRED)


def run(problem: Problem, rule: PromotionRule, bootstrap: str,
        predictions_topic: str, shadow_topic: str, model_topic: str,
        events_topic: Optional[str] = None,
        feedback_topic: Optional[str] = None, once: bool = False,
        timeout_s: Optional[float] = None, consumer_config=None,
        producer_config=None, progress=sys.stderr) -> list[Verdict]:
  """Follows the topics and judges each (live, shadow) pair when it has
  ``min_labelled`` labelled events, then every 10 % more; promotes when the
  rule holds. ``once``: return after the first verdict. Returns the
  verdicts."""
  from kafka import KafkaConsumer
  from transforms.kafka_io import clients
  rule.check(problem.task)
  topics = [predictions_topic, shadow_topic] + (
      [feedback_topic] if feedback_topic else [])
  consumer = KafkaConsumer(
      *topics, bootstrap_servers=bootstrap, auto_offset_reset='earliest',
      enable_auto_commit=False, **clients.CLIENT_DEFAULTS,
      **clients.resolve_secrets(consumer_config or {}))
  book = PairBook(problem)
  next_look: dict[tuple[str, str], int] = {}
  decided: set[tuple[str, str]] = set()
  verdicts: list[Verdict] = []
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  last_progress = 0.0
  try:
    while deadline is None or time.monotonic() < deadline:
      for batch in consumer.poll(timeout_ms=500).values():
        for message in batch:
          try:
            value = json.loads(message.value)
            if message.topic == predictions_topic:
              book.add_prediction(value)
            elif message.topic == shadow_topic:
              book.add_shadow(value)
            else:
              book.add_feedback(value)
          except Exception:  # pylint: disable=broad-except
            continue  # not a record the gate can use
      counts = book.counts()
      if progress and time.monotonic() - last_progress > 5:
        last_progress = time.monotonic()
        progress.write('[gate] labelled events per live/shadow pair: ' + (
            ', '.join(f'{l} vs {s}: {n}/{rule.min_labelled}'
                      for (l, s), n in counts.items()) or 'none yet') + '\n')
        progress.flush()
      for pair, n in counts.items():
        if pair in decided or n < next_look.get(pair, rule.min_labelled):
          continue
        next_look[pair] = int(n * 1.1) + 1
        if not _current(bootstrap, model_topic, problem, pair,
                        consumer_config):
          decided.add(pair)  # an old roll-out: nothing left to decide
          continue
        verdict = judge(problem, rule, pair[0], pair[1],
                        book.triples(*pair))
        verdicts.append(verdict)
        if progress:
          progress.write(f'[gate] {json.dumps(verdict.evidence())}\n')
          progress.flush()
        if verdict.promote:
          decided.add(pair)
          promote(bootstrap, model_topic, problem, verdict, consumer_config,
                  producer_config)
          if events_topic:
            registry.publish(bootstrap, events_topic, [(verdict.shadow, {
                'event': 'promoted', 'model': verdict.shadow,
                'replaces': verdict.live, 'problem': problem.name,
                'time_ms': int(time.time() * 1000),
                'evidence': verdict.evidence()})], producer_config)
        if once:
          return verdicts
  finally:
    consumer.close()
  return verdicts
