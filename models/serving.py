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

Models as data. With a ``RegistrySpec`` the handler follows the model
registry topic instead (``models.registry``): ``RegistryModels`` loads and
validates what the serving plan names (rejected descriptors are reported on
the model-events topic; the models in service keep serving), and each batch
is scored under one ``Snapshot`` of plan and models by ``PlanScorer``
(single, ab, shadow, ensemble, budget, confidence: ``models.strategies``
decides). Every answer is a ``Served``: the answer, which model and version
gave it, the strategy, the decision, and the shadows' answers. Members of a
plan run side by side on a small thread pool per worker (TensorFlow releases
the GIL while it computes).
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import logging
import math
import os
import socket
import threading
import time
import weakref
from typing import Any, Iterable, NamedTuple, Optional, Sequence

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler
from apache_beam.ml.inference.base import PredictionResult

from models import export
from models import registry
from models import strategies
from transforms import columns
from transforms.problem import DType, Problem, Task
from transforms.records import Record

METRICS_NAMESPACE = 'rtml.serve'


class LoadedModel(NamedTuple):
  version: int
  path: str
  signature: Any
  saved_model: Any  # keeps the signature's variables alive
  name: str = ''

  @property
  def ref(self) -> str:
    return f'{self.name}@{self.version}'


def version_of(path: str) -> int:
  """The version a directory's name says (0 when it is not a number: a
  registry descriptor gives the version then)."""
  base = os.path.basename(os.path.normpath(path))
  return int(base) if base.isdigit() else 0


def load(path: str) -> LoadedModel:
  """Loads a SavedModel, then moves every Python object alive (the model,
  TensorFlow, Beam) out of the garbage collector's reach (``gc.freeze``).

  A full collection of that heap paused every thread of the worker for
  378-735 ms, also in the middle of a serving benchmark's rate phases;
  frozen, 6-29 ms (README, "Benchmarks"). Frozen objects are still freed when nothing refers to them;
  what a swapped-out model leaves in cycles is collected here, at the next
  load, before freezing again.
  """
  import tensorflow as tf
  with _FREEZE_LOCK:
    gc.unfreeze()
    gc.collect()
    saved = tf.saved_model.load(path)
    loaded = LoadedModel(version_of(path), path,
                         saved.signatures[export.SERVING_SIGNATURE], saved)
    gc.freeze()
  return loaded


_FREEZE_LOCK = threading.Lock()


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

  def __init__(self, problem: Problem, model_root: str, poll_secs: float,
               name: Optional[str] = None):
    self._problem = problem
    self._name = name or problem.name
    self._root = model_root
    self._poll_secs = poll_secs
    self._lock = threading.Lock()
    self._rejected: dict[int, tuple] = {}
    self._events: list[tuple[str, int]] = []
    self._current = _newest_valid(problem, model_root,
                                  self._note_rejection)._replace(
                                      name=self._name)
    self.pool = MemberPool()
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

  def snapshot(self) -> 'Snapshot':
    """The current version as a single-model plan."""
    current = self.current()
    return Snapshot(registry.single_plan(self._name), {self._name: current})

  @staticmethod
  def _watch(ref: 'weakref.ref[VersionedModel]', poll_secs: float):
    while True:
      time.sleep(poll_secs)
      model = ref()
      if model is None:
        return
      model._check()  # pylint: disable=protected-access
      del model

  def drain_events(self) -> list[tuple[str, Any]]:
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
        if model is not None:
          model = model._replace(name=self._name)
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


class Snapshot(NamedTuple):
  """What one batch is scored with: the plan and its loaded models by
  reference (a reference that resolves to nothing is absent)."""
  plan: registry.ServingPlan
  models: dict[str, LoadedModel]


class RegistrySpec(NamedTuple):
  """Where a serving job's models come from when they are data: the
  registry topic, the plan it starts with, and where model events go."""
  bootstrap_servers: str
  topic: str
  plan: registry.ServingPlan
  events_topic: Optional[str] = None
  consumer_config: dict = {}
  producer_config: dict = {}
  startup_timeout_s: float = 600.0


