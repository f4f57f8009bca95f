"""Beam's ``FlinkRunner``, whose ``cancel()`` ends the Flink job.

Beam's job server (2.62, ``JobInvocation.cancel``) answers a cancel by
interrupting the thread that submitted the job, and reports CANCELLED at
once. The Flink job itself runs on:

* embedded (``--flink_master=[local]``), it kept reading Kafka inside the job
  server, which lives as long as the Python process: a benchmark's or a
  notebook's cancelled jobs went on sharing the workers with the next one;
* on a cluster, after the submitting process exited, the job restarted
  forever, holding its slots: its LOOPBACK workers had gone with that
  process (seen with ``pipelines.serve --run_seconds``).

This runner is Beam's, with one change: the result's ``cancel()`` also
cancels the job through Flink's REST API and waits until Flink reports it
ended. It finds the job by name on a cluster (``runners.options`` gives every
Flink run a unique ``--job_name`` unless one is set) and, embedded, on the
job's own REST endpoint: ``runners.options`` writes a ``flink-conf.yaml``
(``local_conf``) that puts it on a known port. With LOOPBACK workers the job
cannot outlive this process, so a job still running when the interpreter
exits (Ctrl-C, an exception) is cancelled the same way.
"""

from __future__ import annotations

import atexit
import logging
import pathlib
import re
import tempfile
import time
from typing import Any, Optional

from apache_beam.options.pipeline_options import (FlinkRunnerOptions,
                                                  GoogleCloudOptions,
                                                  PortableOptions)
from apache_beam.runners.portability import flink_runner
from apache_beam.runners.runner import PipelineResult, PipelineState

from runners.flink import HOST, REST_ERRORS, rest
from runners.flink.checkpoints import FlinkCheckpointOptions
from runners.tools import RUN_DIR, free_port

_LOGGER = logging.getLogger(__name__)

CONF_ROOT = RUN_DIR / 'flink-conf'
# Flink's job states that end a job (JobStatus.isGloballyTerminalState).
FLINK_ENDED = ('FINISHED', 'CANCELED', 'FAILED')
_MAGIC_MASTERS = ('[local]', '[auto]', '[collection]')


def local_conf(conf_dir: Optional[str] = None,
               savepoint: Optional[str] = None) -> pathlib.Path:
  """A Flink configuration directory for one embedded run: a copy of
  ``conf_dir`` (every file) when one was given, plus its REST endpoint on
  127.0.0.1 at a free port (unless the copy sets ``rest.port``) and, with
  ``savepoint``, ``execution.savepoint.path`` (Beam's job server ignores
  ``--savepoint_path`` for the embedded cluster). Returns the directory."""
  CONF_ROOT.mkdir(parents=True, exist_ok=True)
  out = pathlib.Path(tempfile.mkdtemp(prefix='run-', dir=CONF_ROOT))
  if conf_dir:
    for item in pathlib.Path(conf_dir).iterdir():
      if item.is_file():
        (out / item.name).write_bytes(item.read_bytes())
  conf = out / 'flink-conf.yaml'
  lines = [line for line in (conf.read_text().splitlines()
                             if conf.is_file() else [])
           if not line.startswith('execution.savepoint.path')]
  if not any(line.startswith('rest.port') for line in lines):
    lines += [f'rest.address: {HOST}', f'rest.bind-address: {HOST}',
              f'rest.port: {free_port(HOST)}']
  if savepoint:
    lines.append(f'execution.savepoint.path: {savepoint}')
  conf.write_text(''.join(f'{line}\n' for line in lines))
  _prune(CONF_ROOT, keep=out)
  return out


def _prune(root: pathlib.Path, keep: pathlib.Path,
           older_than_s: float = 7 * 86400) -> None:
  """Removes run configurations of past weeks."""
  cutoff = time.time() - older_than_s
  for old in root.glob('run-*'):
    try:
      if old != keep and old.stat().st_mtime < cutoff:
        for item in old.iterdir():
          item.unlink()
        old.rmdir()
    except OSError:
      pass


def rest_address(options) -> Optional[str]:
  """``http://host:port`` of the Flink REST API that runs this job: the
  cluster's (``--flink_master``), or the embedded cluster's when its
  ``flink-conf.yaml`` names a port (``local_conf``); None otherwise."""
  master = (options.view_as(FlinkRunnerOptions).flink_master or '').strip()
  if master and master not in _MAGIC_MASTERS:
    return master if re.match('^https?://', master) else f'http://{master}'
  conf_dir = options.view_as(FlinkCheckpointOptions).flink_conf_dir
  if master == '[local]' and conf_dir:
    conf = pathlib.Path(conf_dir) / 'flink-conf.yaml'
    settings = dict(line.split(':', 1) for line in (
        conf.read_text().splitlines() if conf.is_file() else [])
                    if ':' in line and not line.lstrip().startswith('#'))
    port = settings.get('rest.port', '').strip()
    if port.isdigit():
      address = settings.get('rest.address', HOST).strip() or HOST
      return f'http://{address}:{port}'
  return None


