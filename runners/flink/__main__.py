"""``python -m runners.flink up|down|status|fetch``: a local Flink cluster.

``up`` starts a standalone session cluster (one JobManager, one TaskManager
or ``--taskmanagers N``,
fetching the pinned Flink jars on first use) in the background and prints its
REST address on stdout, so a shell can hand it to a pipeline::

    FLINK=$(python -m runners.flink up)
    python -m pipelines.analytics --runner flink --flink_master $FLINK ...
    python -m runners.flink status     # JSON; exit 3 when down
    python -m runners.flink check      # runs a tiny DataStream job on it
    python -m runners.flink down

``fetch`` only assembles the Beam job server (its jars and launcher jar) and
fetches the Flink runtime of the cluster.
State (pids, ports, work dir) lives in ~/.cache/rtml/run/flink.json; logs in
~/.cache/rtml/run/flink/log/.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from runners import flink
from runners.tools import RunnerSetupError


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m runners.flink', description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  up = sub.add_parser('up', help='start the cluster; print its REST address')
  up.add_argument('--taskmanagers', type=int, default=1,
                  help='TaskManagers to start (2 or more: a job survives '
                  'losing one)')
  sub.add_parser('down', help='stop the cluster')
  sub.add_parser('status', help='print the cluster state as JSON')
  sub.add_parser('check', help='run a tiny Flink job on the running cluster')
  fetch = sub.add_parser('fetch', help='fetch the pinned jars only')
  fetch.add_argument('--cluster_only', action='store_true',
                     help='skip the Beam job server')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                      format='%(levelname)s %(message)s')
  try:
    if args.command == 'up':
      state = flink.up(args.taskmanagers)
      print(f"Flink {state['flink_version']} up at {state['address']}: "
            f"pids {state['pids']}, logs {state['work_dir']}/log",
            file=sys.stderr)
      print(state['address'])
    elif args.command == 'down':
      print('stopped' if flink.down() else 'no cluster recorded',
            file=sys.stderr)
    elif args.command == 'status':
      state = flink.status()
      print(json.dumps(state or {'running': False}, indent=2))
      return 0 if state else 3
    elif args.command == 'check':
      state = flink.status()
      if not state:
        print('error: no cluster running (python -m runners.flink up)',
              file=sys.stderr)
        return 3
      total = flink.smoke_check(state['address'])
      print(f'ok: smoke job on {state["address"]} returned {total}')
    else:
      print(flink.ensure_cluster_libs())
      if not args.cluster_only:
        print(flink.ensure_job_server_jar())
  except RunnerSetupError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
