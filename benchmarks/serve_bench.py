"""Serving benchmark on the real broker: throughput and end-to-end latency.

    python benchmarks/serve_bench.py [--runners prism] [--events 15000]
        [--rates 10,100,1000] [--seconds 15] [--model_dir OUT/model]
    python benchmarks/serve_bench.py --runners prism,prism:exactly_once
    python benchmarks/serve_bench.py --runners prism,flink,flink_cluster

A runner may carry a delivery mode after a colon (``prism:exactly_once``):
its predictions are then read with ``read_committed`` and its latency ends
when the reader, reading all along, received them (a transactional record
is appended before its transaction commits); its throughput is still
measured on append times.

For each runner, and for a hand-written baseline (kafka-python consumer →
the same parsing → the same SavedModel with the same batch size →
kafka-python producer):

* throughput at saturation: the input topic is filled first, then the job
  drains it; events/s between the first and the last prediction appended;
* end-to-end latency at each fixed rate of ``--rates`` (lowest first, on one
  warm job): events are produced at the rate for ``--seconds``; latency =
  append time of the prediction - append time of the event (both topics use
  ``LogAppendTime``: one clock, the broker's);
* a ``limit`` row: the slower of the SavedModel alone (rows/s at batch 256)
  and kafka-python alone reading the saturation topic, and each job's share
  of it.

Prints one JSON document. Starts its own broker unless
``KAFKA_BOOTSTRAP_SERVERS`` is set, and trains a model unless ``--model_dir``
is given.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _events(n, tag=''):
  """``n`` taxi events, ids made unique by ``tag`` and the pass over the
  file."""
  from tools import replay
  base = replay.load_events(TAXI, 'data/taxi_trips.csv')
  return [(f'{eid}-{tag}{i // len(base)}', event) for i, (eid, event) in
          enumerate(base[i % len(base)] for i in range(n))]


def _measure(bootstrap, topic, n, timeout_s, read_committed=False):
  reader = _Reader(bootstrap, topic, read_committed)
  try:
    got = reader.until(n, timeout_s, 'predictions')
  finally:
    reader.close()
  appended = sorted(reader.appended)
  latency = [t - p['source']['timestamp_ms'] for t, p in got]
  return got, appended, latency


class _Reader:
  """Reads a topic from its start, in a thread of its own from the moment
  it is made: (end ms, value) per message, the end being its append time
  (``LogAppendTime``), or with ``read_committed`` the moment this reader
  received it (a transactional record is appended before its transaction
  commits). A reader that only read after the rate phase's replay had
  returned (as this bench did until 2026-12-03) gave every exactly-once
  prediction the phase's end as its reception time."""

  def __init__(self, bootstrap, topic, read_committed=False):
    from kafka import KafkaConsumer
    self._committed = read_committed
    self._consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset='earliest',
        isolation_level='read_committed' if read_committed
        else 'read_uncommitted')
    self.got = []
    self.appended = []  # append ms of each message, for throughput
    self._changed = threading.Condition()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._read, daemon=True)
    self._thread.start()

  def _read(self):
    while not self._stop.is_set():
      polled = self._consumer.poll(timeout_ms=100)
      received = int(time.time() * 1000)
      messages = [m for ms in polled.values() for m in ms]
      if not messages:
        continue
      with self._changed:
        for message in messages:
          self.appended.append(message.timestamp)
          self.got.append((received if self._committed else message.timestamp,
                           json.loads(message.value)))
        self._changed.notify_all()

  def until(self, n, timeout_s, label):
    deadline = time.monotonic() + timeout_s
    last_print = time.monotonic()
    with self._changed:
      while len(self.got) < n and time.monotonic() < deadline:
        self._changed.wait(timeout=min(2.0, deadline - time.monotonic()))
        if time.monotonic() - last_print >= 2:
          last_print = time.monotonic()
          _log(f'{label}: {len(self.got)}/{n}')
      return list(self.got)

  def close(self):
    self._stop.set()
    self._thread.join()
    self._consumer.close()


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
      ingest = int(time.time() * 1000)
      good = []
      for message in (m for ms in polled.values() for m in ms):
        try:
          good.append((message, R.parse_json_bytes(TAXI, message.value)))
        except R.InvalidRecord:
          continue
      if not good:
        continue
      outputs = serving.predict(TAXI, model, [r for _, r in good])
      for i, (message, record) in enumerate(good):
        context = serve.EventContext(
            message.key.decode(), message.topic, message.partition,
            message.offset, message.timestamp, ingest)
        answer = {export.PROBABILITY: float(outputs[export.PROBABILITY][i]),
                  export.CLASS: int(outputs[export.CLASS][i])}
        producer.send(self._topics['out'], key=message.key, value=json.dumps(
            serve.answer_record(TAXI, context, record, answer, TAXI.name,
                                model.version, strategy='single')).encode())
      producer.flush()
      consumer.commit()
    consumer.close()
    producer.close()

  def stop(self):
    self._stop.set()


