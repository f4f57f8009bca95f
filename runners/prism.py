"""The Prism runner binary, built once from Beam's Go module at our Beam pin.

Beam's ``PrismRunner`` downloads a release zip from GitHub when
``--prism_location`` is unset; that host is not reachable from our machines.
The same binary is a Go module (``github.com/apache/beam/sdks/v2/go/cmd/prism``)
that the Go module proxy serves, so we ``go install`` it at the version of the
installed ``apache_beam`` (pinned in ``setup.py``) into
``~/.cache/rtml/prism/v<beam version>/prism`` and pass that path to Beam.

    python -m runners.prism            # builds if missing, prints the path

The first build downloads ~200 modules and compiles for about 4 minutes on two
cores; every later call is a file check.

Two fixes for running Prism from Python, applied by ``runners.options`` for
``--runner prism``:

* ``tied_launcher()``: Beam starts Prism as a child process and stops it when
  the pipeline's process exits normally; a process that is killed left Prism
  running (one was found 34 minutes later). The launcher script starts Prism
  and stops it within a second of its parent's death, whatever the cause.
* ``tolerate_finalize_without_callbacks()``: Prism 2.77 sends a
  ``FinalizeBundle`` for *every* bundle of a stage holding a DoFn that may
  request finalization (the Kafka reader's commit), ignoring the
  ``requires_finalization`` of the bundle's response; this includes the
  splittable DoFn's pair-with-restriction stage, which never finalizes. The
  Python SDK worker answers those with ``RuntimeError: Bundle is not in a
  finalizable state`` and a traceback (Prism ignores the error, so offsets
  were committed all along). The Java SDK harness answers a finalization
  with no callbacks with an empty response; this makes the Python worker in
  our process do the same. Bundles that registered callbacks are finalized
  exactly as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator

from apache_beam.version import __version__ as BEAM_VERSION

from runners.tools import CACHE_ROOT, RunnerSetupError, require_tool

PRISM_PACKAGE = 'github.com/apache/beam/sdks/v2/go/cmd/prism'


def version() -> str:
  """The Prism version we use: the installed Beam's (``v2.77.0``)."""
  return 'v' + BEAM_VERSION


def binary_path() -> pathlib.Path:
  """Where the Prism binary for our Beam version lives (may not exist)."""
  return CACHE_ROOT / 'prism' / version() / 'prism'


def find_binary() -> str | None:
  """The cached Prism binary, or None if it was never built (no build)."""
  path = binary_path()
  return str(path) if path.is_file() and os.access(path, os.X_OK) else None


@contextlib.contextmanager
def _build_lock(directory: pathlib.Path) -> Iterator[None]:
  # Parallel test workers and pipelines may all ask for Prism at once; one
  # builds, the others wait and then find the binary.
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _heartbeat(done: threading.Event, say, started: float) -> None:
  while not done.wait(30):
    say(f'  ... still building ({time.monotonic() - started:.0f}s)')


def ensure_binary(quiet: bool = False) -> str:
  """Returns the Prism binary path, building it with ``go install`` if missing.

  Args:
    quiet: do not echo the build's progress to stderr.

  Raises:
    RunnerSetupError: Go is missing or the build failed (its output is in the
      message).
  """
  found = find_binary()
  if found:
    return found
  target = binary_path()
  with _build_lock(target.parent):
    found = find_binary()
    if found:
      return found
    go = require_tool('go', f'build the Prism runner {version()}')
    say = (lambda _: None) if quiet else (
        lambda msg: print(f'[prism] {msg}', file=sys.stderr, flush=True))
    say(f'building {PRISM_PACKAGE}@{version()} into {target.parent} '
        '(first time only: ~4 min on 2 cores)')
    started = time.monotonic()
    # Install into a scratch GOBIN and rename, so a killed build never leaves
    # a half-written binary that find_binary() would accept.
    with tempfile.TemporaryDirectory(dir=target.parent) as gobin:
      env = dict(os.environ, GOBIN=gobin)
      proc = subprocess.Popen(
          [go, 'install', f'{PRISM_PACKAGE}@{version()}'], env=env,
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      # Compiling prints nothing for minutes: say we are alive meanwhile.
      done = threading.Event()
      threading.Thread(target=_heartbeat, args=(done, say, started),
                       daemon=True).start()
      lines = []
      try:
        for line in proc.stdout:
          lines.append(line.rstrip())
          say(f'  {line.rstrip()}')
        proc.wait()
      finally:
        done.set()
      if proc.returncode != 0:
        raise RunnerSetupError(
            f'`go install {PRISM_PACKAGE}@{version()}` failed '
            f'(exit {proc.returncode}):\n' + '\n'.join(lines[-30:]) +
            '\nAlternatively pass --prism_location=/path/to/prism.')
      os.replace(os.path.join(gobin, 'prism'), target)
    say(f'built {target} in {time.monotonic() - started:.0f}s')
  return str(target)


_LAUNCHER = """#!/bin/sh
# Prism, stopped when the process that launched it dies (even by SIGKILL).
# Written by runners/prism.py; Beam runs it as --prism_location.
parent=$PPID
"{binary}" "$@" &
child=$!
trap 'kill -TERM $child 2>/dev/null; wait $child; exit' TERM INT HUP
while kill -0 $child 2>/dev/null; do
  if ! kill -0 $parent 2>/dev/null; then
    kill -TERM $child 2>/dev/null
    break
  fi
  sleep 1 &
  wait $!
done
wait $child
"""


def tied_launcher(quiet: bool = False) -> str:
  """A launcher for the Prism binary that dies with its parent (see module
  doc); built and written next to the binary on first use."""
  binary = ensure_binary(quiet)
  path = pathlib.Path(binary).with_name('prism-tied')
  text = _LAUNCHER.format(binary=binary)
  if not path.is_file() or path.read_text() != text:
    tmp = path.with_suffix('.tmp')
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)
  return str(path)


def tolerate_finalize_without_callbacks() -> None:
  """Makes this process's Python SDK worker answer a ``FinalizeBundle`` for a
  bundle that registered no finalization with an empty response, as the
  Java SDK harness does (see module doc). Idempotent."""
  from apache_beam.portability.api import beam_fn_api_pb2
  from apache_beam.runners.worker import sdk_worker
  original = sdk_worker.SdkWorker.finalize_bundle
  if getattr(original, 'rtml_tolerant', False):
    return

  def finalize_bundle(self, request, instruction_id):
    try:
      processor = self.bundle_processor_cache.lookup(request.instruction_id)
    except RuntimeError:  # failed or unknown: the original reports it
      processor = True
    if processor is None:
      # Processed without requesting finalization and released: nothing
      # to finalize.
      return beam_fn_api_pb2.InstructionResponse(
          instruction_id=instruction_id,
          finalize_bundle=beam_fn_api_pb2.FinalizeBundleResponse())
    return original(self, request, instruction_id)

  finalize_bundle.rtml_tolerant = True
  sdk_worker.SdkWorker.finalize_bundle = finalize_bundle


def main() -> None:
  """``python -m runners.prism``: ensure the binary and print its path."""
  try:
    print(ensure_binary())
  except RunnerSetupError as e:
    raise SystemExit(f'runners.prism: {e}')


if __name__ == '__main__':
  main()
