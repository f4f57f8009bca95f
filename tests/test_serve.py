"""The serving pipeline against the real broker, on the embedded runner.

One pipeline run, three phases:
  1. version 1 serves held-out taxi events, and malformed events go to the
     dead-letter topic while the pipeline keeps running;
  2. version 2 is trained and exported while events flow: predictions switch
     to it, none lost;
  3. a corrupt version 3 appears: it is rejected and version 2 keeps serving.
Then: exactly one prediction per good event, each stamped with a model
version, equal to batch predictions of that SavedModel on the same raw rows.
"""

import json
import logging
import os
import shutil
import threading
import time
import uuid

import numpy as np
import pytest
from kafka import KafkaProducer

from models import export
from models import serving
from tools import replay
from pipelines import serve
from pipelines import train
from runners import kafka as kafka_runner
from tests.topics import TopicReader
from transforms import kafka_io
from transforms import records as R
from tests.taxi import TAXI

# Trains models and/or starts runner services.
pytestmark = pytest.mark.integration

BAD_EVENTS = [
    b'{"fare": 12.5, not json',                                    # bad JSON
    b'\x00\x9f\xff garbage \xfe',                                  # binary
    json.dumps({'fare': 'twelve'}).encode(),                       # wrong type
    json.dumps({'payment_type': 'Cash'}).encode(),                 # missing
    json.dumps([1, 2, 3]).encode(),                                # not object
]
PHASE_SIZES = (120, 100, 60)
# Phase 2 lasts until version 2 is seen serving; at most this many events.
PHASE2_MAX = 400


class RejectedVersions(logging.Handler):
  """Versions the in-process workers' model watcher rejected (its log)."""

  def __init__(self):
    super().__init__(logging.ERROR)
    self.versions = set()

  def emit(self, record):
    if isinstance(record.msg, str) and record.msg.startswith(
        'Model version %d rejected'):
      self.versions.add(record.args[0])

  def until(self, version: int, timeout_s: float) -> set:
    deadline = time.monotonic() + timeout_s
    while version not in self.versions and time.monotonic() < deadline:
      time.sleep(0.2)
    return self.versions


@pytest.fixture(scope='module')
def scenario(tmp_path_factory, kafka_bootstrap, taxi_model):
  # The session's trained model, copied: this test adds versions.
  out = str(tmp_path_factory.mktemp('serve') / 'train')
  shutil.copytree(os.path.dirname(taxi_model), out)
  model_root = os.path.join(out, 'model')
  suffix = uuid.uuid4().hex[:8]
  topics = {name: f'{name}-{suffix}'
            for name in ('trips', 'predictions', 'dlq')}
  kafka_runner.create_topic(kafka_bootstrap, topics['trips'], partitions=2)
  kafka_runner.create_topic(kafka_bootstrap, topics['predictions'])
  kafka_runner.create_topic(kafka_bootstrap, topics['dlq'])

  events = replay.load_events(TAXI, 'data/taxi_trips.csv', split='eval',
                              limit=PHASE_SIZES[0] + PHASE2_MAX +
                              PHASE_SIZES[2])
  phases = [events[:PHASE_SIZES[0]],
            events[PHASE_SIZES[0]:PHASE_SIZES[0] + PHASE2_MAX],
            events[-PHASE_SIZES[2]:]]
  result = serve.start([
      '--bootstrap_servers', kafka_bootstrap,
      '--input_topic', topics['trips'],
      '--output_topic', topics['predictions'],
      '--dead_letter_topic', topics['dlq'],
      '--model_dir', model_root, '--model_poll_secs', '0.5',
      '--group_id', f'serve-{suffix}', '--runner', 'prism'])
  predictions = TopicReader(kafka_bootstrap, topics['predictions'])
  dead_letters = TopicReader(kafka_bootstrap, topics['dlq'])
  try:
    # Phase 1: version 1, with malformed events in the middle.
    half = len(phases[0]) // 2
    replay.replay(TAXI, phases[0][:half], topics['trips'], kafka_bootstrap)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for i, value in enumerate(BAD_EVENTS):
      producer.send(topics['trips'], key=f'bad-{i}'.encode(), value=value)
    producer.flush()
    producer.close()
    replay.replay(TAXI, phases[0][half:], topics['trips'], kafka_bootstrap)
    predictions.until(PHASE_SIZES[0], 180)
    dead_letters.until(len(BAD_EVENTS), 60)

    # Phase 2: events flow (6/s) while version 2 is trained and exported,
    # and until a prediction by version 2 has been seen.
    stop = threading.Event()
    sent = []

    def flow():
      producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
      for eid, event in phases[1]:
        if stop.is_set():
          break
        producer.send(topics['trips'], key=eid.encode(),
                      value=json.dumps(event).encode()).get(timeout=30)
        sent.append((eid, event))
        time.sleep(1 / 6)
      producer.close()

    flowing = threading.Thread(target=flow)
    flowing.start()
    train.train_and_export(TAXI, out, epochs=1, verbose=0)
    predictions.until(10**9, 180, done=lambda items: any(
        p['model_version'] == 2 for p in items))
    stop.set()
    flowing.join()
    phases[1] = sent
    predictions.until(PHASE_SIZES[0] + len(sent), 120)

    # Phase 3: a corrupt version 3; version 2 must keep serving.
    corrupt = os.path.join(model_root, '3')
    os.makedirs(os.path.join(corrupt, 'variables'))
    rejected = RejectedVersions()
    logging.getLogger().addHandler(rejected)
    try:
      with open(os.path.join(corrupt, 'saved_model.pb'), 'wb') as f:
        f.write(b'this is not a SavedModel')
      # The worker's watcher (in this process: LOOPBACK) rejects it.
      rejected.until(3, 60)
    finally:
      logging.getLogger().removeHandler(rejected)
    replay.replay(TAXI, phases[2], topics['trips'], kafka_bootstrap)
    total = sum(len(phase) for phase in phases)
    predictions.until(total, 120)
    # Anything more would be a duplicate or a stray: give it a moment.
    predictions.until(total + 1, 3)
  finally:
    result.cancel()
    predictions.close()
    dead_letters.close()
  return {'model_root': model_root, 'phases': phases,
          'rejected': rejected.versions,
          'predictions': predictions.items,
          'dead_letters': dead_letters.items}


