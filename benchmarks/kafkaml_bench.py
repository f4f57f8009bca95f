"""Kafka-ML's HCOPD scenario on this project, measured beside its figures.

    python benchmarks/kafkaml_bench.py [--runner prism] [--rate 10]

The HCOPD rows (``data/hcopd.csv``, 239, the file Kafka-ML streams) go to a
data topic in Avro with ``tools.datasource``; a control message asks for a
training; ``pipelines.control`` trains on exactly that range and publishes
the model live on the registry; a running ``pipelines.serve`` (following the
registry, Avro input) picks it up; then the rows are sent one by one to the
input topic for inference.

* ``training``: control message appended → the serving job reports the new
  model serving (``model-events``), for a second deployment while the
  serving job runs; and the controller's own training time;
* ``inference_with_kafka_ms``: event appended → prediction appended (both
  topics ``LogAppendTime``: the broker's clock), at ``--rate`` events/s;
* ``inference_without_kafka_ms``: the SavedModel called on one row.

Kafka-ML's published figures (Martín et al., "Kafka-ML: connecting the data
stream with ML/AI frameworks", Future Generation Computer Systems 2022, HCOPD
example): training 27–31 s end to end, inference 0.079 s without Kafka and
0.335–0.374 s with data streams. Different machines and models: the figures
sit side by side, they are not a race on equal terms.

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runners import kafka as kafka_runner  # noqa: E402
from tools import demo  # noqa: E402

KAFKA_ML = {'training_s': [27, 31], 'inference_without_kafka_s': 0.079,
            'inference_with_kafka_s': [0.335, 0.374]}


def _log(message):
  print(f'[kafkaml-bench] {message}', file=sys.stderr, flush=True)


def _percentiles(values):
  return {**demo.percentiles(values),
          'mean': round(statistics.fmean(values), 1) if values else None}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--runner', default='prism')
  parser.add_argument('--rate', type=float, default=10.0)
  parser.add_argument('--epochs', type=int, default=None)
  parser.add_argument('--serve_args', default='',
                      help='More pipelines.serve flags, one string (e.g. '
                      '--end_bundle_when_caught_up).')
  args = parser.parse_args()

  from models import serving
  from pipelines import control, serve
  from problems.hcopd import PROBLEM
  from tests.topics import TopicReader
  from tools import datasource, replay
  from transforms import formats
  from transforms import records as R

  broker = None
  bootstrap = os.environ.get('KAFKA_BOOTSTRAP_SERVERS')
  if not bootstrap:
    broker = kafka_runner.KafkaBroker().start()
    bootstrap = broker.bootstrap_servers
  out = {}
  suffix = uuid.uuid4().hex[:6]
  t = {n: f'kafkaml-{n}-{suffix}' for n in (
      'data', 'control', 'results', 'models', 'events', 'predictions', 'dlq',
      'model-events')}
  try:
    for name in ('data', 'control', 'dlq', 'model-events'):
      kafka_runner.create_topic(bootstrap, t[name])
    for name in ('events', 'predictions'):
      kafka_runner.create_topic(bootstrap, t[name],
                                config=demo.LOG_APPEND_TIME)
    fmt = formats.EventFormat.of(PROBLEM, formats.AVRO)
    with tempfile.TemporaryDirectory() as tmp:
      controller = control.Controller(bootstrap, t['control'], t['results'],
                                      t['models'], tmp, 'hcopd',
                                      group_id=f'control-{suffix}')

      def deploy(deployment):
        sent = datasource.send(PROBLEM, 'data/hcopd.csv', t['data'],
                               bootstrap, fmt, progress=None)
        message = datasource.control_message(PROBLEM, deployment, t['data'],
                                             sent, fmt, publish_state='live')
        if args.epochs:
          message['epochs'] = args.epochs
        datasource.send_control(bootstrap, t['control'], message)
        # Keras prints its epochs on stdout: this program's stdout is JSON.
        with contextlib.redirect_stdout(sys.stderr):
          return controller.run(600, 1)[0]

      _log('deployment 1 (before the serving job starts)')
      first = deploy('hcopd-1')
      out['first_deployment'] = {k: first.get(k) for k in (
          'status', 'model', 'train_seconds', 'control_to_done_s')}
      result = serve.start([
          '--problem', 'hcopd', '--runner', args.runner,
          '--bootstrap_servers', bootstrap, '--input_topic', t['events'],
          '--input_format', 'avro', '--output_topic', t['predictions'],
          '--dead_letter_topic', t['dlq'], '--model_topic', t['models'],
          '--model_events_topic', t['model-events'],
          '--group_id', f'serve-{suffix}', *args.serve_args.split()])
      events = TopicReader(bootstrap, t['model-events'])
      predictions = TopicReader(bootstrap, t['predictions'])
      try:
        events.until(10**9, 300, lambda items: any(
            e.get('event') == 'serving' for e in items))
        _log('deployment 2, while the serving job runs')
        sent_ms = int(time.time() * 1000)
        done = {}
        worker = threading.Thread(target=lambda: done.update(
            deploy('hcopd-2')))
        worker.start()
        live = events.until(10**9, 600, lambda items: any(
            e.get('event') == 'serving'
            and e.get('models') == {'hcopd': 'hcopd@2'} for e in items))
        worker.join()
        live_ms = next(e['time_ms'] for e in live
                       if e.get('models') == {'hcopd': 'hcopd@2'})
        out['training'] = {
            'control_to_model_live_s': round((live_ms - sent_ms) / 1000, 3),
            'controller_train_seconds': done.get('train_seconds'),
            'control_to_result_s': done.get('control_to_done_s'),
            'model': done.get('model'), 'metrics': done.get('metrics')}

        rows = replay.load_events(PROBLEM, 'data/hcopd.csv')
        _log(f'inference: {len(rows)} rows at {args.rate:g}/s')
        from kafka import KafkaProducer
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks='all')
        for i, (_, event) in enumerate(rows):
          producer.send(t['events'], key=f'row-{i}'.encode(),
                        value=fmt.encode(PROBLEM, event))
          producer.flush()
          time.sleep(1 / args.rate)
        producer.close()
        got = predictions.until(len(rows), 300)
      finally:
        result.cancel()
        predictions.close()
        events.close()
      latency = []
      from kafka import KafkaConsumer
      consumer = KafkaConsumer(t['predictions'], bootstrap_servers=bootstrap,
                               auto_offset_reset='earliest',
                               consumer_timeout_ms=3000)
      for message in consumer:
        p = json.loads(message.value)
        latency.append(message.timestamp - p['source']['timestamp_ms'])
      consumer.close()
      out['inference_with_kafka_ms'] = {'predictions': len(got),
                                        'model_versions': sorted({
                                            p['model_version'] for p in got}),
                                        **_percentiles(latency)}
      model = serving.load(os.path.join(tmp, 'hcopd', 'model', '2'))
      record = [R.parse_json(PROBLEM, rows[0][1])]
      serving.predict(PROBLEM, model, record)
      single = []
      for _ in range(200):
        start = time.perf_counter()
        serving.predict(PROBLEM, model, record)
        single.append((time.perf_counter() - start) * 1000)
      out['inference_without_kafka_ms'] = _percentiles(single)
  finally:
    if broker is not None:
      broker.stop()
  print(json.dumps({
      'machine': {'cpus': os.cpu_count(), 'python': platform.python_version(),
                  'platform': platform.platform()},
      'runner': args.runner, 'rate': args.rate,
      'serve_args': args.serve_args, 'results': out,
      'kafka_ml_published': KAFKA_ML}, indent=2))


if __name__ == '__main__':
  main()
