"""Evaluation metrics per task, in plain numpy (no pipeline, no TF).

The training pipeline, the benchmarks (which also score a gradient-boosted
trees baseline with them) and the tests all call these, so a model and its
baseline are measured the same way.

* binary: ``auc``, ``accuracy``, ``log_loss`` (from P(class 1));
* multi-class: ``accuracy``, ``macro_f1``, ``log_loss`` (from the class
  probabilities);
* regression: ``mae``, ``rmse``, ``mape`` (a share, over non-zero targets),
  ``r2``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from transforms.problem import Task

_EPS = 1e-7


def auc(y: np.ndarray, score: np.ndarray) -> float:
  """Area under the ROC curve (ties count one half), Mann-Whitney form."""
  y = np.asarray(y).astype(bool)
  score = np.asarray(score, dtype=np.float64)
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if not n_pos or not n_neg:
    return float('nan')
  order = np.argsort(score, kind='mergesort')
  ranks = np.empty(len(score), dtype=np.float64)
  sorted_scores = score[order]
  # Average ranks over ties.
  _, first, counts = np.unique(sorted_scores, return_index=True,
                               return_counts=True)
  average = first + (counts + 1) / 2.0
  ranks[order] = np.repeat(average, counts)
  return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary(y: np.ndarray, probability: np.ndarray,
           threshold: float = 0.5) -> dict[str, float]:
  y = np.asarray(y, dtype=np.float64)
  p = np.clip(np.asarray(probability, dtype=np.float64), _EPS, 1 - _EPS)
  return {
      'auc': auc(y, p),
      'accuracy': float(np.mean((p >= threshold) == (y == 1))),
      'log_loss': float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
  }


def multiclass(y: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
  y = np.asarray(y, dtype=np.int64)
  p = np.asarray(probabilities, dtype=np.float64)
  predicted = p.argmax(axis=1)
  f1s = []
  for k in range(p.shape[1]):
    tp = np.sum((predicted == k) & (y == k))
    fp = np.sum((predicted == k) & (y != k))
    fn = np.sum((predicted != k) & (y == k))
    f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
  chosen = np.clip(p[np.arange(len(y)), y], _EPS, 1.0)
  return {
      'accuracy': float(np.mean(predicted == y)),
      'macro_f1': float(np.mean(f1s)),
      'log_loss': float(-np.mean(np.log(chosen))),
  }


def regression(y: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
  y = np.asarray(y, dtype=np.float64)
  pred = np.asarray(prediction, dtype=np.float64)
  error = pred - y
  nonzero = y != 0
  total = np.sum((y - y.mean()) ** 2)
  return {
      'mae': float(np.mean(np.abs(error))),
      'rmse': float(np.sqrt(np.mean(error ** 2))),
      'mape': float(np.mean(np.abs(error[nonzero]) / np.abs(y[nonzero]))),
      'r2': float(1 - np.sum(error ** 2) / total) if total else float('nan'),
  }


def for_task(task: Task, y: np.ndarray, output: np.ndarray,
             threshold: float = 0.5) -> dict[str, Any]:
  """The task's metrics of model ``output`` (P(1), class probabilities or
  predicted values) against labels ``y`` (class indices or values)."""
  if task is Task.BINARY:
    return binary(y, np.reshape(output, [-1]), threshold)
  if task is Task.MULTICLASS:
    return multiclass(y, output)
  return regression(y, np.reshape(output, [-1]))


# The figure each task is judged by, and whether larger is better.
HEADLINE = {Task.BINARY: ('auc', True), Task.MULTICLASS: ('accuracy', True),
            Task.REGRESSION: ('mape', False)}