def _start_job(kind, bootstrap, topics, model_root, runner, extra=()):
  if kind == 'baseline':
    baseline = Baseline(bootstrap, topics, model_root)
    thread = threading.Thread(target=baseline.run, daemon=True)
    thread.start()
    baseline.ready.wait(60)
    return baseline.stop
  from pipelines import serve
  runner, _, delivery = runner.partition(':')
  flags = []
  if runner == 'flink_cluster':  # the standalone cluster started in main()
    runner, flags = 'flink', ['--flink_master', FLINK_MASTER]
  result = serve.start([
      '--delivery', delivery or 'at_least_once',
      '--bootstrap_servers', bootstrap, '--input_topic', topics['in'],
      '--output_topic', topics['out'], '--dead_letter_topic', topics['dlq'],
      '--model_dir', model_root, '--group_id', f'bench-{uuid.uuid4().hex[:6]}',
      '--max_batch_size', str(BATCH_SIZE), '--runner', runner,
      '--bundle_secs', str(BUNDLE_SECS), *flags, *extra])

  def stop():
    # Gone before the next phase starts: a job still reading (Flink takes
    # seconds to cancel) would share the worker with the next one.
    from runners import jobs
    result.cancel()
    state = jobs.wait(result, duration_s=120)
    _log(f'{runner}: job {state} after cancel')
  return stop


def _bench(kind, bootstrap, model_root, args, runner=None):
  from tools import replay
  out = {}
  committed = (runner or '').endswith(':exactly_once')
  extra = args.serve_args.split() if args.serve_args else []
  # Saturation: fill the topic, then start the job and let it drain.
  topics = _topics(bootstrap)
  events = _events(args.events)
  replay.replay(TAXI, events, topics['in'], bootstrap)
  if kind == 'baseline':
    out['kafka_read_alone_events_per_s'] = _read_alone(bootstrap,
                                                       topics['in'])
  _log(f'{kind} {runner or ""}: draining {len(events)} queued events')
  stop = _start_job(kind, bootstrap, topics, model_root, runner, extra)
  try:
    got, appended, _ = _measure(bootstrap, topics['out'], len(events), 900,
                                committed)
  finally:
    stop()
  out['saturation_events_per_s'] = _throughput(appended)
  out['saturation_predictions'] = len(got)
  # Latency at each fixed rate, lowest first, on one warm job: a half-empty
  # batch must not wait for a full one.
  topics = _topics(bootstrap)
  stop = _start_job(kind, bootstrap, topics, model_root, runner, extra)
  reader = _Reader(bootstrap, topics['out'], committed)
  try:
    warmup = _events(200, 'warmup-')
    replay.replay(TAXI, warmup, topics['in'], bootstrap)
    reader.until(len(warmup), 300, 'warm-up')
    sent = len(warmup)
    out['latency_ms'] = {}
    for rate in args.rates:
      phase = _events(int(rate * args.seconds), f'r{rate:g}-')
      _log(f'{kind} {runner or ""}: {len(phase)} events at {rate:g}/s')
      replay.replay(TAXI, phase, topics['in'], bootstrap, rate=rate)
      sent += len(phase)
      got = reader.until(sent, 300, f'{rate:g}/s')
      ids = {eid for eid, _ in phase}
      mine = [(t, p) for t, p in got if p['event_id'] in ids]
      latency = [t - p['source']['timestamp_ms'] for t, p in mine]
      out['latency_ms'][f'{rate:g}'] = {'predictions': len(latency),
                                        **demo.percentiles(latency),
                                        'stages': _stages(mine)}
  finally:
    stop()
    reader.close()
  return out


def _stages(got):
  """Where an event's time went, p50 / p99 ms per stage (one clock: the
  broker and the job run on this machine): ``read`` event appended → the
  job parsed it (``ingest_ms``), ``score`` → its prediction was formatted
  (``predicted_ms``: batching and the model call), ``write`` → the
  prediction appended (the producer and the broker)."""
  parts = {'read': [], 'score': [], 'write': []}
  for appended, p in got:
    parts['read'].append(p['ingest_ms'] - p['source']['timestamp_ms'])
    parts['score'].append(p['predicted_ms'] - p['ingest_ms'])
    parts['write'].append(appended - p['predicted_ms'])
  return {name: [demo.percentiles(v, (50,))['p50'],
                 demo.percentiles(v, (99,))['p99']]
          for name, v in parts.items()}


