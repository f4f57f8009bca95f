"""Tests of pipelines.replay: event building alone, then against the broker."""

from __future__ import annotations

import io
import json
import os
import time

from kafka import KafkaConsumer

from tools import replay
from transforms import records
from tests.taxi import TAXI
EVENT_TIME_KEY = TAXI.event_time.field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAXI_CSV = os.path.join(REPO, 'data', 'taxi_trips.csv')


def test_events_have_stable_ids_and_the_csv_values(tmp_path):
  csv = tmp_path / 'few.csv'
  rows = list(records.read_csv(TAXI, TAXI_CSV))[:3]
  header = list(rows[0])
  csv.write_text(','.join(header) + '\n' + ''.join(
      ','.join(r[h] for h in header) + '\n' for r in rows))
  events = replay.load_events(TAXI, str(csv))
  assert [eid for eid, _ in events] == ['few-2', 'few-3', 'few-4']
  for (eid, event), row in zip(events, rows):
    assert event == {**records.csv_row_to_event(TAXI, row), 'event_id': eid}
  assert replay.event_time_ms(TAXI, events[0][1]) == (
      int(rows[0][EVENT_TIME_KEY]) * 1000)


def test_event_time_order_limit_and_split_agree_with_training():
  everything = replay.load_events(TAXI, TAXI_CSV, limit=500)
  ordered = replay.load_events(TAXI, TAXI_CSV, order='event_time', limit=50)
  times = [e[EVENT_TIME_KEY] for _, e in ordered]
  assert times == sorted(times) and len(ordered) == 50
  train = replay.load_events(TAXI, TAXI_CSV, split='train', eval_percent=20)
  evals = replay.load_events(TAXI, TAXI_CSV, split='eval', eval_percent=20)
  assert len(train) + len(evals) == len(replay.load_events(TAXI, TAXI_CSV))
  assert not {i for i, _ in train} & {i for i, _ in evals}
  by_id = dict(everything)
  for eid, event in evals[:20]:
    if eid in by_id:
      assert by_id[eid] == event
  rows = {replay.event_id(TAXI_CSV, n): row
          for n, row in enumerate(records.read_csv(TAXI, TAXI_CSV), start=2)}
  assert all(records.is_eval(records.record_key(TAXI, rows[eid]), 20)
             for eid, _ in evals)


def test_replay_produces_keyed_json_with_event_time_timestamps(
    kafka_bootstrap, kafka_topic):
  topic = kafka_topic(partitions=2)
  events = replay.load_events(TAXI, TAXI_CSV, limit=200)
  assert replay.replay(TAXI, events, topic, kafka_bootstrap) == 200
  consumer = KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap,
                           auto_offset_reset='earliest',
                           enable_auto_commit=False,
                           consumer_timeout_ms=3000)
  got = {m.key.decode(): m for m in consumer}
  consumer.close()
  assert set(got) == {eid for eid, _ in events}
  for eid, event in events:
    message = got[eid]
    assert json.loads(message.value) == event
    assert json.loads(message.value)['event_id'] == eid
    assert message.timestamp == event[EVENT_TIME_KEY] * 1000


def test_replay_keeps_to_the_requested_rate(kafka_bootstrap, kafka_topic):
  topic = kafka_topic()
  events = replay.load_events(TAXI, TAXI_CSV, limit=40)
  progress = io.StringIO()
  start = time.monotonic()
  replay.replay(TAXI, events, topic, kafka_bootstrap, rate=50, progress=progress)
  elapsed = time.monotonic() - start
  assert 0.75 <= elapsed < 5, elapsed  # 40 events at 50/s: ~0.8 s
  assert '40/40 events' in progress.getvalue()
  assert 'events/s' in progress.getvalue().splitlines()[-1]


def test_command_line_creates_the_topic_and_reports(kafka_bootstrap, capsys):
  topic = f'replay-cli-{time.time_ns()}'
  code = replay.main(['--input', TAXI_CSV, '--topic', topic,
                      '--bootstrap_servers', kafka_bootstrap,
                      '--split', 'eval', '--limit', '25', '--partitions', '3',
                      '--order', 'event_time'])
  assert code == 0
  assert '25 events' in capsys.readouterr().err
  consumer = KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap,
                           auto_offset_reset='earliest',
                           enable_auto_commit=False,
                           consumer_timeout_ms=3000)
  messages = list(consumer)
  partitions = consumer.partitions_for_topic(topic)
  consumer.close()
  assert len(messages) == 25 and partitions == {0, 1, 2}
