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
* High availability: a standalone Flink cluster of two TaskManagers loses
  one mid-stream (SIGKILL); serving and windowed analytics restart from
  their last checkpoint on the other, losing nothing.
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
from tests.conditions import wait_for
from tests.taxi import TAXI
from tests.topics import every, TopicReader
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
      predictions.until(10**9, 300, every(eid for eid, _ in events))
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
       '--job_server_timeout', '10', '--run_seconds', '40'],
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
      TAXI, events, names['events'], kafka_bootstrap), kwargs={'rate': 30})
  try:
    flowing.start()
    predictions.until(150, 300)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert len(predictions.items) < len(events)  # killed mid-stream
    job = _serve(kafka_bootstrap, names, taxi_model, log, *extra)
    flowing.join(timeout=120)
    predictions.until(10**9, 300, every(eid for eid, _ in events))
    predictions.until(10**9, 5)  # duplicates, if any, keep coming
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
    # The runner fused the transactional writes with the read (the writer
    # logs when it did not).
    assert 'exactly-once is not guaranteed' not in (
        tmp_path / 'serve.log').read_text()
    assert duplicates == 0
    assert sum(letters.values()) == len(bad)


def _running_flink_jobs(cluster, n: int) -> list[str]:
  """The ids of the cluster's running jobs, once there are ``n``."""

  def running():
    jobs = (cluster.rest('/jobs/overview') or {}).get('jobs', [])
    ids = [j['jid'] for j in jobs if j['state'] == 'RUNNING']
    return ids if len(ids) >= n else None

  return wait_for(running, 300, f'{n} running Flink jobs')


def _job_taskmanagers(cluster, job_id: str) -> set[str]:
  """The TaskManagers (ids) that run subtasks of the job."""
  found = set()
  for vertex in (cluster.rest(f'/jobs/{job_id}') or {}).get('vertices', []):
    listing = cluster.rest(f'/jobs/{job_id}/vertices/{vertex["id"]}'
                           '/taskmanagers') or {}
    found.update(tm['taskmanager-id'] for tm in listing.get('taskmanagers',
                                                           []))
  return found


def _checkpoints(cluster, job_id: str) -> dict:
  return cluster.rest(f'/jobs/{job_id}/checkpoints') or {}


def _kill_group(job: subprocess.Popen) -> None:
  if job.poll() is None:
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def _send_live(bootstrap: str, topic: str, events, rate: float,
               sent: list) -> None:
  """Sends the events at ``rate``/s, each stamped with the time it is sent
  (a live stream: the event happens now); appends each id to ``sent``."""
  producer = KafkaProducer(bootstrap_servers=bootstrap, acks='all',
                           linger_ms=5)
  started = time.monotonic()
  for i, (eid, event) in enumerate(events):
    time.sleep(max(0.0, started + i / rate - time.monotonic()))  # the pace
    event = {**event, TAXI.event_time.field: int(time.time())}
    producer.send(topic, key=eid.encode(), value=json.dumps(event).encode())
    sent.append(eid)
  producer.flush()
  producer.close()


def _analytics_topics(kafka_topic, partitions: int) -> dict[str, str]:
  return {'events': kafka_topic(partitions=partitions, suffix='events'),
          **{name: kafka_topic(suffix=name)
             for name in ('stats', 'late', 'alerts', 'dlq')}}