class RegistryModels:
  """The models a plan needs, following the registry topic.

  On every change of the registry the plan (the registry's ``plan``, else
  the job's) is resolved to descriptors; a descriptor not loaded yet is
  loaded and validated in the follower's thread (no batch waits for it).
  One that fails (wrong problem or signature, cannot load, bad canary) is
  rejected with its reason, and its reference keeps the model it had: the
  current models keep serving. Each change swaps one ``Snapshot``, so a
  batch sees a promotion entirely or not at all.
  """

  def __init__(self, problem: Problem, spec: RegistrySpec):
    self._problem = problem
    self._spec = spec
    self._lock = threading.Lock()
    self._snapshot: Optional[Snapshot] = None
    self._loaded: dict[tuple, LoadedModel] = {}
    self._rejected: dict[tuple, int] = {}  # -> the rejected created_ms
    self._events: list[tuple[str, Any]] = []
    self._fingerprint = registry.signature_fingerprint(problem)
    self._producer = None
    self._worker = f'{socket.gethostname()}-{os.getpid()}'
    self.pool = MemberPool()
    self._follower = registry.RegistryFollower(
        self, spec.bootstrap_servers, spec.topic, problem.name,
        spec.consumer_config)
    deadline = time.monotonic() + spec.startup_timeout_s
    while time.monotonic() < deadline and not self._servable():
      self._follower.caught_up.wait(1.0)
    if not self._servable():
      raise RuntimeError(
          f'no model of the serving plan could be loaded from the registry '
          f'{spec.topic!r} within {spec.startup_timeout_s:.0f}s '
          f'(last error: {self._follower.error!r})')

  def _servable(self) -> bool:
    snapshot = self.snapshot_or_none()
    return snapshot is not None and bool(snapshot.models)

  def snapshot_or_none(self) -> Optional[Snapshot]:
    with self._lock:
      return self._snapshot

  def snapshot(self) -> Snapshot:
    with self._lock:
      return self._snapshot

  def drain_events(self) -> list[tuple[str, Any]]:
    with self._lock:
      events, self._events = self._events, []
      return events

  def _note(self, event: str, ref: str, **fields) -> None:
    """Counts a model event and reports it on the model-events topic."""
    with self._lock:
      self._events.append((event, ref))
    record = {'event': event, 'model': ref, 'problem': self._problem.name,
              'worker': self._worker, 'time_ms': int(time.time() * 1000),
              **fields}
    (logging.error if event == 'rejected' else logging.info)(
        'Model registry: %s', json.dumps(record))
    if not self._spec.events_topic:
      return
    try:
      if self._producer is None:
        from kafka import KafkaProducer
        from transforms.kafka_io import clients
        self._producer = KafkaProducer(**{
            **clients.producer_config(self._spec.bootstrap_servers,
                                      'rtml-model-events'),
            # Events are best effort: never hold the follower for long.
            'max_block_ms': 10000, 'request_timeout_ms': 10000,
            'delivery_timeout_ms': 30000,
            **clients.resolve_secrets(self._spec.producer_config)})
      self._producer.send(self._spec.events_topic, key=ref.encode(),
                          value=json.dumps(record).encode())
      self._producer.flush(timeout=30)
    except Exception:  # pylint: disable=broad-except
      logging.exception('Could not write a model event to %r',
                        self._spec.events_topic)

  def _on_registry(self, state: registry.RegistryState,
                   ignored: list[tuple[int, str]]) -> None:
    for offset, reason in ignored:
      self._note('ignored', f'offset {offset}', reason=reason)
    plan = state.plan or self._spec.plan
    try:
      plan.check(self._problem.task.value)
    except registry.InvalidMessage as e:
      previous = self.snapshot_or_none()
      self._note('rejected', 'plan', reason=str(e))
      if previous is not None:
        return
      plan = self._spec.plan
    previous = self.snapshot_or_none()
    models = {}
    for ref in plan.refs():
      descriptor = state.resolve(ref)
      if descriptor is None:
        continue
      loaded = self._load(descriptor)
      if loaded is not None:
        models[ref] = loaded
      elif previous is not None and ref in previous.models:
        models[ref] = previous.models[ref]
    # The previous snapshot's models stay loaded: a rollback is instant.
    used = {(m.name, m.version, m.path) for m in list(models.values()) + (
        list(previous.models.values()) if previous else [])}
    with self._lock:
      changed = previous is None or previous.plan != plan or {
          r: m.ref for r, m in previous.models.items()} != {
              r: m.ref for r, m in models.items()}
      self._snapshot = Snapshot(plan, models)
      # Models no reference uses any more are freed.
      for key in [k for k in self._loaded if k not in used]:
        del self._loaded[key]
    if changed:
      self._note('serving', 'plan', plan=plan.to_json(),
                 models={r: m.ref for r, m in models.items()})

  def _load(self, d: registry.ModelDescriptor) -> Optional[LoadedModel]:
    key = (d.name, d.version, d.uri)
    if key in self._loaded:
      return self._loaded[key]
    # A rejected descriptor is tried again when it is published again (a
    # slow upload finished, a file was fixed): its created time changes.
    if self._rejected.get(key) == d.created_ms:
      return None
    if d.problem != self._problem.name:
      reason = f'made for problem {d.problem!r}, not {self._problem.name!r}'
    elif d.signature != self._fingerprint:
      reason = (f'signature fingerprint {d.signature} is not this '
                f"problem's {self._fingerprint}")
    else:
      model, reason = load_validated(self._problem, d.uri)
      if model is not None:
        self._loaded[key] = model._replace(name=d.name, version=d.version)
        self._note('loaded', d.ref, uri=d.uri)
        return self._loaded[key]
    self._rejected[key] = d.created_ms
    self._note('rejected', d.ref, uri=d.uri, reason=reason)
    return None


