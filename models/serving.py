"""Serving the exported model with Beam RunInference, with versions as data.

``RawFeaturesModelHandler`` is a RunInference ``ModelHandler`` for the
SavedModel that ``models.export`` writes. It batches parsed raw records into
one dense tensor per raw feature and calls the ``serving_default`` signature,
which runs the tf.Transform graph and the Keras model inside: nothing here
re-implements preprocessing. (tfx-bsl's handlers take tf.Examples and lack
``update_model_path``; Beam's TF handlers take one tensor, not a dict of raw
features: hence a handler of our own.)

Hot swap. The "model" the handler loads is a ``VersionedModel``: it serves
the newest valid ``<model_root>/<integer>/`` version and, every
``poll_secs``, looks for a newer one from a background thread. A candidate is
*validated* before it is swapped in: it loads, its signature takes exactly
the problem's raw serving features and returns its task's outputs, and a
canary prediction is well formed (a probability, class probabilities that
sum to one, or a finite value). A version
that fails is rejected (log line + ``model_versions_rejected`` counter) and
the current one keeps serving; it is looked at again only when its files
change (a slow upload finishing). Each batch is scored by one version, whose
number is stamped on every ``PredictionResult`` (``model_id``); no batch
waits for a load.

Failures. A batch the model cannot score is split until the failing events
are alone; each of those, and each event whose outputs are not finite, gets
a ``FailedInference`` (with the reason) as its inference, which the serving
pipeline turns into a dead letter. Good events of the batch are scored.

Why not RunInference's model side input (``model_metadata_pcoll``, fed by
``WatchFilePattern``)? ``WatchFilePattern`` matches files while a SavedModel
is a directory; RunInference would retry a bundle forever if a pushed model
failed to load; and an unbounded, triggered global-window side input is not
supported by Prism (apache/beam#31438), while the DirectRunner runs such a
pipeline on its batch engine. Watching inside the handler works the same on
every runner.

A version directory appears atomically when ``models.export`` writes it on a
local or POSIX file system; on object stores the validation is what keeps a
half-uploaded version out.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from typing import Any, Iterable, NamedTuple, Optional, Sequence

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler
from apache_beam.ml.inference.base import PredictionResult

from models import export
from transforms import columns
from transforms.problem import DType, Problem, Task
from transforms.records import Record

METRICS_NAMESPACE = 'rtml.serve'


class LoadedModel(NamedTuple):
  version: int
  path: str
  signature: Any
  saved_model: Any  # keeps the signature's variables alive


def version_of(path: str) -> int:
  return int(os.path.basename(os.path.normpath(path)))


def load(path: str) -> LoadedModel:
  import tensorflow as tf
  saved = tf.saved_model.load(path)
  return LoadedModel(version_of(path), path,
                     saved.signatures[export.SERVING_SIGNATURE], saved)


def predict(problem: Problem, model: LoadedModel,
            records: Sequence[Record]) -> dict[str, Any]:
  """Runs the raw-feature signature on parsed records (numpy outputs)."""
  import tensorflow as tf
  inputs = {name: tf.constant(values) for name, values in
            columns.to_columns(problem, records, include_label=False).items()}
  return {k: v.numpy() for k, v in model.signature(**inputs).items()}


def inference(problem: Problem, outputs: dict[str, Any], i: int
              ) -> dict[str, Any]:
  """Row ``i`` of the signature's outputs as JSON-ready values."""
  if problem.task is Task.BINARY:
    return {export.PROBABILITY: float(outputs[export.PROBABILITY][i]),
            export.CLASS: int(outputs[export.CLASS][i])}
  if problem.task is Task.MULTICLASS:
    return {export.PROBABILITIES: [
        float(p) for p in outputs[export.PROBABILITIES][i]],
            export.CLASS: int(outputs[export.CLASS][i])}
  return {export.PREDICTION: float(outputs[export.PREDICTION][i])}


class FailedInference(NamedTuple):
  """The inference of one event that could not be scored, and why."""
  reason: str


def check_output(row: dict[str, Any]) -> Optional[str]:
  """Why one event's outputs (``inference``) are unusable, or None."""
  values = row.get(export.PROBABILITIES) or [
      row.get(export.PROBABILITY, row.get(export.PREDICTION))]
  if not all(isinstance(v, float) and math.isfinite(v) for v in values):
    return f'the model answered a non-finite value: {row!r}'
  return None


