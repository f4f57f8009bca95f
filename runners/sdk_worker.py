"""The Python SDK workers of this process, tuned for latency.

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
"""

from __future__ import annotations

SAMPLING_PERIOD_MS = 10


def tune() -> None:
  """Makes this process's bundle processors sample (and so end) every
  ``SAMPLING_PERIOD_MS``. Idempotent."""
  from apache_beam.runners.worker import statesampler
  if getattr(statesampler.StateSampler, 'rtml_tuned', False):
    return
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