class MemberPool:
  """Threads that score a batch with several models at once (one worker
  process's), and which members are still busy with an earlier batch."""

  def __init__(self, threads: int = 8):
    self.executor = concurrent.futures.ThreadPoolExecutor(
        threads, thread_name_prefix='model-member')
    self.busy: dict[str, concurrent.futures.Future] = {}


class Served(NamedTuple):
  """One event's answer under a plan: what answered, how it was decided,
  and the shadows' answers (``(name, version, answer, latency_ms)``)."""
  answer: Any  # the inference dict, or FailedInference
  model: str
  version: int
  strategy: str
  decision: dict
  shadows: tuple = ()


def score(problem: Problem, loaded: LoadedModel, batch: list[Record],
          on_split=None) -> list[Any]:
  """One answer per record (``inference`` dict or ``FailedInference``).

  A batch that fails is split in halves until the events that fail are
  alone, so one bad event never takes good ones with it.
  """
  try:
    outputs = predict(problem, loaded, batch)
    rows = [inference(problem, outputs, i) for i in range(len(batch))]
  except Exception as e:  # pylint: disable=broad-except
    if len(batch) > 1:
      if on_split:
        on_split()
      middle = len(batch) // 2
      return (score(problem, loaded, batch[:middle], on_split) +
              score(problem, loaded, batch[middle:], on_split))
    return [FailedInference(f'inference failed: {type(e).__name__}: '
                            f'{str(e)[:500]}')]
  out = []
  for row in rows:
    reason = check_output(row)
    out.append(FailedInference(reason) if reason else row)
  return out


class _Timed(NamedTuple):
  rows: list
  ms: float


def _timed_score(problem, loaded, batch, on_split) -> _Timed:
  start = time.perf_counter()
  rows = score(problem, loaded, batch, on_split)
  return _Timed(rows, (time.perf_counter() - start) * 1000)


def _ok(row: Any) -> bool:
  return not isinstance(row, FailedInference)


