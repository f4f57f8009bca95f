"""Shared fixtures: a real Kafka broker for the integration tests.

``kafka_bootstrap`` uses ``$KAFKA_BOOTSTRAP_SERVERS`` when set (e.g. the
broker of ``make kafka-up``), else starts one single-node KRaft broker for the
whole test session (about 5 s; the jars are fetched once by Maven).
``kafka_topic`` creates uniquely named topics, so tests never share data.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from typing import Callable, Iterator

import pytest


@pytest.fixture(scope='session')
def kafka_bootstrap() -> Iterator[str]:
  """Bootstrap servers of a running broker, for the whole session."""
  existing = os.environ.get('KAFKA_BOOTSTRAP_SERVERS')
  if existing:
    yield existing
    return
  from runners.kafka import KafkaBroker
  with KafkaBroker() as broker:
    yield broker.bootstrap_servers
    # Clients of cancelled in-process pipelines retry the stopped broker and
    # would log a connection error every few ms until the process exits,
    # burying pytest's summary.
    logging.getLogger('kafka').setLevel(logging.CRITICAL)


@pytest.fixture
def kafka_topic(kafka_bootstrap: str,
                request: pytest.FixtureRequest) -> Callable[..., str]:
  """A factory: ``kafka_topic(partitions=1, suffix='')`` -> a new topic.

  Names are ``<test name>-<random>[-suffix]``, so a topic can be traced back
  to its test on a shared broker.
  """
  from runners.kafka import create_topic
  test = re.sub(r'[^a-zA-Z0-9._-]+', '-', request.node.name)[:120]

  def make(partitions: int = 1, suffix: str = '') -> str:
    name = f'{test}-{uuid.uuid4().hex[:8]}' + (f'-{suffix}' if suffix else '')
    create_topic(kafka_bootstrap, name, partitions,
                 config={'retention.ms': '-1'})
    return name

  return make


@pytest.fixture(scope='session')
def taxi_training(tmp_path_factory) -> dict:
  """A taxi model trained once per session (1 epoch) on the shipped data:
  ``{'out': output dir, 'metrics': what train.run returned}``. Read-only."""
  from pipelines import train
  out = str(tmp_path_factory.mktemp('taxi-model'))
  metrics = train.run(['--input', 'data/taxi_trips.csv', '--output_dir', out,
                       '--epochs', '1'])
  return {'out': out, 'metrics': metrics}


@pytest.fixture(scope='session')
def taxi_model(taxi_training) -> str:
  """The model root (``<integer>/`` versions) of ``taxi_training``.
  Read-only: copy it to add versions."""
  return os.path.join(taxi_training['out'], 'model')


def pytest_sessionfinish(session, exitstatus):
  """Beam stops its Prism servers at interpreter exit with a WARNING each
  ("Really destroying service"); they would print after pytest's summary."""
  logging.getLogger('apache_beam.utils.subprocess_server').setLevel(
      logging.ERROR)


def pytest_collection_modifyitems(config, items):
  """A test that uses the broker is an integration test (`make test-unit`
  leaves it out)."""
  for item in items:
    if {'kafka_bootstrap', 'kafka_topic', 'bootstrap', 'taxi_model',
        'taxi_training'} & set(
        getattr(item, 'fixturenames', ())):
      item.add_marker(pytest.mark.integration)
