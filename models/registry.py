"""The model registry: models as data, on a compacted Kafka topic.

A trained model is announced by a message, not baked into a deployment.
Each message of the registry topic (default ``<problem>-models``, compacted)
is JSON, keyed so that compaction keeps the latest word on each thing:

- ``model/<name>/<version>``: a ``ModelDescriptor`` (where the SavedModel is,
  its task and signature fingerprint, its training metrics, its state:
  ``candidate``, ``live`` or ``retired``);
- ``plan``: the ``ServingPlan`` (which models serve, with which strategy);
  it overrides the plan the serving job was started with, so weights,
  shadows and strategies change without a restart.

A null value deletes the key. Serving jobs follow the topic from its start
(``RegistryFollower``) and fold it into a ``RegistryState``; the CLI
(``python -m tools.models``) and ``pipelines.train --model_topic`` write it.

Model references in a plan: ``name`` (the live version of ``name``),
``name@7`` (that version, whatever its state), ``name@candidate`` (the
newest candidate: nothing when there is none, which is how a shadow plan
follows roll-outs by itself).

Blue/green: ``promote`` writes the new version as live, then the old one as
retired; between the two messages a follower sees two live versions and
takes the one written last, so each batch is scored by exactly one of them.
The promoted descriptor remembers the version it ``replaces``: ``rollback``
makes that one live again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Mapping, Optional

from apache_beam.options.pipeline_options import PipelineOptions

CANDIDATE, LIVE, RETIRED = 'candidate', 'live', 'retired'
STATES = (CANDIDATE, LIVE, RETIRED)
PLAN_KEY = 'plan'
MODEL_PREFIX = 'model/'

SINGLE, AB, SHADOW, ENSEMBLE, BUDGET, CONFIDENCE = (
    'single', 'ab', 'shadow', 'ensemble', 'budget', 'confidence')
STRATEGIES = (SINGLE, AB, SHADOW, ENSEMBLE, BUDGET, CONFIDENCE)


class RegistryOptions(PipelineOptions):
  """Flags of the jobs that publish to or serve from the registry (the
  topic itself is ``--model_topic``, a Kafka flag)."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--model_name', default=None,
                        help='The model\'s name in the registry and in '
                        'predictions; default the problem name.')
    parser.add_argument('--publish_state', choices=STATES, default=CANDIDATE,
                        help='train --model_topic: publish the exported '
                        'version as a candidate (default) or live.')


class InvalidMessage(ValueError):
  """A registry message or plan that cannot be used, and why."""


def signature_fingerprint(problem) -> str:
  """What a SavedModel for ``problem`` must take and return, hashed: its raw
  serving features with their types, its outputs and the task."""
  from models import export
  spec = problem.raw_feature_spec(include_label=False)
  text = json.dumps({'inputs': sorted((k, v.dtype.name) for k, v in
                                      spec.items()),
                     'outputs': sorted(export.output_names(problem)),
                     'task': problem.task.value})
  return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ModelDescriptor:
  """One model version as the registry knows it."""
  problem: str
  name: str
  version: int
  uri: str
  task: str
  signature: str
  metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  created_ms: int = 0
  state: str = CANDIDATE
  # The live version this one replaced when promoted: rollback's target.
  replaces: Optional[int] = None

  @property
  def ref(self) -> str:
    return f'{self.name}@{self.version}'

  @property
  def key(self) -> str:
    return f'{MODEL_PREFIX}{self.name}/{self.version}'

  def to_json(self) -> dict[str, Any]:
    return {'kind': 'model', **dataclasses.asdict(self),
            'metrics': dict(self.metrics)}

  def with_state(self, state: str, **changes) -> 'ModelDescriptor':
    return dataclasses.replace(self, state=state, **changes)

  @classmethod
  def from_json(cls, value: Mapping[str, Any]) -> 'ModelDescriptor':
    if not isinstance(value, Mapping):
      raise InvalidMessage('a model descriptor is a JSON object')
    fields = {f.name for f in dataclasses.fields(cls)}
    missing = {'problem', 'name', 'version', 'uri', 'task', 'signature'} - set(
        value)
    if missing:
      raise InvalidMessage(f'model descriptor lacks {sorted(missing)}')
    version = value['version']
    if isinstance(version, bool) or not isinstance(version, int) or (
        version < 0):
      raise InvalidMessage(f'version {version!r} is not a natural number')
    if value.get('state', CANDIDATE) not in STATES:
      raise InvalidMessage(f"state {value.get('state')!r} is not one of "
                           f'{STATES}')
    for name in ('problem', 'name', 'uri', 'task', 'signature'):
      if not isinstance(value[name], str) or not value[name]:
        raise InvalidMessage(f'{name} {value[name]!r} is not a string')
    if '@' in value['name'] or '/' in value['name']:
      raise InvalidMessage(f"model name {value['name']!r} has '@' or '/'")
    return cls(**{k: v for k, v in value.items() if k in fields})