class PlanScorer:
  """Scores one batch under a snapshot's plan (``models.strategies``)."""

  def __init__(self, problem: Problem, snapshot: Snapshot, pool: MemberPool,
               on_split=None, on_scored=None):
    self._problem = problem
    self._plan = snapshot.plan
    self._models = snapshot.models
    self._pool = pool
    self._on_split = on_split
    # on_scored(model ref, rows, ms): per-model metrics.
    self._on_scored = on_scored or (lambda ref, rows, ms: None)

  def _run(self, model: LoadedModel, batch: list[Record]) -> _Timed:
    timed = _timed_score(self._problem, model, batch, self._on_split)
    self._on_scored(model.ref, timed.rows, timed.ms)
    return timed

  def _run_all(self, members: list[tuple[str, LoadedModel]],
               batch: list[Record]) -> dict[str, _Timed]:
    if len(members) == 1:
      ref, model = members[0]
      return {ref: self._run(model, batch)}
    futures = {ref: self._pool.executor.submit(self._run, model, batch)
               for ref, model in members}
    return {ref: f.result() for ref, f in futures.items()}

  def score(self, batch: list[Record]) -> list[Served]:
    plan = self._plan
    members = [(ref, self._models[ref]) for ref in plan.models
               if ref in self._models]
    primary = {m.ref for _, m in members}
    shadows = [(ref, self._models[ref]) for ref in plan.shadows
               if ref in self._models and self._models[ref].ref not in primary]
    if not members:
      failed = FailedInference(f'no model of the {plan.strategy} plan '
                               f'{list(plan.models)} is loaded')
      return [Served(failed, '', 0, plan.strategy, {}) for _ in batch]
    # Shadows run beside the plan's members, never instead of them.
    shadow_futures = [(m, self._pool.executor.submit(self._run, m, batch))
                      for _, m in shadows]
    served = getattr(self, '_' + plan.strategy)(members, batch)
    if shadow_futures:
      answers = [(m, f.result()) for m, f in shadow_futures]
      served = [s._replace(shadows=tuple(
          (m.name, m.version, timed.rows[i], round(timed.ms, 3))
          for m, timed in answers)) for i, s in enumerate(served)]
    return served

  def _single(self, members, batch) -> list[Served]:
    _, model = members[0]
    timed = self._run(model, batch)
    return [Served(row, model.name, model.version, self._plan.strategy, {})
            for row in timed.rows]

  _shadow = _single

  def _ab(self, members, batch) -> list[Served]:
    plan = self._plan
    weights = [plan.weights[plan.models.index(ref)] for ref, _ in members]
    if not any(w > 0 for w in weights):
      weights = [1.0] * len(members)
    arms = [strategies.ab_arm(strategies.entity_key(self._problem, r),
                              weights) for r in batch]
    out: list[Optional[Served]] = [None] * len(batch)
    for arm, (ref, model) in enumerate(members):
      picked = [i for i, a in enumerate(arms) if a == arm]
      if not picked:
        continue
      timed = self._run(model, [batch[i] for i in picked])
      for i, row in zip(picked, timed.rows):
        out[i] = Served(row, model.name, model.version, plan.strategy,
                        {'arm': ref})
    return out

  def _ensemble(self, members, batch) -> list[Served]:
    answers = self._run_all(members, batch)
    out = []
    for i in range(len(batch)):
      rows = {ref: answers[ref].rows[i] for ref, _ in members}
      good = [row for row in rows.values() if _ok(row)]
      decision = {'members': {self._models[ref].ref: _short(row)
                              for ref, row in rows.items()},
                  'latency_ms': {self._models[ref].ref: round(t.ms, 3)
                                 for ref, t in answers.items()}}
      answer = (strategies.vote(self._problem, good, self._plan.combine)
                if good else next(iter(rows.values())))
      out.append(Served(answer, 'ensemble', 0, self._plan.strategy, decision))
    return out

  def _budget(self, members, batch) -> list[Served]:
    """Members start together; the most preferred one done within the
    budget answers, else the first one done. A member still busy with an
    earlier batch is skipped, so a slow one never piles work up; when all
    are busy, the first to be free takes the batch."""
    budget_s = self._plan.budget_ms / 1000
    busy = self._pool.busy
    started = time.perf_counter()
    futures = {}
    for ref, model in members:
      if ref in busy and not busy[ref].done():
        continue
      futures[ref] = busy[ref] = self._pool.executor.submit(
          self._run, model, batch)
    skipped = [self._models[r].ref for r, _ in members if r not in futures]
    if not futures:
      # Every member is busy (with batches of other threads too): the
      # first one to be free answers.
      running = {busy[ref]: (ref, model) for ref, model in members}
      done, _ = concurrent.futures.wait(
          running, return_when=concurrent.futures.FIRST_COMPLETED)
      ref, model = running[next(iter(done))]
      futures[ref] = busy[ref] = self._pool.executor.submit(
          self._run, model, batch)
    concurrent.futures.wait(futures.values(), timeout=budget_s)
    in_time = [ref for ref, f in futures.items() if f.done()]
    winner = next((ref for ref, _ in members if ref in in_time), None)
    within = winner is not None
    while winner is None:
      done, _ = concurrent.futures.wait(
          futures.values(), return_when=concurrent.futures.FIRST_COMPLETED)
      winner = next(ref for ref, f in futures.items() if f in done)
    elapsed = round((time.perf_counter() - started) * 1000, 3)
    model = self._models[winner]
    decision = {'winner': model.ref, 'within_budget': within,
                'budget_ms': self._plan.budget_ms, 'answered_ms': elapsed,
                'in_time': [self._models[r].ref for r in in_time]}
    if skipped:
      decision['skipped_busy'] = skipped
    return [Served(row, model.name, model.version, self._plan.strategy,
                   decision) for row in futures[winner].result().rows]

  def _confidence(self, members, batch) -> list[Served]:
    plan, task = self._plan, self._problem.task
    answers = self._run_all(members, batch)
    fallback = self._models.get(plan.fallback) if plan.fallback else None
    out, low = [], []
    for i in range(len(batch)):
      rows = [answers[ref].rows[i] for ref, _ in members]
      best = strategies.most_confident(
          task, [row if _ok(row) else None for row in rows])
      if best is None:
        ref, model = members[0]
        out.append(Served(rows[0], model.name, model.version,
                          plan.strategy, {'winner': None}))
        continue
      ref, model = members[best]
      margin = strategies.confidence(task, rows[best])
      out.append(Served(rows[best], model.name, model.version, plan.strategy,
                        {'winner': model.ref, 'confidence': round(margin, 6),
                         'fallback': False}))
      if margin < plan.min_confidence and fallback is not None:
        low.append(i)
    if low:
      timed = self._run(fallback, [batch[i] for i in low])
      for i, row in zip(low, timed.rows):
        out[i] = Served(row, fallback.name, fallback.version, plan.strategy,
                        dict(out[i].decision, winner=fallback.ref,
                             fallback=True))
    return out