def canary_record(problem: Problem) -> Record:
  """A syntactically valid raw record for smoke-testing a model."""
  values = {}
  for f in problem.serving_features:
    if f.domain is not None and f.domain[0] is not None:
      values[f.name] = f.domain[0]
    elif f.default is not None:
      values[f.name] = f.default
    else:
      # Any value: an unseen category is valid (out of vocabulary).
      values[f.name] = {DType.FLOAT: 1.0, DType.INT: 1,
                        DType.STRING: '(canary)'}[f.dtype]
  return Record(values, ())


def check_canary(problem: Problem, outputs: dict[str, Any]) -> Optional[str]:
  """Why one canary prediction is malformed for the task, or None."""
  if problem.task is Task.BINARY:
    p = outputs[export.PROBABILITY]
    if not (len(p) == 1 and math.isfinite(float(p[0]))
            and 0.0 <= float(p[0]) <= 1.0):
      return f'canary prediction is not a probability: {p!r}'
  elif problem.task is Task.MULTICLASS:
    p = outputs[export.PROBABILITIES]
    n = problem.label.n_classes
    if not (len(p) == 1 and len(p[0]) == n
            and all(math.isfinite(float(x)) and x >= 0 for x in p[0])
            and abs(float(sum(p[0])) - 1.0) < 1e-3):
      return (f'canary prediction is not a distribution over {n} classes: '
              f'{p!r}')
  else:
    y = outputs[export.PREDICTION]
    if not (len(y) == 1 and math.isfinite(float(y[0]))):
      return f'canary prediction is not a finite value: {y!r}'
  return None


def load_validated(problem: Problem, path: str
                   ) -> tuple[LoadedModel | None, str | None]:
  """(model, None) if ``path`` is a servable version, else (None, reason)."""
  try:
    model = load(path)
  except Exception as e:  # pylint: disable=broad-except
    return None, f'cannot load: {type(e).__name__}: {str(e)[:300]}'
  expected = {f.name for f in problem.serving_features}
  got = set(model.signature.structured_input_signature[1])
  if got != expected:
    return None, (f'signature inputs differ from the raw serving features: '
                  f'missing {sorted(expected - got)}, '
                  f'extra {sorted(got - expected)}')
  outputs = set(model.signature.structured_outputs)
  if outputs != set(export.output_names(problem)):
    return None, (f'signature outputs {sorted(outputs)} are not those of a '
                  f'{problem.task.value} model '
                  f'{sorted(export.output_names(problem))}')
  try:
    canary = predict(problem, model, [canary_record(problem)])
  except Exception as e:  # pylint: disable=broad-except
    return None, f'canary prediction failed: {type(e).__name__}: {str(e)[:300]}'
  reason = check_canary(problem, canary)
  return (None, reason) if reason else (model, None)


def _fingerprint(path: str) -> tuple:
  import tensorflow as tf
  entries = []
  for root, _, files in tf.io.gfile.walk(path):
    for name in files:
      full = os.path.join(root, name)
      entries.append((full, tf.io.gfile.stat(full).length))
  return tuple(sorted(entries))


def _newest_valid(problem: Problem, model_root: str,
                  on_rejected) -> LoadedModel:
  for version in reversed(export.list_versions(model_root)):
    model, reason = load_validated(problem,
                                   os.path.join(model_root, str(version)))
    if model is not None:
      return model
    on_rejected(version, reason)
  raise FileNotFoundError(f'no servable model version under {model_root}')


def newest_valid_version(problem: Problem, model_root: str) -> int:
  """The newest version that validates; raises FileNotFoundError if none."""
  return _newest_valid(problem, model_root, lambda v, r: logging.warning(
      'Model version %d rejected: %s', v, r)).version