def describe(problem, path: str, name: Optional[str] = None,
             state: str = CANDIDATE) -> ModelDescriptor:
  """The descriptor of an exported version directory (``models.export``):
  its version from the directory name, its eval metrics from its
  ``model_info.json``."""
  import tensorflow as tf
  from models import export
  info_path = os.path.join(path, 'assets.extra', export.MODEL_INFO_FILE)
  info = {}
  if tf.io.gfile.exists(info_path):
    with tf.io.gfile.GFile(info_path) as f:
      info = json.load(f)
  base = os.path.basename(os.path.normpath(path))
  version = int(base) if base.isdigit() else int(info.get('version', 0))
  uri = path if '://' in path else os.path.abspath(path)
  return ModelDescriptor(
      problem=problem.name, name=name or problem.name, version=version,
      uri=uri, task=problem.task.value,
      signature=signature_fingerprint(problem),
      metrics=info.get('eval', {}), created_ms=int(time.time() * 1000),
      state=state)


def parse_ref(ref: str) -> tuple[str, str]:
  """``name[@version|@live|@candidate]`` -> (name, selector)."""
  name, _, selector = str(ref).partition('@')
  selector = selector or LIVE
  if not name or not (selector.isdigit() or selector in (LIVE, CANDIDATE)):
    raise InvalidMessage(f'model reference {ref!r} is not name, name@N, '
                         'name@live or name@candidate')
  return name, selector


@dataclasses.dataclass(frozen=True)
class ServingPlan:
  """Which models answer, and how.

  - ``single``: ``models[0]`` answers.
  - ``ab``: each event goes to one of ``models`` by a stable hash of its
    entity key (sticky), in the proportions of ``weights``.
  - ``shadow``: ``models[0]`` answers; ``shadows`` score the same events
    (any strategy may have shadows; their answers go to the shadow topic).
  - ``ensemble``: every member answers; classes by majority vote (ties by
    the mean probability), probabilities averaged; regression by ``combine``
    (``mean`` or ``median``).
  - ``budget``: members start together; the first of ``models`` (in order
    of preference) that finished within ``budget_ms`` answers; if none did,
    the first to finish.
  - ``confidence``: every member answers; the largest class margin wins;
    below ``min_confidence``, ``fallback`` answers (when given).
  """
  strategy: str = SINGLE
  models: tuple[str, ...] = ()
  weights: tuple[float, ...] = ()
  shadows: tuple[str, ...] = ()
  budget_ms: float = 50.0
  min_confidence: float = 0.0
  fallback: Optional[str] = None
  combine: str = 'mean'

  def __post_init__(self):
    s, n = self.strategy, len(self.models)
    if s not in STRATEGIES:
      raise InvalidMessage(f'strategy {s!r} is not one of {STRATEGIES}')
    for ref in self.refs():
      parse_ref(ref)
    if n == 0:
      raise InvalidMessage(f'a {s} plan names no model')
    if s in (SINGLE, SHADOW) and n != 1:
      raise InvalidMessage(f'a {s} plan has one model, not {n}')
    if s == SHADOW and not self.shadows:
      raise InvalidMessage('a shadow plan names no shadow model')
    if s in (ENSEMBLE, BUDGET) and n < 2:
      raise InvalidMessage(f'a {s} plan needs two models or more')
    if s == AB and (len(self.weights) != n or any(
        not isinstance(w, (int, float)) or w < 0 for w in self.weights)
                    or sum(self.weights) <= 0):
      raise InvalidMessage(f'an ab plan needs one weight >= 0 per model '
                           f'(some > 0): {self.weights!r}')
    if s == BUDGET and not self.budget_ms > 0:
      raise InvalidMessage(f'budget_ms {self.budget_ms!r} is not > 0')
    if not 0.0 <= self.min_confidence <= 1.0:
      raise InvalidMessage(f'min_confidence {self.min_confidence!r} is not '
                           'in [0, 1]')
    if self.combine not in ('mean', 'median'):
      raise InvalidMessage(f'combine {self.combine!r} is not mean or median')

  def refs(self) -> tuple[str, ...]:
    """Every model the plan may need."""
    return tuple(dict.fromkeys(
        self.models + self.shadows + ((self.fallback,) if self.fallback
                                      else ())))

  def check(self, task: str) -> None:
    if self.strategy == CONFIDENCE and task == 'regression':
      raise InvalidMessage('the confidence strategy needs class '
                           'probabilities; a regression has none')

  def to_json(self) -> dict[str, Any]:
    return {'kind': 'plan', **{k: list(v) if isinstance(v, tuple) else v
                               for k, v in dataclasses.asdict(self).items()}}

  @classmethod
  def from_json(cls, value: Mapping[str, Any]) -> 'ServingPlan':
    if not isinstance(value, Mapping):
      raise InvalidMessage('a serving plan is a JSON object')
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(value) - fields - {'kind'}
    if unknown:
      raise InvalidMessage(f'serving plan has unknown fields {sorted(unknown)}')
    args = dict(value)
    args.pop('kind', None)
    for name in ('models', 'weights', 'shadows'):
      if name in args:
        if not isinstance(args[name], (list, tuple)):
          raise InvalidMessage(f'{name} is a list')
        args[name] = tuple(args[name])
    try:
      return cls(**args)
    except TypeError as e:
      raise InvalidMessage(str(e)) from e


