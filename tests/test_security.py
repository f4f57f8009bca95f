"""TLS and SASL/SCRAM end to end, against our own broker.

One broker (``runners.kafka.KafkaBroker(security=...)``) listens with TLS
(``SSL``) and with TLS + SCRAM-SHA-256 (``SASL_SSL``), with certificates this
module makes (``tests/certs.py``) and random passwords. Through each listener
a Beam pipeline of the project's connector (``ReadFromKafka`` bounded read ->
``WriteToKafka``, on the DirectRunner like ``test_kafka_io.py``) copies a
topic, configured only by ``--consumer_config`` / ``--producer_config`` flags
whose password is an ``env:NAME`` reference; the copy must be exact. Then:

* no secret (the SCRAM password, the keystore password) is in anything the
  job wrote: its options, its graph (``Pipeline.to_runner_api``; pickled
  transforms are base64 of bz2 there, so such runs are unpacked first),
  every log record at DEBUG (caplog and a log file; kafka-python's admin
  client logs its settings there, which ``runners.kafka`` masks), the
  temporary files made during the run, nor the broker's own logs. A control
  builds the same job with the literal password and checks that this scan
  finds it;
* a wrong password and a client that does not trust the CA are refused
  within the client's own bootstrap timeout, the reason logged;
* the truststore made for Java clients holds the CA.

    python -m pytest tests/test_security.py -x -q
"""

from __future__ import annotations

import base64
import bz2
import dataclasses
import json
import logging
import pathlib
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import zlib
from typing import Any, Iterator

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from kafka import KafkaConsumer
from kafka.errors import KafkaTimeoutError

from runners.kafka import BrokerSecurity, KafkaBroker, create_topic
from tests.certs import make_certs
from tests.topics import consume_all, produce
from transforms import kafka_io
from transforms.kafka_io.clients import resolve_secrets

pytestmark = pytest.mark.integration

USER = 'rtml-alice'
PASSWORD_ENV = 'RTML_TEST_KAFKA_PASSWORD'
RECORDS = 40


@dataclasses.dataclass
class SecureBroker:
  broker: KafkaBroker
  ca_pem: str
  truststore: pathlib.Path
  # Left out of repr: pytest prints fixtures of a failing test.
  password: str = dataclasses.field(repr=False)  # USER's SCRAM password
  keystore_password: str = dataclasses.field(repr=False)

  def client_config(self, protocol: str) -> dict[str, Any]:
    """kafka-python settings of a listener, the password as a reference."""
    config = {'security_protocol': protocol, 'ssl_cafile': self.ca_pem}
    if protocol == 'SASL_SSL':
      config.update(sasl_mechanism='SCRAM-SHA-256', sasl_plain_username=USER,
                    sasl_plain_password=f'env:{PASSWORD_ENV}')
    return config

  def servers(self, protocol: str) -> str:
    return {'SSL': self.broker.ssl_bootstrap_servers,
            'SASL_SSL': self.broker.sasl_ssl_bootstrap_servers}[protocol]


@pytest.fixture(scope='module')
def secure(tmp_path_factory) -> Iterator[SecureBroker]:
  keystore_password = secrets.token_urlsafe(16)
  password = secrets.token_urlsafe(16)
  certs = make_certs(tmp_path_factory.mktemp('certs'), keystore_password)
  security = BrokerSecurity(certs.keystore, keystore_password,
                            scram_users={USER: password})
  with KafkaBroker(security=security) as broker:
    yield SecureBroker(broker, str(certs.ca_pem), certs.truststore, password,
                       keystore_password)


def _copy_job(servers: str, source: str, sink: str,
              flags: list[str]) -> beam.Pipeline:
  """The job under test: its Kafka settings come from flags only, as in the
  project's pipelines."""
  options = PipelineOptions(['--runner=DirectRunner', *flags])
  kafka = options.view_as(kafka_io.KafkaOptions)
  p = beam.Pipeline(options=options)
  _ = (p
       | 'Read' >> kafka_io.ReadFromKafka(
           servers, source, bounded=True, consumer_config=kafka.consumer_config)
       | 'KeyValue' >> beam.Map(lambda r: (r.key, r.value))
       | 'Write' >> kafka_io.WriteToKafka(
           servers, sink, producer_config=kafka.producer_config))
  return p


