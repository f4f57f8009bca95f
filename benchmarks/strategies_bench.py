"""Serving strategies side by side on the real broker: what several models
cost in throughput and latency.

    python benchmarks/strategies_bench.py [--runner prism] [--events 6000]
        [--rates 1000] [--seconds 10] [--model_dir OUT/model]

One run: a model registry topic holding the trained taxi model three times
(versions 1, 2 and 3: the same SavedModel, so the figures show the cost of
the strategy, not of a bigger model), then, for each plan, a fresh
``pipelines.serve --model_topic ... --plan ...`` job measured exactly as
``serve_bench.py`` measures one (saturation drain, then latency at each
fixed rate; append time of the prediction - append time of the event):

* ``single``: version 1;
* ``shadow``: version 1 answers, version 2 shadows (two models per event);
* ``ensemble``: versions 1, 2 and 3 vote (three models per event);
* ``budget``: versions 2 and 1 start together, 20 ms budget.

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import serve_bench  # noqa: E402
from runners import kafka as kafka_runner  # noqa: E402

PLANS = {
    'single': {'strategy': 'single', 'models': ['taxi@1']},
    'shadow': {'strategy': 'shadow', 'models': ['taxi@1'],
               'shadows': ['taxi@2']},
    'ensemble': {'strategy': 'ensemble',
                 'models': ['taxi@1', 'taxi@2', 'taxi@3']},
    'budget': {'strategy': 'budget', 'models': ['taxi@2', 'taxi@1'],
               'budget_ms': 20},
}


def _registry(bootstrap: str, model_root: str, tmp: str) -> str:
  """A registry topic with the newest version copied as 1, 2 and 3."""
  from models import registry
  from models import serving
  newest = serving.newest_valid_version(serve_bench.TAXI, model_root)
  topic = f'bench-models-{uuid.uuid4().hex[:6]}'
  registry.ensure_topic(bootstrap, topic)
  messages = []
  for version in (1, 2, 3):
    path = os.path.join(tmp, 'registry', str(version))
    shutil.copytree(os.path.join(model_root, str(newest)), path)
    d = registry.describe(serve_bench.TAXI, path).with_state(registry.LIVE)
    messages.append((d.key, d.to_json()))
  registry.publish(bootstrap, topic, messages)
  return topic


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--runner', default='prism')
  parser.add_argument('--plans', default=','.join(PLANS))
  parser.add_argument('--events', type=int, default=6000)
  parser.add_argument('--rates', default='1000')
  parser.add_argument('--seconds', type=float, default=10)
  parser.add_argument('--model_dir', default=None)
  args = parser.parse_args()
  args.rates = [float(r) for r in args.rates.split(',') if r]

  broker = None
  bootstrap = os.environ.get('KAFKA_BOOTSTRAP_SERVERS')
  if not bootstrap:
    broker = kafka_runner.KafkaBroker().start()
    bootstrap = broker.bootstrap_servers
  results = {}
  try:
    with tempfile.TemporaryDirectory() as tmp:
      model_root = args.model_dir
      if model_root is None:
        from pipelines import train
        serve_bench._log('training a model')
        # Keras prints its epochs on stdout: this program's stdout is JSON.
        with contextlib.redirect_stdout(sys.stderr):
          train.run(['--input', 'data/taxi_trips.csv', '--output_dir', tmp])
        model_root = os.path.join(tmp, 'model')
      topic = _registry(bootstrap, model_root, tmp)
      for name in args.plans.split(','):
        plan = json.dumps(PLANS[name], separators=(',', ':'))
        args.serve_args = f'--model_topic {topic} --plan {plan}'
        serve_bench._log(f'plan {name}: {plan}')
        results[name] = serve_bench._bench('pipeline', bootstrap, model_root,
                                           args, args.runner)
  finally:
    if broker is not None:
      broker.stop()
  single = (results.get('single') or {}).get('saturation_events_per_s')
  for result in results.values():
    mine = result.get('saturation_events_per_s')
    result['throughput_ratio_to_single'] = (
        round(mine / single, 3) if mine and single else None)
  print(json.dumps({
      'machine': {'cpus': os.cpu_count(), 'python': platform.python_version(),
                  'platform': platform.platform()},
      'runner': args.runner, 'batch_size': serve_bench.BATCH_SIZE,
      'plans': {k: PLANS[k] for k in results},
      'results': results,
  }, indent=2))


if __name__ == '__main__':
  main()