def _short(row: Any) -> Any:
  """A member's answer in a decision: its class, or its value."""
  if not _ok(row):
    return None
  return row.get(export.CLASS, row.get(export.PREDICTION))


class RawFeaturesModelHandler(ModelHandler[Record, PredictionResult, Any]):
  """RunInference handler for the raw-feature SavedModels of
  ``models.export``, under a serving plan.

  Args:
    problem: what the records are and the model's task.
    model_root: directory of ``<integer>/`` versions; the newest valid one
      serves, newer ones are swapped in as they appear (see module doc).
      Ignored with ``registry``.
    poll_secs: how often to look for a new version.
    registry: models and plan from a registry topic instead.
    model_name: the name predictions carry (directory mode); default the
      problem's name.
  """

  def __init__(self, problem: Problem, model_root: Optional[str] = None,
               poll_secs: float = 5.0,
               registry_spec: Optional[RegistrySpec] = None,
               model_name: Optional[str] = None):
    super().__init__()
    self._problem = problem
    self._model_root = model_root
    self._poll_secs = poll_secs
    self._registry = registry_spec
    self._model_name = model_name
    self._accepted = Metrics.counter(METRICS_NAMESPACE,
                                     'model_versions_accepted')
    self._rejected = Metrics.counter(METRICS_NAMESPACE,
                                     'model_versions_rejected')
    self._version = Metrics.gauge(METRICS_NAMESPACE, 'model_version_in_use')
    self._splits = Metrics.counter(METRICS_NAMESPACE, 'failed_batches_split')

  def load_model(self):
    if self._registry is not None:
      return RegistryModels(self._problem, self._registry)
    return VersionedModel(self._problem, self._model_root, self._poll_secs,
                          self._model_name)

  def run_inference(self, batch: Sequence[Record], model,
                    inference_args: Optional[dict[str, Any]] = None
                    ) -> Iterable[PredictionResult]:
    snapshot = model.snapshot()
    for event, _ in model.drain_events():
      if event in ('accepted', 'loaded'):
        self._accepted.inc()
      elif event == 'rejected':
        self._rejected.inc()
    if len(snapshot.models) == 1:
      self._version.set(next(iter(snapshot.models.values())).version)
    batch = list(batch)
    calls = []  # Beam metrics count only on this thread, not the pool's.
    served = PlanScorer(self._problem, snapshot, model.pool,
                        on_split=lambda: calls.append(None),
                        on_scored=lambda *call: calls.append(call)
                        ).score(batch)
    for call in calls:
      if call is None:
        self._splits.inc()
      else:
        _model_metrics(*call)
    return [PredictionResult(record, s, f'{s.model}@{s.version}')
            for record, s in zip(batch, served)]

  def get_num_bytes(self, batch: Sequence[Record]) -> int:
    return sum(len(r.values) * 8 for r in batch)

  def get_metrics_namespace(self) -> str:
    return METRICS_NAMESPACE


def _model_metrics(ref: str, rows: list, ms: float) -> None:
  """Per-model counters and the latency of its calls (Beam metrics)."""
  failed = sum(1 for r in rows if not _ok(r))
  Metrics.counter(METRICS_NAMESPACE, f'predictions[{ref}]').inc(
      len(rows) - failed)
  if failed:
    Metrics.counter(METRICS_NAMESPACE, f'failures[{ref}]').inc(failed)
  Metrics.distribution(METRICS_NAMESPACE, f'inference_ms[{ref}]').update(
      int(round(ms)))