def load_plan(text: str) -> ServingPlan:
  """A plan from JSON text, or from a ``.json``/``.yaml`` file."""
  if os.path.exists(text):
    with open(text) as f:
      body = f.read()
    if text.endswith(('.yaml', '.yml')):
      import yaml
      return ServingPlan.from_json(yaml.safe_load(body))
    text = body
  try:
    return ServingPlan.from_json(json.loads(text))
  except json.JSONDecodeError as e:
    raise InvalidMessage(f'serving plan is not JSON (nor a file): {e}') from e


def single_plan(name: str) -> ServingPlan:
  return ServingPlan(SINGLE, (name,))


class RegistryState:
  """The registry topic folded: descriptors by (name, version), the plan."""

  def __init__(self, problem: Optional[str] = None):
    self._problem = problem
    self._models: dict[tuple[str, int], tuple[int, ModelDescriptor]] = {}
    self._seq = 0
    self.plan: Optional[ServingPlan] = None

  def apply(self, key: Optional[str], value: Any) -> Optional[str]:
    """Folds one message in; returns why it was ignored, or None."""
    self._seq += 1
    try:
      if key == PLAN_KEY:
        self.plan = None if value is None else ServingPlan.from_json(value)
        return None
      if not key or not key.startswith(MODEL_PREFIX):
        raise InvalidMessage(f'unknown registry key {key!r}')
      name, _, version = key[len(MODEL_PREFIX):].rpartition('/')
      if value is None:
        self._models.pop((name, int(version)), None)
        return None
      descriptor = ModelDescriptor.from_json(value)
      if (descriptor.name, str(descriptor.version)) != (name, version):
        raise InvalidMessage(f'key {key!r} does not match {descriptor.ref}')
      if self._problem and descriptor.problem != self._problem:
        raise InvalidMessage(f'model for problem {descriptor.problem!r}, '
                             f'not {self._problem!r}')
      self._models[(name, descriptor.version)] = (self._seq, descriptor)
      return None
    except (InvalidMessage, ValueError) as e:
      return str(e)

  def descriptors(self) -> list[ModelDescriptor]:
    return [d for _, d in sorted(self._models.values(),
                                 key=lambda sd: (sd[1].name, sd[1].version))]

  def get(self, name: str, version: int) -> Optional[ModelDescriptor]:
    found = self._models.get((name, version))
    return found[1] if found else None

  def live(self, name: str) -> Optional[ModelDescriptor]:
    """The live version of ``name``: the one declared live last."""
    live = [sd for (n, _), sd in self._models.items()
            if n == name and sd[1].state == LIVE]
    return max(live, key=lambda sd: sd[0])[1] if live else None

  def newest_candidate(self, name: str) -> Optional[ModelDescriptor]:
    found = [d for (n, _), (_, d) in self._models.items()
             if n == name and d.state == CANDIDATE]
    return max(found, key=lambda d: d.version) if found else None

  def resolve(self, ref: str) -> Optional[ModelDescriptor]:
    name, selector = parse_ref(ref)
    if selector == LIVE:
      return self.live(name)
    if selector == CANDIDATE:
      return self.newest_candidate(name)
    return self.get(name, int(selector))