class VersionedModel:
  """The model version in service, swapped when a newer valid one appears.

  Thread-safe; shared by the RunInference threads of a worker process.
  """

  def __init__(self, problem: Problem, model_root: str, poll_secs: float):
    self._problem = problem
    self._root = model_root
    self._poll_secs = poll_secs
    self._lock = threading.Lock()
    self._rejected: dict[int, tuple] = {}
    self._events: list[tuple[str, int]] = []
    self._current = _newest_valid(problem, model_root, self._note_rejection)
    # A daemon thread watches the root, whether or not events flow, so a new
    # version is loaded and validated before the first batch needs it.
    # It holds only a weak reference, so it ends when RunInference releases
    # this model.
    threading.Thread(target=VersionedModel._watch,
                     args=(weakref.ref(self), poll_secs),
                     name='model-version-watch', daemon=True).start()

  def _note_rejection(self, version: int, reason: str):
    """Remembers a bad version (until its files change) and counts it."""
    self._rejected[version] = _fingerprint(
        os.path.join(self._root, str(version)))
    with self._lock:
      self._events.append(('rejected', version))
    logging.error('Model version %d rejected: %s', version, reason)

  def current(self) -> LoadedModel:
    """The model to score the next batch with."""
    with self._lock:
      return self._current

  @staticmethod
  def _watch(ref: 'weakref.ref[VersionedModel]', poll_secs: float):
    while True:
      time.sleep(poll_secs)
      model = ref()
      if model is None:
        return
      model._check()  # pylint: disable=protected-access
      del model

  def drain_events(self) -> list[tuple[str, int]]:
    """('accepted' | 'rejected', version) since the last call (for metrics)."""
    with self._lock:
      events, self._events = self._events, []
      return events

  def _check(self):
    try:
      for version in reversed(export.list_versions(self._root)):
        if version <= self._current.version:
          return
        path = os.path.join(self._root, str(version))
        if self._rejected.get(version) == _fingerprint(path):
          continue
        model, reason = load_validated(self._problem, path)
        if model is None:
          self._note_rejection(version, f'{reason} (still serving '
                               f'{self._current.version})')
          continue
        with self._lock:
          previous, self._current = self._current.version, model
          self._events.append(('accepted', version))
        logging.info('Model version %d now serving (was %d)', version, previous)
        return
    except Exception:  # pylint: disable=broad-except
      logging.exception('Looking for a new model version failed; will retry')


class RawFeaturesModelHandler(ModelHandler[Record, PredictionResult,
                                           VersionedModel]):
  """RunInference handler for the raw-feature SavedModel of ``models.export``.

  Args:
    problem: what the records are and the model's task.
    model_root: directory of ``<integer>/`` versions; the newest valid one
      serves, newer ones are swapped in as they appear (see module doc).
    poll_secs: how often to look for a new version.
    min_batch_size, max_batch_size, max_batch_duration_secs: RunInference
      batching. In streaming, ``max_batch_duration_secs`` bounds how long an
      element may wait for its batch to fill, which bounds added latency.
  """

  def __init__(self, problem: Problem, model_root: str,
               poll_secs: float = 5.0, min_batch_size: int = 1,
               max_batch_size: int = 256,
               max_batch_duration_secs: Optional[float] = None):
    super().__init__(min_batch_size=min_batch_size,
                     max_batch_size=max_batch_size,
                     max_batch_duration_secs=max_batch_duration_secs)
    self._problem = problem
    self._model_root = model_root
    self._poll_secs = poll_secs
    self._accepted = Metrics.counter(METRICS_NAMESPACE,
                                     'model_versions_accepted')
    self._rejected = Metrics.counter(METRICS_NAMESPACE,
                                     'model_versions_rejected')
    self._version = Metrics.gauge(METRICS_NAMESPACE, 'model_version_in_use')
    self._splits = Metrics.counter(METRICS_NAMESPACE, 'failed_batches_split')

  def load_model(self) -> VersionedModel:
    return VersionedModel(self._problem, self._model_root, self._poll_secs)

  def run_inference(self, batch: Sequence[Record], model: VersionedModel,
                    inference_args: Optional[dict[str, Any]] = None
                    ) -> Iterable[PredictionResult]:
    loaded = model.current()
    for event, _ in model.drain_events():
      (self._accepted if event == 'accepted' else self._rejected).inc()
    self._version.set(loaded.version)
    return self._score(loaded, list(batch))

  def _score(self, loaded: LoadedModel, batch: list[Record]
             ) -> list[PredictionResult]:
    """Scores a batch; a batch that fails is split in halves until the
    events that fail are alone, so one bad event never takes good ones
    with it. Those get a ``FailedInference``."""
    model_id = str(loaded.version)
    try:
      outputs = predict(self._problem, loaded, batch)
      rows = [inference(self._problem, outputs, i) for i in range(len(batch))]
    except Exception as e:  # pylint: disable=broad-except
      if len(batch) > 1:
        self._splits.inc()
        middle = len(batch) // 2
        return (self._score(loaded, batch[:middle]) +
                self._score(loaded, batch[middle:]))
      rows = [FailedInference(f'inference failed: {type(e).__name__}: '
                              f'{str(e)[:500]}')]
    results = []
    for record, row in zip(batch, rows):
      if not isinstance(row, FailedInference):
        reason = check_output(row)
        if reason:
          row = FailedInference(reason)
      results.append(PredictionResult(record, row, model_id))
    return results

  def get_num_bytes(self, batch: Sequence[Record]) -> int:
    return sum(len(r.values) * 8 for r in batch)

  def get_metrics_namespace(self) -> str:
    return METRICS_NAMESPACE
