"""The Python SDK workers of this process: tuned for latency, two fixes, and
a quiet end.

Our runners run their Python workers inside the launching process
(LOOPBACK for Prism and Flink; the DirectRunner's own engine), so
``runners.options.resolve`` calls ``tune()`` before any pipeline starts.

What it changes: Beam's state sampler (``statesampler_fast``) measures the
time each step takes with a thread that sleeps between samples, its period
growing to ``DEFAULT_SAMPLING_PERIOD_MS`` (200 ms). At the end of *every*
bundle the worker stops that thread and waits for it to wake up
(``StateSampler.stop`` joins it), so a bundle that lasted about a second
answered the runner 0-200 ms late, and the Kafka source's next read started
that much later. A trace of Flink serving (2026-12-02, 100 events/s) put
5-198 ms between the read's end and the bundle's response, and the serving
benchmark's read stage had a p95 of 100-280 ms. Sampling every
``SAMPLING_PERIOD_MS`` bounds that wait; the sampler is C code that runs
without the GIL, so waking more often costs next to nothing, and step
timings are, if anything, finer.

And one fix: a runner's request to split a running splittable DoFn (Prism
asks when a bundle makes no visible progress, e.g. exactly-once serving's
1 s bundles) failed in the worker with "cannot convert float NaN to
integer", and Prism then failed the job (seen 2026-12-03 in
``benchmarks/serve_bench.py --runners prism:exactly_once``, twice in two
runs at 100 events/s). Beam measures an element's completed work as the
bytes it output, elements x their mean sampled size
(``SdfProcessSizedElements.current_element_progress``), and that mean is NaN
until one output has been sampled. The split then treats the progress as
unknown, as Beam does when a DoFn reports none (``DataInputOperation``).

And a quiet end: when a job ends (cancelled, or its runner shut down), the
runner closes the worker's gRPC streams with status CANCELLED ("Runner
closed connection", "Multiplexer hanging up"), and Beam's worker printed
each as an error with its traceback (three per cancelled Flink job), and
on Prism a ``KeyError`` from a bundle finishing after the worker had shut
its bundle processors down. A user stopping a healthy job read them as
failures. They are now one INFO line each; any other error of those
threads and loggers is reported as before.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Optional

_LOGGER = logging.getLogger(__name__)

SAMPLING_PERIOD_MS = 10
# DataInputOperation.try_split's progress for an element whose progress is
# unknown.
UNKNOWN_PROGRESS = 0.5


def tune() -> None:
  """Makes this process's bundle processors sample (and so end) every
  ``SAMPLING_PERIOD_MS``, and their splits survive a NaN progress.
  Idempotent."""
  from apache_beam.runners.worker import statesampler
  if getattr(statesampler.StateSampler, 'rtml_tuned', False):
    return
  _split_with_unknown_progress()
  _quiet_runner_hang_up()
  beams = statesampler.StateSampler

  class StateSampler(beams):
    """Beam's, with a shorter default sampling period."""
    rtml_tuned = True

    def __init__(self, prefix, counter_factory,
                 sampling_period_ms=SAMPLING_PERIOD_MS):
      super().__init__(prefix, counter_factory, sampling_period_ms)

  # bundle_processor looks the class up in the module at each new bundle
  # processor.
  statesampler.StateSampler = StateSampler


def _split_with_unknown_progress() -> None:
  """``DataInputOperation._compute_split`` with a NaN element progress taken
  as unknown (see the module docstring)."""
  from apache_beam.runners.worker import bundle_processor
  operation = bundle_processor.DataInputOperation
  compute_split = operation._compute_split  # pylint: disable=protected-access

  def _compute_split(index, current_element_progress, *args, **kwargs):
    if math.isnan(current_element_progress):
      current_element_progress = UNKNOWN_PROGRESS
    return compute_split(index, current_element_progress, *args, **kwargs)

  operation._compute_split = staticmethod(_compute_split)


def runner_hung_up(error: Optional[BaseException]) -> bool:
  """Whether ``error`` is the runner closing a worker stream: gRPC status
  CANCELLED (a runner that died gives UNAVAILABLE instead)."""
  import grpc
  code = getattr(error, 'code', None)
  return (isinstance(error, grpc.RpcError) and callable(code) and
          code() == grpc.StatusCode.CANCELLED)


class _HangUpFilter(logging.Filter):
  """Beam's data plane logs a stream the runner closed as an error with its
  traceback: one INFO line instead."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and runner_hung_up(record.exc_info[1]):
      message = record.getMessage()
      record.msg = '%s (the runner closed the stream: the job ended)'
      record.args = (message,)
      record.levelno, record.levelname = logging.INFO, 'INFO'
      record.exc_info = record.exc_text = None
    return True


def _quiet_runner_hang_up() -> None:
  """See the module docstring: the worker threads' and the data plane's
  reports of a closed stream, and a bundle released after the worker's
  shutdown."""
  from apache_beam.runners.worker import sdk_worker
  logging.getLogger('apache_beam.runners.worker.data_plane').addFilter(
      _HangUpFilter())
  previous_hook = threading.excepthook

  def excepthook(args):
    if runner_hung_up(args.exc_value):
      _LOGGER.info('Worker thread %s ended: the runner closed its stream',
                   args.thread.name if args.thread else '?')
      return
    previous_hook(args)

  threading.excepthook = excepthook
  cache = sdk_worker.BundleProcessorCache
  release = cache.release

  def release_unless_shut_down(self, instruction_id):
    with self._lock:  # pylint: disable=protected-access
      # discard() (from shutdown()) moved it to the failed instructions.
      shut_down = (instruction_id not in self.active_bundle_processors and
                   instruction_id in self.failed_instruction_ids)
    if shut_down:
      # shutdown() (the job ended) already shut this bundle's processor.
      _LOGGER.info('Bundle %s finished after the worker shut down',
                   instruction_id)
      return
    release(self, instruction_id)

  cache.release = release_unless_shut_down
