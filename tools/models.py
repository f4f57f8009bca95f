"""``python -m tools.models``: the model registry from the command line.

    python -m tools.models list
    python -m tools.models publish out/taxi/model/2 [--state live] [--name taxi]
    python -m tools.models promote taxi[@2]      # default: newest candidate
    python -m tools.models rollback taxi         # the version it replaced
    python -m tools.models retire taxi@1
    python -m tools.models plan '{"strategy": "shadow", "models": ["taxi"],
                                  "shadows": ["taxi@candidate"]}'
    python -m tools.models plan --clear          # back to the job's --plan
    python -m tools.models gate --promote_if auc:0.005 --min_labelled 2000

Common flags: ``--problem`` (default taxi), ``--bootstrap_servers`` (default
$KAFKA_BOOTSTRAP_SERVERS or the broker of ``make kafka-up``),
``--model_topic`` (default ``<problem>-models``). Serving jobs that follow
the topic (``pipelines.serve --model_topic``) apply each message within a
second or two, between two batches, with no restart.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from models import gate
from models import registry
from tools import replay
from transforms import problem as problem_lib


def _table(state: registry.RegistryState) -> str:
  lines = [f"{'model':<24} {'state':<10} {'replaces':<9} metrics / uri"]
  for d in state.descriptors():
    shown = {k: round(v, 4) for k, v in d.metrics.items()
             if isinstance(v, (int, float))}
    lines.append(f'{d.ref:<24} {d.state:<10} {str(d.replaces or ""):<9} '
                 f'{json.dumps(shown)} {d.uri}')
  lines.append(f'plan: {json.dumps(state.plan.to_json()) if state.plan else "(the job flags)"}')
  return '\n'.join(lines)


def _ref_version(ref: str) -> tuple[str, Optional[int]]:
  name, selector = registry.parse_ref(ref)
  return name, int(selector) if selector.isdigit() else None


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m tools.models',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--problem', default=problem_lib.DEFAULT)
  parser.add_argument('--bootstrap_servers', default=None)
  parser.add_argument('--model_topic', default=None)
  parser.add_argument('--consumer_config', type=json.loads, default={})
  parser.add_argument('--producer_config', type=json.loads, default={})
  commands = parser.add_subparsers(dest='command', required=True)
  commands.add_parser('list', help='Models, states and the plan.')
  p = commands.add_parser('publish', help='Announce an exported version.')
  p.add_argument('path', help='A version directory (models.export).')
  p.add_argument('--name', default=None)
  p.add_argument('--state', choices=registry.STATES,
                 default=registry.CANDIDATE)
  p = commands.add_parser('promote', help='Make a version live (blue/green).')
  p.add_argument('ref', help='name or name@version')
  p = commands.add_parser('rollback', help='Back to the replaced version.')
  p.add_argument('name')
  p = commands.add_parser('retire', help='Retire a version.')
  p.add_argument('ref', help='name@version')
  p = commands.add_parser('plan', help='Set (or --clear) the serving plan.')
  p.add_argument('plan', nargs='?', help='JSON, or a .json/.yaml file.')
  p.add_argument('--clear', action='store_true')
  p = commands.add_parser('gate', help='Promote a clearly better shadow.')
  p.add_argument('--promote_if', required=True,
                 help='METRIC:GAIN[%%], e.g. auc:0.005 or mae:2%%.')
  p.add_argument('--min_labelled', type=int, default=2000)
  p.add_argument('--predictions_topic', default=None)
  p.add_argument('--shadow_topic', default=None)
  p.add_argument('--feedback_topic', default=None,
                 help='Labels that come later ({"event_id", "label"}).')
  p.add_argument('--model_events_topic', default=None)
  p.add_argument('--once', action='store_true',
                 help='Stop after the first verdict.')
  p.add_argument('--timeout_s', type=float, default=None)
  args = parser.parse_args(argv)

  problem = problem_lib.load(args.problem)
  bootstrap = replay.bootstrap_or_exit(args.bootstrap_servers, 'tools.models')
  topic = args.model_topic or problem.topic('models')
  try:
    if args.command == 'gate':
      rule = gate.PromotionRule.parse(args.promote_if, args.min_labelled)
      verdicts = gate.run(
          problem, rule, bootstrap,
          args.predictions_topic or problem.topic('predictions'),
          args.shadow_topic or problem.topic('shadow'), topic,
          args.model_events_topic or problem.topic('model-events'),
          args.feedback_topic, once=args.once, timeout_s=args.timeout_s,
          consumer_config=args.consumer_config,
          producer_config=args.producer_config)
      print(json.dumps([v.evidence() for v in verdicts], indent=2))
      return 0
    registry.ensure_topic(bootstrap, topic, args.consumer_config)
    state = registry.read(bootstrap, topic, problem.name,
                          args.consumer_config)
    if args.command == 'list':
      print(_table(state))
      return 0
    if args.command == 'publish':
      descriptor = registry.describe(problem, args.path, args.name)
      messages = [(descriptor.key, descriptor.to_json())]
      if args.state == registry.LIVE:
        state.apply(*messages[0])
        messages += registry.promote_messages(state, descriptor.name,
                                              descriptor.version)
      elif args.state == registry.RETIRED:
        messages = [(descriptor.key,
                     descriptor.with_state(registry.RETIRED).to_json())]
    elif args.command == 'promote':
      messages = registry.promote_messages(state, *_ref_version(args.ref))
    elif args.command == 'rollback':
      messages = registry.rollback_messages(state, args.name)
    elif args.command == 'retire':
      name, version = _ref_version(args.ref)
      if version is None:
        raise registry.InvalidMessage('retire takes name@version')
      messages = registry.retire_messages(state, name, version)
    else:
      if args.clear:
        messages = [(registry.PLAN_KEY, None)]
      elif args.plan:
        plan = registry.load_plan(args.plan)
        plan.check(problem.task.value)
        messages = [(registry.PLAN_KEY, plan.to_json())]
      else:
        raise registry.InvalidMessage('plan takes a plan or --clear')
    registry.publish(bootstrap, topic, messages, args.producer_config)
    for key, value in messages:
      print(f'{key}: {json.dumps(value)}', file=sys.stderr)
    print(_table(registry.read(bootstrap, topic, problem.name,
                               args.consumer_config)))
    return 0
  except registry.InvalidMessage as e:
    print(f'tools.models: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
