"""Waiting for a condition in tests."""

from __future__ import annotations

import time

import pytest


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 1.0):
  """Polls ``condition()`` until truthy; returns it or fails naming what."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    value = condition()
    if value:
      return value
    time.sleep(poll_s)
  pytest.fail(f'no {what} within {timeout_s:.0f} s')
