"""Flink job servers that a test starts, stopped when it is done."""

import contextlib

import pytest
from apache_beam.runners.portability import job_server


@contextlib.contextmanager
def stopping_job_servers():
  """Stops the job servers Beam's FlinkRunner starts inside the block.

  Beam keeps each one (a JVM, with its mini-cluster for [local]) until the
  Python process exits; a test session would pile them up. Observing
  ``StopOnExitJobServer.start`` changes nothing else.
  """
  started = []
  original = job_server.StopOnExitJobServer.start

  def start(self):
    started.append(self)
    return original(self)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(job_server.StopOnExitJobServer, 'start', start)
    try:
      yield
    finally:
      for server in started:
        server.stop()


# When a job server stops, the in-process SDK harness threads of its finished
# or cancelled job see their gRPC streams end (CANCELLED "Multiplexer hanging
# up", UNAVAILABLE "Socket closed") and pytest reports each thread's exception.
HARNESS_HANG_UP = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnhandledThreadExceptionWarning')
