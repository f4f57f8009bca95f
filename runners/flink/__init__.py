"""Apache Flink for Beam pipelines: the job server and a local cluster.

Both are assembled from pinned Maven coordinates (``pom.xml``, whose
properties are the one declaration of the versions) into
``~/.cache/rtml/flink/``; only ``java`` (17) and ``mvn`` are needed:

* Beam's Flink job server, which translates a portable Beam pipeline to a
  Flink job: the closure of ``beam-runners-flink-1.19:2.62.0`` (161 jars,
  Flink 1.19.0 included, plus log4j) in ``job-server-2.62.0/libs/``, and next to it a tiny
  *launcher jar* written here with ``zipfile``. Its manifest names
  ``FlinkJobServerDriver`` as ``Main-Class``, the libs as ``Class-Path`` and
  the JDK packages Flink reflects into on Java 17 as ``Add-Opens``, so
  ``java -jar launcher.jar --flink-master=...`` runs the job server exactly as
  Beam runs its own job server jar. ``--runner flink`` (``runners.options``)
  passes it to Beam's unchanged ``FlinkRunner`` as ``--flink_job_server_jar``
  with ``--flink_version=1.19``. With ``--flink_master=[local]`` the job runs
  in a Flink mini-cluster inside the job server; with ``HOST:PORT`` it is
  submitted to a cluster.
* Flink's own runtime jars (``1.19.0/lib/``), enough to run a real standalone
  session cluster of the same Flink release: a JobManager
  (``StandaloneSessionClusterEntrypoint``) and one or more TaskManagers
  (``TaskManagerRunner``) as plain ``java -cp`` processes on 127.0.0.1 with
  free ports and a legacy ``flink-conf.yaml`` (what Flink 1.19 reads first),
  sized by Flink's own ``BashJavaUtils`` exactly as ``bin/start-cluster.sh``
  would.

Why a 2.62 job server under the 2.77 Python SDK: Beam's ready-made job server
jar (``beam-runners-flink-<minor>-job-server``) is not on the Maven mirror we
can reach (404 for every version), and that mirror is a sparse snapshot: the
newest Beam Flink runner whose whole dependency closure resolves is
``beam-runners-flink-1.19:2.62.0`` (2.70.0 exists, but its
``beam-runners-java-job-service:2.70.0`` does not). The SDK and the job server
only talk through Beam's portability API: the pipeline is a Runner API proto
whose transforms, coders and requirements are versioned URNs, sent over the
Job API (gRPC), and in ``LOOPBACK`` the Python SDK harness is this process,
speaking the Fn API that the job server's Flink operators drive. So an older
runner runs a newer SDK's pipeline as long as the pipeline uses no URN newer
than the runner; the one skew seen is the SDK's ``bounded_trie`` lineage
metric, which the 2.62 runner ignores (a log line). Measured rather than assumed: ``tests/test_runners.py`` runs
a batch job (embedded and on the standalone cluster), the tf.Transform
training pipeline and the streaming Kafka serving pipeline (an unbounded
splittable DoFn) on it and compares each with the local runners. When the
mirror has a complete newer closure, raise ``beam.jobserver.version`` (and
``flink.minor``/``flink.version`` to a Flink line that release supports).

On a cluster (``--flink_master=HOST:PORT``) the job server uploads its
classpath with every job, as Beam's own job server jar does: ~150 MB, 15-20 s
on a 2-core machine before the job starts.

From the shell (state in ``~/.cache/rtml/run/flink.json``)::

    python -m runners.flink fetch     # both closures, prints the paths
    python -m runners.flink up        # prints the address for --flink_master
    python -m runners.flink status
    python -m runners.flink check     # a tiny DataStream job on the cluster
    python -m runners.flink down

From Python (tests)::

    from runners.flink import FlinkCluster
    with FlinkCluster() as cluster:
      pipeline.run(['--runner', 'flink', '--flink_master', cluster.address])
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
import zipfile
from typing import Any

from runners.tools import (CACHE_ROOT, RUN_DIR, RunnerSetupError, alive,
                           free_port, require_tool)

_LOGGER = logging.getLogger(__name__)

POM = pathlib.Path(__file__).with_name('pom.xml')
STATE_FILE = RUN_DIR / 'flink.json'
HOST = '127.0.0.1'
JOB_SERVER_MAIN = 'org.apache.beam.runners.flink.FlinkJobServerDriver'
# What Flink 1.19's default flink-conf.yaml (env.java.opts.all) gives every
# JVM on Java 17: Kryo, the RPC system and Beam's coders reflect into these.
JAVA_EXPORTS = ('java.base/sun.net.util', 'java.rmi/sun.rmi.registry',
                'java.security.jgss/sun.security.krb5')
JAVA_OPENS = tuple(f'java.base/{pkg}' for pkg in (
    'java.lang', 'java.net', 'java.io', 'java.nio', 'sun.nio.ch',
    'java.lang.reflect', 'java.text', 'java.time', 'java.util',
    'java.util.concurrent', 'java.util.concurrent.atomic',
    'java.util.concurrent.locks'))
JAVA_FLAGS = tuple([f'--add-exports={p}=ALL-UNNAMED' for p in JAVA_EXPORTS] +
                   [f'--add-opens={p}=ALL-UNNAMED' for p in JAVA_OPENS])
# The job server's log4j: Flink's warnings and Beam's progress go to stdout,
# which Beam turns into Python INFO logging (logger ``FlinkJarJobServer``).
# Turned down, as noise seen on every job: per-bundle worker set-up chatter;
# a stack trace each time a LOOPBACK environment is closed ("Error cleaning up
# servers ... call already closed"); a warning per bundle about the SDK's
# bounded_trie lineage metrics, which the 2.62 runner does not know; the
# runner's dump of every metric at the end of a job (the SDK reports them);
# Flink's notes on tokens, web log files and long operator names.
_JOB_SERVER_LOG4J = """\
rootLogger.level = WARN
rootLogger.appenderRef.console.ref = Console
appender.console.name = Console
appender.console.type = Console
appender.console.target = SYSTEM_OUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{HH:mm:ss,SSS} %-5p %c{1} - %m%n
logger.beam.name = org.apache.beam
logger.beam.level = INFO
logger.dump.name = org.apache.beam.runners.flink.FlinkPipelineRunner
logger.dump.level = WARN
logger.fn.name = org.apache.beam.runners.fnexecution
logger.fn.level = WARN
logger.bundles.name = org.apache.beam.runners.fnexecution.control.DefaultJobBundleFactory
logger.bundles.level = ERROR
logger.metrics.name = org.apache.beam.runners.core.metrics.MetricsContainerImpl
logger.metrics.level = ERROR
logger.flinkmetrics.name = org.apache.flink.metrics.MetricGroup
logger.flinkmetrics.level = ERROR
logger.tokens.name = org.apache.flink.runtime.security.token
logger.tokens.level = ERROR
logger.web.name = org.apache.flink.runtime.webmonitor
logger.web.level = ERROR
"""


@dataclasses.dataclass(frozen=True)
class Versions:
  """The pinned versions, read from ``pom.xml``."""
  job_server: str    # Beam release of the Java job server: '2.62.0'
  flink_minor: str   # Beam's name for the Flink line: '1.19'
  flink: str         # the Flink release of job server and cluster: '1.19.0'


def versions() -> Versions:
  """Reads the pins from ``pom.xml`` and checks them against the SDK."""
  ns = {'m': 'http://maven.apache.org/POM/4.0.0'}
  props = ET.parse(POM).getroot().find('m:properties', ns)
  get = lambda name: props.find(f'm:{name}', ns).text.strip()
  pinned = Versions(get('beam.jobserver.version'), get('flink.minor'),
                    get('flink.version'))
  from apache_beam.options.pipeline_options import FlinkRunnerOptions
  if pinned.flink_minor not in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS:
    raise RunnerSetupError(
        f'the installed Beam SDK does not accept --flink_version='
        f'{pinned.flink_minor}; pick one of '
        f'{FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS} in {POM}.')
  if not pinned.flink.startswith(pinned.flink_minor + '.'):
    raise RunnerSetupError(
        f'{POM}: flink.version {pinned.flink} is not on the '
        f'{pinned.flink_minor} line (flink.minor)')
  return pinned


def home() -> pathlib.Path:
  """``~/.cache/rtml/flink/<flink version>``: the cluster's jars."""
  return CACHE_ROOT / 'flink' / versions().flink


