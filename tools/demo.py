"""``make demo``: the whole loop on one machine, with real components.

1. start a single-node Kafka broker (or use ``KAFKA_BOOTSTRAP_SERVERS``);
2. train the problem's model on its data and export model version 1;
3. start the streaming serving pipeline on the embedded runner, monitored
   against the training statistics;
4. replay the held-out (eval) rows, plus a few malformed events, to Kafka;
5. read the predictions back and print a sample, the live quality against
   the true labels, the dead letters and the end-to-end latency percentiles;
   run the live-quality job on the predictions (each event's own label as
   feedback) and print its windows; write the live report
   (``tools.live_report``) of quality, predictions and drift;
6. shut everything down.

    python -m tools.demo [--problem taxi|houses|exasens|FILE.py --input CSV] \\
        --work_dir ~/.cache/rtml/run/demo [--runner prism]

Latency is measured on the broker's clock: the input and prediction topics
use ``message.timestamp.type=LogAppendTime``, so the latency of an event is
(append time of its prediction) - (append time of the event).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from typing import Any, TextIO

from runners import kafka as kafka_runner
from transforms import problem as problem_lib
from transforms.problem import Problem, Task

LOG_APPEND_TIME = {'message.timestamp.type': 'LogAppendTime'}
BAD_EVENTS = [b'{"fare": 3.5, "payment_type": ', b'\xff\xfe\x00garbage',
              json.dumps({'fare': 'ten', 'payment_type': 'Cash'}).encode()]


def percentiles(values: list[float], points=(50, 95, 99)) -> dict[str, float]:
  if not values:
    return {f'p{p}': float('nan') for p in points}
  ordered = sorted(values)
  return {f'p{p}': ordered[min(len(ordered) - 1,
                               int(round(p / 100 * (len(ordered) - 1))))]
          for p in points}


def collect(bootstrap: str, topic: str, expected: int, timeout_s: float,
            label: str, progress: TextIO = sys.stdout,
            read_committed: bool = False, count=len
            ) -> list[tuple[int, dict[str, Any]]]:
  """(append time ms, JSON value) of the messages until ``count`` of them
  (default: how many) reaches ``expected``.

  With ``read_committed`` (output of an exactly-once job) only committed
  messages are read, and the time is when this reader received them: a
  transactional record is appended before its transaction commits.
  """
  from kafka import KafkaConsumer
  consumer = KafkaConsumer(
      topic, bootstrap_servers=bootstrap, auto_offset_reset='earliest',
      consumer_timeout_ms=500,
      isolation_level='read_committed' if read_committed
      else 'read_uncommitted')
  got: list[tuple[int, dict[str, Any]]] = []
  deadline = time.monotonic() + timeout_s
  last_print = 0.0
  try:
    while count(got) < expected and time.monotonic() < deadline:
      for message in consumer:
        got.append((int(time.time() * 1000) if read_committed
                    else message.timestamp, json.loads(message.value)))
        if count(got) >= expected:
          break
      if time.monotonic() - last_print > 2:
        last_print = time.monotonic()
        print(f'[demo] {label}: {count(got)}/{expected}', file=progress,
              flush=True)
  finally:
    consumer.close()
  return got


def live_quality(problem: Problem, predictions: list[dict[str, Any]]
                 ) -> dict[str, Any]:
  """Quality of all the streamed predictions whose events carried the
  label, with the streaming quality job's metrics (``transforms.feedback``)."""
  from transforms import feedback
  acc = feedback.new_quality()
  for p in predictions:
    if p['label'] is not None:
      feedback.add_pair(problem, acc, p)
  return {k: round(v, 4) if isinstance(v, float) else v
          for k, v in feedback.quality_summary(problem, acc).items()}


WINDOWS = 12   # the live quality and monitor windows over the replay


def window_size(problem: Problem, events: list[tuple[str, dict]]) -> int:
  """Seconds: WINDOWS windows over the events' time span (10 at least)."""
  from tools import replay
  times = [ms / 1000 for ms in (replay.event_time_ms(problem, event)
                                for _, event in events) if ms is not None]
  if not times:
    return 10
  return max(10, math.ceil((max(times) - min(times)) / WINDOWS))


