"""How several models' answers become one: the decisions of a serving plan.

Plain functions on one event's answers (the dicts ``models.serving``
returns: ``probability``/``class``, ``probabilities``/``class``, or
``prediction``), so each rule is tested with literal numbers and is the same
on every runner. ``models.serving`` runs the models and calls these.
"""

from __future__ import annotations

import hashlib
import statistics
from typing import Any, Optional, Sequence

from models import export
from transforms.problem import Problem, Task
from transforms.records import Record


def entity_key(problem: Problem, record: Record) -> str:
  """What A/B routing is sticky on: the problem's entity key, else the
  event id, else the event's values."""
  if problem.entity_key and problem.entity_key in record.values:
    return str(record.values[problem.entity_key])
  if record.event_id is not None:
    return record.event_id
  return repr(sorted(record.values.items()))


def ab_arm(key: str, weights: Sequence[float]) -> int:
  """The arm of ``key``: a stable hash placed on the cumulative weights.

  The same key always lands in the same arm while the weights stay (sticky
  per entity), whatever the process, runner or Python hash seed.
  """
  digest = hashlib.sha256(key.encode('utf-8', 'replace')).digest()
  point = int.from_bytes(digest[:8], 'big') / 2**64 * sum(weights)
  total = 0.0
  for i, weight in enumerate(weights):
    total += weight
    if point < total:
      return i
  return max(i for i, w in enumerate(weights) if w > 0)


def confidence(task: Task, answer: dict[str, Any]) -> float:
  """The class margin of an answer, in [0, 1]: binary |2p - 1|, multi-class
  the top probability minus the second."""
  if task is Task.BINARY:
    return abs(2.0 * answer[export.PROBABILITY] - 1.0)
  if task is Task.MULTICLASS:
    top = sorted(answer[export.PROBABILITIES], reverse=True)
    return top[0] - (top[1] if len(top) > 1 else 0.0)
  raise ValueError('a regression answer has no class margin')


def most_confident(task: Task, answers: Sequence[Optional[dict[str, Any]]]
                   ) -> Optional[int]:
  """Index of the most confident answer (the first on a tie); None if no
  member answered."""
  best, best_margin = None, -1.0
  for i, answer in enumerate(answers):
    if answer is not None and confidence(task, answer) > best_margin:
      best, best_margin = i, confidence(task, answer)
  return best


def vote(problem: Problem, answers: Sequence[dict[str, Any]],
         combine: str = 'mean') -> dict[str, Any]:
  """The ensemble's answer from its members' answers.

  Classification: the class most members chose; a tie goes to the class of
  highest mean probability. Probabilities are the members' mean. Regression:
  the mean or the median of the members' predictions.
  """
  if not answers:
    raise ValueError('no member answered')
  task = problem.task
  if task is Task.REGRESSION:
    values = [a[export.PREDICTION] for a in answers]
    return {export.PREDICTION: float(statistics.median(values)
                                     if combine == 'median'
                                     else statistics.fmean(values))}
  if task is Task.BINARY:
    p = statistics.fmean(a[export.PROBABILITY] for a in answers)
    ones = sum(a[export.CLASS] for a in answers)
    zeros = len(answers) - ones
    cls = 1 if ones > zeros else 0 if zeros > ones else int(
        p >= problem.label.threshold)
    return {export.PROBABILITY: p, export.CLASS: cls}
  n = len(answers[0][export.PROBABILITIES])
  mean = [statistics.fmean(a[export.PROBABILITIES][k] for a in answers)
          for k in range(n)]
  votes = [0] * n
  for a in answers:
    votes[a[export.CLASS]] += 1
  most = max(votes)
  cls = max((k for k in range(n) if votes[k] == most), key=lambda k: mean[k])
  return {export.PROBABILITIES: mean, export.CLASS: cls}


def disagreement(task: Task, live: dict[str, Any], shadow: dict[str, Any]
                 ) -> tuple[Optional[bool], float]:
  """(same class?, |difference|) of a shadow's answer against the live one:
  binary |Δ probability|, multi-class the largest |Δ| of a class
  probability, regression |Δ prediction| (and no class)."""
  if task is Task.REGRESSION:
    return None, abs(live[export.PREDICTION] - shadow[export.PREDICTION])
  same = live[export.CLASS] == shadow[export.CLASS]
  if task is Task.BINARY:
    return same, abs(live[export.PROBABILITY] - shadow[export.PROBABILITY])
  return same, max(abs(a - b) for a, b in zip(live[export.PROBABILITIES],
                                              shadow[export.PROBABILITIES]))
