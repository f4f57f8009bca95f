"""Turns a short ``--runner`` flag into complete Beam options.

Every pipeline's ``run(argv)`` passes its argv through ``resolve`` before
building its ``PipelineOptions``, so the runner (and everything it needs:
staged binaries, jars, environment type) comes from flags only and no
pipeline names a runner in code. A flag the user gave is never overridden;
``resolve`` only adds what is missing.

==========  ==============================================================
``--runner``  what ``resolve`` adds (unless already given)
==========  ==============================================================
direct      batch: ``--runner=runners.direct.LocalBatchRunner``, Beam's
            DirectRunner minus its first try on Prism (in Beam 2.77 a
            download from GitHub, which fails offline; see
            ``runners.direct``); streaming: ``--runner=DirectRunner``
prism       ``--runner=PrismRunner --prism_location=<cached launcher>
            --environment_type=LOOPBACK``; the binary is built once with
            ``go install`` at the Beam pin, and started by a launcher that
            stops it when this process dies (``runners.prism``)
flink       ``--runner=runners.flink.runner.FlinkRunner --flink_version=1.19
            --flink_master=[local] --environment_type=LOOPBACK
            --flink_job_server_jar=<cached launcher jar>
            --job_name=rtml-<random>``: Beam's FlinkRunner, whose cancel also
            ends the Flink job (``runners.flink.runner``), and Beam's Flink
            job server 2.62 assembled from Maven (``runners.flink`` says why
            not 2.77); for a cluster give ``--flink_master=HOST:PORT``
            (``python -m runners.flink up`` prints one). The embedded cluster
            gets a ``--flink_conf_dir`` of its own (its REST port, a restored
            checkpoint). A streaming job also
            gets checkpoints every 10 s, kept in a directory per job
            (``runners.flink.checkpoints``). LOOPBACK runs the
            Python workers inside the submitting process, which the task
            managers must be able to reach (same machine or network); for
            remote clusters use ``--environment_type=PROCESS
            --environment_config='{"command": "/opt/apache/beam/boot"}'`` with
            Beam's ``boot`` and this package installed on every task manager.
dataflow    ``--runner=DataflowRunner --setup_file=<repo>/setup.py`` (not with
            ``--sdk_container_image``: our image has the package); requires
            ``--project``, ``--region`` and a ``gs://`` ``--temp_location``.
            With ``--dry_run`` the job is built offline (no credentials, no
            API call) and written to ``--dataflow_job_file`` (default
            ``~/.cache/rtml/run/dataflow/<job_name>.json``) by
            ``runners.dataflow.OfflineDataflowRunner``.
==========  ==============================================================

Any other value (``PrismRunner``, ``BundleBasedDirectRunner``, a dotted class
path...) is passed through unchanged.

Without ``--runner`` a batch job gets ``direct`` and a
streaming job (``streaming=True``: serving, analytics on Kafka) gets
``EMBEDDED_STREAMING_RUNNER``, Prism. Why not the DirectRunner for streaming:
in Beam 2.77 it runs any pipeline without a TestStream, Pub/Sub or real-time
timer on its *batch* engine (FnApiRunner), even with ``--streaming``, so an
unbounded Kafka read never advances watermarks between bundles and a job with
an unbounded side input never starts; the BundleBasedDirectRunner cannot
expand our splittable DoFns ("was not replaced as expected"). Prism runs them
with real watermarks and was 1.7-1.9x faster at volume
(``benchmarks/runners_bench.py``).

Example::

    python -m pipelines.analytics --runner prism ...
    python -m pipelines.serve --runner flink --flink_master 127.0.0.1:8081 ...
    python -m pipelines.serve --runner dataflow --project P --region R \\
        --temp_location gs://B/tmp --dry_run
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Callable

from runners.tools import REPO_ROOT, RUN_DIR, RunnerSetupError

ALIASES = ('direct', 'prism', 'flink', 'dataflow')
EMBEDDED_STREAMING_RUNNER = 'prism'
OFFLINE_DATAFLOW_RUNNER = 'runners.dataflow.OfflineDataflowRunner'
LOCAL_BATCH_RUNNER = 'runners.direct.LocalBatchRunner'
FLINK_RUNNER = 'runners.flink.runner.FlinkRunner'
# Beam's check for a GCS path (PipelineOptionsValidator.GCS_URI/GCS_BUCKET).
_LOGGER = logging.getLogger(__name__)
_GCS_PATH = re.compile(r'^gs://[a-z0-9][-_a-z0-9.]+[a-z0-9](/.*)?$')
_FALSE = ('', '0', 'false', 'no', 'off')


class RunnerOptionsError(ValueError):
  """The flags given cannot work with the chosen runner."""


def resolve(argv: list[str] | None, streaming: bool = False) -> list[str]:
  """Returns argv completed with the options the chosen runner needs.

  Args:
    argv: command-line flags, as given to a pipeline's ``run(argv)``.
    streaming: the job is a streaming one; without ``--runner`` it then runs
      on ``EMBEDDED_STREAMING_RUNNER`` (see module docstring).

  Returns:
    A new list: ``argv`` with ``--runner`` replaced by Beam's runner name and
    the runner's missing flags appended.

  Raises:
    RunnerOptionsError: required flags are missing or inconsistent.
    RunnerSetupError: a tool (Go, Java, Maven) or artifact is missing.
  """
  from runners import sdk_worker
  # LOOPBACK and in-process workers run in this process (runners.sdk_worker).
  sdk_worker.tune()
  argv = _normalize(list(argv or []))
  runner = get_flag(argv, 'runner')
  if runner is None:
    runner = EMBEDDED_STREAMING_RUNNER if streaming else 'direct'
    argv = set_flag(argv, 'runner', runner)
  if runner.lower() not in ALIASES:
    return argv
  completer: Callable[[list[str]], list[str]] = {
      'direct': lambda argv: _direct(argv, streaming), 'prism': _prism,
      'flink': lambda argv: _flink(argv, streaming),
      'dataflow': _dataflow}[runner.lower()]
  return completer(argv)


def _direct(argv: list[str], streaming: bool = False) -> list[str]:
  return set_flag(argv, 'runner',
                  'DirectRunner' if streaming else LOCAL_BATCH_RUNNER)


def _prism(argv: list[str]) -> list[str]:
  from runners import prism
  argv = set_flag(argv, 'runner', 'PrismRunner')
  if not has_flag(argv, 'prism_location'):
    # Dies with this process (a killed pipeline leaves no Prism behind).
    argv = set_flag(argv, 'prism_location', prism.tied_launcher())
  # The LOOPBACK workers run in this process (see runners.prism).
  prism.tolerate_finalize_without_callbacks()
  # Beam shares one Prism job server per process. In Beam 2.77 a
  # DirectRunner run first tries Prism *without* our binary (a download,
  # which fails offline) and leaves that broken server as the shared one, so
  # a later --runner prism in the same process (a notebook, a test session)
  # would reuse it. Our runs get their own server.
  argv = add_experiment(argv, 'disable_prism_server_singleton')
  # Python workers in this process: no Docker, no worker start-up cost.
  return set_default(argv, 'environment_type', 'LOOPBACK')


FLINK_STREAMING_BUNDLE_MS = 20
FLINK_DATA_FLUSH_MS = 5


def _flink(argv: list[str], streaming: bool = False) -> list[str]:
  from runners import flink
  # Beam's FlinkRunner, whose cancel() also ends the Flink job
  # (runners.flink.runner says why Beam's does not).
  argv = set_flag(argv, 'runner', FLINK_RUNNER)
  if streaming:
    argv = _flink_checkpoints(argv)
    # Flink ends a bundle of the Python stage after this long (default
    # 1,000 ms) and only then resumes a checkpointed Kafka read: serving
    # answered in p50 646-760 ms with the default, 13-413 ms with 20
    # (benchmarks/serve_bench.py, three runs, README "Benchmarks").
    argv = set_default(argv, 'max_bundle_time_mills',
                       str(FLINK_STREAMING_BUNDLE_MS))
    # The job server sends a resumed Kafka read's element to the Python
    # worker only when its buffer fills or its bundle ends (the 20 ms
    # above): each read began 20-25 ms after its bundle (a trace at 10
    # events/s); with a 5 ms flush, 1-9 ms.
    argv = add_experiment(
        argv, f'data_buffer_time_limit_ms={FLINK_DATA_FLUSH_MS}')
  argv = set_default(argv, 'flink_version', flink.versions().flink_minor)
  argv = set_default(argv, 'flink_master', '[local]')
  savepoint = (_flink_restore(argv) if streaming else
               get_flag(argv, 'savepoint_path'))
  argv = _drop(argv, 'savepoint_path')
  if get_flag(argv, 'flink_master') == '[local]':
    # The embedded cluster ignores --savepoint_path, and its REST endpoint
    # (where a cancel reaches the job) is on a port of its own choosing: a
    # flink-conf.yaml of this run says both.
    from runners.flink.runner import local_conf
    conf = local_conf(get_flag(argv, 'flink_conf_dir'), savepoint)
    argv = set_flag(argv, 'flink_conf_dir', str(conf))
  if savepoint:
    argv = argv + [f'--savepoint_path={savepoint}']
  # After the checkpoint directory was chosen (by --job_name or --group_id):
  # the name a cancel finds the job by on a cluster.
  argv = set_default(argv, 'job_name', f'rtml-{uuid.uuid4().hex[:12]}')
  argv = set_default(argv, 'environment_type', 'LOOPBACK')
  if not has_flag(argv, 'flink_job_server_jar'):
    jar = flink.ensure_job_server_jar(get_flag(argv, 'flink_version'))
    argv = set_flag(argv, 'flink_job_server_jar', jar)
  else:
    from runners.tools import require_tool
    require_tool('java', 'run the Beam Flink job server')
  return argv


def _flink_checkpoints(argv: list[str]) -> list[str]:
  """Checkpoints on, kept, in a directory per job (``flink.checkpoints``)."""
  from runners.flink import checkpoints
  argv = set_default(argv, 'checkpointing_interval',
                     str(checkpoints.DEFAULT_INTERVAL_MS))
  argv = set_default(argv, 'state_backend', 'filesystem')
  job = get_flag(argv, 'job_name') or get_flag(argv, 'group_id')
  argv = set_default(argv, 'state_backend_storage_path',
                     checkpoints.job_dir(job).as_uri())
  for name in ('finish_bundle_before_checkpointing',
               'externalized_checkpoints_enabled',
               'retain_externalized_checkpoints_on_cancellation'):
    if not has_flag(argv, name):
      argv = argv + [f'--{name}']
  return argv


def _flink_restore(argv: list[str]) -> str | None:
  """The checkpoint or savepoint to start from: ``--savepoint_path``, with
  ``latest`` resolved to the job's newest complete checkpoint
  (``runners.flink.checkpoints``); None for a fresh start."""
  from runners.flink import checkpoints
  savepoint = get_flag(argv, 'savepoint_path')
  if savepoint == checkpoints.LATEST:
    storage = get_flag(argv, 'state_backend_storage_path')
    savepoint = checkpoints.latest_checkpoint(storage) if storage else None
    if savepoint is None:
      _LOGGER.info('--savepoint_path=latest: no complete checkpoint under %s '
                   'yet; starting afresh', storage)
      return None
    _LOGGER.info('Restoring the job from its newest checkpoint %s', savepoint)
  return savepoint


def _dataflow(argv: list[str]) -> list[str]:
  missing = [f'--{name}' for name in ('project', 'region', 'temp_location')
             if not get_flag(argv, name)]
  if missing:
    raise RunnerOptionsError(
        f'--runner dataflow needs {", ".join(missing)} (e.g. --project '
        'my-project --region us-central1 --temp_location gs://my-bucket/tmp)')
  for name in ('temp_location', 'staging_location'):
    value = get_flag(argv, name)
    if value is not None and not _GCS_PATH.match(value):
      # Beam would otherwise try to create a default bucket over the network.
      raise RunnerOptionsError(
          f'--{name}={value} is not a gs://BUCKET/PATH location (bucket names '
          'are 3-63 lowercase letters, digits, -, _ and .)')
  if not has_flag(argv, 'sdk_container_image'):
    # Workers install our packages from the sdist of setup.py. The image of
    # runners/dataflow/Dockerfile has them installed already.
    argv = set_default(argv, 'setup_file', str(REPO_ROOT / 'setup.py'))
  if _truthy(get_flag(argv, 'dry_run')):
    argv = set_flag(argv, 'runner', OFFLINE_DATAFLOW_RUNNER)
    job_name = get_flag(argv, 'job_name') or 'job'
    return set_default(argv, 'dataflow_job_file',
                       str(RUN_DIR / 'dataflow' / f'{job_name}.json'))
  return set_flag(argv, 'runner', 'DataflowRunner')


# ---- argv helpers: `--name value` and `--name=value`, last one wins. ----


def _normalize(argv: list[str]) -> list[str]:
  """Gives a bare ``--dry_run`` the value Beam's parser requires."""
  out = []
  for i, arg in enumerate(argv):
    nxt = argv[i + 1] if i + 1 < len(argv) else None
    if arg == '--dry_run' and (nxt is None or nxt.startswith('--')):
      out.append('--dry_run=True')
    else:
      out.append(arg)
  return out