def promote_messages(state: RegistryState, name: str,
                     version: Optional[int] = None
                     ) -> list[tuple[str, dict]]:
  """Messages that make ``name@version`` (default: the newest candidate)
  live and retire the version it replaces (blue/green)."""
  target = (state.get(name, version) if version is not None
            else state.newest_candidate(name))
  if target is None:
    raise InvalidMessage(f'no {name}@{version if version is not None else "candidate"} '
                         'in the registry')
  current = state.live(name)
  if current is not None and current.version == target.version:
    raise InvalidMessage(f'{target.ref} is already live')
  messages = [(target.key, target.with_state(
      LIVE, replaces=current.version if current else target.replaces
  ).to_json())]
  if current is not None:
    messages.append((current.key, current.with_state(RETIRED).to_json()))
  return messages


def rollback_messages(state: RegistryState, name: str
                      ) -> list[tuple[str, dict]]:
  """Messages that make the version the live one replaced live again."""
  current = state.live(name)
  if current is None or current.replaces is None:
    raise InvalidMessage(f'{name} has no live version that replaced another')
  previous = state.get(name, current.replaces)
  if previous is None:
    raise InvalidMessage(f'{name}@{current.replaces} is no longer in the '
                         'registry')
  return [(previous.key, previous.with_state(LIVE).to_json()),
          (current.key, current.with_state(RETIRED).to_json())]


def retire_messages(state: RegistryState, name: str, version: int
                    ) -> list[tuple[str, dict]]:
  target = state.get(name, version)
  if target is None:
    raise InvalidMessage(f'no {name}@{version} in the registry')
  return [(target.key, target.with_state(RETIRED).to_json())]


# --- Kafka ---------------------------------------------------------------

def _json_bytes(value: Any) -> Optional[bytes]:
  return None if value is None else json.dumps(value).encode()


def ensure_topic(bootstrap: str, topic: str,
                 client_config: Optional[Mapping[str, Any]] = None,
                 compact: bool = True) -> None:
  """Creates the topic (one partition; compacted, as the registry) if
  missing."""
  from kafka.admin import KafkaAdminClient, NewTopic
  from kafka.errors import TopicAlreadyExistsError
  from transforms.kafka_io import clients
  admin = KafkaAdminClient(bootstrap_servers=bootstrap,
                           **clients.resolve_secrets(client_config or {}))
  try:
    admin.create_topics([NewTopic(topic, 1, 1, topic_configs={
        'cleanup.policy': 'compact'} if compact else {})])
  except TopicAlreadyExistsError:
    pass
  finally:
    admin.close()


def publish(bootstrap: str, topic: str,
            messages: Iterable[tuple[str, Any]],
            producer_config: Optional[Mapping[str, Any]] = None) -> None:
  """Writes (key, JSON value | None) messages in order, and waits for them."""
  from kafka import KafkaProducer
  from transforms.kafka_io import clients
  producer = KafkaProducer(**{
      **clients.producer_config(bootstrap, 'rtml-registry'),
      **clients.resolve_secrets(producer_config or {})})
  try:
    for key, value in messages:
      producer.send(topic, key=key.encode(), value=_json_bytes(value)).get(
          timeout=60)
  finally:
    producer.close()