def _read_alone(bootstrap, topic):
  """kafka-python alone: events/s reading ``topic`` from the start."""
  from kafka import KafkaConsumer
  consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap,
                           auto_offset_reset='earliest',
                           consumer_timeout_ms=2000, max_poll_records=500)
  n, first, last = 0, None, None
  for _ in consumer:
    last = time.perf_counter()
    first = first or last
    n += 1
  consumer.close()
  if n < 2 or last == first:
    raise RuntimeError(f'read only {n} events of {topic}')
  return round((n - 1) / (last - first), 1)


def _model_alone(model_root, batch=256, rounds=40):
  """The exported SavedModel alone: rows/s scoring parsed events."""
  from models import serving
  from transforms import records as R
  model = serving.load(os.path.join(
      model_root, str(serving.newest_valid_version(TAXI, model_root))))
  rows = [R.parse_json(TAXI, event) for _, event in _events(batch)]
  serving.predict(TAXI, model, rows)  # warm
  started = time.perf_counter()
  for _ in range(rounds):
    serving.predict(TAXI, model, rows)
  return round(batch * rounds / (time.perf_counter() - started), 1)


FLINK_MASTER = None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--runners', default='prism',
                      help='Comma-separated runners: prism, flink (embedded), '
                      'flink_cluster (a local standalone cluster), each with '
                      'an optional :exactly_once.')
  parser.add_argument('--events', type=int, default=15000)
  parser.add_argument('--rates', default='10,100,1000',
                      help='Comma-separated fixed rates, events/s.')
  parser.add_argument('--seconds', type=float, default=15,
                      help='How long each fixed rate lasts.')
  parser.add_argument('--model_dir', default=None)
  parser.add_argument('--bundle_secs', type=float, default=1.0,
                      help='pipelines.serve --bundle_secs')
  parser.add_argument('--serve_args', default='',
                      help='More pipelines.serve flags, one string.')
  parser.add_argument('--no_baseline', action='store_true',
                      help='Skip the hand-written loop and the limit row '
                      '(to compare pipeline settings quickly).')
  args = parser.parse_args()
  args.rates = [float(r) for r in args.rates.split(',') if r]
  global BUNDLE_SECS, FLINK_MASTER
  BUNDLE_SECS = args.bundle_secs

  broker = None
  cluster = None
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
        # Keras prints its epochs on stdout: this program's stdout is JSON.
        with contextlib.redirect_stdout(sys.stderr):
          train.run(['--input', 'data/taxi_trips.csv', '--output_dir', tmp])
        model_root = os.path.join(tmp, 'model')
      results = {}
      limit = None
      if not args.no_baseline:
        results['baseline'] = _bench('baseline', bootstrap, model_root, args)
        model_rows = _model_alone(model_root)
        read_events = results['baseline'].pop(
            'kafka_read_alone_events_per_s')
        limit = min(model_rows, read_events)
        results['limit'] = {'savedmodel_alone_rows_per_s': model_rows,
                            'kafka_read_alone_events_per_s': read_events,
                            'events_per_s': limit}
      for runner in args.runners.split(','):
        if runner.startswith('flink_cluster') and cluster is None:
          from runners import flink
          cluster = flink.FlinkCluster().start()
          FLINK_MASTER = cluster.address
        results[runner] = _bench('pipeline', bootstrap, model_root, args,
                                 runner)
      for name, result in results.items():
        if name == 'limit':
          continue
        if limit is None:
          continue
        base = results['baseline']['saturation_events_per_s']
        mine = result['saturation_events_per_s']
        if name != 'baseline':
          result['throughput_ratio_to_baseline'] = (
              round(mine / base, 3) if base and mine else None)
        result['share_of_limit'] = round(mine / limit, 3) if mine else None
  finally:
    if cluster is not None:
      cluster.stop()
    if broker is not None:
      broker.stop()
  print(json.dumps({
      'machine': {'cpus': os.cpu_count(), 'python': platform.python_version(),
                  'platform': platform.platform()},
      'batch_size': BATCH_SIZE,
      'bundle_secs': BUNDLE_SECS,
      'serve_args': args.serve_args,
      'results': results,
  }, indent=2))


if __name__ == '__main__':
  main()
