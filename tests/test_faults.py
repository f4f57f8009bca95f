"""Nothing lost, nothing stuck: poison inputs and broker faults, on the real
broker and the default runner (Prism).

* A seeded fuzz of 1,000 malformed or extreme messages (``tests.poison``)
  among good events: serving predicts every good one exactly once,
  dead-letters every bad one exactly once, and is still running; analytics
  accounts for every message in windows, late output or dead letters.
* The broker stopped for 60 s mid-stream and started again on the same
  address: serving predicts every event (duplicates counted and printed).
* ``make kafka-down`` / ``make kafka-up`` keeps the broker's address.
* The runner's job-state stream past its deadline: the job lives on.
* Serving's whole process group SIGKILLed mid-stream and restarted with the
  same group, on Prism (at-least-once and exactly-once) and on Flink: every
  event predicted, duplicates counted.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from apache_beam.runners.runner import PipelineState
from kafka import KafkaProducer

from pipelines import analytics
from pipelines import serve
from tests import poison
from tests.taxi import TAXI
from tests.topics import TopicReader
from tools import replay
from transforms import kafka_io

pytestmark = pytest.mark.integration

SEED = 20261201
N_GOOD = 300
N_BAD = 1000
OUTAGE_S = 60  # the bar: every client waits out a minute


def _send(bootstrap: str, topic: str, messages) -> list[tuple]:
  """Sends the messages in order; (message, partition, offset) of each."""
  producer = KafkaProducer(bootstrap_servers=bootstrap, acks='all',
                           linger_ms=5)
  futures = [producer.send(topic, key=m.key, value=m.value,
                           headers=m.headers) for m in messages]
  producer.flush()
  sent = []
  for message, future in zip(messages, futures):
    metadata = future.get(timeout=60)
    sent.append((message, metadata.partition, metadata.offset))
  producer.close()
  return sent


@pytest.fixture(scope='module')
def fuzz_messages():
  events = replay.load_events(TAXI, 'data/taxi_trips.csv', split='eval',
                              limit=N_GOOD)
  return poison.messages(TAXI, events, N_BAD, seed=SEED)


def test_serve_fuzz_every_message_predicted_or_dead_lettered_once(
    kafka_bootstrap, kafka_topic, taxi_model, fuzz_messages):
  events = kafka_topic(partitions=2, suffix='events')
  output = kafka_topic(suffix='predictions')
  dlq = kafka_topic(suffix='dlq')
  result = serve.start([
      '--bootstrap_servers', kafka_bootstrap, '--input_topic', events,
      '--output_topic', output, '--dead_letter_topic', dlq,
      '--model_dir', taxi_model, '--group_id', events, '--runner', 'prism'])
  predictions = TopicReader(kafka_bootstrap, output)
  dead = TopicReader(kafka_bootstrap, dlq)
  try:
    sent = _send(kafka_bootstrap, events, fuzz_messages)
    good = [m for m, _, _ in sent if m.good]
    bad = {(p, o): m for m, p, o in sent if not m.good}
    predictions.until(len(good), 300)
    dead.until(len(bad), 300)
    # Anything more would be a duplicate or a stray: give it a moment.
    predictions.until(len(good) + 1, 3)
    dead.until(len(bad) + 1, 3)
    state = result.state
  finally:
    result.cancel()
    predictions.close()
    dead.close()

  assert len(bad) == N_BAD and len(good) == N_GOOD
  assert state == PipelineState.RUNNING
  got = collections.Counter(p['event_id'] for p in predictions.items)
  assert got == collections.Counter(m.event_id for m in good)
  letters = collections.Counter((d['partition'], d['offset'])
                                for d in dead.items)
  assert letters == collections.Counter(list(bad))
  for d in dead.items:
    message = bad[(d['partition'], d['offset'])]
    assert d['topic'] == events and d['errors'][0]['reason'], d['errors']
    kept = kafka_io.original_bytes(d)
    if message.value is None:
      assert kept is None
    else:  # the original bytes, cut to a safe size with the size recorded
      assert d['value_size'] == len(message.value)
      assert message.value.startswith(kept) and (
          d['value_truncated'] or kept == message.value)
  kinds = collections.Counter(m.kind for m in bad.values())
  print(f'serve fuzz: {len(good)} good predicted once, {len(bad)} bad '
        f'dead-lettered once ({dict(kinds)}); job {state}')


def test_analytics_fuzz_every_message_in_a_window_or_dead_lettered(
    kafka_bootstrap, kafka_topic, fuzz_messages):
  """Analytics from Kafka to Kafka (stats, late and dead-letter topics)."""
  events = kafka_topic(partitions=2, suffix='events')
  names = {name: kafka_topic(suffix=name)
           for name in ('stats', 'late', 'alerts', 'dlq')}
  sent = _send(kafka_bootstrap, events, fuzz_messages)
  # One window over all of 2013-2017 (the replayed years): nothing is late
  # by design, so every good message must land in a window.
  year = 365 * 24 * 3600
  analytics.run([
      '--bootstrap_servers', kafka_bootstrap, '--input_topic', events,
      '--bounded', '--group_id', events, '--streaming', '--runner', 'prism',
      '--output_topic', names['stats'], '--late_topic', names['late'],
      '--alerts_topic', names['alerts'], '--dead_letter_topic', names['dlq'],
      '--window', 'fixed', '--size', str(50 * year),
      '--allowed_lateness', str(50 * year), '--accumulation', 'discarding'])
  good = sum(1 for m, _, _ in sent if m.good)
  bad = {(p, o) for m, p, o in sent if not m.good}
  readers = {name: TopicReader(kafka_bootstrap, topic)
             for name, topic in names.items()}
  try:
    dead = readers['dlq'].until(len(bad), 60)
    stats = readers['stats'].until(10**9, 10, done=lambda rows: sum(
        r.get('count', 0) for r in rows if r['type'] == 'window_stats'
    ) >= good)
    late = readers['late'].until(10**9, 3)
  finally:
    for reader in readers.values():
      reader.close()
  counted = sum(r['count'] for r in stats if r['type'] == 'window_stats')
  assert counted + len(late) == good
  assert collections.Counter((d['partition'], d['offset']) for d in dead) == (
      collections.Counter(bad))
  print(f'analytics fuzz: {counted} in windows, {len(late)} late, '
        f'{len(dead)} dead letters of {len(sent)} messages')


def test_serve_rides_out_a_broker_outage(tmp_path, taxi_model):
  """The broker is stopped for 60 s while events flow, then started again
  on the same address and data: serving keeps running and predicts every
  event; duplicates are counted (at-least-once)."""
  from runners.kafka import KafkaBroker
  broker = KafkaBroker(tmp_path / 'kafka').start()
  bootstrap = broker.bootstrap_servers
  try:
    broker.create_topic('events', 2)
    broker.create_topic('predictions')
    broker.create_topic('dead-letters')
    events = replay.load_events(TAXI, 'data/taxi_trips.csv', split='eval',
                                limit=600)
    result = serve.start([
        '--bootstrap_servers', bootstrap, '--input_topic', 'events',
        '--output_topic', 'predictions', '--dead_letter_topic',
        'dead-letters', '--model_dir', taxi_model, '--group_id', 'serve',
        '--runner', 'prism'])
    predictions = TopicReader(bootstrap, 'predictions')
    try:
      replay.replay(TAXI, events[:300], 'events', bootstrap)
      predictions.until(300, 300)
      # Events keep coming while the broker is down: the replayer's
      # producer buffers and retries them.
      flowing = threading.Thread(target=replay.replay, args=(
          TAXI, events[300:], 'events', bootstrap), kwargs={'rate': 20})
      flowing.start()
      predictions.until(320, 120)  # the second half is being served
      broker.stop(keep_data=True)
      time.sleep(OUTAGE_S)  # the fault itself: the broker stays down
      broker.start()
      flowing.join(timeout=300)
      assert not flowing.is_alive()
      predictions.until(len(events), 300)
      predictions.until(10**9, 5)  # duplicates, if any, keep coming
      state = result.state
    finally:
      result.cancel()
      predictions.close()
  finally:
    broker.stop()
  got = collections.Counter(p['event_id'] for p in predictions.items)
  assert set(got) == {eid for eid, _ in events}
  duplicates = sum(got.values()) - len(got)
  assert state == PipelineState.RUNNING
  print(f'broker outage {OUTAGE_S} s: {len(got)} of {len(events)} events predicted, '
        f'{duplicates} duplicates; job {state}')


def test_kafka_down_up_keeps_the_address(tmp_path, monkeypatch):
  from runners import kafka as kafka_runner
  monkeypatch.setattr(kafka_runner, 'RUN_DIR', tmp_path)
  monkeypatch.setattr(kafka_runner, 'STATE_FILE', tmp_path / 'kafka.json')
  first = kafka_runner.up(data_dir=tmp_path / 'data')
  try:
    kafka_runner.create_topic(first['bootstrap_servers'], 'kept', 1)
    kafka_runner.down()
    assert not kafka_runner.status()['running']
    again = kafka_runner.up()
    assert again['bootstrap_servers'] == first['bootstrap_servers']
    assert kafka_runner.answers(again['bootstrap_servers'])
    from kafka import KafkaConsumer
    consumer = KafkaConsumer(bootstrap_servers=again['bootstrap_servers'])
    assert 'kept' in consumer.topics()
    consumer.close()
  finally:
    kafka_runner.down()


def test_serve_outlives_the_runner_state_stream_deadline(
    kafka_bootstrap, kafka_topic, taxi_model, tmp_path):
  """Beam opens Prism's job-state stream with a deadline of
  --job_server_timeout (300 s by default); when it passed, the job used to
  die with it. Here the deadline is 10 s and the job keeps serving."""
  events_topic = kafka_topic(suffix='events')
  output = kafka_topic(suffix='predictions')
  events = replay.load_events(TAXI, 'data/taxi_trips.csv', split='eval',
                              limit=100)
  log = open(tmp_path / 'serve.log', 'w')
  job = subprocess.Popen(
      [sys.executable, '-m', 'pipelines.serve',
       '--bootstrap_servers', kafka_bootstrap, '--input_topic', events_topic,
       '--output_topic', output, '--model_dir', taxi_model,
       '--group_id', events_topic, '--runner', 'prism',
       '--job_server_timeout', '10', '--run_seconds', '60'],
      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  started = time.monotonic()
  predictions = TopicReader(kafka_bootstrap, output)
  try:
    replay.replay(TAXI, events[:50], events_topic, kafka_bootstrap)
    predictions.until(50, 120)
    # What is tested is time itself: send the rest once the 10 s deadline of
    # the state stream has passed.
    time.sleep(max(0.0, started + 15 - time.monotonic()))
    replay.replay(TAXI, events[50:], events_topic, kafka_bootstrap)
    predictions.until(len(events), 120)
    code = job.wait(timeout=180)  # --run_seconds, then a clean exit
  finally:
    if job.poll() is None:
      os.killpg(job.pid, signal.SIGKILL)
    predictions.close()
    log.close()
  assert code == 0, (tmp_path / 'serve.log').read_text()[-3000:]
  assert {p['event_id'] for p in predictions.items} == {
      eid for eid, _ in events}


def _serve(kafka_bootstrap, names, model_root, log, *extra):
  """``python -m pipelines.serve`` in its own process group (on Prism
  unless ``extra`` names a runner)."""
  return subprocess.Popen(
      [sys.executable, '-m', 'pipelines.serve',
       '--bootstrap_servers', kafka_bootstrap,
       '--input_topic', names['events'], '--output_topic', names['output'],
       '--dead_letter_topic', names['dlq'], '--model_dir', model_root,
       '--group_id', names['events'], '--runner', 'prism', *extra],
      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _runner_children(pid: int, name: bytes) -> list[int]:
  """Processes of the process group ``pid`` leads whose command line has
  ``name`` (b'prism', or b'flink' for the job server)."""
  found = []
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat') as f:
        fields = f.read().split(')')[-1].split()
      with open(f'/proc/{entry}/cmdline', 'rb') as f:
        cmdline = f.read()
    except OSError:
      continue
    if int(fields[2]) == pid and fields[0] != 'Z' and name in cmdline:
      found.append(int(entry))
  return found


@pytest.mark.parametrize('runner,delivery', [
    ('prism', 'at_least_once'), ('prism', 'exactly_once'),
    ('flink', 'at_least_once')])
def test_serve_killed_mid_stream_and_restarted_loses_nothing(
    kafka_bootstrap, kafka_topic, taxi_model, tmp_path, runner, delivery):
  """SIGKILL to serving's whole process group (the runner with it) while
  events flow, then a restart with the same group: every event is
  predicted; duplicates are counted (at-least-once) or none (exactly-once,
  read_committed)."""
  names = {'events': kafka_topic(partitions=2, suffix='events'),
           'output': kafka_topic(suffix='predictions'),
           'dlq': kafka_topic(suffix='dlq')}
  events = replay.load_events(TAXI, 'data/taxi_trips.csv', split='eval',
                              limit=600)
  extra = ['--runner', runner, '--delivery', delivery,
           # A killed job's open transaction is aborted after this.
           '--producer_config', json.dumps({'transaction_timeout_ms': 10000})
           if delivery == 'exactly_once' else '{}']
  if runner == 'flink':
    extra += ['--state_backend_storage_path', (tmp_path / 'ckpt').as_uri()]
  log = open(tmp_path / 'serve.log', 'w')
  predictions = TopicReader(kafka_bootstrap, names['output'],
                            isolation_level='read_committed')
  dead = TopicReader(kafka_bootstrap, names['dlq'],
                     isolation_level='read_committed')
  job = _serve(kafka_bootstrap, names, taxi_model, log, *extra)
  # A few bad messages among the events: dead letters are outputs too.
  bad = [m for m in poison.messages(TAXI, events[:5], 5, seed=SEED)
         if not m.good]
  _send(kafka_bootstrap, names['events'], bad)
  flowing = threading.Thread(target=replay.replay, args=(
      TAXI, events, names['events'], kafka_bootstrap), kwargs={'rate': 15})
  try:
    flowing.start()
    predictions.until(150, 300)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert len(predictions.items) < len(events)  # killed mid-stream
    job = _serve(kafka_bootstrap, names, taxi_model, log, *extra)
    flowing.join(timeout=120)
    predictions.until(len(events), 300)
    predictions.until(10**9, 15)  # duplicates, if any, keep coming
    dead.until(10**9, 5)
    running = job.poll() is None
  finally:
    leftover = _runner_children(job.pid, runner.encode())
    if job.poll() is None:
      os.killpg(job.pid, signal.SIGKILL)
      job.wait()
    predictions.close()
    dead.close()
    log.close()
  got = collections.Counter(p['event_id'] for p in predictions.items)
  letters = collections.Counter((d['partition'], d['offset'])
                                for d in dead.items)
  lost = {eid for eid, _ in events} - set(got)
  duplicates = sum(got.values()) - len(got)
  print(f'serve SIGKILL ({runner}, {delivery}): {len(got)} of {len(events)} '
        f'events predicted, {len(lost)} lost, {duplicates} duplicates')
  assert running, (tmp_path / 'serve.log').read_text()[-3000:]
  assert not lost
  assert leftover, f'the restarted job runs on {runner}'
  assert len(letters) == len(bad)
  if delivery == 'exactly_once':
    assert duplicates == 0
    assert sum(letters.values()) == len(bad)

