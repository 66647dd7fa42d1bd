"""Polling until something is true: the one ``wait_for`` of tests, benchmarks and rigs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """What :func:`wait_for` raises by default (an AssertionError: in a test it is a failure)."""


def wait_for(pred: Callable[[], T], timeout: float, interval: float = 0.02, what: str = "condition", *,
             error: type[Exception] = WaitTimeout) -> T:
    """Call ``pred`` every ``interval`` seconds until it returns a truthy value, and return that
    value; after ``timeout`` seconds raise ``error`` naming ``what``.  ``pred`` is always called
    at least once, and once more after the deadline passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)