def _job_files(p: beam.Pipeline, directory: pathlib.Path) -> None:
  """Writes what a runner is handed: the options and the graph."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'options.json').write_text(
      json.dumps(p.options.get_all_options(drop_default=True)))
  (directory / 'pipeline.pb').write_bytes(
      p.to_runner_api().SerializeToString())


_BASE64_RUN = re.compile(rb'[A-Za-z0-9+/]{32,}={0,2}')


def _unpacked(blob: bytes, depth: int = 2) -> list[bytes]:
  """``blob`` and what it hides: its base64 runs decoded (at each of the 4
  alignments, in case a length byte before a run looks like base64), and
  those decompressed when bz2 or zlib. Beam stores each pickled transform in
  the graph as base64 of a bz2 stream."""
  found = [blob]
  if depth == 0:
    return found
  for match in _BASE64_RUN.finditer(blob):
    for skip in range(4):
      run = match.group().rstrip(b'=')[skip:]
      data = base64.b64decode(run[:len(run) // 4 * 4])
      found.append(data)
      for unpack in (lambda: bz2.BZ2Decompressor().decompress(data),
                     lambda: zlib.decompressobj().decompress(data)):
        try:
          found.extend(_unpacked(unpack(), depth - 1))
        except (OSError, zlib.error):
          pass
  return found


def _leaks(secret: str, blobs: dict[str, bytes]) -> list[str]:
  """The names of the ``blobs`` holding ``secret``, plain or packed."""
  return [name for name, blob in blobs.items()
          if any(secret.encode() in b for b in _unpacked(blob))]


def _files(directory: pathlib.Path) -> dict[str, bytes]:
  return {str(f): f.read_bytes() for f in directory.rglob('*') if f.is_file()}


@pytest.mark.parametrize('protocol', ['SSL', 'SASL_SSL'])
def test_connector_copies_a_topic_over_tls_and_scram_leaking_no_secret(
    secure, protocol, tmp_path, monkeypatch, caplog):
  monkeypatch.setenv(PASSWORD_ENV, secure.password)
  # Everything the run writes to temporary files lands in the scanned dir.
  job_dir = tmp_path / 'job'
  (job_dir / 'tmp').mkdir(parents=True)
  monkeypatch.setenv('TMPDIR', str(job_dir / 'tmp'))
  monkeypatch.setattr(tempfile, 'tempdir', str(job_dir / 'tmp'))
  caplog.set_level(logging.DEBUG)
  log_file = logging.FileHandler(job_dir / 'job.log')
  log_file.setLevel(logging.DEBUG)
  logging.getLogger().addHandler(log_file)

  servers = secure.servers(protocol)
  config = secure.client_config(protocol)
  resolved = resolve_secrets(config)  # the test's own clients
  assert resolved['ssl_cafile'] == secure.ca_pem
  source, sink = f'secure-{protocol}-in', f'secure-{protocol}-out'
  create_topic(servers, source, partitions=2, client_config=resolved)
  create_topic(servers, sink, client_config=resolved)
  sent = [(b'k%d' % i, json.dumps({'i': i, 'pad': 'x' * i}).encode())
          for i in range(RECORDS)]
  produce(servers, source, sent, **resolved)

  flags = ['--consumer_config', json.dumps(config),
           '--producer_config', json.dumps(config)]
  try:
    p = _copy_job(servers, source, sink, flags)
    _job_files(p, job_dir)
    p.run().wait_until_finish()
  finally:
    logging.getLogger().removeHandler(log_file)
    log_file.close()

  got = [(m.key, m.value) for m in
         consume_all(servers, sink, expected=RECORDS, **resolved)]
  assert sorted(got) == sorted(sent)

  # The scan: job files, temporary files, every log record, broker logs.
  written = _files(job_dir)
  assert {'options.json', 'pipeline.pb', 'job.log'} <= {
      pathlib.Path(f).name for f in written}
  if protocol == 'SASL_SSL':  # the job carries the reference
    assert f'env:{PASSWORD_ENV}'.encode() in written[
        str(job_dir / 'options.json')]
  logs = {'caplog': '\n'.join(
      f'{r.getMessage()} {r.exc_text or ""}'
      for r in caplog.records).encode()}
  assert len(caplog.records) > 10  # DEBUG records were captured
  broker_logs = {name: (secure.broker.data_dir / name).read_bytes()
                 for name in ('broker.log', 'broker.out')
                 if (secure.broker.data_dir / name).exists()}
  assert broker_logs
  for secret in (secure.password, secure.keystore_password):
    assert _leaks(secret, {**written, **logs, **broker_logs}) == []

  # The control: the same job with the literal password is caught.
  literal = dict(config, sasl_plain_password=secure.password)
  leaky = _copy_job(servers, source, sink,
                    ['--consumer_config', json.dumps(literal)])
  _job_files(leaky, tmp_path / 'leaky')
  assert sorted(pathlib.Path(f).name
                for f in _leaks(secure.password,
                                _files(tmp_path / 'leaky'))) == [
                                    'options.json', 'pipeline.pb']


def _broker_log_count(secure: SecureBroker, text: str) -> int:
  return secure.broker.log_file.read_text(errors='replace').count(text)


@pytest.mark.parametrize('refused', ['wrong password', 'untrusted broker'])
def test_bad_credentials_are_refused_within_the_client_timeout(
    secure, refused, caplog):
  """kafka-python 3.0.12 reports either as a bootstrap timeout (bounded by
  ``bootstrap_timeout_ms``), not as an authentication error; it must not
  hang. Why it failed is in the broker's log (a wrong password: the client
  logs it too, except when the broker closes the socket first) or in the
  client's (a certificate it does not trust)."""
  caplog.set_level(logging.WARNING, logger='kafka')
  protocol = 'SASL_SSL'
  good = resolve_secrets(dict(secure.client_config(protocol),
                              sasl_plain_password=secure.password))
  if refused == 'wrong password':
    config = dict(good, sasl_plain_password='not-' + secure.password)
  else:  # the right password, but the CA is not given
    config = {k: v for k, v in good.items() if k != 'ssl_cafile'}
  # The broker's line: "Failed authentication with /127.0.0.1 (...)
  # (Authentication failed during authentication due to invalid credentials
  # with SASL mechanism SCRAM-SHA-256)".
  refused_log = 'invalid credentials with SASL mechanism SCRAM-SHA-256'
  refusals = _broker_log_count(secure, refused_log)
  start = time.monotonic()
  with pytest.raises(KafkaTimeoutError, match='Unable to bootstrap'):
    KafkaConsumer(bootstrap_servers=secure.servers(protocol),
                  bootstrap_timeout_ms=3000, request_timeout_ms=3000,
                  **config)
  assert time.monotonic() - start < 15
  if refused == 'wrong password':
    deadline = time.monotonic() + 5  # the broker's log is written async
    while (_broker_log_count(secure, refused_log) == refusals and
           time.monotonic() < deadline):
      time.sleep(0.1)
    assert _broker_log_count(secure, refused_log) > refusals
  else:
    assert 'CERTIFICATE_VERIFY_FAILED' in caplog.text
  # The right settings get in through the same listener.
  consumer = KafkaConsumer(bootstrap_servers=secure.servers(protocol),
                           bootstrap_timeout_ms=10000, **good)
  try:
    assert isinstance(consumer.topics(), set)
  finally:
    consumer.close()


def test_truststore_holds_the_ca_for_java_clients(secure, monkeypatch):
  keytool = shutil.which('keytool')
  if keytool is None:
    pytest.skip('no keytool')
  monkeypatch.setenv('RTML_TEST_STOREPASS', secure.keystore_password)
  listing = subprocess.run(
      [keytool, '-list', '-storetype', 'PKCS12', '-keystore',
       str(secure.truststore), '-storepass:env', 'RTML_TEST_STOREPASS'],
      capture_output=True, text=True, timeout=60, check=True).stdout
  assert 'trustedCertEntry' in listing
