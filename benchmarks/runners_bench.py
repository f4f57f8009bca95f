"""Prism vs the Python DirectRunner on small streaming pipelines.

Decides the embedded default runner for streaming. Each case runs in a fresh
process (start-up and teardown included in ``wall_s``; ``pipeline_s`` is
``run()`` to ``wait_until_finish()``), and the outputs of both runners are
compared line by line.

* ``teststream``: N taxi trips (the CSV repeated as needed) as a TestStream in
  event time, the watermark advanced in STEPS steps, counted per payment type
  per 30-day window.
* ``periodic``: PeriodicImpulse at 100 Hz for N ticks (a real-time unbounded
  SDF source, like our Kafka reader), summed per 1 s window.

    python benchmarks/runners_bench.py                # the default grid
    python benchmarks/runners_bench.py teststream PrismRunner 75000
"""

from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream as BeamTestStream
from apache_beam.transforms import window
from apache_beam.transforms.periodicsequence import PeriodicImpulse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from runners import options as runner_options  # noqa: E402

# DirectRunner: Beam's switching runner; with --prism_location unset and no
# network it runs the Python engine (TestStream always does).
RUNNERS = {'DirectRunner': ['--runner', 'DirectRunner'],
           'PrismRunner': ['--runner', 'prism', '--prism_log_level', 'warn']}
GRID = [('teststream', 15000, 20), ('teststream', 15000, 300),
        ('teststream', 75000, 20), ('periodic', 500, 0)]


class _Append(beam.DoFn):

  def __init__(self, out_dir: str):
    self._out_dir = out_dir

  def setup(self):
    self._path = os.path.join(self._out_dir, uuid.uuid4().hex)

  def process(self, line: str):
    with open(self._path, 'a') as f:
      f.write(line + '\n')


class _FormatWindow(beam.DoFn):

  def process(self, kv, win=beam.DoFn.WindowParam):
    yield f'{int(win.start)} {kv[0]} {kv[1]}'


def _events(n: int) -> list[tuple[str, int]]:
  with open(os.path.join(REPO, 'data', 'taxi_trips.csv')) as f:
    rows = list(csv.DictReader(f))
  rows = (rows * (n // len(rows) + 1))[:n]
  return sorted(((r['payment_type'], int(r['trip_start_timestamp']))
                 for r in rows), key=lambda e: e[1])


def build(pipeline: beam.Pipeline, kind: str, n: int, steps: int):
  if kind == 'teststream':
    events = _events(n)
    stream = BeamTestStream()
    size = len(events) // steps + 1
    for i in range(0, len(events), size):
      chunk = events[i:i + size]
      stream = stream.add_elements(
          [window.TimestampedValue(k, t) for k, t in chunk]
      ).advance_watermark_to(chunk[-1][1])
    return (pipeline
            | 'ReadEvents' >> stream.advance_watermark_to_infinity()
            | 'WindowMonthly' >> beam.WindowInto(
                window.FixedWindows(30 * 86400))
            | 'CountPerType' >> beam.combiners.Count.PerElement()
            | 'FormatCounts' >> beam.ParDo(_FormatWindow()))
  now = time.time()
  return (pipeline
          | 'Tick' >> PeriodicImpulse(start_timestamp=now,
                                      stop_timestamp=now + n * 0.01,
                                      fire_interval=0.01)
          | 'KeyTicks' >> beam.Map(lambda t: (f'k{int(t * 100) % 3}', 1))
          | 'WindowSecondly' >> beam.WindowInto(window.FixedWindows(1))
          | 'SumPerKey' >> beam.CombinePerKey(sum)
          | 'FormatSums' >> beam.ParDo(_FormatWindow()))


def run_one(kind: str, runner: str, n: int, steps: int, out_dir: str) -> float:
  argv = runner_options.resolve(RUNNERS[runner] + ['--streaming'])
  started = time.monotonic()
  pipeline = beam.Pipeline(options=PipelineOptions(argv))
  build(pipeline, kind, n, steps) | 'Write' >> beam.ParDo(_Append(out_dir))
  pipeline.run().wait_until_finish()
  return time.monotonic() - started


def _read(out_dir: str) -> list[str]:
  lines = []
  for path in glob.glob(os.path.join(out_dir, '*')):
    with open(path) as f:
      lines.extend(f.read().splitlines())
  return sorted(lines)


def main() -> None:
  if len(sys.argv) > 1:
    kind, runner, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 20
    out_dir = sys.argv[5] if len(sys.argv) > 5 else tempfile.mkdtemp()
    print(json.dumps({'pipeline_s': round(
        run_one(kind, runner, n, steps, out_dir), 2)}))
    return
  for kind, n, steps in GRID:
    outputs = {}
    for runner in RUNNERS:
      out_dir = tempfile.mkdtemp(prefix=f'bench-{runner}-')
      started = time.monotonic()
      proc = subprocess.run(
          [sys.executable, __file__, kind, runner, str(n), str(steps),
           out_dir], capture_output=True, text=True, check=False)
      wall = time.monotonic() - started
      last = proc.stdout.strip().splitlines()[-1:] or ['{}']
      result = json.loads(last[0]) if proc.returncode == 0 else {
          'error': proc.stderr.strip().splitlines()[-1:]}
      outputs[runner] = _read(out_dir)
      print(json.dumps({'case': kind, 'n': n, 'steps': steps,
                        'runner': runner, 'wall_s': round(wall, 2),
                        'lines': len(outputs[runner]), **result}), flush=True)
    if kind == 'teststream':  # periodic output depends on wall-clock ticks
      print(json.dumps({'case': kind, 'n': n, 'steps': steps,
                        'outputs_equal': outputs['DirectRunner'] ==
                        outputs['PrismRunner']}), flush=True)


if __name__ == '__main__':
  main()
