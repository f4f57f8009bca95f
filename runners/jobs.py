"""Waiting for a running job without tying its life to the runner's stream.

``PipelineResult.wait_until_finish`` of Beam's portable runners (Prism,
Flink) follows the job service's state *stream*, which Beam 2.77 opens with
a deadline of ``--job_server_timeout`` (300 s by default,
``portable_runner.JobServiceHandle.run``). After five minutes the stream
ends with ``DEADLINE_EXCEEDED`` (or ``CANCELLED``); ``wait_until_finish``
then raises and runs the job's cleanup, which stops the job server and with
it a healthy streaming job. ``wait`` asks for the job's state instead (one
``GetState`` call a second), rides out failed calls for up to ``give_up_s``
with a log line, and reports the outcome once the job is in a terminal
state.

SIGTERM (how systemd, Kubernetes or ``kill`` stop a process) received while
``wait`` waits cancels the job, and ``wait`` returns once it has ended, as
after Ctrl-C. Without this the process died at once, and a Flink job whose
LOOPBACK workers lived in it was left restarting on the cluster for good
(``runners.flink.runner`` cancels it on a normal exit only).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any, Iterator, Optional

from apache_beam.runners.runner import PipelineState

_LOGGER = logging.getLogger(__name__)


def wait(result: Any, duration_s: Optional[float] = None,
         poll_s: float = 1.0, give_up_s: float = 300.0) -> Any:
  """Waits until the job ends (or ``duration_s`` passes); returns its state.

  Raises what ``wait_until_finish`` raises for a failed job, and
  ``RuntimeError`` when the runner has not answered for ``give_up_s``.
  """
  started = time.monotonic()
  unanswered_since = None
  cancelled = False
  with _sigterm() as stop_asked:
    while True:
      if stop_asked.is_set() and not cancelled:
        _LOGGER.info('SIGTERM: cancelling the job')
        cancelled = True
        try:
          result.cancel()
        except Exception as e:  # pylint: disable=broad-except
          # The runner may be gone already; its state below says.
          _LOGGER.warning('Cancelling the job failed: %r', e)
      try:
        state = result.state
      except Exception as e:  # pylint: disable=broad-except
        now = time.monotonic()
        unanswered_since = unanswered_since or now
        if now - unanswered_since > give_up_s:
          raise RuntimeError(f'the runner has not answered for '
                             f'{give_up_s:.0f}s: {e!r}') from e
        _LOGGER.warning('Asking the runner for the job state failed (%r); '
                        'the job keeps running, asking again', e)
      else:
        unanswered_since = None
        if PipelineState.is_terminal(state):
          return _finish(result, state)
      if duration_s is not None and time.monotonic() - started >= duration_s:
        return state
      stop_asked.wait(poll_s)


@contextlib.contextmanager
def _sigterm() -> Iterator[threading.Event]:
  """An event set by SIGTERM while the block runs (main thread only: Python
  runs signal handlers there; elsewhere the event is never set)."""
  asked = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield asked
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: asked.set())
  try:
    yield asked
  finally:
    signal.signal(signal.SIGTERM, previous)


def _finish(result: Any, state: str) -> str:
  """Lets ``wait_until_finish`` report a finished job (its error, its
  cleanup); a state stream past its deadline only matters if it failed."""
  try:
    result.wait_until_finish()
  except Exception:  # pylint: disable=broad-except
    if state == PipelineState.FAILED:
      raise
    _LOGGER.info('The job ended in state %s (its state stream had ended)',
                 state)
  if state == PipelineState.FAILED:
    raise RuntimeError('the job failed')
  return state
