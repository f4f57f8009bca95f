"""Runner plumbing: flag mapping, and the same pipelines on every runner.

The same tiny job (payment-type counts of the taxi CSV, batch; per-window
counts from a ``TestStream``, streaming) runs on the DirectRunner as the
oracle, on Prism and on Flink, and is translated for Dataflow offline. On
Flink the real jobs run too: the training pipeline (tf.Transform) gives the
DirectRunner's output, and the streaming serving pipeline on the real Kafka
broker scores events exactly as the SavedModel does in batch. Nothing is
mocked and nothing skips: Prism is the real binary, Flink the real job server
(embedded mini-cluster) and a real standalone cluster.

    python -m pytest tests/test_runners.py -v --durations=0
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import time
import pathlib
import uuid
import zipfile

import apache_beam as beam
from apache_beam.utils.windowed_value import PaneInfoTiming
import pytest
from apache_beam.options.pipeline_options import (DebugOptions,
                                                  FlinkRunnerOptions,
                                                  GoogleCloudOptions,
                                                  PipelineOptions,
                                                  PortableOptions,
                                                  PrismRunnerOptions,
                                                  SetupOptions,
                                                  StandardOptions,
                                                  TypeOptions)
from apache_beam.testing.test_stream import TestStream as BeamTestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window
from apache_beam.transforms.periodicsequence import PeriodicImpulse

from runners import flink, prism
from runners import options as runner_options
from runners.options import RunnerOptionsError, get_flag, has_flag, resolve
from runners.tools import REPO_ROOT, RunnerSetupError
from tests.conditions import wait_for
from tests.flink_jobs import HARNESS_HANG_UP as _HARNESS_HANG_UP
from tests.flink_jobs import stopping_job_servers as _stopping_flink_job_servers
from tests.topics import TopicReader
from tests.taxi import TAXI

# Trains models and/or starts runner services.
pytestmark = pytest.mark.integration

TRIPS = str(REPO_ROOT / 'data' / 'taxi_trips.csv')
PAYMENT_COLUMN = 13
DATAFLOW = ['--runner', 'dataflow', '--project', 'rtml-test',
            '--region', 'us-central1', '--temp_location', 'gs://rtml-test/tmp']


# ---------------------------------------------------------------------------
# resolve(): flags in, flags out.
# ---------------------------------------------------------------------------


def test_resolve_leaves_unknown_runners_alone():
  for runner in ('PrismRunner', 'BundleBasedDirectRunner',
                 'apache_beam.runners.direct.direct_runner.DirectRunner'):
    argv = ['--runner', runner, '--environment_type', 'DOCKER']
    assert resolve(argv) == argv


def test_direct_is_beams_direct_runner_without_its_prism_attempt():
  argv = resolve(['--input=x', '--runner=direct'])
  assert argv == ['--input=x', '--runner=runners.direct.LocalBatchRunner']
  assert resolve(['--input=x']) == argv  # a batch job's default
  assert resolve(['--runner=direct'], streaming=True) == [
      '--runner=DirectRunner']


def test_local_batch_runner_runs_on_the_python_engine_not_prism(caplog):
  """Beam's DirectRunner tried Prism first (a GitHub download, failing
  offline, in every batch job); ours goes straight to the Python engine."""
  import logging
  caplog.set_level(logging.INFO)
  options = PipelineOptions(resolve(['--runner', 'direct']))
  with beam.Pipeline(options=options) as p:
    assert_that(p | beam.Create([1, 2, 3]) | beam.Map(lambda x: x * 2),
                equal_to([2, 4, 6]))
  assert 'PrismRunner' not in caplog.text
  assert not options.view_as(TypeOptions).allow_unsafe_triggers


def test_prism_adds_the_cached_binary_and_loopback():
  argv = resolve(['--runner', 'prism', '--streaming'])
  options = PipelineOptions(argv)
  assert options.view_as(StandardOptions).runner == 'PrismRunner'
  assert options.view_as(StandardOptions).streaming
  location = options.view_as(PrismRunnerOptions).prism_location
  assert location == prism.tied_launcher()
  assert str(prism.binary_path()) in open(location).read()
  assert os.access(location, os.X_OK)
  assert options.view_as(PortableOptions).environment_type == 'LOOPBACK'


def test_prism_dies_with_the_process_that_launched_it(tmp_path):
  """A pipeline process killed with SIGKILL leaves no Prism behind."""
  import signal
  import subprocess
  import sys
  from runners.kafka import free_port
  port = free_port()
  # A parent that starts the launcher (as Beam does) and prints Prism's pid.
  parent = subprocess.Popen([sys.executable, '-c', (
      'import subprocess, sys, time\n'
      f'p = subprocess.Popen([{prism.tied_launcher()!r}, "--job_port", '
      f'"{port}", "--serve_http=false"])\n'
      'print(p.pid, flush=True)\n'
      'time.sleep(600)\n')], stdout=subprocess.PIPE, text=True)
  launcher = int(parent.stdout.readline())
  deadline = time.monotonic() + 30
  children = []
  while not children and time.monotonic() < deadline:
    children = subprocess.run(['pgrep', '-P', str(launcher)],
                              capture_output=True, text=True).stdout.split()
    children = [c for c in children if 'prism' in open(
        f'/proc/{c}/cmdline', 'rb').read().decode(errors='replace')]
    time.sleep(0.05)
  assert children, 'Prism did not start'
  prism_pid = int(children[0])
  os.kill(parent.pid, signal.SIGKILL)
  parent.wait()
  deadline = time.monotonic() + 10
  while os.path.exists(f'/proc/{prism_pid}') and time.monotonic() < deadline:
    with open(f'/proc/{prism_pid}/stat') as f:
      if f.read().split(')')[-1].split()[0] == 'Z':
        break  # a zombie: exited, waiting to be reaped
    time.sleep(0.1)
  alive = os.path.exists(f'/proc/{prism_pid}')
  if alive:
    with open(f'/proc/{prism_pid}/stat') as f:
      alive = f.read().split(')')[-1].split()[0] != 'Z'
  assert not alive, 'Prism outlived the process that launched it'


def test_prism_keeps_the_users_flags():
  argv = resolve(['--runner=PRISM', '--prism_location', '/opt/prism',
                  '--environment_type=DOCKER'])
  assert get_flag(argv, 'prism_location') == '/opt/prism'
  assert get_flag(argv, 'environment_type') == 'DOCKER'
  assert argv.count('--prism_location') == 1
  assert not any(a.startswith('--environment_type=LOOPBACK') for a in argv)


def test_flink_defaults_to_an_embedded_cluster_in_loopback():
  # A given jar is never fetched or replaced: this test needs no Maven.
  argv = resolve(['--runner', 'flink', '--flink_job_server_jar', '/j.jar'])
  options = PipelineOptions(argv)
  flink_options = options.view_as(FlinkRunnerOptions)
  assert options.view_as(StandardOptions).runner == (
      'runners.flink.runner.FlinkRunner')
  assert flink_options.flink_master == '[local]'
  assert flink_options.flink_version == flink.versions().flink_minor
  assert flink_options.flink_job_server_jar == '/j.jar'
  assert options.view_as(PortableOptions).environment_type == 'LOOPBACK'


def test_flink_streaming_jobs_checkpoint_into_a_directory_per_job():
  from runners.flink import checkpoints
  argv = resolve(['--runner', 'flink', '--flink_job_server_jar', '/j.jar',
                  '--group_id', 'serve/taxi'], streaming=True)
  options = PipelineOptions(argv).view_as(checkpoints.FlinkCheckpointOptions)
  assert options.checkpointing_interval == checkpoints.DEFAULT_INTERVAL_MS
  assert options.state_backend == 'filesystem'
  assert options.state_backend_storage_path == (
      checkpoints.CHECKPOINT_ROOT / 'serve_taxi').as_uri()
  assert options.finish_bundle_before_checkpointing
  assert options.externalized_checkpoints_enabled
  assert options.retain_externalized_checkpoints_on_cancellation
  # What the Python FlinkRunner sends the job server: declared flags only.
  sent = PipelineOptions(argv).get_all_options(drop_default=True)
  assert sent['checkpointing_interval'] == checkpoints.DEFAULT_INTERVAL_MS
  # The job server flushes data to the workers every 5 ms.
  assert 'data_buffer_time_limit_ms=5' in sent['experiments']
  # The user's choice wins; batch jobs get none of it.
  argv = resolve(['--runner', 'flink', '--flink_job_server_jar', '/j.jar',
                  '--checkpointing_interval', '-1',
                  '--experiments=data_buffer_time_limit_ms=50'],
                 streaming=True)
  assert get_flag(argv, 'checkpointing_interval') == '-1'
  assert PipelineOptions(argv).get_all_options()['experiments'] == [
      'data_buffer_time_limit_ms=50']
  batch = resolve(['--runner', 'flink', '--flink_job_server_jar', '/j.jar'])
  assert not has_flag(batch, 'checkpointing_interval')
  assert not PipelineOptions(batch).get_all_options()['experiments']


def test_flink_restores_the_newest_complete_checkpoint(tmp_path, monkeypatch):
  from runners.flink import checkpoints, runner
  monkeypatch.setattr(runner, 'CONF_ROOT', tmp_path / 'conf')
  storage = tmp_path / 'ckpt'
  # Two runs of the job (Flink job ids); the newest complete one wins.
  for job, name, complete, age in (('a1b2', 'chk-10', True, 300),
                                   ('c3d4', 'chk-3', True, 100),
                                   ('c3d4', 'chk-4', False, 0)):
    (storage / job / name).mkdir(parents=True)
    if complete:  # chk-4 is still being written: no _metadata yet
      (storage / job / name / '_metadata').write_bytes(b'x')
    then = time.time() - age
    os.utime(storage / job / name, (then, then))
  flags = ['--runner', 'flink', '--flink_job_server_jar', '/j.jar',
           '--group_id', 'g', '--state_backend_storage_path',
           storage.as_uri(), '--savepoint_path', 'latest']
  argv = resolve(flags, streaming=True)
  restored = (storage / 'c3d4' / 'chk-3').as_uri()
  assert get_flag(argv, 'savepoint_path') == restored
  # The embedded cluster ignores --savepoint_path: a Flink conf says it.
  conf = pathlib.Path(get_flag(argv, 'flink_conf_dir')) / 'flink-conf.yaml'
  assert f'execution.savepoint.path: {restored}\n' in conf.read_text()
  # A cluster takes --savepoint_path itself.
  argv = resolve(flags + ['--flink_master', 'h:8081'], streaming=True)
  assert get_flag(argv, 'savepoint_path') == restored
  assert not has_flag(argv, 'flink_conf_dir')
  # Nothing to restore yet: a fresh start.
  argv = resolve(flags[:-3] + [(tmp_path / 'none').as_uri(),
                               '--savepoint_path', 'latest'], streaming=True)
  assert not has_flag(argv, 'savepoint_path')
  conf = pathlib.Path(get_flag(argv, 'flink_conf_dir')) / 'flink-conf.yaml'
  assert 'execution.savepoint.path' not in conf.read_text()
  with pytest.raises(ValueError, match='local file system'):
    checkpoints.latest_checkpoint('gs://bucket/ckpt')


def test_embedded_flink_gets_a_rest_port_and_every_run_a_job_name(
    tmp_path, monkeypatch):
  from runners.flink import runner
  monkeypatch.setattr(runner, 'CONF_ROOT', tmp_path / 'conf')
  users = tmp_path / 'users'
  users.mkdir()
  (users / 'flink-conf.yaml').write_text('taskmanager.numberOfTaskSlots: 2\n')
  (users / 'log4j.properties').write_text('rootLogger.level = WARN\n')
  flags = ['--runner', 'flink', '--flink_job_server_jar', '/j.jar']
  runs = [resolve(flags + ['--flink_conf_dir', str(users)]), resolve(flags)]
  options = [PipelineOptions(argv) for argv in runs]
  addresses = [runner.rest_address(o) for o in options]
  assert all(re.fullmatch(r'http://127\.0\.0\.1:\d+', a) for a in addresses)
  assert addresses[0] != addresses[1]  # each run its own embedded cluster
  first = pathlib.Path(get_flag(runs[0], 'flink_conf_dir'))
  # The user's configuration is kept, in a copy.
  assert 'taskmanager.numberOfTaskSlots: 2\n' in (
      first / 'flink-conf.yaml').read_text()
  assert (first / 'log4j.properties').read_text() == (
      'rootLogger.level = WARN\n')
  assert (users / 'flink-conf.yaml').read_text() == (
      'taskmanager.numberOfTaskSlots: 2\n')
  names = [o.view_as(GoogleCloudOptions).job_name for o in options]
  assert all(n.startswith('rtml-') for n in names) and names[0] != names[1]
  # A cluster's address is the master's; a given job name is kept.
  argv = resolve(flags + ['--flink_master', '127.0.0.1:8081',
                          '--job_name', 'serve-taxi'])
  assert runner.rest_address(PipelineOptions(argv)) == 'http://127.0.0.1:8081'
  assert get_flag(argv, 'job_name') == 'serve-taxi'
  assert not has_flag(argv, 'flink_conf_dir')


def test_flink_keeps_a_cluster_address_and_environment():
  argv = resolve(['--runner', 'flink', '--flink_master=127.0.0.1:8081',
                  '--environment_type=PROCESS', '--flink_version=1.20',
                  '--flink_job_server_jar=/j.jar'])
  options = PipelineOptions(argv).view_as(FlinkRunnerOptions)
  assert options.flink_master == '127.0.0.1:8081'
  assert options.flink_version == '1.20'
  assert get_flag(argv, 'environment_type') == 'PROCESS'


def test_flink_pins_agree_with_beam():
  pinned = flink.versions()
  assert pinned.flink_minor in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS
  assert pinned.flink.startswith(pinned.flink_minor + '.')


def test_manifest_lines_are_wrapped_at_72_bytes():
  value = ' '.join(f'libs/dependency-number-{i}.jar' for i in range(40))
  data = flink.manifest({'Manifest-Version': '1.0', 'Class-Path': value})
  lines = data.split(b'\r\n')
  assert lines[-2:] == [b'', b'']  # the main section ends with a blank line
  assert all(len(line) <= 72 for line in lines)
  unfolded = data.replace(b'\r\n ', b'').decode().splitlines()
  assert unfolded[:2] == ['Manifest-Version: 1.0', f'Class-Path: {value}']


def test_flink_launcher_jar_names_the_pinned_job_server():
  jar = pathlib.Path(flink.ensure_job_server_jar())
  with zipfile.ZipFile(jar) as zf:
    raw = zf.read('META-INF/MANIFEST.MF')
  assert all(len(line) <= 72 for line in raw.split(b'\r\n'))
  attributes = dict(line.split(': ', 1) for line in
                    raw.replace(b'\r\n ', b'').decode().splitlines() if line)
  assert attributes['Main-Class'] == flink.JOB_SERVER_MAIN
  libs = [jar.parent / entry for entry in attributes['Class-Path'].split()]
  assert len(libs) > 100 and all(lib.is_file() for lib in libs)
  names = {lib.name for lib in libs}
  pinned = flink.versions()
  assert (f'beam-runners-flink-{pinned.flink_minor}-{pinned.job_server}.jar'
          in names)
  # The job server's embedded Flink is the cluster's Flink.
  assert f'flink-runtime-{pinned.flink}.jar' in names
  assert {'java.base/java.util', 'java.base/java.lang',
          'java.base/java.lang.reflect', 'java.base/java.io',
          'java.base/java.net', 'java.base/java.nio', 'java.base/sun.nio.ch',
          'java.base/java.time', 'java.base/java.util.concurrent'} <= set(
              attributes['Add-Opens'].split())
  assert resolve(['--runner', 'flink'])[-1] == (
      f'--flink_job_server_jar={jar}')


def test_dataflow_names_every_missing_required_flag():
  with pytest.raises(RunnerOptionsError) as error:
    resolve(['--runner', 'dataflow', '--project', 'p'])
  assert '--region' in str(error.value)
  assert '--temp_location' in str(error.value)
  assert '--project,' not in str(error.value)


def test_dataflow_rejects_a_temp_location_beam_would_replace_online():
  # 'gs://b' is too short a bucket: Beam would try to create a default
  # bucket over the network instead of failing.
  with pytest.raises(RunnerOptionsError, match='gs://BUCKET'):
    resolve(['--runner', 'dataflow', '--project', 'p', '--region', 'r',
             '--temp_location', 'gs://b/tmp'])


def test_dataflow_stages_setup_py_unless_the_image_has_the_package():
  options = PipelineOptions(resolve(DATAFLOW))
  assert options.view_as(StandardOptions).runner == 'DataflowRunner'
  assert options.view_as(SetupOptions).setup_file == str(
      REPO_ROOT / 'setup.py')
  argv = resolve(DATAFLOW + ['--sdk_container_image', 'img:1'])
  assert get_flag(argv, 'setup_file') is None


def test_dataflow_dry_run_selects_the_offline_runner():
  argv = resolve(DATAFLOW + ['--dry_run', '--job_name', 'rtml-x'])
  options = PipelineOptions(argv)
  assert options.view_as(StandardOptions).runner == (
      runner_options.OFFLINE_DATAFLOW_RUNNER)
  assert options.view_as(DebugOptions).dataflow_job_file.endswith(
      'dataflow/rtml-x.json')
  assert resolve(DATAFLOW + ['--dry_run=false'])[-1] == (
      '--runner=DataflowRunner')


def test_missing_tools_are_named(monkeypatch, tmp_path):
  monkeypatch.setenv('PATH', str(tmp_path))
  monkeypatch.setattr(prism, 'CACHE_ROOT', tmp_path)  # nothing cached
  with pytest.raises(RunnerSetupError, match='`go` was not found'):
    prism.ensure_binary(quiet=True)
  monkeypatch.setattr(flink, 'CACHE_ROOT', tmp_path)
  with pytest.raises(RunnerSetupError, match='`mvn` was not found'):
    flink.ensure_job_server_jar()


# ---------------------------------------------------------------------------
# One small pipeline, every runner.
# ---------------------------------------------------------------------------


class _AppendLines(beam.DoFn):
  """Test sink: each DoFn instance appends to its own file in ``out_dir``.

  Works for bounded and unbounded input alike (``WriteToText`` would write
  windowed shards in streaming); LOOPBACK workers share our filesystem.
  """

  def __init__(self, out_dir: str):
    self._out_dir = out_dir

  def setup(self):
    self._path = os.path.join(self._out_dir, uuid.uuid4().hex)

  def process(self, line: str):
    with open(self._path, 'a') as f:
      f.write(line + '\n')


class _FormatWindowCount(beam.DoFn):

  def process(self, kv, win=beam.DoFn.WindowParam,
              pane=beam.DoFn.PaneInfoParam):
    yield (f'{int(win.start)} {kv[0]} {kv[1]} '
           f'{PaneInfoTiming.to_string(pane.timing)}')


def _payment(line: str) -> str:
  return next(csv.reader([line]))[PAYMENT_COLUMN]


def _batch_counts(pipeline: beam.Pipeline, out_dir: str):
  return (pipeline
          | 'ReadTrips' >> beam.io.ReadFromText(TRIPS, skip_header_lines=1)
          | 'ExtractPayment' >> beam.Map(_payment)
          | 'CountPerType' >> beam.combiners.Count.PerElement()
          | 'FormatCounts' >> beam.MapTuple(lambda k, n: f'{k} {n}')
          | 'WriteCounts' >> beam.ParDo(_AppendLines(out_dir)))


def _trip_events(limit: int = 3000) -> list[tuple[str, int]]:
  with open(TRIPS) as f:
    rows = list(csv.DictReader(f))[:limit]
  return sorted(((r['payment_type'], int(r['trip_start_timestamp']))
                 for r in rows), key=lambda e: e[1])


def _windowed_counts(pipeline: beam.Pipeline, out_dir: str):
  """Event-time counts per 30-day window; the watermark moves 10 times."""
  events = _trip_events()
  stream = BeamTestStream()
  step = len(events) // 10 + 1
  for i in range(0, len(events), step):
    chunk = events[i:i + step]
    stream = (stream.add_elements(
        [window.TimestampedValue(k, t) for k, t in chunk])
              .advance_watermark_to(chunk[-1][1]))
  return (pipeline
          | 'ReadEvents' >> stream.advance_watermark_to_infinity()
          | 'WindowMonthly' >> beam.WindowInto(
              window.FixedWindows(30 * 24 * 3600))
          | 'CountPerType' >> beam.combiners.Count.PerElement()
          | 'FormatCounts' >> beam.ParDo(_FormatWindowCount())
          | 'WriteCounts' >> beam.ParDo(_AppendLines(out_dir)))


def _run(build, argv: list[str], out_dir: pathlib.Path) -> list[str]:
  """Runs ``build`` with ``resolve(argv)``; returns the sorted output."""
  out_dir.mkdir(parents=True)
  pipeline = beam.Pipeline(options=PipelineOptions(resolve(argv)))
  build(pipeline, str(out_dir))
  pipeline.run().wait_until_finish()
  lines = []
  for path in glob.glob(str(out_dir / '*')):
    with open(path) as f:
      lines.extend(f.read().splitlines())
  return sorted(lines)


@pytest.fixture(scope='module')
def oracle(tmp_path_factory) -> dict[str, list[str]]:
  """DirectRunner output of both pipelines (Python engine)."""
  root = tmp_path_factory.mktemp('direct')
  # BundleBasedDirectRunner: the Python engine itself, never Prism.
  direct = ['--runner', 'BundleBasedDirectRunner']
  return {
      'batch': _run(_batch_counts, direct, root / 'batch'),
      'streaming': _run(_windowed_counts, direct + ['--streaming'],
                        root / 'streaming'),
  }


def test_oracle_is_meaningful(oracle):
  counts = dict(line.rsplit(' ', 1) for line in oracle['batch'])
  assert counts['Cash'] == '9909' and counts['Credit Card'] == '4975'
  assert sum(map(int, counts.values())) == 15002
  assert len(oracle['streaming']) > 20  # many windows, one pane each
  assert all(line.endswith(' ON_TIME') for line in oracle['streaming'])


def test_prism_batch_output_equals_direct_runner(oracle, tmp_path):
  assert _run(_batch_counts, ['--runner', 'prism'], tmp_path / 'o') == (
      oracle['batch'])


def test_prism_streaming_output_equals_direct_runner(oracle, tmp_path):
  assert _run(_windowed_counts, ['--runner', 'prism', '--streaming'],
              tmp_path / 'o') == oracle['streaming']


# ---- Flink: Beam's job server 2.62 (runners.flink) and Flink 1.19. ----


@pytest.fixture
def flink_job_servers():
  with _stopping_flink_job_servers():
    yield


def test_flink_local_batch_output_equals_direct_runner(
    oracle, flink_job_servers, tmp_path):
  # Beam starts the launcher with `java -jar`; [local] is the job server's
  # embedded Flink mini-cluster.
  assert _run(_batch_counts, ['--runner', 'flink'], tmp_path / 'o') == (
      oracle['batch'])


@pytest.fixture(scope='module')
def flink_cluster():
  with flink.FlinkCluster() as cluster:
    yield cluster


def test_flink_cluster_runs_a_job(flink_cluster):
  overview = flink_cluster.overview()
  assert overview['taskmanagers'] == 1 and overview['slots-total'] == 2
  assert overview['flink-version'] == flink.versions().flink
  assert flink_cluster.check(n=1000) == 1000 * 1001
  assert flink_cluster.overview()['jobs-finished'] >= 1


def _flink_states(cluster, name: str) -> list[str]:
  """The states of the cluster's Flink jobs named ``name``, as the runner's
  cancel finds them (``runners.flink.runner.FlinkJob``)."""
  from runners.flink.runner import FlinkJob
  return [job['state'] for job in
          FlinkJob(cluster.address, name, embedded=False).jobs() or []]


@_HARNESS_HANG_UP
def test_a_cancelled_streaming_job_ends_on_the_flink_cluster(
    flink_cluster, flink_job_servers):
  """Beam's job server reports CANCELLED at once and leaves the Flink job
  running (after this process it would restart forever); our runner's
  cancel ends it in Flink."""
  argv = resolve(['--runner', 'flink', '--flink_master',
                  flink_cluster.address, '--streaming'], streaming=True)
  name = get_flag(argv, 'job_name')
  pipeline = beam.Pipeline(options=PipelineOptions(argv))
  _ = (pipeline | PeriodicImpulse(fire_interval=0.2)
       | beam.Map(lambda t: t))
  result = pipeline.run()

  wait_for(lambda: _flink_states(flink_cluster, name) == ['RUNNING'], 120,
           'running Flink job', 0.5)
  result.cancel()
  assert result.state == 'CANCELLED'
  assert _flink_states(flink_cluster, name) == ['CANCELED']


# A streaming job submitted the way the pipelines' command lines do: resolve,
# run, then runners.jobs.wait until it ends.
_WAITING_SUBMITTER = """
import sys
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.periodicsequence import PeriodicImpulse
from runners import jobs
from runners.options import resolve
pipeline = beam.Pipeline(options=PipelineOptions(
    resolve(sys.argv[1:], streaming=True)))
_ = pipeline | PeriodicImpulse(fire_interval=0.2) | beam.Map(lambda t: t)
print('ended', jobs.wait(pipeline.run()), flush=True)
"""


def test_sigterm_to_a_waiting_submitter_cancels_its_flink_job(
    flink_cluster, tmp_path):
  """SIGTERM (a process manager's stop) used to end the submitting process
  at once: its LOOPBACK workers went with it and the cluster restarted the
  job for good."""
  import signal
  import subprocess
  import sys
  name = f'rtml-sigterm-{uuid.uuid4().hex[:8]}'
  log = tmp_path / 'submitter.log'
  with open(log, 'w') as err:
    submitter = subprocess.Popen(
        [sys.executable, '-c', _WAITING_SUBMITTER, '--runner', 'flink',
         '--flink_master', flink_cluster.address, '--job_name', name],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=err, text=True)

  try:
    wait_for(lambda: (_flink_states(flink_cluster, name) == ['RUNNING'] or
                      submitter.poll() is not None),
             180, 'running Flink job', 0.5)
    assert _flink_states(flink_cluster, name) == ['RUNNING'], (
        log.read_text()[-3000:])
    submitter.send_signal(signal.SIGTERM)
    out, _ = submitter.communicate(timeout=120)
  finally:
    if submitter.poll() is None:
      submitter.kill()
  assert submitter.returncode == 0, log.read_text()[-3000:]
  assert out.strip() == 'ended CANCELLED'
  assert _flink_states(flink_cluster, name) == ['CANCELED']
  # The runner closing the worker's streams is no error (runners.sdk_worker).
  assert 'Traceback' not in log.read_text(), log.read_text()[-3000:]


def test_flink_cluster_batch_output_equals_direct_runner(
    oracle, flink_cluster, flink_job_servers, tmp_path):
  finished = flink_cluster.overview()['jobs-finished']
  argv = ['--runner', 'flink', '--flink_master', flink_cluster.address]
  assert _run(_batch_counts, argv, tmp_path / 'o') == oracle['batch']
  # It ran on the cluster, not in an embedded mini-cluster.
  assert flink_cluster.overview()['jobs-finished'] == finished + 1


def _decoded_examples(pattern: str) -> list[str]:
  """Transformed tf.Examples as canonical JSON (byte order of the proto map
  fields may differ between runs; the values may not)."""
  import tensorflow as tf
  from google.protobuf import json_format
  files = sorted(glob.glob(pattern))
  assert files, pattern
  return sorted(
      json.dumps(json_format.MessageToDict(tf.train.Example.FromString(
          record.numpy())), sort_keys=True)
      for record in tf.data.TFRecordDataset(files, compression_type='GZIP'))


@pytest.fixture(scope='module')
def flink_training(tmp_path_factory):
  """pipelines.train on the same 400 rows (+1 bad one): DirectRunner, Flink."""
  from pipelines import train
  root = tmp_path_factory.mktemp('train')
  data = root / 'trips.csv'
  with open(TRIPS) as f:
    lines = [next(f) for _ in range(401)]
  # One row with too many columns: both runners must dead-letter it.
  data.write_text(''.join(lines) + lines[1].rstrip('\n') + ',extra\n')
  runs = {}
  for name, argv in (('direct', ['--runner', 'direct']),
                     ('flink', ['--runner', 'flink'])):
    out = root / name
    with _stopping_flink_job_servers():
      metrics = train.run(['--input', str(data), '--output_dir', str(out),
                           '--epochs', '1'] + argv)
    runs[name] = {'out': out, 'metrics': metrics}
  return runs


@_HARNESS_HANG_UP
def test_flink_training_equals_direct_runner(flink_training):
  direct, on_flink = flink_training['direct'], flink_training['flink']
  for key in ('n_train', 'n_eval', 'n_dead_letters'):
    assert on_flink['metrics'][key] == direct['metrics'][key], key
  assert direct['metrics']['n_train'] + direct['metrics']['n_eval'] == 400
  assert direct['metrics']['n_dead_letters'] == 1
  read = lambda run, name: (run['out'] / name).read_text()
  assert json.loads(read(on_flink, 'stats.json')) == json.loads(
      read(direct, 'stats.json'))
  # tf.Transform's analyzers: the same vocabularies...
  assets = 'transform/transform_fn/assets'
  vocabularies = sorted(p.name for p in (direct['out'] / assets).iterdir())
  assert vocabularies
  for name in vocabularies:
    assert read(on_flink, f'{assets}/{name}') == read(
        direct, f'{assets}/{name}')
  # ...and the same transformed rows, train and eval.
  for prefix in ('transformed/train', 'transformed/eval'):
    assert _decoded_examples(f'{on_flink["out"]}/{prefix}*') == (
        _decoded_examples(f'{direct["out"]}/{prefix}*'))
  dead = glob.glob(str(on_flink['out'] / 'dead_letters' / '*.jsonl'))
  assert [json.loads(line)['errors'][0]['reason']
          for path in dead for line in open(path)] == ['too many columns']


@_HARNESS_HANG_UP
def test_flink_streaming_serving_on_kafka_equals_batch_predictions(
    flink_training, kafka_bootstrap, kafka_topic, flink_job_servers):
  """The Flink-trained model served by the streaming job on Flink."""
  import numpy as np
  from kafka import KafkaProducer
  from models import export, serving
  from pipelines import serve
  from tools import replay
  from transforms import records

  model_root = str(flink_training['flink']['out'] / 'model')
  topics = {'trips': kafka_topic(partitions=2, suffix='trips'),
            'predictions': kafka_topic(suffix='predictions'),
            'dlq': kafka_topic(suffix='dlq')}
  events = replay.load_events(TAXI, TRIPS, split='eval', limit=60)
  result = serve.start([
      '--runner', 'flink', '--bootstrap_servers', kafka_bootstrap,
      '--input_topic', topics['trips'],
      '--output_topic', topics['predictions'],
      '--dead_letter_topic', topics['dlq'], '--model_dir', model_root,
      '--group_id', f'serve-{uuid.uuid4().hex[:8]}'])
  predictions = TopicReader(kafka_bootstrap, topics['predictions'])
  dead_letters = TopicReader(kafka_bootstrap, topics['dlq'])
  try:
    replay.replay(TAXI, events[:30], topics['trips'], kafka_bootstrap)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    producer.send(topics['trips'], key=b'bad-0', value=b'{"fare": 1, no')
    producer.flush()
    producer.close()
    replay.replay(TAXI, events[30:], topics['trips'], kafka_bootstrap)
    predictions.until(len(events), 180)
    dead_letters.until(1, 30)
    predictions.until(len(events) + 1, 3)  # a duplicate would show up now
    assert result.state == 'RUNNING'
    # The embedded cluster's REST API, where the cancel below goes.
    assert [job['state'] for job in result.flink_job.jobs()] == ['RUNNING']
  finally:
    result.cancel()
    predictions.close()
    dead_letters.close()
  # Ended in Flink too, not only in the job server's answer (the embedded
  # cluster shuts down with its one job).
  assert result.flink_job.jobs() is None

  got = predictions.items
  assert sorted(p['event_id'] for p in got) == sorted(e for e, _ in events)
  assert {p['model_version'] for p in got} == {1}
  model = serving.load(os.path.join(model_root, '1'))
  by_id = dict(events)
  batch = serving.predict(TAXI, 
      model, [records.parse_json(TAXI, by_id[p['event_id']]) for p in got])
  np.testing.assert_allclose([p['probability'] for p in got],
                             batch[export.PROBABILITY], atol=1e-6)
  assert [d['key'] for d in dead_letters.items] == ['bad-0']
  assert dead_letters.items[0]['errors'][0]['reason'].startswith('not JSON')


def test_a_stopped_flink_serving_job_logs_no_traceback(
    flink_training, kafka_bootstrap, kafka_topic, tmp_path):
  """The command line as a user runs it, stopped by --run_seconds: the
  runner closing the worker's streams used to print three tracebacks
  (runners.sdk_worker)."""
  import subprocess
  import sys
  log = tmp_path / 'serve.log'
  with open(log, 'w') as err:
    done = subprocess.run(
        [sys.executable, '-m', 'pipelines.serve', '--runner', 'flink',
         '--bootstrap_servers', kafka_bootstrap,
         '--input_topic', kafka_topic(partitions=2, suffix='trips'),
         '--output_topic', kafka_topic(suffix='predictions'),
         '--dead_letter_topic', kafka_topic(suffix='dlq'),
         '--model_dir', str(flink_training['flink']['out'] / 'model'),
         '--group_id', f'serve-{uuid.uuid4().hex[:8]}',
         '--run_seconds', '20'],
        cwd=REPO_ROOT, stderr=err, timeout=300, check=False)
  text = log.read_text()
  assert done.returncode == 0, text[-3000:]
  assert 'Cancelling Flink job' in text  # runners.flink.runner
  assert 'Traceback' not in text, text[-3000:]


def test_dataflow_job_graph_is_built_offline(tmp_path):
  job_file = tmp_path / 'job.json'
  pipeline = beam.Pipeline(options=PipelineOptions(resolve(
      DATAFLOW + ['--dry_run', '--dataflow_job_file', str(job_file),
                  '--job_name', 'rtml-counts'])))
  _batch_counts(pipeline, 'unused')
  result = pipeline.run()
  assert result.wait_until_finish() == 'DONE'

  job = json.loads(job_file.read_text())
  assert job['name'] == 'rtml-counts'
  assert job['type'] == 'JOB_TYPE_BATCH'
  environment = job['environment']
  assert 'use_runner_v2' in environment['experiments']
  options = environment['sdkPipelineOptions']['options']
  assert options['project'] == 'rtml-test'
  assert options['region'] == 'us-central1'
  pool, = environment['workerPools']
  assert {p['name'] for p in pool['packages']} >= {'workflow.tar.gz'}
  assert pool['workerHarnessContainerImage'].endswith(
      f'beam_python3.11_sdk:{beam.__version__}')

  graph = json.loads(pathlib.Path(result.pipeline_file).read_text())
  names = {t['uniqueName'] for t in graph['components']['transforms'].values()}
  assert {'ReadTrips', 'ExtractPayment', 'CountPerType', 'FormatCounts',
          'WriteCounts'} <= names
  assert result.step_names() == names


def test_dataflow_streaming_job_is_a_streaming_job(tmp_path):
  job_file = tmp_path / 'job.json'
  pipeline = beam.Pipeline(options=PipelineOptions(resolve(
      DATAFLOW + ['--dry_run', '--dataflow_job_file', str(job_file)])))
  # An unbounded source makes the job streaming without --streaming.
  (pipeline
   | 'Tick' >> PeriodicImpulse(fire_interval=1.0)
   | 'WindowMinutely' >> beam.WindowInto(window.FixedWindows(60))
   | 'CountTicks' >> beam.combiners.Count.Globally().without_defaults())
  pipeline.run()
  job = json.loads(job_file.read_text())
  assert job['type'] == 'JOB_TYPE_STREAMING'
  options = job['environment']['sdkPipelineOptions']['options']
  assert options['streaming'] is True


def _graph_names(result) -> set[str]:
  graph = json.loads(pathlib.Path(result.pipeline_file).read_text())
  return {t['uniqueName'] for t in graph['components']['transforms'].values()}


def test_dataflow_job_graphs_of_train_and_serve(tmp_path, monkeypatch):
  """The project's own pipelines, unchanged, build Dataflow jobs offline."""
  from pipelines import serve
  from pipelines import train
  results = []
  original_run = beam.Pipeline.run

  def keep_result(self, *args, **kwargs):
    results.append(original_run(self, *args, **kwargs))
    return results[-1]
  monkeypatch.setattr(beam.Pipeline, 'run', keep_result)

  assert train.run(DATAFLOW + [
      '--dry_run', '--dataflow_job_file', str(tmp_path / 'train.json'),
      '--job_name', 'rtml-train', '--input', 'gs://rtml-test/data/*.csv',
      # tf.Transform creates its temp dir while building the graph: local,
      # since there is no network here.
      '--output_dir', str(tmp_path / 'out')]) == {'dry_run': True}
  job = json.loads((tmp_path / 'train.json').read_text())
  assert job['type'] == 'JOB_TYPE_BATCH'
  names = _graph_names(results[-1])
  assert {'ReadCsv', 'ParseAndSplit', 'ComputeStats', 'WriteDeadLetters',
          'AnalyzeAndTransform', 'TransformEval', 'WriteTrain', 'WriteEval',
          'WriteTransformFn'} <= names

  serve.start(DATAFLOW + [
      '--dry_run', '--dataflow_job_file', str(tmp_path / 'serve.json'),
      '--job_name', 'rtml-serve', '--bootstrap_servers', 'broker:9092',
      '--model_dir', 'gs://rtml-test/out/model',
      '--consumer_config', json.dumps({
          'security_protocol': 'SASL_SSL', 'sasl_mechanism': 'SCRAM-SHA-512',
          'sasl_plain_username': 'rtml',
          'sasl_plain_password': 'hunter2-literal'}),
      '--producer_config', json.dumps({
          'sasl_plain_password': 'env:KAFKA_PASSWORD'})])
  text = (tmp_path / 'serve.json').read_text()
  assert 'hunter2-literal' not in text  # a literal secret is redacted
  job = json.loads(text)
  assert job['type'] == 'JOB_TYPE_STREAMING'
  options = job['environment']['sdkPipelineOptions']['options']
  assert options['bootstrap_servers'] == 'broker:9092'
  assert options['consumer_config']['sasl_plain_password'] == '***'
  assert options['producer_config']['sasl_plain_password'] == (
      'env:KAFKA_PASSWORD')  # a reference is resolved on the workers
  names = _graph_names(results[-1])
  assert {'ReadEvents', 'ParseEvents', 'AttachContext', 'Predict',
          'Predict/RunInference', 'WritePredictions', 'MergeDeadLetters',
          'WriteDecodeDeadLetters', 'WritePredictDeadLetters',
          'WriteBatchDeadLetters', 'WriteUnwritableDeadLetters'} <= names


def test_every_jobs_flags_parse_together():
  """Beam parses the flags of every imported PipelineOptions class with one
  parser (``get_all_options``, e.g. when a job is submitted): two jobs that
  declare the same flag in one process fail to launch. Shared flags live in
  shared classes (``kafka_io.KafkaOptions``, ``windowing.WindowOptions``)."""
  import importlib
  from apache_beam.options.pipeline_options import PipelineOptions
  for module in ('pipelines.train', 'pipelines.serve', 'pipelines.analytics',
                 'pipelines.quality', 'tools.demo', 'benchmarks.serve_bench',
                 'benchmarks.soak_bench'):
    importlib.import_module(module)
  options = PipelineOptions(['--size', '60', '--alerts_topic', 'a',
                             '--min_auc', '0.7']).get_all_options()
  assert (options['size'], options['alerts_topic'], options['min_auc']) == (
      60.0, 'a', 0.7)


def test_resolve_makes_this_processs_workers_sample_every_10_ms():
  """The workers run in this process; a bundle's end waits for the state
  sampler to wake (runners.sdk_worker)."""
  from apache_beam.runners.worker import statesampler
  from apache_beam.utils.counters import CounterFactory
  from runners import sdk_worker
  resolve(['--runner', 'prism'])
  sampler = statesampler.StateSampler('s', CounterFactory())
  assert sampler.sampling_period_ms == sdk_worker.SAMPLING_PERIOD_MS == 10
  # Still Beam's sampler, and tuning twice wraps it once.
  assert isinstance(sampler, statesampler.statesampler_impl.StateSampler)
  sdk_worker.tune()
  assert statesampler.StateSampler.__mro__[1].__name__ == 'StateSampler'
  assert not getattr(statesampler.StateSampler.__mro__[1], 'rtml_tuned',
                     False)


def test_a_split_request_survives_a_nan_element_progress():
  """Beam's byte-based progress of a splittable DoFn is NaN until an output
  was sampled; Prism's split request then failed the job (runners.sdk_worker).
  """
  import math
  from apache_beam.runners.worker import bundle_processor
  from runners import sdk_worker
  resolve(['--runner', 'prism'])
  compute = bundle_processor.DataInputOperation._compute_split
  asked = []

  def try_split(fraction):
    asked.append(fraction)
    return None  # the Kafka reader splits only to checkpoint

  # Prism's request: half of the remainder, one element in the bundle.
  got = compute(0, math.nan, math.inf, 0.5, 1, [], try_split)
  assert got == compute(0, sdk_worker.UNKNOWN_PROGRESS, math.inf, 0.5, 1, [],
                        try_split)
  assert asked == [0.5, 0.5]  # the DoFn was asked, not skipped


def test_a_bundle_finishing_after_the_worker_shut_down_is_no_error():
  """When a job ends, the worker shuts its bundle processors down while a
  bundle may still be finishing; its release raised KeyError, printed with
  a traceback (runners.sdk_worker)."""
  from apache_beam.portability.api import beam_fn_api_pb2
  from apache_beam.runners.worker import data_plane
  from apache_beam.runners.worker import sdk_worker as beam_worker
  resolve(['--runner', 'prism'])

  class NoStateApi(beam_worker.StateHandlerFactory):
    """A bundle with no transforms asks for no state: Beam's own handler
    that refuses every request."""

    def create_state_handler(self, api_service_descriptor):
      return beam_worker.ThrowingStateHandler()

    def close(self):
      pass

  cache = beam_worker.BundleProcessorCache(
      frozenset(), NoStateApi(), data_plane.GrpcClientDataChannelFactory(),
      {'d': beam_fn_api_pb2.ProcessBundleDescriptor(id='d')})
  cache.get('bundle-1', 'd')
  cache.shutdown()  # the job ended while bundle-1 ran
  cache.release('bundle-1')  # bundle-1 finishes: no KeyError
  assert 'bundle-1' in cache.failed_instruction_ids
  assert not cache.active_bundle_processors
  # Releasing a bundle nobody shut down still fails as Beam's does.
  with pytest.raises(KeyError):
    cache.release('never-started')
