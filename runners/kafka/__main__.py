"""``python -m runners.kafka up|down|status|topics``: the local broker.

``up`` starts a single-node KRaft broker in the background (fetching the
pinned jars on first use) and prints its bootstrap servers on stdout, so a
shell can capture them::

    export KAFKA_BOOTSTRAP_SERVERS=$(python -m runners.kafka up)
    python -m runners.kafka status
    python -m runners.kafka topics taxi-events:2 taxi-feedback   # if absent
    python -m runners.kafka down      # the data directory is kept

The jobs read only topics that exist (a mistyped name fails at launch, not
silently); ``topics`` creates them, on the recorded broker or
``--bootstrap_servers``.

State (pid, bootstrap servers, data dir) lives in ~/.cache/rtml/run/kafka.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from runners import kafka
from runners.tools import RunnerSetupError


def _create_topics(bootstrap: str, specs: list[str]) -> list[str]:
  """Creates the ``NAME[:PARTITIONS]`` topics that do not exist; their
  names."""
  names = []
  for spec in specs:
    name, _, partitions = spec.partition(':')
    kafka.create_topic(bootstrap, name, int(partitions or 1))
    names.append(name)
  return names


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m runners.kafka', description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  up = sub.add_parser('up', help='start the broker; print bootstrap servers')
  up.add_argument('--data_dir', help=f'default: {kafka.DEFAULT_DATA_DIR}')
  up.add_argument('--port', type=int, help='client port (default: free)')
  up.add_argument('--controller_port', type=int)
  up.add_argument('--topic', action='append', default=[],
                  metavar='NAME[:PARTITIONS]', help='create topics after up')
  sub.add_parser('down', help='stop the broker (data is kept)')
  sub.add_parser('status', help='print the broker state as JSON')
  topics = sub.add_parser('topics', help='create topics that do not exist')
  topics.add_argument('names', nargs='+', metavar='NAME[:PARTITIONS]')
  topics.add_argument('--bootstrap_servers',
                      help='default: the broker of `up`')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                      format='%(levelname)s %(message)s')
  logging.getLogger('kafka').setLevel(logging.ERROR)
  try:
    if args.command == 'up':
      state = kafka.up(args.data_dir, args.port, args.controller_port)
      _create_topics(state['bootstrap_servers'], args.topic)
      print(f"Kafka {state['kafka_version']} up: pid {state['pid']}, "
            f"data {state['data_dir']}, log {state['log']}", file=sys.stderr)
      print(state['bootstrap_servers'])
    elif args.command == 'topics':
      bootstrap = args.bootstrap_servers or kafka.status().get(
          'bootstrap_servers')
      if not bootstrap:
        print('error: no broker recorded; give --bootstrap_servers',
              file=sys.stderr)
        return 2
      for name in _create_topics(bootstrap, args.names):
        print(f'{name}: ready on {bootstrap}', file=sys.stderr)
    elif args.command == 'down':
      state = kafka.down()
      print('stopped' if state else 'no broker recorded', file=sys.stderr)
    else:
      state = kafka.status()
      print(json.dumps(state, indent=2))
      return 0 if state['running'] else 3
  except RunnerSetupError as e:  # includes KafkaBrokerError
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
