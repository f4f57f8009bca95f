"""Flink checkpoints for streaming jobs: on by default, and kept.

A streaming job on Flink (``--runner flink``, ``runners.options``) gets,
unless the flags are given:

* ``--checkpointing_interval=10000`` (ms): Flink snapshots every operator's
  state (window contents, the Kafka source's restrictions, i.e. offsets)
  every 10 s, and the Kafka source commits the group's offsets only once the
  checkpoint that covers them is complete (Beam's bundle finalization);
* ``--state_backend=filesystem`` with
  ``--state_backend_storage_path=file://~/.cache/rtml/run/flink-checkpoints/<job>``
  where ``<job>`` is ``--job_name``, else ``--group_id``, else ``default``:
  the same job restarted finds its own checkpoints;
* ``--finish_bundle_before_checkpointing``: each operator finishes its
  bundle, so the Kafka sinks flush, before its snapshot. Without it the
  runner keeps a bundle's pending outputs in the checkpoint; the source then
  commits offsets of records whose predictions exist only in that checkpoint,
  and a job restarted from the group's offsets (not from the checkpoint)
  loses them (seen: the SIGKILL test lost events on Flink);
* ``--externalized_checkpoints_enabled`` and
  ``--retain_externalized_checkpoints_on_cancellation``: checkpoints outlive
  the job (a crash, a cancel).

Restarting a job from its state: ``--savepoint_path=<dir>/<job id>/chk-<n>``
(or a savepoint), or ``--savepoint_path=latest``: the newest complete
checkpoint under the job's ``--state_backend_storage_path`` (none yet: the
job starts afresh, with a log line). Beam's job server (2.62) applies
``--savepoint_path`` only when it submits to a cluster; for the embedded
cluster (``--flink_master=[local]``) it ignores it, so ``runners.options``
writes a ``flink-conf.yaml`` with ``execution.savepoint.path``
(``runners.flink.runner.local_conf``) and passes its directory as
``--flink_conf_dir``, which the embedded environment reads.

What was measured (README, "Reliability"): serving killed with its whole
process group on Flink loses nothing (the group's offsets are committed
after each checkpoint); windowed analytics killed the same way and started
again with ``--savepoint_path=latest`` restores its open windows and loses
nothing; a TaskManager lost on a two-TaskManager cluster is recovered by
Flink itself from the last checkpoint.

Beam's Python ``FlinkRunner`` forwards to the job server only the flags some
Python options class declares (it drops unknown ones unless it builds an
uber jar), so ``FlinkCheckpointOptions`` declares the Java
``FlinkPipelineOptions`` names used here.
"""

from __future__ import annotations

import pathlib
import re
import urllib.parse
from typing import Optional

from apache_beam.options.pipeline_options import PipelineOptions

from runners.tools import RUN_DIR

CHECKPOINT_ROOT = RUN_DIR / 'flink-checkpoints'
DEFAULT_INTERVAL_MS = 10_000


class FlinkCheckpointOptions(PipelineOptions):
  """Flink's checkpoint flags, forwarded to the Beam Flink job server."""

  @classmethod
  def _add_argparse_args(cls, parser):
    parser.add_argument('--checkpointing_interval', type=int, default=None,
                        help='Flink: milliseconds between checkpoints '
                        '(streaming default 10000).')
    parser.add_argument('--state_backend', default=None,
                        help='Flink: filesystem or rocksdb.')
    parser.add_argument('--state_backend_storage_path', default=None,
                        help='Flink: where checkpoints are written '
                        '(file:// or a shared file system).')
    parser.add_argument('--externalized_checkpoints_enabled',
                        action='store_true', default=None,
                        help='Flink: keep checkpoints outside the job.')
    parser.add_argument('--retain_externalized_checkpoints_on_cancellation',
                        action='store_true', default=None,
                        help='Flink: keep them when the job is cancelled.')
    parser.add_argument('--finish_bundle_before_checkpointing',
                        action='store_true', default=None,
                        help='Flink: every operator finishes its bundle '
                        '(the Kafka sinks flush) before its snapshot.')
    parser.add_argument('--flink_conf_dir', default=None,
                        help='Flink: a directory with a flink-conf.yaml for '
                        'the job server\'s Flink environment.')
    parser.add_argument('--savepoint_path', default=None,
                        help='Flink: start from this savepoint or retained '
                        'checkpoint (a chk-<n> directory), or "latest": the '
                        'job\'s newest complete checkpoint.')


def job_dir(job: Optional[str]) -> pathlib.Path:
  """The default checkpoint directory of a job name (or group id)."""
  safe = re.sub(r'[^A-Za-z0-9._-]', '_', job or 'default')
  return CHECKPOINT_ROOT / safe


LATEST = 'latest'


def latest_checkpoint(storage_path: str) -> Optional[str]:
  """The newest complete checkpoint (``chk-<n>`` with its ``_metadata``)
  under a ``--state_backend_storage_path`` (``file://`` URI or path), as a
  ``file://`` URI; None if there is none."""
  scheme = urllib.parse.urlparse(storage_path).scheme
  if scheme not in ('', 'file'):
    raise ValueError(f'--savepoint_path latest looks for checkpoints on the '
                     f'local file system only, not in {storage_path}; give '
                     f'the chk-<n> path itself')
  root = pathlib.Path(_local_path(storage_path))
  done = [m.parent for m in root.glob('*/chk-*/_metadata')]
  if not done:
    return None
  newest = max(done, key=lambda d: (d.stat().st_mtime,
                                    int(d.name.split('-')[1])))
  return newest.resolve().as_uri()


def _local_path(uri: str) -> str:
  if uri.startswith('file://'):
    return urllib.parse.unquote(urllib.parse.urlparse(uri).path)
  return uri