def test_exactly_one_prediction_per_event_with_a_model_version(scenario):
  sent = [eid for phase in scenario['phases'] for eid, _ in phase]
  got = [p['event_id'] for p in scenario['predictions']]
  assert len(got) == len(sent)
  assert sorted(got) == sorted(sent)
  for p in scenario['predictions']:
    assert p['model_version'] in (1, 2)
    assert 0.0 <= p['probability'] <= 1.0
    assert p['class'] == int(p['probability'] >= 0.5)
    assert p['label'] in (0, 1)  # held-out events carry tips
    assert p['ingest_ms'] <= p['predicted_ms']


def test_bad_events_are_dead_lettered_with_reasons(scenario):
  dead = scenario['dead_letters']
  assert len(dead) == len(BAD_EVENTS)
  assert sorted(d['key'] for d in dead) == sorted(
      f'bad-{i}' for i in range(len(BAD_EVENTS)))
  for d in dead:
    assert d['errors'] and all(e['reason'] for e in d['errors'])
    assert kafka_io.original_bytes(d)  # the original bytes are kept
  reasons = {d['key']: d['errors'][0]['reason'] for d in dead}
  assert reasons['bad-0'].startswith('not JSON')
  assert reasons['bad-4'] == 'expected an object'


def test_hot_swap_to_v2_and_corrupt_v3_rejected(scenario):
  by_id = {p['event_id']: p['model_version'] for p in scenario['predictions']}
  phase1, phase2, phase3 = scenario['phases']
  assert {by_id[eid] for eid, _ in phase1} == {1}
  # The switch happened while events were flowing (before the pool of phase
  # 2 events ran out).
  assert {by_id[eid] for eid, _ in phase2} == {1, 2}
  assert len(phase2) < PHASE2_MAX
  assert {by_id[eid] for eid, _ in phase3} == {2}
  assert export.list_versions(scenario['model_root']) == [1, 2, 3]
  # Rejected by the running pipeline's watcher, not merely never looked at.
  assert 3 in scenario['rejected']
  assert serving.newest_valid_version(TAXI, scenario['model_root']) == 2


def test_streaming_predictions_equal_batch_predictions(scenario):
  events = {eid: e for phase in scenario['phases'] for eid, e in phase}
  for version in (1, 2):
    served = [p for p in scenario['predictions']
              if p['model_version'] == version]
    assert served, f'no prediction from version {version}'
    model = serving.load(os.path.join(scenario['model_root'], str(version)))
    batch = serving.predict(TAXI, 
        model, [R.parse_json(TAXI, events[p['event_id']]) for p in served])
    np.testing.assert_allclose(
        [p['probability'] for p in served], batch[export.PROBABILITY],
        atol=1e-6)

