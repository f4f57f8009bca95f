"""Throughput of the Beam Kafka source/sink vs plain kafka-python loops.

Same broker, same data (taxi trips as JSON events, cycled to ``--events``),
one run: a plain ``KafkaProducer`` loop and ``WriteToKafka``, then a plain
``KafkaConsumer`` loop and ``ReadFromKafka`` (Kafka timestamps, and event time
from the JSON field). Beam times are whole pipeline runs on the chosen runner;
each is also run empty (same shape, zero events) to separate the fixed
pipeline start-up from the per-event cost. Prints JSON with the ratios
(Beam / plain events per second, higher is better): ``ratio`` end to end,
``steady_state_ratio`` without the start-up.

    python benchmarks/kafka_io_bench.py --events 100000
    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python benchmarks/kafka_io_bench.py

Starts its own broker unless ``KAFKA_BOOTSTRAP_SERVERS`` is set.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import logging
import os
import sys
import time
import uuid
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from tools import replay
from runners import kafka as local_kafka
from transforms import kafka_io
from transforms import problem as problem_lib

TAXI = problem_lib.load('taxi')
EVENT_TIME_KEY = TAXI.event_time.field

TAXI_CSV = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'data', 'taxi_trips.csv')
PRODUCER = {'acks': 'all', 'enable_idempotence': True, 'linger_ms': 5,
            'batch_size': 256 * 1024}


def messages(count: int) -> list[tuple[bytes, bytes]]:
  """``count`` (key, JSON value) pairs: the taxi events, cycled."""
  events = replay.load_events(TAXI, TAXI_CSV)
  out = []
  for i, (eid, event) in zip(range(count), itertools.cycle(events)):
    out.append((f'{eid}-{i}'.encode(),
                json.dumps(event, separators=(',', ':')).encode()))
  return out


@contextlib.contextmanager
def broker() -> Iterator[str]:
  if os.environ.get('KAFKA_BOOTSTRAP_SERVERS'):
    yield os.environ['KAFKA_BOOTSTRAP_SERVERS']
  else:
    with local_kafka.KafkaBroker() as b:
      yield b.bootstrap_servers


def plain_write(bootstrap: str, topic: str, data) -> float:
  from kafka import KafkaProducer
  producer = KafkaProducer(bootstrap_servers=bootstrap, **PRODUCER)
  start = time.perf_counter()
  for key, value in data:
    producer.send(topic, key=key, value=value)
  producer.flush()
  elapsed = time.perf_counter() - start
  producer.close()
  return elapsed


def beam_write(bootstrap: str, topic: str, count: int, options) -> float:
  def generate(_):
    yield from (messages(count) if count else ())

  start = time.perf_counter()
  with beam.Pipeline(options=options) as p:
    _ = (p
         | 'Start' >> beam.Impulse()
         | 'Generate' >> beam.FlatMap(generate)
         | 'Write' >> kafka_io.WriteToKafka(bootstrap, topic,
                                            producer_config=PRODUCER))
  return time.perf_counter() - start


def plain_read(bootstrap: str, topic: str, count: int) -> float:
  from kafka import KafkaConsumer, TopicPartition
  consumer = KafkaConsumer(bootstrap_servers=bootstrap,
                           enable_auto_commit=False, max_poll_records=1000)
  tps = [TopicPartition(topic, p)
         for p in sorted(consumer.partitions_for_topic(topic))]
  start = time.perf_counter()
  consumer.assign(tps)
  consumer.seek_to_beginning()
  seen = 0
  while seen < count:
    for batch in consumer.poll(timeout_ms=1000).values():
      seen += len(batch)
  elapsed = time.perf_counter() - start
  consumer.close()
  return elapsed


def beam_read(bootstrap: str, topic: str, count: int, options,
              event_time: str) -> float:
  """Reads ``count`` events (0: an empty range of every partition)."""
  start = time.perf_counter()
  with beam.Pipeline(options=options) as p:
    counted = (p
               | 'Read' >> kafka_io.ReadFromKafka(
                   bootstrap, topic, bounded=True, event_time=event_time,
                   start_offsets=0, stop_offsets=None if count else 0)
               | 'Count' >> beam.combiners.Count.Globally())
    assert_that(counted, equal_to([count]))
  return time.perf_counter() - start


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--events', type=int, default=100_000)
  parser.add_argument('--partitions', type=int, default=4)
  parser.add_argument('--runner', default='DirectRunner')
  args, beam_args = parser.parse_known_args(argv)
  logging.getLogger('kafka').setLevel(logging.ERROR)
  options = PipelineOptions(['--runner', args.runner, *beam_args])
  data = messages(args.events)
  value_bytes = sum(len(v) for _, v in data) / len(data)
  # kafka-python checks record CRCs in pure Python unless `crc32c` is there.
  crc = ('crc32c (C)' if importlib.util.find_spec('crc32c')
         else 'pure Python')
  results: dict = {
      'events': args.events, 'partitions': args.partitions,
      'mean_value_bytes': round(value_bytes), 'runner': args.runner,
      'kafka_python_crc32c': crc, 'cpus': os.cpu_count(),
      'load_average_1m': round(os.getloadavg()[0], 2)}
  with broker() as bootstrap:
    run = uuid.uuid4().hex[:8]
    plain_topic, beam_topic = f'bench-plain-{run}', f'bench-beam-{run}'
    for topic in (plain_topic, beam_topic):
      local_kafka.create_topic(bootstrap, topic, args.partitions,
                               config={'retention.ms': '-1'})

    def rates(plain_s: float, beam_s: float, empty_s: float) -> dict:
      return {'plain_events_per_s': round(args.events / plain_s),
              'beam_events_per_s': round(args.events / beam_s),
              'ratio': round(plain_s / beam_s, 3),
              'beam_startup_s': round(empty_s, 2),
              'steady_state_ratio': round(
                  plain_s / max(beam_s - empty_s, 1e-9), 3)}

    results['write'] = rates(
        plain_write(bootstrap, plain_topic, data),
        beam_write(bootstrap, beam_topic, args.events, options),
        beam_write(bootstrap, beam_topic, 0, options))
    plain_s = plain_read(bootstrap, plain_topic, args.events)
    for name, event_time in (('read', 'kafka'),
                             ('read_json_event_time', EVENT_TIME_KEY)):
      results[name] = rates(
          plain_s,
          beam_read(bootstrap, plain_topic, args.events, options, event_time),
          beam_read(bootstrap, plain_topic, 0, options, event_time))
  print(json.dumps(results, indent=2))
  return results


if __name__ == '__main__':
  main()
