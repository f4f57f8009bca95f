"""The training controller: control messages on a Kafka topic start
trainings on data topics, results come back by message, models are
published to the registry (Kafka-ML's loop, on this project's pieces).

    python -m pipelines.control --control_topic hcopd-control \\
        --results_topic hcopd-results --model_topic hcopd-models \\
        [--output_root out/control] [--runner direct] [--run_seconds S]

A control message (JSON, key = deployment id; ``tools.datasource`` writes
them)::

    {"deployment_id": "hcopd-1", "problem": "hcopd", "topic": "hcopd-data",
     "input_format": "avro", "input_config": {"avro_schema": {...}},
     "validation_rate": 0.2, "total_msg": 239, "ranges": {"0": [0, 239]},
     "publish_state": "live", "model_name": "hcopd", "epochs": 40,
     "runner": "prism"}

(``from_time_ms``/``to_time_ms`` instead of ``ranges``: the records the
broker appended in that time.)

For each one the controller checks it, runs ``pipelines.train`` on exactly
that range of the data topic (``ranges``: per partition, first offset and
the offset after the last; none: the whole topic up to now) on the runner of
the flags (into ``<output_root>/<model name>/``, so its versions
follow each other), and writes to the results topic (compacted, key = deployment id)
``started``, then ``done`` (metrics, counts, dead letters, the model
published) or ``failed`` (the reason). The model goes to the registry as the
message asks (``candidate`` or ``live``), so serving jobs following it pick
it up with no restart.

Delivery: one control message at a time, its offset committed only once its
result is written. A message whose deployment is already ``done`` does not
train again (a ``duplicate`` result, under its own key); after a crash
mid-training the message is read again, and the deployment, ``started`` but
not done, is trained again and marked ``resumed``. A bad message gets a
``failed`` result and the controller goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Mapping, Optional, Sequence

from models import registry
from pipelines import train
from transforms import formats
from transforms import problem as problem_lib
from transforms.kafka_io import clients

STARTED, DONE, FAILED, DUPLICATE, REJECTED = (
    'started', 'done', 'failed', 'duplicate', 'rejected')


class InvalidControl(ValueError):
  pass


def check(message: Any) -> dict[str, Any]:
  """A control message, checked; raises InvalidControl with the reason."""
  if not isinstance(message, dict):
    raise InvalidControl('a control message is a JSON object')
  deployment = message.get('deployment_id')
  if not isinstance(deployment, str) or not deployment.strip():
    raise InvalidControl('no deployment_id')
  if not isinstance(message.get('topic'), str) or not message['topic']:
    raise InvalidControl('no data topic')
  fmt = message.get('input_format', formats.JSON)
  if fmt not in formats.FORMATS:
    raise InvalidControl(f'input_format {fmt!r} is not one of '
                         f'{formats.FORMATS}')
  config = message.get('input_config') or {}
  if not isinstance(config, dict):
    raise InvalidControl('input_config is an object')
  rate = message.get('validation_rate', 0.2)
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (
      0 < rate < 1):
    raise InvalidControl(f'validation_rate {rate!r} is not in (0, 1)')
  ranges = message.get('ranges')
  if ranges is not None:
    try:
      spans = {int(p): (int(a), int(b)) for p, (a, b) in ranges.items()}
    except (AttributeError, TypeError, ValueError):
      raise InvalidControl('ranges is {"partition": [first, after_last]}'
                           ) from None
    if any(a < 0 or b < a for a, b in spans.values()):
      raise InvalidControl(f'ranges {ranges!r} are not offset intervals')
    total = message.get('total_msg')
    if total is not None and total != sum(b - a for a, b in spans.values()):
      raise InvalidControl(f'total_msg {total} is not the size of the ranges '
                           f'({sum(b - a for a, b in spans.values())})')
  for name in ('from_time_ms', 'to_time_ms'):
    value = message.get(name)
    if value is not None and (isinstance(value, bool)
                              or not isinstance(value, int)):
      raise InvalidControl(f'{name} {value!r} is not epoch milliseconds')
  if message.get('runner') not in (None, 'direct', 'prism', 'flink',
                                   'dataflow'):
    raise InvalidControl(f"runner {message.get('runner')!r} is not direct, "
                         'prism, flink or dataflow')
  if message.get('publish_state', registry.CANDIDATE) not in (
      registry.CANDIDATE, registry.LIVE):
    raise InvalidControl('publish_state is candidate or live')
  return message


def train_argv(message: Mapping[str, Any], problem_spec: str,
               bootstrap: str, model_topic: Optional[str], output_dir: str,
               extra: Sequence[str] = ()) -> list[str]:
  """The ``pipelines.train`` flags of a checked control message (no
  ``model_topic``: train does not publish)."""
  argv = ['--problem', problem_spec, '--bootstrap_servers', bootstrap,
          '--input_topic', message['topic'],
          '--input_format', message.get('input_format', formats.JSON),
          '--eval_percent',
          str(int(round(100 * message.get('validation_rate', 0.2)))),
          '--output_dir', output_dir]
  if model_topic:
    argv += ['--model_topic', model_topic, '--publish_state',
             message.get('publish_state', registry.CANDIDATE)]
  config = message.get('input_config') or {}
  if config.get('avro_schema') is not None:
    argv += ['--avro_schema', json.dumps(config['avro_schema'])]
  if config.get('schema_id') is not None:
    argv += ['--avro_schema_id', str(config['schema_id'])]
  ranges = message.get('ranges')
  if ranges is not None:
    argv += ['--from_offsets', json.dumps({p: a for p, (a, _) in
                                           ranges.items()}),
             '--to_offsets', json.dumps({p: b for p, (_, b) in
                                         ranges.items()})]
  elif message.get('from_time_ms') is not None or message.get(
      'to_time_ms') is not None:
    for flag, name in (('--from_time', 'from_time_ms'),
                       ('--to_time', 'to_time_ms')):
      if message.get(name) is not None:
        argv += [flag, str(message[name])]
  if message.get('model_name'):
    argv += ['--model_name', message['model_name']]
  if message.get('epochs'):
    argv += ['--epochs', str(int(message['epochs']))]
  argv += list(extra)
  # A runner the message names wins over the controller's flags.
  if message.get('runner'):
    argv += ['--runner', str(message['runner'])]
  return argv


def read_results(bootstrap: str, topic: str,
                 consumer_config: Optional[Mapping[str, Any]] = None
                 ) -> dict[str, dict]:
  """The newest result per key of the results topic."""
  try:
    consumer, tps = clients.from_start(bootstrap, topic, consumer_config)
  except LookupError:
    return {}
  try:
    end = consumer.end_offsets(tps)
    out = {}
    while any(consumer.position(tp) < end[tp] for tp in tps):
      for batch in consumer.poll(timeout_ms=500).values():
        for m in batch:
          key = m.key.decode() if m.key else None
          out[key] = json.loads(m.value) if m.value else None
    return out
  finally:
    consumer.close()


@dataclasses.dataclass(frozen=True)
class RetrainPolicy:
  """When the controller retrains by itself, and on what.

  Attributes:
    template: a control message (data topic, format, problem, model name...)
      without a range; None: no retraining.
    every_s: retrain on this schedule (seconds; None: never by schedule).
    alerts_topic: retrain when a drift alert arrives there.
    hours: train on the records appended in the last ``hours``.
    min_gap_s: at most one retraining in this many seconds.
    max_regression: publish only if the new model's headline eval metric is
      at most this much worse than the live model's (negative: must be
      better by that much).
    publish_state: how a validated model is published.
  """
  template: Optional[dict] = None
  every_s: Optional[float] = None
  alerts_topic: Optional[str] = None
  hours: float = 24.0
  min_gap_s: float = 600.0
  max_regression: float = 0.01
  publish_state: str = registry.LIVE


class Controller:
  """Consumes the control topic and trains, one message at a time."""

  def __init__(self, bootstrap: str, control_topic: str, results_topic: str,
               model_topic: str, output_root: str, problem: str,
               group_id: str = 'rtml-control', train_flags: Sequence[str] = (),
               consumer_config=None, producer_config=None,
               policy: Optional['RetrainPolicy'] = None):
    self.bootstrap = bootstrap
    self.control_topic = control_topic
    self.results_topic = results_topic
    self.model_topic = model_topic
    self.output_root = output_root
    self.problem = problem
    self.group_id = group_id
    self.train_flags = list(train_flags)
    self.consumer_config = consumer_config or {}
    self.producer_config = producer_config or {}
    self.policy = policy or RetrainPolicy()
    self._last_retrain = time.monotonic()
    self._alerts = None
    if self.policy.template is not None and self.policy.alerts_topic:
      # Alerts from now on: an old alert does not retrain a new model.
      from kafka import KafkaConsumer, TopicPartition
      self._alerts = KafkaConsumer(
          bootstrap_servers=bootstrap, enable_auto_commit=False,
          **clients.CLIENT_DEFAULTS,
          **clients.resolve_secrets(self.consumer_config))
      topic = self.policy.alerts_topic
      tps = [TopicPartition(topic, p) for p in sorted(
          self._alerts.partitions_for_topic(topic) or ())]
      if not tps:
        raise SystemExit(f'pipelines.control: alerts topic {topic!r} does '
                         'not exist')
      self._alerts.assign(tps)
      self._alerts.seek_to_end(*tps)
      for tp in tps:
        self._alerts.position(tp)
    for topic in (results_topic, model_topic):
      registry.ensure_topic(bootstrap, topic, self.consumer_config)
    # A consumer of a topic not there yet would see it only at its next
    # metadata refresh (minutes): make it now.
    registry.ensure_topic(bootstrap, control_topic, self.consumer_config,
                          compact=False)
    self.results = read_results(bootstrap, results_topic,
                                self.consumer_config)

  def _result(self, key: str, record: dict[str, Any]) -> None:
    record = dict(record, time_ms=int(time.time() * 1000))
    registry.publish(self.bootstrap, self.results_topic, [(key, record)],
                     self.producer_config)
    self.results[key] = record
    print(f'[control] {json.dumps(record)}', file=sys.stderr, flush=True)

  def handle(self, value: Optional[bytes], offset: int,
             timestamp_ms: int) -> dict[str, Any]:
    """One control message -> its result (written to the results topic)."""
    decoded = None
    try:
      decoded = json.loads(value) if value is not None else None
      message = check(decoded)
    except (InvalidControl, ValueError) as e:
      reason = str(e) if isinstance(e, InvalidControl) else (
          f'not JSON: {e}')
      deployment = decoded.get('deployment_id') if isinstance(
          decoded, dict) else None
      if not isinstance(deployment, str) or not deployment:
        deployment = None
      result = {'deployment_id': deployment, 'status': FAILED,
                'reason': reason, 'control_offset': offset}
      # Under its deployment's key, unless that would hide a model trained.
      key = deployment if deployment and (self.results.get(
          deployment) or {}).get('status') != DONE else (
              f'{deployment or "invalid"}@{offset}')
      self._result(key, result)
      return result
    deployment = message['deployment_id']
    previous = self.results.get(deployment) or {}
    if previous.get('status') == DONE:
      result = {'deployment_id': deployment, 'status': DUPLICATE,
                'control_offset': offset, 'model': previous.get('model')}
      self._result(f'{deployment}@{offset}', result)
      return result
    return self._deploy(message, offset, timestamp_ms,
                        resumed=previous.get('status') == STARTED)

  def _deploy(self, message: dict[str, Any], offset: Optional[int],
              timestamp_ms: int, resumed: bool = False,
              validate: bool = False) -> dict[str, Any]:
    """Trains on a checked message and reports. ``validate``: the model is
    published only if it loads, passes the canary and is not worse than the
    live one by more than ``max_regression`` (retraining)."""
    deployment = message['deployment_id']
    self._result(deployment, {'deployment_id': deployment, 'status': STARTED,
                              'control_offset': offset, 'resumed': resumed})
    problem_spec = message.get('problem') or self.problem
    output_dir = None
    started = time.monotonic()
    try:
      problem = problem_lib.load(problem_spec)
      name = message.get('model_name') or problem.name
      # One directory per model: its versions follow each other (1, 2...).
      output_dir = os.path.join(self.output_root, name)
      metrics = train.run(train_argv(
          message, problem_spec, self.bootstrap,
          None if validate else self.model_topic, output_dir,
          self.train_flags))
      verdict = self._validate(problem, name, metrics) if validate else None
      if verdict and verdict.get('published'):
        metrics['published'] = verdict['published']
    except BaseException as e:  # pylint: disable=broad-except
      if isinstance(e, KeyboardInterrupt):
        raise
      logging.exception('Deployment %s failed', deployment)
      result = {'deployment_id': deployment, 'status': FAILED,
                'control_offset': offset, 'resumed': resumed,
                'reason': f'{type(e).__name__}: {str(e)[:1000]}'}
      self._result(deployment, result)
      return result
    result = {
        'deployment_id': deployment,
        'status': REJECTED if verdict and not verdict.get('published')
        else DONE,
        'control_offset': offset, 'resumed': resumed,
        'model': (metrics.get('published') or {}).get('model'),
        'state': (metrics.get('published') or {}).get('state'),
        'metrics': {k: v for k, v in metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)},
        'n_dead_letters': metrics.get('n_dead_letters'),
        'train_seconds': round(time.monotonic() - started, 3),
        'control_to_done_s': round(time.time() - timestamp_ms / 1000, 3),
        'output_dir': output_dir}
    if verdict is not None:
      result['validation'] = verdict
    self._result(deployment, result)
    return result

  def _validate(self, problem, name: str, metrics: dict[str, Any]
                ) -> dict[str, Any]:
    """Publishes a retrained version only if it is fit to serve."""
    from models import metrics as metrics_lib
    from models import serving
    path = metrics['model_path']
    _, reason = serving.load_validated(problem, path)
    headline, larger_better = metrics_lib.HEADLINE[problem.task]
    new = metrics.get(headline)
    live = registry.read(self.bootstrap, self.model_topic, problem.name,
                         self.consumer_config).resolve(name)
    old = (live.metrics or {}).get(headline) if live else None
    verdict = {'metric': headline, 'new': new, 'live': old,
               'live_model': live.ref if live else None,
               'max_regression': self.policy.max_regression}
    if reason is None and old is not None and new is not None:
      worse = (old - new) if larger_better else (new - old)
      if worse > self.policy.max_regression:
        reason = (f'{headline} {new:.4f} is worse than the live model\'s '
                  f'{old:.4f} by more than {self.policy.max_regression}')
    if reason:
      verdict['reason'] = reason
      return verdict
    descriptor = registry.describe(problem, path, name)
    messages = [(descriptor.key, descriptor.to_json())]
    if self.policy.publish_state == registry.LIVE:
      state = registry.read(self.bootstrap, self.model_topic, problem.name,
                            self.consumer_config)
      state.apply(*messages[0])
      messages += registry.promote_messages(state, descriptor.name,
                                            descriptor.version)
    registry.publish(self.bootstrap, self.model_topic, messages,
                     self.producer_config)
    verdict['published'] = {'model': descriptor.ref,
                            'state': self.policy.publish_state}
    return verdict

  def _due_retraining(self, alerts) -> Optional[str]:
    """Why a retraining is due now (schedule or a drift alert), or None."""
    policy = self.policy
    if policy.template is None:
      return None
    now = time.monotonic()
    reason = None
    if policy.every_s and now - self._last_retrain >= policy.every_s:
      reason = 'schedule'
    if alerts is not None:
      for batch in alerts.poll(timeout_ms=0).values():
        for m in batch:
          try:
            alert = json.loads(m.value)
          except ValueError:
            continue
          if isinstance(alert, dict) and alert.get('kind', 'drift') == 'drift':
            reason = reason or 'drift'
    if reason and now - self._last_retrain < policy.min_gap_s:
      return None
    return reason

  def retrain(self, reason: str) -> dict[str, Any]:
    """Trains on the last ``hours`` of the template's data topic."""
    self._last_retrain = time.monotonic()
    now_ms = int(time.time() * 1000)
    message = dict(self.policy.template,
                   deployment_id=f'retrain-{reason}-{now_ms}',
                   from_time_ms=now_ms - int(self.policy.hours * 3600e3),
                   to_time_ms=None, ranges=None, total_msg=None)
    return self._deploy(check(message), None, now_ms, validate=True)

  def run(self, run_seconds: Optional[float] = None,
          max_messages: Optional[int] = None) -> list[dict]:
    from kafka import KafkaConsumer
    consumer = KafkaConsumer(
        self.control_topic, bootstrap_servers=self.bootstrap,
        group_id=self.group_id, enable_auto_commit=False,
        auto_offset_reset='earliest', max_poll_records=1,
        # A training may take longer than the default poll interval.
        max_poll_interval_ms=24 * 3600 * 1000, **clients.CLIENT_DEFAULTS,
        **clients.resolve_secrets(self.consumer_config))
    alerts = self._alerts
    deadline = None if run_seconds is None else time.monotonic() + run_seconds
    handled = []
    print(f'[control] waiting for control messages on '
          f'{self.control_topic!r}', file=sys.stderr, flush=True)
    try:
      while deadline is None or time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
          for message in batch:
            handled.append(self.handle(message.value, message.offset,
                                       message.timestamp))
            consumer.commit()
        due = self._due_retraining(alerts)
        if due:
          handled.append(self.retrain(due))
        if max_messages is not None and len(handled) >= max_messages:
          break
    finally:
      consumer.close()
    return handled

  def close(self) -> None:
    if self._alerts is not None:
      self._alerts.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m pipelines.control',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--problem', default=problem_lib.DEFAULT,
                      help='Problem of messages that name none.')
  parser.add_argument('--bootstrap_servers', default=None)
  parser.add_argument('--control_topic', default=None,
                      help='Default <problem>-control.')
  parser.add_argument('--results_topic', default=None,
                      help='Default <problem>-results.')
  parser.add_argument('--model_topic', default=None,
                      help='Default <problem>-models.')
  parser.add_argument('--output_root', default='out/control')
  parser.add_argument('--group_id', default='rtml-control')
  parser.add_argument('--run_seconds', type=float, default=None)
  parser.add_argument('--retrain_template', default=None,
                      help='A control message (JSON file) without a range: '
                      'turns on retraining.')
  parser.add_argument('--retrain_every_s', type=float, default=None)
  parser.add_argument('--retrain_on_alerts', default=None,
                      help='Alerts topic: a drift alert starts a retraining.')
  parser.add_argument('--retrain_hours', type=float, default=24.0)
  parser.add_argument('--retrain_min_gap_s', type=float, default=600.0)
  parser.add_argument('--max_regression', type=float, default=0.01)
  parser.add_argument('--consumer_config', type=json.loads, default={})
  parser.add_argument('--producer_config', type=json.loads, default={})
  args, train_flags = parser.parse_known_args(argv)
  bootstrap = args.bootstrap_servers or os.environ.get(
      'KAFKA_BOOTSTRAP_SERVERS')
  if not bootstrap:
    from runners import kafka  # the broker of `make kafka-up`, if any
    state = kafka.status()
    bootstrap = state['bootstrap_servers'] if state.get('running') else None
  if not bootstrap:
    print('pipelines.control: no broker: pass --bootstrap_servers, set '
          'KAFKA_BOOTSTRAP_SERVERS or run `make kafka-up`', file=sys.stderr)
    return 2
  problem = problem_lib.load(args.problem)
  template = None
  if args.retrain_template:
    with open(args.retrain_template) as f:
      template = json.load(f)
  policy = RetrainPolicy(template, args.retrain_every_s,
                         args.retrain_on_alerts, args.retrain_hours,
                         args.retrain_min_gap_s, args.max_regression,
                         (template or {}).get('publish_state', registry.LIVE))
  controller = Controller(
      bootstrap, args.control_topic or problem.topic('control'),
      args.results_topic or problem.topic('results'),
      args.model_topic or problem.topic('models'), args.output_root,
      args.problem, args.group_id, train_flags, args.consumer_config,
      args.producer_config, policy)
  try:
    controller.run(args.run_seconds)
  finally:
    controller.close()
  return 0


if __name__ == '__main__':
  logging.getLogger().setLevel(logging.WARNING)
  sys.exit(main())
