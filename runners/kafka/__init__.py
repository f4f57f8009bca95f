"""A local single-node Apache Kafka broker (KRaft) for development and tests.

Nothing is installed system-wide: the broker jars are fetched by their pinned
Maven coordinates (``runners/kafka/pom.xml``) into
``~/.cache/rtml/kafka/<version>/libs`` once, and the broker runs as a plain
``java`` process with its data, config and log in one directory. Only
``java`` (17+) and ``mvn`` are needed.

From the shell (state is kept in ``~/.cache/rtml/run/kafka.json``)::

    python -m runners.kafka up        # prints the bootstrap servers
    python -m runners.kafka status
    python -m runners.kafka down

From Python (tests, benchmarks)::

    from runners.kafka import KafkaBroker
    with KafkaBroker() as broker:            # free ports, temporary data dir
      broker.create_topic('trips', partitions=4)
      print(broker.bootstrap_servers)        # '127.0.0.1:<port>'

The broker is configured for one node (replication factor 1 for the offsets
and transaction logs) with transactions enabled, so idempotent and
transactional producers work as on a real cluster.

With ``security=BrokerSecurity(...)`` it also listens with TLS (``SSL``) and
with TLS plus SCRAM authentication (``SASL_SSL``), each on its own port; the
PLAINTEXT listener stays for admin and inter-broker traffic::

    security = BrokerSecurity('broker.p12', keystore_password='...',
                              scram_users={'alice': '...'})
    with KafkaBroker(security=security) as broker:
      broker.sasl_ssl_bootstrap_servers   # '127.0.0.1:<port>'
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from typing import Any, Mapping

from runners.tools import (CACHE_ROOT, RUN_DIR, RunnerSetupError, alive,
                           free_port, require_tool)

_LOGGER = logging.getLogger(__name__)

POM = pathlib.Path(__file__).with_name('pom.xml')
STATE_FILE = RUN_DIR / 'kafka.json'
DEFAULT_DATA_DIR = RUN_DIR / 'kafka-data'
HOST = '127.0.0.1'
# The broker is a development service on a shared machine: keep it small.
JVM_OPTS = ('-Xms128m', '-Xmx512m', '-XX:+UseG1GC',
            '-XX:MaxGCPauseMillis=20', '-Djava.awt.headless=true')


class KafkaBrokerError(RunnerSetupError):
  """The local broker could not be fetched, started or stopped."""


def kafka_version() -> str:
  """The pinned Kafka version, read from ``pom.xml`` (its one declaration)."""
  ns = {'m': 'http://maven.apache.org/POM/4.0.0'}
  version = ET.parse(POM).getroot().find('m:properties/m:kafka.version', ns)
  if version is None or not version.text:
    raise KafkaBrokerError(f'no <kafka.version> in {POM}')
  return version.text.strip()


def fetch_jars(version: str | None = None) -> pathlib.Path:
  """Downloads the broker jars once and returns the directory holding them.

  Maven copies the runtime dependencies of ``pom.xml`` into a temporary
  directory that is renamed into place only when complete, so an interrupted
  download is never mistaken for a cached one.
  """
  version = version or kafka_version()
  libs = CACHE_ROOT / 'kafka' / version / 'libs'
  if (libs / f'kafka_2.13-{version}.jar').is_file():
    return libs
  mvn = require_tool('mvn', 'download the Kafka broker jars (or set '
                     'KAFKA_BOOTSTRAP_SERVERS to an existing broker)')
  libs.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix='libs-', dir=libs.parent))
  _LOGGER.info('Fetching Kafka %s jars into %s', version, libs)
  cmd = [mvn, '-q', '-B', '-f', str(POM), 'dependency:copy-dependencies',
         f'-DoutputDirectory={tmp}', '-DincludeScope=runtime']
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0 or not (tmp / f'kafka_2.13-{version}.jar').is_file():
    shutil.rmtree(tmp, ignore_errors=True)
    raise KafkaBrokerError(
        f'`{" ".join(cmd)}` failed ({proc.returncode}):\n'
        f'{proc.stdout[-2000:]}{proc.stderr[-2000:]}')
  try:
    tmp.rename(libs)
  except OSError:  # Another process won the race; its copy is complete.
    shutil.rmtree(tmp, ignore_errors=True)
  return libs


def _server_properties(data_dir: pathlib.Path, port: int,
                       controller_port: int,
                       extra: Mapping[str, Any],
                       more_listeners: Mapping[str, int] | None = None) -> str:
  """``more_listeners``: {security protocol: port}, one listener named after
  its protocol each (``SSL``, ``SASL_SSL``), next to PLAINTEXT."""
  client = {'PLAINTEXT': port, **(more_listeners or {})}
  advertised = ','.join(f'{name}://{HOST}:{p}' for name, p in client.items())
  props = {
      'process.roles': 'broker,controller',
      'node.id': 1,
      'controller.quorum.voters': f'1@{HOST}:{controller_port}',
      'listeners': f'{advertised},CONTROLLER://{HOST}:{controller_port}',
      'advertised.listeners': advertised,
      'controller.listener.names': 'CONTROLLER',
      'inter.broker.listener.name': 'PLAINTEXT',
      'listener.security.protocol.map': ','.join(
          ['CONTROLLER:PLAINTEXT'] + [f'{name}:{name}' for name in client]),
      'log.dirs': data_dir / 'logs',
      'num.partitions': 1,
      # One node: internal topics cannot be replicated; few partitions keep
      # the first consumer group / transaction fast to set up.
      'offsets.topic.replication.factor': 1,
      'offsets.topic.num.partitions': 4,
      'transaction.state.log.replication.factor': 1,
      'transaction.state.log.min.isr': 1,
      'transaction.state.log.num.partitions': 4,
      'group.initial.rebalance.delay.ms': 0,
      'auto.create.topics.enable': 'true',
      # Time retention compares record timestamps with the wall clock:
      # replayed historical trips (2013...) would be deleted at once.
      'log.retention.ms': -1,
  }
  props.update(extra)
  return ''.join(f'{k}={v}\n' for k, v in props.items())


_LOG4J = """\
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File={log}
log4j.appender.file.MaxFileSize=20MB
log4j.appender.file.MaxBackupIndex=2
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.kafka.controller=INFO
log4j.logger.kafka.log.LogCleaner=INFO
log4j.logger.state.change.logger=WARN
log4j.logger.org.apache.kafka.controller=INFO
"""


@dataclasses.dataclass(frozen=True)
class BrokerSecurity:
  """TLS and SASL/SCRAM listeners for ``KafkaBroker`` (``security=``).

  The broker then also listens on ``SSL`` (TLS, no client authentication)
  and ``SASL_SSL`` (TLS + SCRAM user and password) ports.

  Args:
    keystore: the broker's private key and certificate chain (PKCS12 or JKS);
      the certificate must name 127.0.0.1 (SAN ``IP:127.0.0.1``) for clients
      that check the host name.
    keystore_password: the password of the keystore and of its key. It is in
      ``server.properties`` (mode 0600, in the broker's data directory): the
      broker reads it from there and masks it in its own log.
    scram_users: {user name: password} for ``scram_mechanism``, created when
      the storage is formatted (a reused data directory keeps the users it
      was formatted with). The storage tool is given salted credentials
      only, so no plain-text password is on a command line or on disk
      (a salted one still lets a SCRAM client in: it is not logged either).
    keystore_type: 'PKCS12' or 'JKS'.
    scram_mechanism: 'SCRAM-SHA-256' or 'SCRAM-SHA-512'.

  Passwords are left out of ``repr`` so that logging this object is safe.
  """
  keystore: str | os.PathLike
  keystore_password: str = dataclasses.field(repr=False)
  scram_users: Mapping[str, str] = dataclasses.field(
      default_factory=dict, repr=False)
  keystore_type: str = 'PKCS12'
  scram_mechanism: str = 'SCRAM-SHA-256'
  scram_iterations: int = 4096  # Kafka's minimum and its tools' default

  def server_properties(self) -> dict[str, Any]:
    """The ``server.properties`` entries of both listeners."""
    mechanism = self.scram_mechanism
    return {
        'ssl.keystore.type': self.keystore_type,
        'ssl.keystore.location': pathlib.Path(self.keystore).resolve(),
        'ssl.keystore.password': self.keystore_password,
        'ssl.key.password': self.keystore_password,
        'sasl.enabled.mechanisms': mechanism,
        # Broker side of SCRAM: credentials come from the cluster metadata.
        f'listener.name.sasl_ssl.{mechanism.lower()}.sasl.jaas.config':
            'org.apache.kafka.common.security.scram.ScramLoginModule '
            'required;',
    }

  def scram_arguments(self) -> list[str]:
    """``--add-scram`` arguments of ``StorageTool format``: one salted
    credential per user (RFC 5802 SaltedPassword = PBKDF2-HMAC; the broker
    derives its stored and server keys from it)."""
    digest = {'SCRAM-SHA-256': 'sha256',
              'SCRAM-SHA-512': 'sha512'}[self.scram_mechanism]
    args = []
    for name, password in self.scram_users.items():
      if not name or any(c in name for c in ',=[]"'):
        raise ValueError(f'unusable SCRAM user name {name!r}')
      salt = os.urandom(16)
      salted = hashlib.pbkdf2_hmac(digest, password.encode(), salt,
                                   self.scram_iterations)
      args += ['--add-scram',
               f'{self.scram_mechanism}=[name={name},'
               f'iterations={self.scram_iterations},'
               f'salt="{base64.b64encode(salt).decode()}",'
               f'saltedpassword="{base64.b64encode(salted).decode()}"]']
    return args

  def secrets(self) -> list[str]:
    """The passwords, for redacting error messages."""
    return [s for s in (self.keystore_password, *self.scram_users.values())
            if s]


def _redact(text: str, secrets: list[str]) -> str:
  for secret in secrets:
    text = text.replace(secret, '***')
  return text


def _cluster_id() -> str:
  """A Kafka cluster id: a random UUID, URL-safe base64 without padding.

  Like Kafka's ``Uuid.randomUuid``, ids starting with '-' are avoided: the
  storage tool would read them as an option.
  """
  while True:
    cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b'=').decode()
    if not cid.startswith('-'):
      return cid


def _set_parent_death_signal() -> None:  # pragma: no cover - in the child
  """Linux: the broker gets SIGTERM when the Python process that owns it dies,
  so a killed test run leaves no orphan broker behind."""
  try:
    import ctypes
    pr_set_pdeathsig = 1
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(
        pr_set_pdeathsig, signal.SIGTERM)
  except OSError:
    pass


_SECRET_WORDS = ('password', 'secret', 'token')


def _mask_secrets(record: logging.LogRecord) -> bool:
  """A log filter: kafka-python's ``KafkaAdminClient`` logs all its settings,
  passwords included, at DEBUG; mask the secret ones."""
  if isinstance(record.args, Mapping):
    record.args = {k: '***' if v and any(w in k for w in _SECRET_WORDS) else v
                   for k, v in record.args.items()}
  return True


def _admin_client(**config: Any) -> Any:
  from kafka import KafkaAdminClient
  # A logger holds a filter once, however often it is added.
  logging.getLogger('kafka.admin.client').addFilter(_mask_secrets)
  return KafkaAdminClient(**config)


def answers(bootstrap_servers: str, timeout_s: float = 5.0) -> bool:
  """True if a broker at ``bootstrap_servers`` answers a metadata request."""
  from kafka.errors import KafkaError
  try:
    admin = _admin_client(
        bootstrap_servers=bootstrap_servers,
        request_timeout_ms=int(timeout_s * 1000),
        bootstrap_timeout_ms=int(timeout_s * 1000),
        client_id='rtml-broker-probe')
  except (KafkaError, OSError, ValueError):
    return False
  try:
    admin.describe_cluster()
    return True
  except (KafkaError, OSError, ValueError):
    return False
  finally:
    admin.close()


def _client_config(client_class: Any,
                   config: Mapping[str, Any] | None) -> dict[str, Any]:
  """The entries of ``config`` (e.g. security settings) a client accepts."""
  return {k: v for k, v in (config or {}).items()
          if k in client_class.DEFAULT_CONFIG and k != 'bootstrap_servers'}


def create_topic(bootstrap_servers: str, name: str, partitions: int = 1,
                 config: Mapping[str, str] | None = None,
                 timeout_s: float = 30.0,
                 client_config: Mapping[str, Any] | None = None) -> None:
  """Creates a topic (replication factor 1) and waits until it has leaders.

  An existing topic with that name is left as is. ``client_config`` holds
  extra kafka-python settings (security...); keys a client does not know
  (producer-only settings, say) are ignored.
  """
  from kafka import KafkaAdminClient, KafkaConsumer
  from kafka.admin import NewTopic
  from kafka.errors import TopicAlreadyExistsError
  admin = _admin_client(bootstrap_servers=bootstrap_servers,
                        client_id='rtml-topic-admin',
                        **_client_config(KafkaAdminClient, client_config))
  want = partitions
  try:
    admin.create_topics([NewTopic(name, num_partitions=partitions,
                                  replication_factor=1,
                                  topic_configs=dict(config or {}))])
  except TopicAlreadyExistsError:
    want = 1  # whatever it has
  finally:
    admin.close()
  # Metadata propagates asynchronously: wait until every partition is known.
  consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers,
                           enable_auto_commit=False,
                           client_id='rtml-topic-admin',
                           **_client_config(KafkaConsumer, client_config))
  try:
    deadline = time.monotonic() + timeout_s
    while True:
      known = consumer.partitions_for_topic(name) or set()
      if len(known) >= want:
        return
      if time.monotonic() > deadline:
        raise KafkaBrokerError(
            f'topic {name!r} has {len(known)}/{want} partitions after '
            f'{timeout_s}s')
      time.sleep(0.1)
  finally:
    consumer.close()


class KafkaBroker:
  """A single-node KRaft Kafka broker in a child ``java`` process.

  Args:
    data_dir: directory for config, data and ``broker.log``; a temporary
      directory (removed on stop) when None. An existing formatted directory
      is reused, so topics survive a restart.
    port: client (PLAINTEXT) port; a free one when None.
    controller_port: KRaft controller port; a free one when None.
    config: extra ``server.properties`` entries, overriding the defaults.
    security: also listen with TLS and SASL_SSL (``BrokerSecurity``), on
      free ports (``ssl_bootstrap_servers``, ``sasl_ssl_bootstrap_servers``).
    startup_timeout_s: how long to wait for the broker to answer.
    tie_to_parent: stop the broker when this Python process dies (tests).
      ``python -m runners.kafka up`` sets False so the broker outlives it.
  """

  def __init__(self, data_dir: str | os.PathLike | None = None,
               port: int | None = None, controller_port: int | None = None,
               config: Mapping[str, Any] | None = None,
               security: BrokerSecurity | None = None,
               startup_timeout_s: float = 90.0, tie_to_parent: bool = True):
    self._temporary = data_dir is None
    self.data_dir = pathlib.Path(
        tempfile.mkdtemp(prefix='rtml-kafka-') if data_dir is None
        else data_dir).expanduser().resolve()
    self.port = port or free_port()
    self.controller_port = controller_port or free_port()
    while self.controller_port == self.port:
      self.controller_port = free_port()
    self.security = security
    # {security protocol: port} of the listeners besides PLAINTEXT.
    self.secure_ports: dict[str, int] = {}
    for protocol in ('SSL', 'SASL_SSL') if security else ():
      port = free_port()
      while port in (self.port, self.controller_port,
                     *self.secure_ports.values()):
        port = free_port()
      self.secure_ports[protocol] = port
    self._config = dict(config or {})
    self._startup_timeout_s = startup_timeout_s
    self._tie_to_parent = tie_to_parent
    self._proc: subprocess.Popen | None = None

  @property
  def bootstrap_servers(self) -> str:
    return f'{HOST}:{self.port}'

  @property
  def ssl_bootstrap_servers(self) -> str:
    """The TLS listener (needs ``security``)."""
    return f'{HOST}:{self.secure_ports["SSL"]}'

  @property
  def sasl_ssl_bootstrap_servers(self) -> str:
    """The TLS + SCRAM listener (needs ``security``)."""
    return f'{HOST}:{self.secure_ports["SASL_SSL"]}'

  @property
  def pid(self) -> int | None:
    return self._proc.pid if self._proc else None

  @property
  def log_file(self) -> pathlib.Path:
    return self.data_dir / 'broker.log'

  def start(self) -> 'KafkaBroker':
    """Fetches the jars if needed, formats storage, starts and waits."""
    java = require_tool('java', 'run the Kafka broker (or set '
                        'KAFKA_BOOTSTRAP_SERVERS to an existing broker)')
    libs = fetch_jars()
    classpath = str(libs / '*')
    self.data_dir.mkdir(parents=True, exist_ok=True)
    props = self.data_dir / 'server.properties'
    config = dict(self._config)
    if self.security is not None:
      config = {**self.security.server_properties(), **config}
    # It may hold the keystore password: readable by us only.
    fd = os.open(props, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, 'w') as f:
      f.write(_server_properties(self.data_dir, self.port,
                                 self.controller_port, config,
                                 self.secure_ports))
    log4j = self.data_dir / 'log4j.properties'
    log4j.write_text(_LOG4J.format(log=self.log_file))
    log4j_opt = f'-Dlog4j.configuration=file:{log4j}'
    if not (self.data_dir / 'logs' / 'meta.properties').exists():
      scram = self.security.scram_arguments() if self.security else []
      proc = subprocess.run(
          [java, *JVM_OPTS, log4j_opt, '-cp', classpath,
           'kafka.tools.StorageTool', 'format', '-t', _cluster_id(),
           '-c', str(props), *scram],
          capture_output=True, text=True, check=False)
      if proc.returncode != 0:
        secrets = (self.security.secrets() + scram[1::2]
                   if self.security else [])
        raise KafkaBrokerError(
            f'formatting {self.data_dir} failed:\n'
            + _redact(proc.stdout + proc.stderr, secrets))
    out = open(self.data_dir / 'broker.out', 'ab')  # JVM crashes, GC notes
    try:
      self._proc = subprocess.Popen(
          [java, *JVM_OPTS, log4j_opt, f'-Dkafka.logs.dir={self.data_dir}',
           '-cp', classpath, 'kafka.Kafka', str(props)],
          stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
          cwd=self.data_dir, start_new_session=True,
          preexec_fn=_set_parent_death_signal if self._tie_to_parent else None)
    finally:
      out.close()
    try:
      self._wait_ready()
    except BaseException:
      self.stop()
      raise
    _LOGGER.info('Kafka broker %s up (pid %d, data %s%s)',
                 self.bootstrap_servers, self._proc.pid, self.data_dir,
                 ''.join(f', {name} {HOST}:{port}'
                         for name, port in self.secure_ports.items()))
    return self

  def _wait_ready(self) -> None:
    deadline = time.monotonic() + self._startup_timeout_s
    while time.monotonic() < deadline:
      if self._proc.poll() is not None:
        raise KafkaBrokerError(
            f'the broker exited with code {self._proc.returncode}; last log '
            f'lines of {self.log_file}:\n{self._log_tail()}')
      if (_port_open(self.port) and
          all(_port_open(p) for p in self.secure_ports.values()) and
          answers(self.bootstrap_servers, 2.0)):
        return
      time.sleep(0.25)
    raise KafkaBrokerError(
        f'the broker did not answer on {self.bootstrap_servers} within '
        f'{self._startup_timeout_s}s; log tail:\n{self._log_tail()}')

  def _log_tail(self, lines: int = 30) -> str:
    text = ''
    for name in ('broker.log', 'broker.out'):
      path = self.data_dir / name
      if path.exists():
        tail = path.read_text(errors='replace').splitlines(True)[-lines:]
        text += ''.join(tail)
    return text

  def stop(self, timeout_s: float = 30.0, keep_data: bool = False) -> None:
    """SIGTERM (controlled shutdown), then SIGKILL after ``timeout_s``.

    With ``keep_data``, ``start()`` brings the same broker back on the same
    address with its topics and offsets (fault tests); otherwise a
    temporary data directory is deleted.
    """
    if self._proc is not None:
      stop_process(self._proc.pid, timeout_s, popen=self._proc)
      self._proc = None
    if self._temporary and not keep_data:
      shutil.rmtree(self.data_dir, ignore_errors=True)

  def create_topic(self, name: str, partitions: int = 1,
                   config: Mapping[str, str] | None = None) -> str:
    """Creates topic ``name`` (if absent) and returns its name."""
    create_topic(self.bootstrap_servers, name, partitions, config)
    return name

  def __enter__(self) -> 'KafkaBroker':
    return self.start()

  def __exit__(self, *exc_info) -> None:
    self.stop()


def _port_open(port: int, host: str = HOST) -> bool:
  with contextlib.closing(socket.socket(socket.AF_INET,
                                        socket.SOCK_STREAM)) as s:
    s.settimeout(0.5)
    return s.connect_ex((host, port)) == 0


def stop_process(pid: int, timeout_s: float = 30.0,
                 popen: subprocess.Popen | None = None) -> None:
  """SIGTERM ``pid``, wait up to ``timeout_s``, then SIGKILL it."""
  def wait(seconds: float) -> bool:
    if popen is not None:
      try:
        popen.wait(seconds)
        return True
      except subprocess.TimeoutExpired:
        return False
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
      if not alive(pid):
        return True
      time.sleep(0.1)
    return not alive(pid)

  if not alive(pid):
    wait(0)
    return
  try:
    os.kill(pid, signal.SIGTERM)
  except ProcessLookupError:
    return
  if not wait(timeout_s):
    _LOGGER.warning('Kafka broker pid %d ignored SIGTERM; sending SIGKILL', pid)
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, signal.SIGKILL)
    wait(10)


# ---- `python -m runners.kafka up|down|status`: a broker that outlives us.

def _read_state() -> dict[str, Any] | None:
  try:
    return json.loads(STATE_FILE.read_text())
  except (OSError, ValueError):
    return None


def _is_our_broker(state: Mapping[str, Any]) -> bool:
  """The recorded pid is still the java broker we started (not a reused pid)."""
  pid = state.get('pid')
  if not pid or not alive(pid):
    return False
  try:
    cmdline = pathlib.Path(f'/proc/{pid}/cmdline').read_bytes().split(b'\0')
  except OSError:
    return True  # no /proc: trust the pid
  return (b'kafka.Kafka' in cmdline and
          any(str(state.get('data_dir')).encode() in arg for arg in cmdline))


def up(data_dir: str | os.PathLike | None = None, port: int | None = None,
       controller_port: int | None = None) -> dict[str, Any]:
  """Starts the background broker (or finds it running); returns its state."""
  state = _read_state()
  if state and _is_our_broker(state):
    return state
  data = pathlib.Path(data_dir or (state or {}).get('data_dir')
                      or DEFAULT_DATA_DIR)
  if state and not port and str(data) == state.get('data_dir'):
    # Restarting on the same data: keep the ports clients were given.
    port = port or (state['port'] if not _port_open(state['port']) else None)
    controller_port = controller_port or (
        state['controller_port']
        if not _port_open(state['controller_port']) else None)
  broker = KafkaBroker(data, port=port, controller_port=controller_port,
                       tie_to_parent=False).start()
  state = {
      'pid': broker.pid,
      'bootstrap_servers': broker.bootstrap_servers,
      'port': broker.port,
      'controller_port': broker.controller_port,
      'data_dir': str(broker.data_dir),
      'log': str(broker.log_file),
      'kafka_version': kafka_version(),
      'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
  }
  RUN_DIR.mkdir(parents=True, exist_ok=True)
  tmp = STATE_FILE.with_suffix('.tmp')
  tmp.write_text(json.dumps(state, indent=2) + '\n')
  tmp.replace(STATE_FILE)
  return state


def down(timeout_s: float = 30.0) -> dict[str, Any] | None:
  """Stops the background broker; returns its last state.

  The data and the address are kept: the next ``up`` starts the same broker
  on the same ports, so running clients reconnect to it.
  """
  state = _read_state()
  if state is None:
    return None
  if _is_our_broker(state):
    stop_process(state['pid'], timeout_s)
  stopped = dict(state, pid=None,
                 stopped=time.strftime('%Y-%m-%dT%H:%M:%S%z'))
  tmp = STATE_FILE.with_suffix('.tmp')
  tmp.write_text(json.dumps(stopped, indent=2) + '\n')
  tmp.replace(STATE_FILE)
  return state


def status() -> dict[str, Any]:
  """The recorded state plus whether the broker is alive and answering."""
  state = _read_state() or {}
  running = bool(state) and _is_our_broker(state)
  state['running'] = running
  state['answers'] = running and answers(state['bootstrap_servers'])
  return state


__all__ = ['BrokerSecurity', 'KafkaBroker', 'KafkaBrokerError', 'answers',
           'create_topic', 'down', 'fetch_jars', 'free_port', 'kafka_version',
           'status', 'up']