def _analytics(kafka_bootstrap, names, tmp_path, log, *extra):
  """``python -m pipelines.analytics`` on Flink in its own process group:
  10 s windows closing at the watermark, accumulating panes, checkpoints
  every 5 s into ``tmp_path/ckpt``."""
  return subprocess.Popen(
      [sys.executable, '-m', 'pipelines.analytics',
       '--bootstrap_servers', kafka_bootstrap,
       '--input_topic', names['events'], '--output_topic', names['stats'],
       '--late_topic', names['late'], '--dead_letter_topic', names['dlq'],
       '--alerts_topic', names['alerts'], '--group_id', names['events'],
       '--runner', 'flink', '--checkpointing_interval', '5000',
       '--state_backend_storage_path', (tmp_path / 'ckpt').as_uri(),
       '--window', 'fixed', '--size', '10', '--allowed_lateness', '0',
       '--accumulation', 'accumulating',
       # A live stream sent in order: windows close 5 s after their end,
       # and 5 s after the stream stops (not 60 s).
       '--max_out_of_orderness', '5', '--idle_timeout_s', '5', *extra],
      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _counted(rows) -> int:
  """Events in the newest pane of every (key, window): accumulating panes,
  so a pane fired again after a restore is not counted twice."""
  newest = {}
  for row in rows:
    if row.get('type') != 'window_stats':
      continue
    window = (row['key'], row['window_start_s'])
    if row['pane_index'] >= newest.get(window, (-1, 0))[0]:
      newest[window] = (row['pane_index'], row['count'])
  return sum(count for _, count in newest.values())


def _until_counted(stats: TopicReader, late: TopicReader, n: int,
                   timeout_s: float) -> int:
  """Reads stats and late rows until ``n`` events are accounted for (or the
  timeout), then a while longer for re-fired panes; returns the count."""
  deadline = time.monotonic() + timeout_s
  while (_counted(stats.items) + len(late.items) < n
         and time.monotonic() < deadline):
    stats.until(10**9, 5)
    late.until(10**9, 1)
  stats.until(10**9, 5)  # a pane fired again would show up now
  return _counted(stats.items) + len(late.items)


def test_analytics_on_flink_killed_and_restored_from_its_checkpoint(
    kafka_bootstrap, kafka_topic, tmp_path):
  """Windowed analytics on embedded Flink, its whole process group
  SIGKILLed mid-stream with windows open, started again with
  ``--savepoint_path latest``: the windows' contents come back from the
  newest complete checkpoint and every event is counted once."""
  from runners.flink import checkpoints
  names = _analytics_topics(kafka_topic, partitions=2)
  events = replay.load_events(TAXI, 'data/taxi_trips.csv', split='eval',
                              limit=300)
  log = open(tmp_path / 'analytics.log', 'w')
  stats = TopicReader(kafka_bootstrap, names['stats'])
  late = TopicReader(kafka_bootstrap, names['late'])
  storage = (tmp_path / 'ckpt').as_uri()
  job = _analytics(kafka_bootstrap, names, tmp_path, log)
  sent = []
  flowing = threading.Thread(target=_send_live, args=(
      kafka_bootstrap, names['events'], events, 20, sent))
  try:
    # Events flow once the job runs (its first checkpoint), so that the
    # kill, at half of them, is mid-stream however long Flink took to start.
    wait_for(lambda: checkpoints.latest_checkpoint(storage), 300,
              'the first checkpoint', 0.5)
    flowing.start()
    wait_for(lambda: len(sent) >= 150, 60, '150 events sent', 0.2)
    _kill_group(job)
    sent_at_kill = len(sent)
    before = _counted(stats.until(10**9, 2)) + len(late.items)
    job = _analytics(kafka_bootstrap, names, tmp_path, log,
                     '--savepoint_path', 'latest')
    flowing.join(timeout=120)
    total = _until_counted(stats, late, len(events), 240)
    running = job.poll() is None
  finally:
    _kill_group(job)
    stats.close()
    late.close()
    log.close()
  print(f'analytics on Flink, SIGKILL and --savepoint_path latest: '
        f'{sent_at_kill} sent and {before} counted at the kill, {total} of '
        f'{len(events)} counted after the restore')
  output = (tmp_path / 'analytics.log').read_text()
  assert running, output[-3000:]
  assert sent_at_kill < len(events)  # killed mid-stream
  assert 'Restoring the job from its newest checkpoint' in output
  assert total == len(events)


def test_flink_cluster_loses_a_taskmanager_and_its_jobs_lose_nothing(
    kafka_bootstrap, kafka_topic, taxi_model, tmp_path):
  """High availability: a standalone Flink cluster of two TaskManagers runs
  serving and windowed analytics, each with parallelism 2 over a 4-partition
  topic; one TaskManager is SIGKILLed mid-stream. Flink restarts both jobs
  from their last checkpoints on the other TaskManager: every event
  predicted (duplicates counted), every event counted once in its window,
  both jobs running, the restores visible in Flink's checkpoint statistics.
  """
  from runners import flink
  serving = {'events': kafka_topic(partitions=4, suffix='events'),
             'output': kafka_topic(suffix='predictions'),
             'dlq': kafka_topic(suffix='dlq')}
  analyzing = _analytics_topics(kafka_topic, partitions=4)
  trips = replay.load_events(TAXI, 'data/taxi_trips.csv', split='eval',
                             limit=400)
  log = open(tmp_path / 'jobs.log', 'w')
  predictions = TopicReader(kafka_bootstrap, serving['output'])
  stats = TopicReader(kafka_bootstrap, analyzing['stats'])
  late = TopicReader(kafka_bootstrap, analyzing['late'])
  on_cluster = ['--parallelism', '2']
  # Four slots each: the survivor can take both jobs' four subtasks.
  with flink.FlinkCluster(taskmanagers=2, slots=4) as cluster:
    on_cluster += ['--flink_master', cluster.address]
    jobs = [
        _serve(kafka_bootstrap, serving, taxi_model, log, '--runner',
               'flink', '--checkpointing_interval', '5000',
               '--state_backend_storage_path',
               (tmp_path / 'serve-ckpt').as_uri(), *on_cluster),
        _analytics(kafka_bootstrap, analyzing, tmp_path, log, *on_cluster)]
    sent = []
    flows = [
        threading.Thread(target=replay.replay, args=(
            TAXI, trips, serving['events'], kafka_bootstrap),
                         kwargs={'rate': 20}),
        threading.Thread(target=_send_live, args=(
            kafka_bootstrap, analyzing['events'], trips[:300], 20, sent))]
    try:
      job_ids = _running_flink_jobs(cluster, 2)
      # Events flow once both jobs checkpoint, so that the kill, after 100
      # predictions, is mid-stream however long the jobs took to start.
      for job_id in job_ids:
        wait_for(lambda: _checkpoints(cluster, job_id).get('counts', {}).get(
            'completed'), 120, 'completed checkpoint')
      for flow in flows:
        flow.start()
      predictions.until(100, 300)
      wait_for(lambda: len(sent) >= 100, 60, '100 events sent', 0.2)
      # Each job's subtasks on both machines: losing one hits both jobs.
      for job_id in job_ids:
        assert _job_taskmanagers(cluster, job_id) == {
            'taskmanager', 'taskmanager-2'}, job_id
      sent_at_kill = len(sent)
      cluster.kill_taskmanager('taskmanager-2')
      restored = [wait_for(lambda: (_checkpoints(cluster, job_id).get(
          'latest') or {}).get('restored'), 180, 'restore from a checkpoint')
                  for job_id in job_ids]
      for flow in flows:
        flow.join(timeout=120)
      predictions.until(10**9, 300, every(eid for eid, _ in trips))
      predictions.until(10**9, 5)  # duplicates, if any, keep coming
      counted = _until_counted(stats, late, 300, 120)
      states = [(cluster.rest(f'/jobs/{j}') or {}).get('state')
                for j in job_ids]
      running = [job.poll() is None for job in jobs]
    finally:
      for job in jobs:
        _kill_group(job)
      for reader in (predictions, stats, late):
        reader.close()
      log.close()
  got = collections.Counter(p['event_id'] for p in predictions.items)
  lost = {eid for eid, _ in trips} - set(got)
  duplicates = sum(got.values()) - len(got)
  print(f'Flink HA (2 TaskManagers, one SIGKILLed; jobs restored from '
        f'checkpoints {[r.get("id") for r in restored]}): serving '
        f'{len(got)} of {len(trips)} events predicted, {len(lost)} lost, '
        f'{duplicates} duplicates; analytics {counted} of 300 counted '
        f'({sent_at_kill} sent at the kill); jobs {states}')
  assert all(running), (tmp_path / 'jobs.log').read_text()[-3000:]
  assert states == ['RUNNING', 'RUNNING']
  assert 'StopIteration' not in (tmp_path / 'jobs.log').read_text()
  assert sent_at_kill < 300  # killed mid-stream
  assert not lost
  assert counted == 300