def _consumer(bootstrap: str, topic: str,
              consumer_config: Optional[Mapping[str, Any]]):
  from transforms.kafka_io import clients
  try:
    return clients.from_start(bootstrap, topic, consumer_config)
  except LookupError:
    raise InvalidMessage(f'registry topic {topic!r} does not exist') from None


def _decode(message) -> tuple[Optional[str], Any]:
  key = message.key.decode('utf-8', 'replace') if message.key else None
  if message.value is None:
    return key, None
  try:
    return key, json.loads(message.value)
  except ValueError:
    return key, {'kind': 'unreadable'}


def read(bootstrap: str, topic: str, problem: Optional[str] = None,
         consumer_config: Optional[Mapping[str, Any]] = None,
         timeout_s: float = 30.0) -> RegistryState:
  """The registry as it is now: the topic read to its end."""
  consumer, tps = _consumer(bootstrap, topic, consumer_config)
  state = RegistryState(problem)
  try:
    end = consumer.end_offsets(tps)
    deadline = time.monotonic() + timeout_s
    while any(consumer.position(tp) < end[tp] for tp in tps):
      if time.monotonic() > deadline:
        raise TimeoutError(f'registry {topic!r} not read within {timeout_s}s')
      for batch in consumer.poll(timeout_ms=200).values():
        for message in batch:
          reason = state.apply(*_decode(message))
          if reason:
            logging.warning('Registry message at offset %d ignored: %s',
                            message.offset, reason)
  finally:
    consumer.close()
  return state


class RegistryFollower:
  """Follows a registry topic from its start, in a daemon thread.

  ``owner._on_registry(state, ignored)`` is called after every poll that
  changed the state (``ignored``: (offset, reason) of messages that could not
  be used). The thread holds the owner weakly and ends with it.
  ``caught_up`` is set once the topic was read to the end it had when the
  follower started.
  """

  def __init__(self, owner, bootstrap: str, topic: str,
               problem: Optional[str] = None,
               consumer_config: Optional[Mapping[str, Any]] = None,
               poll_ms: int = 200):
    self.caught_up = threading.Event()
    self.error: Optional[BaseException] = None
    threading.Thread(
        target=RegistryFollower._follow,
        args=(weakref.ref(owner), self, bootstrap, topic, problem,
              consumer_config, poll_ms),
        name='model-registry-follower', daemon=True).start()

  @staticmethod
  def _follow(owner_ref: Callable, follower: 'RegistryFollower',
              bootstrap: str, topic: str, problem: Optional[str],
              consumer_config, poll_ms: int) -> None:
    delay = 0.5
    while owner_ref() is not None:
      try:
        consumer, tps = _consumer(bootstrap, topic, consumer_config)
      except Exception as e:  # pylint: disable=broad-except
        # The broker is down or the topic is not there yet: wait it out.
        follower.error = e
        logging.warning('Model registry %r unreachable (%r); retrying in '
                        '%.1fs', topic, e, delay)
        time.sleep(delay)
        delay = min(2 * delay, 10.0)
        continue
      follower.error, delay = None, 0.5
      try:
        RegistryFollower._read(owner_ref, follower, consumer, tps, problem,
                               poll_ms)
        return
      except Exception:  # pylint: disable=broad-except
        # Read again from the start: the state is rebuilt, not patched.
        logging.exception('Following the model registry %r failed; '
                          'reading it again', topic)
      finally:
        consumer.close()

  @staticmethod
  def _read(owner_ref: Callable, follower: 'RegistryFollower', consumer, tps,
            problem: Optional[str], poll_ms: int) -> None:
    state = RegistryState(problem)
    end = consumer.end_offsets(tps)
    changed, ignored, reached = False, [], False
    while True:
      for batch in consumer.poll(timeout_ms=poll_ms).values():
        for message in batch:
          changed = True
          reason = state.apply(*_decode(message))
          if reason:
            ignored.append((message.offset, reason))
      owner = owner_ref()
      if owner is None:
        return
      # The owner sees the topic whole at first, then every change.
      if not reached and all(consumer.position(tp) >= end[tp] for tp in tps):
        reached = changed = True
      if reached and changed:
        owner._on_registry(state, ignored)  # pylint: disable=protected-access
        changed, ignored = False, []
        follower.caught_up.set()
      del owner
