"""What every runner launcher shares: the cache layout and tool checks.

Binaries and jars are fetched once by pinned coordinates into
``~/.cache/rtml/<what>/<version>/`` (``RTML_CACHE_DIR`` moves the root) and
handed to Beam as local paths, because Beam's own downloads (Prism from
GitHub, jars from Maven URLs) are not reachable everywhere we run.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket

CACHE_ROOT = pathlib.Path(
    os.environ.get('RTML_CACHE_DIR', '~/.cache/rtml')).expanduser()
RUN_DIR = CACHE_ROOT / 'run'
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

_INSTALL_HINTS = {
    'go': 'install Go 1.22+ (`apt-get install golang` or https://go.dev/dl)',
    'java': 'install a JDK 17 (`apt-get install openjdk-17-jdk-headless`)',
    'mvn': 'install Apache Maven (`apt-get install maven`)',
}


class RunnerSetupError(RuntimeError):
  """A runner's binary, jar or service could not be prepared."""


def require_tool(tool: str, purpose: str) -> str:
  """Returns the path of ``tool`` on PATH, or raises a clear error.

  Args:
    tool: executable name (``go``, ``java``, ``mvn``).
    purpose: what it is needed for, completing "it is needed to ...".

  Raises:
    RunnerSetupError: the tool is not installed.
  """
  path = shutil.which(tool)
  if not path:
    hint = _INSTALL_HINTS.get(tool, f'install {tool}')
    raise RunnerSetupError(
        f'`{tool}` was not found on PATH; it is needed to {purpose}. '
        f'To fix: {hint}.')
  return path


def free_port(host: str = '127.0.0.1') -> int:
  """A TCP port that was free a moment ago (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind((host, 0))
    return sock.getsockname()[1]


def alive(pid: int) -> bool:
  """Whether process ``pid`` is running; an exited zombie does not count.

  A zombie child of ours is reaped here; another process's zombie is read
  from ``/proc`` (it waits for its own parent).
  """
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:
    if os.waitpid(pid, os.WNOHANG) != (0, 0):
      return False
  except ChildProcessError:
    pass  # not our child
  try:
    with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return True