def _truthy(value: str | None) -> bool:
  return value is not None and value.strip().lower() not in _FALSE


def _positions(argv: list[str], name: str) -> list[tuple[int, int]]:
  """(index, how many items) of each occurrence of ``--name``."""
  flag = f'--{name}'
  found = []
  for i, arg in enumerate(argv):
    if arg == flag:
      found.append((i, 2 if i + 1 < len(argv) else 1))
    elif arg.startswith(flag + '='):
      found.append((i, 1))
  return found


def has_flag(argv: list[str], name: str) -> bool:
  """Whether ``--name`` is in argv (with any value)."""
  return bool(_positions(argv, name))


def get_flag(argv: list[str], name: str) -> str | None:
  """The value of the last ``--name`` in argv, or None."""
  found = _positions(argv, name)
  if not found:
    return None
  i, n = found[-1]
  if n == 2:
    return argv[i + 1]
  return argv[i].split('=', 1)[1] if '=' in argv[i] else None


def set_flag(argv: list[str], name: str, value: str) -> list[str]:
  """argv with every ``--name`` removed and ``--name=value`` appended."""
  return _drop(argv, name) + [f'--{name}={value}']


def _drop(argv: list[str], name: str) -> list[str]:
  """argv without ``--name`` (and its value)."""
  drop = set()
  for i, n in _positions(argv, name):
    drop.update(range(i, i + n))
  return [a for j, a in enumerate(argv) if j not in drop]


def set_default(argv: list[str], name: str, value: str) -> list[str]:
  """argv with ``--name=value`` appended unless ``--name`` is already set."""
  return argv if has_flag(argv, name) else argv + [f'--{name}={value}']


def add_experiment(argv: list[str], experiment: str) -> list[str]:
  """argv with ``--experiments=experiment`` appended unless argv already
  names that experiment (the part before any ``=``), with any value."""
  name = experiment.split('=', 1)[0]
  return argv if name in ' '.join(argv) else argv + [
      f'--experiments={experiment}']


__all__ = ['resolve', 'RunnerOptionsError', 'RunnerSetupError',
           'add_experiment', 'get_flag', 'has_flag', 'set_flag',
           'set_default']
