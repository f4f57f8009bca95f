"""Runner plumbing: flag mapping, and one small pipeline on every runner.

The same tiny job (payment-type counts of the taxi CSV, batch; per-window
counts from a ``TestStream``, streaming) runs on the DirectRunner as the
oracle, on Prism and on Flink, and is translated for Dataflow offline. Nothing
is mocked: Prism is the real binary, Flink the real job server and cluster;
a test skips (saying why) only when a runner's artifact cannot be had here.

    python -m pytest tests/test_runners.py -v --durations=0
"""

from __future__ import annotations

import csv
import functools
import glob
import json
import os
import pathlib
import shutil
import uuid

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import (DebugOptions,
                                                  FlinkRunnerOptions,
                                                  PipelineOptions,
                                                  PortableOptions,
                                                  PrismRunnerOptions,
                                                  SetupOptions,
                                                  StandardOptions)
from apache_beam.testing.test_stream import TestStream as BeamTestStream
from apache_beam.transforms import window
from apache_beam.transforms.periodicsequence import PeriodicImpulse

from runners import flink, prism
from runners import options as runner_options
from runners.options import RunnerOptionsError, get_flag, resolve
from runners.tools import REPO_ROOT, RunnerSetupError

TRIPS = str(REPO_ROOT / 'data' / 'taxi_trips.csv')
PAYMENT_COLUMN = 13
DATAFLOW = ['--runner', 'dataflow', '--project', 'rtml-test',
            '--region', 'us-central1', '--temp_location', 'gs://rtml-test/tmp']


# ---------------------------------------------------------------------------
# resolve(): flags in, flags out.
# ---------------------------------------------------------------------------


def test_resolve_leaves_unknown_runners_and_no_runner_alone():
  assert resolve(None) == []
  assert resolve(['--input', 'x']) == ['--input', 'x']
  for runner in ('PrismRunner', 'BundleBasedDirectRunner',
                 'apache_beam.runners.direct.direct_runner.DirectRunner'):
    argv = ['--runner', runner, '--environment_type', 'DOCKER']
    assert resolve(argv) == argv


def test_direct_is_beams_direct_runner():
  argv = resolve(['--input=x', '--runner=direct'])
  assert argv == ['--input=x', '--runner=DirectRunner']
  assert PipelineOptions(argv).view_as(StandardOptions).runner == (
      'DirectRunner')


def test_prism_adds_the_cached_binary_and_loopback():
  argv = resolve(['--runner', 'prism', '--streaming'])
  options = PipelineOptions(argv)
  assert options.view_as(StandardOptions).runner == 'PrismRunner'
  assert options.view_as(StandardOptions).streaming
  location = options.view_as(PrismRunnerOptions).prism_location
  assert location == str(prism.binary_path())
  assert os.access(location, os.X_OK)
  assert options.view_as(PortableOptions).environment_type == 'LOOPBACK'


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
  assert options.view_as(StandardOptions).runner == 'FlinkRunner'
  assert flink_options.flink_master == '[local]'
  assert flink_options.flink_version == flink.versions().flink_minor
  assert flink_options.flink_job_server_jar == '/j.jar'
  assert options.view_as(PortableOptions).environment_type == 'LOOPBACK'


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
  assert pinned.beam == beam.__version__
  assert pinned.flink_minor in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS
  assert pinned.flink.startswith(pinned.flink_minor + '.')


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
    yield f'{int(win.start)} {kv[0]} {kv[1]} {pane.timing}'


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
  assert all(line.endswith('ON_TIME') or line.endswith(' 1')
             for line in oracle['streaming'])


def test_prism_batch_output_equals_direct_runner(oracle, tmp_path):
  assert _run(_batch_counts, ['--runner', 'prism'], tmp_path / 'o') == (
      oracle['batch'])


def test_prism_streaming_output_equals_direct_runner(oracle, tmp_path):
  assert _run(_windowed_counts, ['--runner', 'prism', '--streaming'],
              tmp_path / 'o') == oracle['streaming']


@functools.lru_cache(maxsize=1)
def _flink_job_server_problem() -> str | None:
  """Why Beam's Flink job server jar cannot be had here (asked once)."""
  if not all(shutil.which(t) for t in ('java', 'mvn')):
    return 'Flink needs java and mvn'
  try:
    flink.ensure_job_server_jar()
  except RunnerSetupError as e:
    return f'no Beam Flink job server jar: {str(e).splitlines()[-1]}'
  return None


def _flink_or_skip() -> None:
  problem = _flink_job_server_problem()
  if problem:
    pytest.skip(problem)


def test_flink_local_batch_output_equals_direct_runner(oracle, tmp_path):
  _flink_or_skip()
  assert _run(_batch_counts, ['--runner', 'flink'], tmp_path / 'o') == (
      oracle['batch'])


@pytest.fixture(scope='module')
def flink_cluster():
  if not all(shutil.which(t) for t in ('java', 'javac', 'mvn')):
    pytest.skip('the Flink cluster needs a JDK and mvn')
  with flink.FlinkCluster() as cluster:
    yield cluster


def test_flink_cluster_runs_a_job(flink_cluster):
  overview = flink_cluster.overview()
  assert overview['taskmanagers'] == 1 and overview['slots-total'] == 2
  assert overview['flink-version'] == flink.versions().flink
  assert flink_cluster.check(n=1000) == 1000 * 1001
  assert flink_cluster.overview()['jobs-finished'] >= 1


def test_flink_cluster_batch_output_equals_direct_runner(
    oracle, flink_cluster, tmp_path):
  _flink_or_skip()
  argv = ['--runner', 'flink', '--flink_master', flink_cluster.address]
  assert _run(_batch_counts, argv, tmp_path / 'o') == oracle['batch']


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