def quality_windows(problem: Problem, problem_spec: str, bootstrap: str,
                    predictions_topic: str, predictions: list[dict[str, Any]],
                    suffix: str, runner_args: list[str], size: int,
                    alerts_topic: str) -> list[dict]:
  """Live quality per event-time window of ``size`` seconds, from the
  streaming quality job (``pipelines.quality``) reading the predictions
  topic, each event's own label as its feedback."""
  from pipelines import quality
  from tools import report
  times = [p['event_time_ms'] for p in predictions if p['label'] is not None]
  if not times:
    return []
  expected = {t // 1000 - (t // 1000) % size for t in times}
  topics = {role: f'{problem.topic(role)}-{suffix}'
            for role in ('feedback', 'quality', 'feedback-late',
                         'quality-dead-letters')}
  for topic in topics.values():
    kafka_runner.create_topic(bootstrap, topic)
  print(f'[demo] live quality: the streaming quality job joins each '
        f'prediction to its label, in {len(expected)} windows of {size:,} s',
        flush=True)
  result = quality.start([
      '--problem', problem_spec, '--bootstrap_servers', bootstrap,
      '--predictions_topic', predictions_topic,
      '--feedback_topic', topics['feedback'],
      '--quality_topic', topics['quality'],
      '--alerts_topic', alerts_topic,
      '--late_topic', topics['feedback-late'],
      '--dead_letter_topic', topics['quality-dead-letters'],
      '--labels_in_predictions', '--label_ttl', '60', '--size', str(size),
      # Replayed in event-time order, a bundle apart at most; the topics
      # go quiet once read, and the watermark then closes every window.
      '--max_out_of_orderness', str(size), '--idle_timeout_s', '5',
      '--group_id', f'demo-quality-{suffix}'] + runner_args)
  windows = lambda got: len({row['window_start_s'] for _, row in got})
  try:
    rows = collect(bootstrap, topics['quality'], len(expected), 180,
                   'quality windows', count=windows)
  finally:
    result.cancel()
  # Accumulating panes: a window's newest pane holds all of it.
  newest = report.newest_panes(row for _, row in rows)
  return [newest[key] for key in sorted(newest)]


def is_valid(problem: Problem, event: dict[str, Any]) -> bool:
  """Whether the serving parser accepts a replayed event."""
  from transforms import records
  try:
    records.parse_json(problem, event)
  except records.InvalidRecord:
    return False
  return True


def run_demo(problem: Problem, data: str, bootstrap: str, work_dir: str,
             runner_args: list[str], problem_spec: str) -> int:
  from models.metrics import HEADLINE
  from pipelines import serve
  from pipelines import train
  from tools import replay

  train_dir = os.path.join(work_dir, problem.name, 'train')
  shutil.rmtree(train_dir, ignore_errors=True)
  metrics = train.run(['--problem', problem_spec, '--input', data,
                       '--output_dir', train_dir])

  suffix = uuid.uuid4().hex[:6]
  topics = {role: f'{problem.topic(role)}-{suffix}'
            for role in ('events', 'predictions', 'dead-letters', 'metrics',
                         'alerts', 'monitor-late')}
  kafka_runner.create_topic(bootstrap, topics['events'], partitions=2,
                            config=LOG_APPEND_TIME)
  kafka_runner.create_topic(bootstrap, topics['predictions'],
                            config=LOG_APPEND_TIME)
  for role in ('dead-letters', 'metrics', 'alerts', 'monitor-late'):
    kafka_runner.create_topic(bootstrap, topics[role])
  # In event-time order: the quality windows below close in order.
  events = replay.load_events(problem, data, split='eval',
                              order='event_time')
  size = window_size(problem, events)

  print(f'[demo] starting the serving pipeline, monitored against the '
        f'training statistics in windows of {size:,} s', flush=True)
  result = serve.start([
      '--problem', problem_spec,
      '--bootstrap_servers', bootstrap, '--input_topic', topics['events'],
      '--output_topic', topics['predictions'],
      '--dead_letter_topic', topics['dead-letters'],
      '--model_dir', os.path.join(train_dir, 'model'),
      '--training_stats', os.path.join(train_dir, 'stats.json'),
      '--monitor_window', str(size), '--metrics_topic', topics['metrics'],
      '--alerts_topic', topics['alerts'],
      '--late_topic', topics['monitor-late'],
      # Replayed in event-time order: the watermark follows the events and,
      # once the topic is quiet, the clock; every window then closes.
      '--max_out_of_orderness', str(size), '--idle_timeout_s', '5',
      '--group_id', f'demo-{suffix}', '--max_batch_size', '64'] + runner_args)
  try:
    # The malformed events go first: their dead letters show the job is up
    # (runner, workers, model loaded), so start-up does not count as latency.
    print(f'[demo] sending {len(BAD_EVENTS)} malformed events', flush=True)
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for i, value in enumerate(BAD_EVENTS):
      producer.send(topics['events'], key=f'malformed-{i}'.encode(),
                    value=value)
    producer.flush()
    producer.close()
    dead = collect(bootstrap, topics['dead-letters'], len(BAD_EVENTS), 180,
                   'dead letters')
    # Rows the parser rejects (houses sold at price 0) are replayed too:
    # they must come back as dead letters, not predictions.
    invalid = sum(not is_valid(problem, event) for _, event in events)
    print(f'[demo] replaying {len(events)} held-out rows at 500/s '
          f'({invalid} of them invalid)', flush=True)
    replay.replay(problem, events, topics['events'], bootstrap, rate=500,
                  progress=sys.stderr)
    predictions = collect(bootstrap, topics['predictions'],
                          len(events) - invalid, 300, 'predictions')
    dead = collect(bootstrap, topics['dead-letters'],
                   len(BAD_EVENTS) + invalid, 60, 'dead letters')
    # Serving stays up (idle) meanwhile: a cancelled job's worker threads
    # complain on stderr for as long as this process goes on.
    windows = quality_windows(problem, problem_spec, bootstrap,
                              topics['predictions'],
                              [p for _, p in predictions], suffix, runner_args,
                              size, topics['alerts'])
    monitored = {p['event_time_ms'] // 1000 // size * size
                 for _, p in predictions}
    collect(bootstrap, topics['metrics'], len(monitored), 120,
            'monitor windows', count=lambda got: len({
                row['window_start_s'] for _, row in got
                if row['type'] == 'predictions'}))
  finally:
    result.cancel()
  from tools import live_report
  report = os.path.join(work_dir, problem.name, 'live_report.png')
  report_rows = live_report.main([
      '--problem', problem_spec, '--bootstrap_servers', bootstrap,
      '--quality_topic', f'{problem.topic("quality")}-{suffix}',
      '--metrics_topic', topics['metrics'],
      '--alerts_topic', topics['alerts'],
      '--model_dir', os.path.join(train_dir, 'model'), '--output', report])

  print('\n[demo] sample predictions:')
  for _, p in predictions[:5]:
    print('  ' + json.dumps({k: v for k, v in p.items() if k not in (
        'source', 'ingest_ms', 'predicted_ms', 'event_time_ms')}))
  latency = [t - p['source']['timestamp_ms'] for t, p in predictions]
  headline, _ = HEADLINE[problem.task]
  summary = {
      'problem': problem.name,
      'task': problem.task.value,
      'events_replayed': len(events),
      'predictions': len(predictions),
      'dead_letters': len(dead),
      'dead_letter_reasons': sorted({d['errors'][0]['reason']
                                     for _, d in dead}),
      'model_versions': sorted({p['model_version'] for _, p in predictions}),
      f'training_eval_{headline}': round(metrics[headline], 4),
      'live_quality': live_quality(problem, [p for _, p in predictions]),
      'end_to_end_latency_ms': percentiles(latency),
      # Per metric, windows that alerted (a window's final pane repeats it).
      'alerts': dict(collections.Counter(
          f"{a['kind']}: {a.get('feature') or a.get('model_key')} "
          f"{a['metric']}" for a in {
              (a['kind'], a.get('feature'), a.get('model_key'), a['metric'],
               a['window_start_s']): a
              for a in report_rows['alerts']}.values())),
      'live_report': report,
  }
  print('[demo] summary: ' + json.dumps(summary, indent=2))
  live = {Task.BINARY: 'auc', Task.MULTICLASS: 'accuracy',
          Task.REGRESSION: 'mape'}[problem.task]
  print(f'\n[demo] live {live} per event-time window (streaming quality job) '
        f'against training eval {live} {metrics[live]:.4f}:')
  for row in windows:
    value = row.get(live)
    # Dates for day-long windows and more, else times of day.
    cut = (slice(0, 10) if row['window_end_s'] - row['window_start_s'] >= 86400
           else slice(11, 19))
    print(f"  {row['window_start'][cut]} .. {row['window_end'][cut]}  "
          f"labelled {row['labelled']:5d}  {live} "
          f"{'n/a' if value is None else f'{value:.4f}'}")
  ok = (len(predictions) == len(events) - invalid
        and len(dead) == len(BAD_EVENTS) + invalid)
  if not ok:
    print('[demo] FAILED: some events got no prediction or dead letter',
          file=sys.stderr)
  return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--problem', default=problem_lib.DEFAULT,
                      help='A shipped problem or your own (see README).')
  parser.add_argument('--input', default=None,
                      help='CSV data (default: the shipped problem\'s).')
  parser.add_argument('--work_dir',
                      default=os.path.expanduser('~/.cache/rtml/run/demo'))
  args, runner_args = parser.parse_known_args(argv)
  problem = problem_lib.load(args.problem)
  data = args.input or problem.data
  if not data:
    parser.error(f'--input is needed for problem {args.problem}')
  os.makedirs(args.work_dir, exist_ok=True)
  bootstrap = os.environ.get('KAFKA_BOOTSTRAP_SERVERS')
  if bootstrap:
    return run_demo(problem, data, bootstrap, args.work_dir, runner_args,
                    args.problem)
  print('[demo] starting a local Kafka broker', flush=True)
  with kafka_runner.KafkaBroker() as broker:
    print(f'[demo] broker at {broker.bootstrap_servers}', flush=True)
    code = run_demo(problem, data, broker.bootstrap_servers, args.work_dir,
                    runner_args, args.problem)
    # The cancelled pipeline's clients would log a connection error every
    # few ms once the broker stops, until this process exits.
    logging.getLogger('kafka').setLevel(logging.CRITICAL)
    return code


if __name__ == '__main__':
  sys.exit(main())
