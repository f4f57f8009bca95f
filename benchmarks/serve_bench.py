"""Serving benchmark on the real broker: throughput and end-to-end latency.

    python benchmarks/serve_bench.py [--runners prism] [--events 15000]
        [--rate 1000] [--seconds 15] [--model_dir OUT/model]
    python benchmarks/serve_bench.py --runners prism,prism:exactly_once

A runner may carry a delivery mode after a colon (``prism:exactly_once``):
its predictions are then read with ``read_committed`` and its latency ends
when the reader received them (a transactional record is appended before
its transaction commits).

For each runner, and for a hand-written baseline (kafka-python consumer →
the same parsing → the same SavedModel with the same batch size →
kafka-python producer):

* throughput at saturation: the input topic is filled first, then the job
  drains it; events/s between the first and the last prediction appended;
* end-to-end latency at a fixed rate: events are produced at ``--rate`` for
  ``--seconds``; latency = append time of the prediction - append time of
  the event (both topics use ``LogAppendTime``: one clock, the broker's).

Prints one JSON document. Starts its own broker unless
``KAFKA_BOOTSTRAP_SERVERS`` is set, and trains a model unless ``--model_dir``
is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import demo  # noqa: E402
from runners import kafka as kafka_runner  # noqa: E402
from transforms import problem as problem_lib

TAXI = problem_lib.load('taxi')

BATCH_SIZE = 64
BUNDLE_SECS = 1.0


def _log(message):
  print(f'[bench] {message}', file=sys.stderr, flush=True)


def _topics(bootstrap):
  suffix = uuid.uuid4().hex[:6]
  topics = {n: f'bench-{n}-{suffix}' for n in ('in', 'out', 'dlq')}
  kafka_runner.create_topic(bootstrap, topics['in'], partitions=2,
                            config=demo.LOG_APPEND_TIME)
  kafka_runner.create_topic(bootstrap, topics['out'],
                            config=demo.LOG_APPEND_TIME)
  kafka_runner.create_topic(bootstrap, topics['dlq'])
  return topics


def _events(n):
  from tools import replay
  base = replay.load_events(TAXI, 'data/taxi_trips.csv')
  return [(f'{eid}-{i // len(base)}', event) for i, (eid, event) in
          enumerate(base[i % len(base)] for i in range(n))]


def _measure(bootstrap, topic, n, timeout_s, read_committed=False):
  got = demo.collect(bootstrap, topic, n, timeout_s, 'predictions',
                     progress=sys.stderr, read_committed=read_committed)
  appended = sorted(t for t, _ in got)
  latency = [t - p['source']['timestamp_ms'] for t, p in got]
  return got, appended, latency


def _throughput(appended):
  if len(appended) < 2 or appended[-1] == appended[0]:
    return None
  return round((len(appended) - 1) / ((appended[-1] - appended[0]) / 1000), 1)


class Baseline:
  """kafka-python consumer → parse → SavedModel → kafka-python producer."""

  def __init__(self, bootstrap, topics, model_root):
    self._bootstrap = bootstrap
    self._topics = topics
    self._model_root = model_root
    self._stop = threading.Event()
    self.ready = threading.Event()

  def run(self):
    from kafka import KafkaConsumer, KafkaProducer
    from apache_beam.ml.inference.base import PredictionResult
    from models import export, serving
    from pipelines import serve
    from transforms import records as R
    model = serving.load(os.path.join(
        self._model_root, str(serving.newest_valid_version(TAXI, self._model_root))))
    consumer = KafkaConsumer(self._topics['in'],
                             bootstrap_servers=self._bootstrap,
                             auto_offset_reset='earliest',
                             group_id=f'baseline-{uuid.uuid4().hex[:6]}',
                             max_poll_records=BATCH_SIZE)
    producer = KafkaProducer(bootstrap_servers=self._bootstrap, acks='all',
                             enable_idempotence=True, linger_ms=5)
    self.ready.set()
    while not self._stop.is_set():
      polled = consumer.poll(timeout_ms=100, max_records=BATCH_SIZE)
      good = []
      for message in (m for ms in polled.values() for m in ms):
        try:
          good.append((message, R.parse_json_bytes(TAXI, message.value)))
        except R.InvalidRecord:
          continue
      if not good:
        continue
      outputs = serving.predict(TAXI, model, [r for _, r in good])
      now = int(time.time() * 1000)
      for i, (message, record) in enumerate(good):
        context = serve.EventContext(
            message.key.decode(), message.topic, message.partition,
            message.offset, message.timestamp, now)
        result = PredictionResult(record, {
            export.PROBABILITY: float(outputs[export.PROBABILITY][i]),
            export.CLASS: int(outputs[export.CLASS][i])}, str(model.version))
        producer.send(self._topics['out'], key=message.key, value=json.dumps(
            serve.prediction_record(TAXI, context, result)).encode())
      producer.flush()
      consumer.commit()
    consumer.close()
    producer.close()

  def stop(self):
    self._stop.set()


def _start_job(kind, bootstrap, topics, model_root, runner):
  if kind == 'baseline':
    baseline = Baseline(bootstrap, topics, model_root)
    thread = threading.Thread(target=baseline.run, daemon=True)
    thread.start()
    baseline.ready.wait(60)
    return baseline.stop
  from pipelines import serve
  runner, _, delivery = runner.partition(':')
  result = serve.start([
      '--delivery', delivery or 'at_least_once',
      '--bootstrap_servers', bootstrap, '--input_topic', topics['in'],
      '--output_topic', topics['out'], '--dead_letter_topic', topics['dlq'],
      '--model_dir', model_root, '--group_id', f'bench-{uuid.uuid4().hex[:6]}',
      '--max_batch_size', str(BATCH_SIZE), '--runner', runner,
      '--bundle_secs', str(BUNDLE_SECS)])
  return result.cancel


def _bench(kind, bootstrap, model_root, args, runner=None):
  from tools import replay
  out = {}
  committed = (runner or '').endswith(':exactly_once')
  # Saturation: fill the topic, then start the job and let it drain.
  topics = _topics(bootstrap)
  events = _events(args.events)
  replay.replay(TAXI, events, topics['in'], bootstrap)
  _log(f'{kind}: draining {len(events)} queued events')
  stop = _start_job(kind, bootstrap, topics, model_root, runner)
  try:
    got, appended, _ = _measure(bootstrap, topics['out'], len(events), 600,
                                committed)
  finally:
    stop()
  out['saturation_events_per_s'] = _throughput(appended)
  out['saturation_predictions'] = len(got)
  # Latency at a fixed rate, on a warm job.
  topics = _topics(bootstrap)
  n = int(args.rate * args.seconds)
  stop = _start_job(kind, bootstrap, topics, model_root, runner)
  try:
    warmup = _events(200)
    replay.replay(TAXI, warmup, topics['in'], bootstrap)
    demo.collect(bootstrap, topics['out'], len(warmup), 180, 'warm-up',
                 progress=sys.stderr, read_committed=committed)
    _log(f'{kind}: {n} events at {args.rate}/s')
    replay.replay(TAXI, _events(n), topics['in'], bootstrap, rate=args.rate)
    got, _, latency = _measure(bootstrap, topics['out'], len(warmup) + n, 300,
                               committed)
  finally:
    stop()
  latency = latency[len(warmup):]
  out['latency_rate_events_per_s'] = args.rate
  out['latency_predictions'] = len(latency)
  out['latency_ms'] = demo.percentiles(latency)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--runners', default='prism',
                      help='Comma-separated runners to benchmark.')
  parser.add_argument('--events', type=int, default=15000)
  parser.add_argument('--rate', type=float, default=1000)
  parser.add_argument('--seconds', type=float, default=15)
  parser.add_argument('--model_dir', default=None)
  parser.add_argument('--bundle_secs', type=float, default=1.0,
                      help='pipelines.serve --bundle_secs')
  args = parser.parse_args()
  global BUNDLE_SECS
  BUNDLE_SECS = args.bundle_secs

  broker = None
  bootstrap = os.environ.get('KAFKA_BOOTSTRAP_SERVERS')
  if not bootstrap:
    broker = kafka_runner.KafkaBroker().start()
    bootstrap = broker.bootstrap_servers
  try:
    with tempfile.TemporaryDirectory() as tmp:
      model_root = args.model_dir
      if model_root is None:
        from pipelines import train
        _log('training a model')
        train.run(['--input', 'data/taxi_trips.csv', '--output_dir', tmp])
        model_root = os.path.join(tmp, 'model')
      results = {'baseline': _bench('baseline', bootstrap, model_root, args)}
      for runner in args.runners.split(','):
        results[runner] = _bench('pipeline', bootstrap, model_root, args,
                                 runner)
        base = results['baseline']['saturation_events_per_s']
        mine = results[runner]['saturation_events_per_s']
        results[runner]['throughput_ratio_to_baseline'] = (
            round(mine / base, 3) if base and mine else None)
  finally:
    if broker is not None:
      broker.stop()
  print(json.dumps({
      'machine': {'cpus': os.cpu_count(), 'python': platform.python_version(),
                  'platform': platform.platform()},
      'batch_size': BATCH_SIZE,
      'bundle_secs': BUNDLE_SECS,
      'results': results,
  }, indent=2))


if __name__ == '__main__':
  main()