def job_server_home() -> pathlib.Path:
  """``~/.cache/rtml/flink/job-server-<beam version>``: libs and launcher."""
  return CACHE_ROOT / 'flink' / f'job-server-{versions().job_server}'


def job_server_jar_path() -> pathlib.Path:
  """Where the launcher jar of the pinned job server is written."""
  pinned = versions()
  return job_server_home() / (f'beam-runners-flink-{pinned.flink_minor}-'
                              f'job-server-{pinned.job_server}-launcher.jar')


def _mvn(args: list[str], what: str) -> None:
  mvn = require_tool('mvn', f'fetch {what}')
  require_tool('java', f'run {what}')
  print(f'[flink] fetching {what} with Maven (first time only)', flush=True)
  proc = subprocess.run([mvn, '-B', '-q', '-Dstyle.color=never', '-f',
                         str(POM)] + args,
                        capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    output = re.sub(r'\x1b\[[0-9;]*m', '', proc.stdout + proc.stderr)
    tail = '\n'.join(line for line in output.splitlines()
                     if line.startswith('[ERROR] Failed')) or output[-2000:]
    raise RunnerSetupError(f'Maven could not fetch {what}:\n{tail}')


def _copy_closure(profile: str, out: pathlib.Path, what: str) -> None:
  """Copies the runtime closure of a pom profile into ``out`` (atomically)."""
  staging = out.with_name(out.name + '.partial')
  shutil.rmtree(staging, ignore_errors=True)
  _mvn(['-P', profile, 'dependency:copy-dependencies',
        '-DincludeScope=runtime', f'-DoutputDirectory={staging}'], what)
  shutil.rmtree(out, ignore_errors=True)
  staging.rename(out)


def manifest(attributes: dict[str, str]) -> bytes:
  """A JAR manifest: lines of at most 72 bytes, continued with one space."""
  lines = []
  for name, value in attributes.items():
    data = f'{name}: {value}'.encode('utf-8')
    lines.append(data[:72])
    for i in range(72, len(data), 71):
      lines.append(b' ' + data[i:i + 71])
  return b'\r\n'.join(lines) + b'\r\n\r\n'


def _launcher_entries(jar: pathlib.Path,
                      libs: pathlib.Path) -> dict[str, bytes]:
  class_path = ' '.join(
      urllib.parse.quote(f'{libs.relative_to(jar.parent).as_posix()}/{p.name}')
      for p in sorted(libs.glob('*.jar')))
  return {
      'META-INF/MANIFEST.MF': manifest({
          'Manifest-Version': '1.0',
          'Created-By': 'rtml runners.flink',
          'Main-Class': JOB_SERVER_MAIN,
          'Class-Path': class_path,
          'Add-Opens': ' '.join(JAVA_OPENS),
          'Add-Exports': ' '.join(JAVA_EXPORTS),
      }),
      'log4j2.properties': _JOB_SERVER_LOG4J.encode(),
  }


def write_launcher(jar: pathlib.Path, libs: pathlib.Path) -> None:
  """Writes a jar whose manifest alone makes ``java -jar`` run the job server.

  ``Class-Path`` entries are URLs relative to the launcher, so the launcher
  and ``libs/`` move together. Rewritten only when its content would change.
  """
  entries = _launcher_entries(jar, libs)
  try:
    with zipfile.ZipFile(jar) as zf:
      if {n: zf.read(n) for n in zf.namelist()} == entries:
        return
  except (OSError, zipfile.BadZipFile):
    pass
  staging = jar.with_name(f'{jar.name}.{os.getpid()}.partial')
  with zipfile.ZipFile(staging, 'w', zipfile.ZIP_DEFLATED) as zf:
    for name, data in entries.items():
      zf.writestr(name, data)
  staging.replace(jar)


def ensure_job_server_jar(flink_minor: str | None = None) -> str:
  """Returns the job server's launcher jar, assembling it if missing.

  Args:
    flink_minor: Beam's Flink line the job asks for (``--flink_version``);
      only the pinned one can be had.

  Raises:
    RunnerSetupError: Java/Maven missing, the closure is not in the
      configured Maven repositories, or another Flink line was asked for.
  """
  pinned = versions()
  if flink_minor and flink_minor != pinned.flink_minor:
    raise RunnerSetupError(
        f'only a Flink {pinned.flink_minor} job server is pinned ({POM}); '
        f'for --flink_version={flink_minor} pass --flink_job_server_jar too')
  jar = job_server_jar_path()
  libs = jar.parent / 'libs'
  coords = (f'org.apache.beam:beam-runners-flink-{pinned.flink_minor}:'
            f'{pinned.job_server}')
  done = jar.parent / '.complete'
  if not (done.is_file() and done.read_text() == coords):
    jar.parent.mkdir(parents=True, exist_ok=True)
    _copy_closure('job-server', libs, f'the Beam Flink job server {coords}')
    embedded = sorted(p.name for p in libs.glob('flink-runtime-*.jar'))
    if embedded != [f'flink-runtime-{pinned.flink}.jar']:
      raise RunnerSetupError(
          f'{coords} brings {embedded}, but {POM} pins Flink {pinned.flink} '
          'for the cluster: set flink.version to the one the runner uses.')
    done.write_text(coords)
  write_launcher(jar, libs)
  return str(jar)


def ensure_cluster_libs() -> pathlib.Path:
  """Returns ``lib/`` with Flink's runtime jars, fetching them if missing."""
  lib = home() / 'lib'
  done = lib / '.complete'
  if not done.is_file():
    lib.parent.mkdir(parents=True, exist_ok=True)
    _copy_closure('cluster', lib, f'Apache Flink {versions().flink}')
    done.touch()
  return lib


def _flink_conf(ports: dict[str, int], slots: int, jm_memory: str,
                tm_memory: str, work_dir: pathlib.Path) -> str:
  """Flink 1.19 ``flink-conf.yaml`` (flat keys): all on 127.0.0.1."""
  return f"""\
# Generated by runners.flink; a single-machine standalone session cluster.
jobmanager.rpc.address: {HOST}
jobmanager.rpc.port: {ports['jm_rpc']}
jobmanager.bind-host: {HOST}
jobmanager.memory.process.size: {jm_memory}
taskmanager.host: {HOST}
taskmanager.bind-host: {HOST}
taskmanager.numberOfTaskSlots: {slots}
taskmanager.memory.process.size: {tm_memory}
rest.address: {HOST}
rest.bind-address: {HOST}
rest.port: {ports['rest']}
blob.server.port: {ports['blob']}
parallelism.default: 1
io.tmp.dirs: {work_dir / 'tmp'}
# Several TaskManagers: spread a job's slots over them (so losing one loses
# part of every job, and the rest can take it over), and notice a lost one
# in seconds rather than the default 50.
cluster.evenly-spread-out-slots: true
heartbeat.interval: 2000
heartbeat.timeout: 10000
"""


_LOG4J = """\
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = MainAppender
appender.main.name = MainAppender
appender.main.type = File
appender.main.fileName = ${sys:log.file}
appender.main.layout.type = PatternLayout
appender.main.layout.pattern = %d{yyyy-MM-dd HH:mm:ss,SSS} %-5p %-60c %x - %m%n
"""


class FlinkCluster:
  """A standalone Flink session cluster: one JobManager, N TaskManagers.

  Attributes:
    address: ``127.0.0.1:<rest port>``, what ``--flink_master`` takes.
    pids: process id per process name (``jobmanager``, ``taskmanager``,
      ``taskmanager-2``...); each leads its own process group.
  """

  def __init__(self, work_dir: str | os.PathLike | None = None,
               slots: int = 2, jm_memory: str = '768m',
               tm_memory: str = '1280m', keep: bool = False,
               taskmanagers: int = 1):
    """Configures (does not start) a cluster.

    Args:
      work_dir: config, logs and temp files; default a new temp directory,
        removed on stop.
      slots: task slots of each TaskManager (parallel subtasks).
      jm_memory: JobManager process size (``jobmanager.memory.process.size``).
      tm_memory: TaskManager process size (``taskmanager.memory.process.size``).
      keep: leave the processes running when the context exits
        (``python -m runners.flink up``).
      taskmanagers: how many TaskManagers to start (high availability of a
        job's tasks: with two, one can die and the job restarts from its
        last checkpoint on the other).
    """
    if taskmanagers < 1:
      raise ValueError('a cluster needs at least one TaskManager')
    self._own_dir = work_dir is None
    self.work_dir = pathlib.Path(
        work_dir or tempfile.mkdtemp(prefix='rtml-flink-')).resolve()
    self.slots, self.jm_memory, self.tm_memory = slots, jm_memory, tm_memory
    self.keep = keep
    self.taskmanagers = taskmanagers
    self.ports: dict[str, int] = {}
    self.pids: dict[str, int] = {}
    self._procs: dict[str, subprocess.Popen] = {}
    self._started_tms = 0

  @property
  def address(self) -> str:
    return f'{HOST}:{self.ports["rest"]}'

  @property
  def _log4j(self) -> pathlib.Path:
    return self.work_dir / 'conf' / 'log4j.properties'

  def _classpath(self) -> str:
    return str(ensure_cluster_libs() / '*')

  def _resource_params(self, java: str, which: str) -> tuple[list[str],
                                                             list[str]]:
    """JVM flags and -D settings from Flink's memory model (BashJavaUtils)."""
    out = subprocess.run(
        [java, '-cp', self._classpath(),
         f'-Dlog.file={self.work_dir / "log" / "bash-java-utils.log"}',
         f'-Dlog4j.configurationFile=file:{self._log4j}',
         'org.apache.flink.runtime.util.bash.BashJavaUtils',
         f'GET_{which}_RESOURCE_PARAMS', '--configDir',
         str(self.work_dir / 'conf')],
        capture_output=True, text=True, check=False)
    results = [line.split(':', 1)[1] for line in out.stdout.splitlines()
               if line.startswith('BASH_JAVA_UTILS_EXEC_RESULT:')]
    if out.returncode != 0 or len(results) < 2:
      raise RunnerSetupError(
          f'Flink could not size the {which} memory:\n{out.stdout[-2000:]}'
          f'{out.stderr[-2000:]}')
    return results[-2].split(), results[-1].split()

  def _spawn(self, java: str, name: str, main_class: str,
             settings: dict[str, Any] | None = None) -> None:
    which = 'JM' if name == 'jobmanager' else 'TM'
    jvm, dynamic = self._resource_params(java, which)
    for key, value in (settings or {}).items():
      dynamic += ['-D', f'{key}={value}']
    log_dir = self.work_dir / 'log'
    cmd = ([java] + jvm + list(JAVA_FLAGS) +
           [f'-Dlog.file={log_dir / (name + ".log")}',
            f'-Dlog4j.configurationFile=file:{self._log4j}',
            '-cp', self._classpath(), main_class,
            '--configDir', str(self.work_dir / 'conf')] + dynamic)
    with open(log_dir / f'{name}.out', 'ab') as out:
      # Own process group: stop() can end the JVM and anything it started.
      proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL,
                              start_new_session=True)
    self._procs[name] = proc
    self.pids[name] = proc.pid

  def rest(self, path: str, timeout: float = 5.0) -> Any:
    """GET ``path`` of the REST API (``/overview``, ``/jobs/overview``,
    ``/jobs/<id>/checkpoints``...) as JSON; None if it does not answer."""
    try:
      return rest(self.address, path, timeout=timeout)
    except REST_ERRORS:
      return None

  def _overview(self) -> dict[str, Any] | None:
    return self.rest('/overview', timeout=2)

  def _wait(self, ready, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      for name, proc in self._procs.items():
        if proc.poll() is not None:
          raise RunnerSetupError(
              f'Flink {name} exited with {proc.returncode} while waiting for '
              f'{what}; see {self.work_dir / "log"}/{name}.log and .out')
      if ready():
        return
      time.sleep(0.5)
    raise RunnerSetupError(
        f'Flink: no {what} after {timeout:.0f}s; see {self.work_dir / "log"}')

  def start(self, timeout: float = 120.0) -> 'FlinkCluster':
    """Starts the JobManager, then the TaskManagers; waits for their slots."""
    java = require_tool('java', 'run Apache Flink')
    self._classpath()  # fetch before the clock starts
    for sub in ('conf', 'log', 'tmp'):
      (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
    self.ports = {k: free_port() for k in ('rest', 'jm_rpc', 'blob')}
    # Flink 1.19 would read a config.yaml only without a flink-conf.yaml;
    # remove one a Flink 2 cluster left in a reused work dir all the same.
    (self.work_dir / 'conf' / 'config.yaml').unlink(missing_ok=True)
    (self.work_dir / 'conf' / 'flink-conf.yaml').write_text(_flink_conf(
        self.ports, self.slots, self.jm_memory, self.tm_memory,
        self.work_dir))
    self._log4j.write_text(_LOG4J)
    started = time.monotonic()
    try:
      self._spawn(java, 'jobmanager',
                  'org.apache.flink.runtime.entrypoint.'
                  'StandaloneSessionClusterEntrypoint')
      self._wait(lambda: self._overview() is not None, 'REST endpoint',
                 timeout)
      for _ in range(self.taskmanagers):
        self.add_taskmanager(timeout)
    except BaseException:
      self.stop()
      raise
    _LOGGER.info('Flink %s up at %s in %.1fs (%d TaskManagers)',
                 versions().flink, self.address, time.monotonic() - started,
                 self.taskmanagers)
    return self

  def add_taskmanager(self, timeout: float = 120.0) -> str:
    """Starts one more TaskManager (e.g. to replace a dead one); waits for
    its slots; returns its name (``taskmanager``, ``taskmanager-2``...)."""
    java = require_tool('java', 'run Apache Flink')
    self._started_tms += 1
    n = self._started_tms
    name = 'taskmanager' if n == 1 else f'taskmanager-{n}'
    # Each TaskManager its own ports and id, all with the one config file.
    self._spawn(java, name,
                'org.apache.flink.runtime.taskexecutor.TaskManagerRunner',
                {'taskmanager.rpc.port': free_port(),
                 'taskmanager.data.port': free_port(),
                 'taskmanager.resource-id': name})
    # Registered is not ready: its slots are reported a moment later, and
    # a job submitted before then waits for resources. (Counting all slots
    # would be fooled by a killed TaskManager not yet timed out.)
    self._wait(lambda: self.taskmanager_slots().get(name, {}).get('slots')
               == self.slots, f'{name} with {self.slots} slots', timeout)
    return name

  def taskmanager_names(self) -> list[str]:
    """The TaskManagers started and not killed, in start order."""
    return [name for name in self.pids if name.startswith('taskmanager')]

  def kill_taskmanager(self, name: str) -> None:
    """SIGKILLs a TaskManager's process group: a machine lost."""
    pid = self.pids.pop(name)
    proc = self._procs.pop(name, None)
    os.killpg(pid, signal.SIGKILL)
    if proc is not None:
      proc.wait()

  def taskmanager_slots(self) -> dict[str, dict[str, int]]:
    """Per live TaskManager id: ``{'slots': n, 'free': n}`` (REST)."""
    listing = self.rest('/taskmanagers') or {}
    return {tm['id']: {'slots': tm['slotsNumber'], 'free': tm['freeSlots']}
            for tm in listing.get('taskmanagers', [])}

  def check(self, n: int = 1000) -> int:
    """Runs a tiny DataStream job on the cluster; returns its result.

    ``SmokeJob.java`` submits through ``RemoteStreamEnvironment``, the path
    Beam's job server takes for ``--flink_master=HOST:PORT``, so a pass means
    the cluster accepts, schedules and finishes jobs. Needs a JDK (javac).

    Returns:
      The job's sum of ``2 * i`` for ``i`` in 1..n, i.e. ``n * (n + 1)``.
    """
    return smoke_check(self.address, n)

  def overview(self) -> dict[str, Any] | None:
    """The REST ``/overview`` (task managers, slots, jobs), None if down."""
    return self._overview()

  def stop(self, timeout: float = 20.0) -> None:
    """Ends every process (TERM, then KILL), TaskManagers first, and
    removes a temp work dir."""
    for name in self.taskmanager_names() + ['jobmanager']:
      pid = self.pids.pop(name, None)
      if pid is not None:
        _terminate(pid, timeout)
      self._procs.pop(name, None)
    if self._own_dir:
      shutil.rmtree(self.work_dir, ignore_errors=True)

  def state(self) -> dict[str, Any]:
    return {'address': self.address, 'ports': self.ports, 'pids': self.pids,
            'work_dir': str(self.work_dir), 'flink_version': versions().flink}

  def __enter__(self) -> 'FlinkCluster':
    return self.start()

  def __exit__(self, *exc) -> None:
    if not self.keep:
      self.stop()


REST_ERRORS = (urllib.error.URLError, OSError, ValueError)


def rest(address: str, path: str, method: str = 'GET',
         timeout: float = 5.0) -> Any:
  """``method`` on ``path`` of the Flink REST API at ``address``
  (``host:port`` or ``http://host:port``): its JSON answer, {} when empty.
  Raises one of ``REST_ERRORS`` when Flink does not answer or refuses."""
  base = address if re.match('^https?://', address) else f'http://{address}'
  request = urllib.request.Request(f'{base}{path}', method=method)
  with urllib.request.urlopen(request, timeout=timeout) as resp:
    body = resp.read()
  return json.loads(body) if body else {}


def _terminate(pid: int, timeout: float) -> None:
  """TERM the process group led by ``pid`` (only ours: started with setsid)."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
      os.killpg(pid, sig)
    except ProcessLookupError:
      return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if not alive(pid):
        return
      time.sleep(0.2)


def smoke_check(address: str, n: int = 1000) -> int:
  """Compiles (once) and runs ``SmokeJob.java`` against ``address``."""
  javac = require_tool('javac', 'compile the Flink smoke job (install a JDK)')
  java = require_tool('java', 'run the Flink smoke job')
  lib = ensure_cluster_libs()
  build = home() / 'smoke'
  jar = build / 'smoke.jar'
  source = pathlib.Path(__file__).with_name('SmokeJob.java')
  if not jar.is_file() or jar.stat().st_mtime < source.stat().st_mtime:
    classes = build / 'classes'
    classes.mkdir(parents=True, exist_ok=True)
    subprocess.run([javac, '-cp', str(lib / '*'), '-d', str(classes),
                    str(source)], check=True, capture_output=True)
    import zipfile
    with zipfile.ZipFile(jar, 'w') as zf:
      zf.writestr('META-INF/MANIFEST.MF',
                  'Manifest-Version: 1.0\nMain-Class: SmokeJob\n')
      for cls in classes.glob('*.class'):
        zf.write(cls, cls.name)
  host, port = address.rsplit(':', 1)
  out = subprocess.run(
      [java] + list(JAVA_FLAGS) + ['-cp', f'{lib / "*"}:{jar}', 'SmokeJob',
                                   host, port, str(jar), str(n)],
      capture_output=True, text=True, check=False, timeout=300)
  for line in out.stdout.splitlines():
    if line.startswith('SUM '):
      return int(line.split()[1])
  raise RunnerSetupError(
      f'Flink smoke job failed on {address}:\n{out.stdout[-1500:]}'
      f'{out.stderr[-1500:]}')


# ---- the long-lived development cluster of `python -m runners.flink`. ----


def read_state() -> dict[str, Any] | None:
  """The running dev cluster's state, or None (a stale file is removed)."""
  try:
    state = json.loads(STATE_FILE.read_text())
  except (OSError, ValueError):
    return None
  # The JobManager is the cluster; a lost TaskManager leaves it degraded.
  jobmanager = state.get('pids', {}).get('jobmanager')
  if jobmanager is None or not alive(jobmanager):
    STATE_FILE.unlink(missing_ok=True)
    return None
  return state


def up(taskmanagers: int = 1) -> dict[str, Any]:
  """Starts the dev cluster (or finds it running); returns its state."""
  state = read_state()
  if state:
    live = [n for n, pid in state['pids'].items()
            if n != 'jobmanager' and alive(pid)]
    if len(live) != taskmanagers:
      _LOGGER.warning('Flink is already up at %s with %d live TaskManagers '
                      '(%d asked); `down` first to change it',
                      state['address'], len(live), taskmanagers)
    return state
  cluster = FlinkCluster(work_dir=RUN_DIR / 'flink', keep=True,
                         taskmanagers=taskmanagers).start()
  state = cluster.state()
  STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
  STATE_FILE.write_text(json.dumps(state, indent=2))
  return state


def down() -> bool:
  """Stops the dev cluster; False if none was running."""
  state = read_state()
  if not state:
    return False
  pids = state['pids']
  # TaskManagers first, then the JobManager; a dead one's pid may be reused.
  for name in sorted(pids, key=lambda n: n == 'jobmanager'):
    if alive(pids[name]):
      _terminate(pids[name], 20.0)
  STATE_FILE.unlink(missing_ok=True)
  return True


def status() -> dict[str, Any] | None:
  """The dev cluster's state plus its live REST overview, or None."""
  state = read_state()
  if not state:
    return None
  try:
    with urllib.request.urlopen(f'http://{state["address"]}/overview',
                                timeout=2) as resp:
      state['overview'] = json.load(resp)
  except (urllib.error.URLError, OSError, ValueError) as e:
    state['overview'] = {'error': str(e)}
  return state
