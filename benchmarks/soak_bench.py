"""Soak benchmark: a long run of serving, its memory and threads over time.

    python benchmarks/soak_bench.py [--events 1000000] [--rate 0]
        [--runner prism] [--model_dir OUT/model]
    python benchmarks/soak_bench.py --pipeline analytics --events 300000 \
        --rate 500     # ten minutes of windowed analytics

Starts ``python -m pipelines.serve`` (its own process group, as a user
would), pushes ``--events`` taxi events through it (``--rate`` events/s; 0:
as fast as serving keeps up, at most ``--max_lag`` events ahead), counts the
predictions and samples the resident memory (RSS) and thread count of the
serving process and its children (Prism) every ``--sample_s``. The start
figures are taken once ``--warmup`` predictions have come out (the model and
the runner are loaded), the end figures when the last prediction has.

With ``--pipeline analytics`` the job is ``pipelines.analytics`` (fixed
one-minute windows, discarding panes), the events are stamped with the time
they are sent (a live stream: replayed history would move the watermark by
years a second, and the late-data splitter ticks once per window across
them), and an event counts once it is in a window's count or on the late
topic; the counts reach ``--events`` when the last windows close, about a
minute after the last event.

Goal (reliability issue): RSS and threads flat within 10 % from start to
end, every event predicted (or counted), the job still running. Prints one JSON
document; progress goes to stderr. Starts its own broker unless
``KAFKA_BOOTSTRAP_SERVERS`` is set, and trains a model (1 epoch) unless
``--model_dir`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runners import kafka as kafka_runner  # noqa: E402
from transforms import problem as problem_lib  # noqa: E402

TAXI = problem_lib.load('taxi')


def _log(message):
  print(f'[soak] {message}', file=sys.stderr, flush=True)


def _tree(pid: int) -> list[int]:
  """``pid`` and its descendants."""
  children: dict[int, list[int]] = {}
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/stat') as f:
          ppid = int(f.read().split(')')[-1].split()[1])
      except OSError:
        continue
      children.setdefault(ppid, []).append(int(entry))
  found, todo = [], [pid]
  while todo:
    p = todo.pop()
    found.append(p)
    todo.extend(children.get(p, []))
  return found


def _usage(pid: int) -> dict[str, float]:
  """RSS (MiB) and threads of a process tree, from /proc."""
  rss_kb = threads = 0
  for p in _tree(pid):
    try:
      with open(f'/proc/{p}/status') as f:
        for line in f:
          if line.startswith('VmRSS:'):
            rss_kb += int(line.split()[1])
          elif line.startswith('Threads:'):
            threads += int(line.split()[1])
    except OSError:
      continue
  return {'rss_mib': round(rss_kb / 1024, 1), 'threads': threads}


def _events_in(record) -> int:
  """How many events an output record accounts for: a prediction or a late
  event 1, a window pane its count, anything else (drift rows) 0."""
  if not record.topic.startswith('soak-stats-'):
    return 1
  row = json.loads(record.value)
  return row.get('count', 0) if row.get('type') == 'window_stats' else 0


class Counter(threading.Thread):
  """Counts the events accounted for on the output topics (predictions, or
  window counts plus late events), and distinct keys."""

  def __init__(self, bootstrap: str, topics: list[str]):
    super().__init__(daemon=True)
    from kafka import KafkaConsumer
    self.count = 0
    self.ids: set[str] = set()
    self._stop = threading.Event()
    self._consumer = KafkaConsumer(*topics, bootstrap_servers=bootstrap,
                                   auto_offset_reset='earliest',
                                   max_poll_records=5000)

  def run(self):
    while not self._stop.is_set():
      for records in self._consumer.poll(timeout_ms=500).values():
        for record in records:
          self.count += _events_in(record)
          self.ids.add(record.key)
    self._consumer.close()

  def stop(self):
    self._stop.set()


def _produce(bootstrap, topic, n, rate, max_lag, counter, stop,
             live_times=False):
  from kafka import KafkaProducer
  from tools import replay
  base = replay.load_events(TAXI, 'data/taxi_trips.csv')
  producer = KafkaProducer(bootstrap_servers=bootstrap, acks='all',
                           linger_ms=20, batch_size=256 * 1024)
  started = time.monotonic()
  for i in range(n):
    if stop.is_set():
      break
    if rate:
      ahead = started + i / rate - time.monotonic()
      if ahead > 0:
        time.sleep(ahead)
    while i - counter.count > max_lag and not stop.is_set():
      time.sleep(0.05)  # serving is behind: let it catch up
    eid, event = base[i % len(base)]
    if live_times:  # a live stream: the event happens now
      event = {**event, TAXI.event_time.field: int(time.time())}
    producer.send(topic, key=f'{eid}-{i // len(base)}'.encode(),
                  value=json.dumps(event, separators=(',', ':')).encode())
  producer.flush()
  producer.close()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--events', type=int, default=1_000_000)
  parser.add_argument('--rate', type=float, default=0)
  parser.add_argument('--max_lag', type=int, default=20_000)
  parser.add_argument('--warmup', type=int, default=10_000)
  parser.add_argument('--sample_s', type=float, default=10.0)
  parser.add_argument('--keep_log', default=None,
                      help='Copy the job log here at the end.')
  parser.add_argument('--runner', default='prism')
  parser.add_argument('--pipeline', choices=['serve', 'analytics'],
                      default='serve')
  parser.add_argument('--model_dir', default=None)
  parser.add_argument('job_args', nargs='*',
                      help='More flags for the job, after --.')
  args = parser.parse_args()
  analytics = args.pipeline == 'analytics'
  # `timeout` or a Ctrl-C in another shell: clean up (the job is in its own
  # process group and would outlive us).
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

  broker = None
  bootstrap = os.environ.get('KAFKA_BOOTSTRAP_SERVERS')
  if not bootstrap:
    broker = kafka_runner.KafkaBroker().start()
    bootstrap = broker.bootstrap_servers
  tmp = tempfile.TemporaryDirectory()
  job = None
  try:
    model_root = args.model_dir
    if model_root is None and not analytics:
      from pipelines import train
      _log('training a model (1 epoch)')
      train.run(['--input', 'data/taxi_trips.csv', '--output_dir', tmp.name,
                 '--epochs', '1'])
      model_root = os.path.join(tmp.name, 'model')
    suffix = uuid.uuid4().hex[:6]
    outs = ('stats', 'late', 'alerts') if analytics else ('out',)
    topics = {n: f'soak-{n}-{suffix}' for n in ('in', 'dlq', *outs)}
    for name, topic in topics.items():
      kafka_runner.create_topic(bootstrap, topic,
                                partitions=2 if name == 'in' else 1)
    log_path = os.path.join(tmp.name, 'job.log')
    log = open(log_path, 'w')
    common = ['--bootstrap_servers', bootstrap, '--input_topic', topics['in'],
              '--dead_letter_topic', topics['dlq'], '--group_id', suffix,
              '--runner', args.runner]
    if analytics:
      command = ['pipelines.analytics', *common,
                 '--output_topic', topics['stats'],
                 '--late_topic', topics['late'],
                 '--alerts_topic', topics['alerts'],
                 '--window', 'fixed', '--size', '60',
                 '--accumulation', 'discarding']
      outputs = [topics['stats'], topics['late']]
    else:
      command = ['pipelines.serve', *common, '--output_topic', topics['out'],
                 '--model_dir', model_root]
      outputs = [topics['out']]
    job = subprocess.Popen([sys.executable, '-m', *command, *args.job_args],
                           stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    counter = Counter(bootstrap, outputs)
    counter.start()
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(
        bootstrap, topics['in'], args.events, args.rate, args.max_lag,
        counter, stop, analytics), daemon=True)
    producer.start()
    samples = []
    start = end = None
    started = time.monotonic()
    last_count, last_time = 0, started
    progressed = started
    while counter.count < args.events:
      time.sleep(args.sample_s)
      if job.poll() is not None:
        _log(f'{args.pipeline} exited with {job.returncode}; log: '
             f'{log_path}')
        break
      now = time.monotonic()
      if counter.count > last_count:
        progressed = now
      elif now - progressed > 300:
        _log(f'no output for 300 s; log: {log_path}')
        break
      usage = _usage(job.pid)
      rate = (counter.count - last_count) / (now - last_time)
      last_count, last_time = counter.count, now
      sample = {'t_s': round(now - started), 'accounted': counter.count,
                'events_per_s': round(rate), **usage}
      samples.append(sample)
      _log(json.dumps(sample))
      if start is None and counter.count >= args.warmup:
        start = sample
    end = samples[-1] if samples else None
    running = job.poll() is None
    stop.set()
    counter.stop()
    elapsed = time.monotonic() - started

    def growth(key):
      if not start or not end or not start[key]:
        return None
      return round(end[key] / start[key] - 1, 3)

    print(json.dumps({
        'machine': {'cpus': os.cpu_count(),
                    'python': platform.python_version(),
                    'platform': platform.platform()},
        'runner': args.runner,
        'pipeline': args.pipeline,
        'events': args.events,
        'events_accounted_for': counter.count,
        'distinct_output_keys': len(counter.ids),
        'seconds': round(elapsed, 1),
        'events_per_s': round(counter.count / elapsed, 1),
        'job_running_at_end': running,
        'start': start, 'end': end,
        'rss_growth': growth('rss_mib'),
        'threads_growth': growth('threads'),
        'samples': samples,
    }, indent=2))
  finally:
    if job is not None and job.poll() is None:
      os.killpg(job.pid, signal.SIGTERM)
      try:
        job.wait(timeout=30)
      except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
    if broker is not None:
      broker.stop()
    if args.keep_log and os.path.exists(os.path.join(tmp.name, 'job.log')):
      import shutil
      shutil.copy(os.path.join(tmp.name, 'job.log'), args.keep_log)
    tmp.cleanup()


if __name__ == '__main__':
  main()