class FlinkJob:
  """A Beam job's Flink job(s), found through Flink's REST API."""

  def __init__(self, rest: str, name: Optional[str], embedded: bool):
    self.rest = rest
    self.name = name
    self.embedded = embedded

  def jobs(self) -> Optional[list[dict[str, Any]]]:
    """This job's Flink jobs (id, name, state); None when the REST API does
    not answer (the embedded cluster shuts down with its job)."""
    try:
      listing = rest(self.rest, '/jobs/overview').get('jobs', [])
    except REST_ERRORS:
      return None
    # The embedded cluster runs this job only; a cluster, many.
    return [job for job in listing
            if self.embedded or job.get('name') == self.name]

  def cancel(self, timeout_s: float = 120.0) -> str:
    """Cancels every running Flink job of this Beam job and waits until
    Flink reports each one ended (or ``timeout_s`` passes). Returns what it
    saw: "cancelled", "ended" (nothing was running) or "still running"."""
    started = time.monotonic()
    cancelled, quiet_polls, last_line = set(), 0, started
    while True:
      jobs = self.jobs()
      if jobs is None:
        if self.embedded:
          return 'cancelled' if cancelled else 'ended'
        _LOGGER.warning('Flink at %s does not answer; cannot cancel job %s',
                        self.rest, self.name)
        return 'still running'
      running = [job for job in jobs if job.get('state') not in FLINK_ENDED]
      for job in running:
        if job['jid'] not in cancelled:
          _LOGGER.info('Cancelling Flink job %s (%s, %s)', job['jid'],
                       job.get('name'), job.get('state'))
          try:
            rest(self.rest, f'/jobs/{job["jid"]}?mode=cancel', method='PATCH')
          except REST_ERRORS as e:
            _LOGGER.warning('Cancelling Flink job %s failed: %r; retrying',
                            job['jid'], e)
            continue
          cancelled.add(job['jid'])
      # Two quiet polls: a job the job server was still submitting when it
      # was cancelled shows up by then.
      quiet_polls = 0 if running else quiet_polls + 1
      if quiet_polls >= 2:
        return 'cancelled' if cancelled else 'ended'
      now = time.monotonic()
      if now - started > timeout_s:
        _LOGGER.warning('Flink job %s still %s after %.0f s', self.name,
                        [job.get('state') for job in running], timeout_s)
        return 'still running'
      if now - last_line > 10:
        last_line = now
        _LOGGER.info('Waiting for Flink to end job %s: %s', self.name,
                     [job.get('state') for job in running])
      time.sleep(0.5)


class FlinkJobResult(PipelineResult):
  """Beam's portable result, with a ``cancel()`` that reaches Flink."""

  def __init__(self, result: PipelineResult, flink_job: Optional[FlinkJob],
               loopback: bool):
    # The state is always the wrapped result's (``state`` below).
    super().__init__(PipelineState.UNKNOWN)
    self._result = result
    self.flink_job = flink_job
    self._cancelled = False
    if flink_job is not None and loopback:
      atexit.register(self._cancel_at_exit)

  @property
  def state(self):
    return self._result.state

  def wait_until_finish(self, duration=None):
    return self._result.wait_until_finish(duration)

  def metrics(self):
    return self._result.metrics()

  def cancel(self):
    state = self._result.cancel()
    self._cancelled = True
    if self.flink_job is not None:
      self.flink_job.cancel()
    return state

  def _cancel_at_exit(self):
    if self._cancelled:
      return
    try:
      ended = PipelineState.is_terminal(self._result.state)
    except Exception:  # pylint: disable=broad-except
      ended = False  # the job server has gone; Flink may not have
    if not ended:
      _LOGGER.info('This process ends and its LOOPBACK workers with it: '
                   'cancelling Flink job %s', self.flink_job.name)
      self.flink_job.cancel(timeout_s=30)

  def __getattr__(self, name):
    if name == '_result':  # not set yet
      raise AttributeError(name)
    return getattr(self._result, name)


class FlinkRunner(flink_runner.FlinkRunner):
  """Beam's FlinkRunner; its results cancel the Flink job too."""

  def run_pipeline(self, pipeline, options):
    result = super().run_pipeline(pipeline, options)
    rest = rest_address(options)
    master = options.view_as(FlinkRunnerOptions).flink_master
    job = None if rest is None else FlinkJob(
        rest, options.view_as(GoogleCloudOptions).job_name,
        embedded=master == '[local]')
    loopback = (options.view_as(PortableOptions).environment_type or
                '').upper() == 'LOOPBACK'
    return FlinkJobResult(result, job, loopback)
