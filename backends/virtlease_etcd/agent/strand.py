"""One owner's driver calls, in order, on the agent's thread pool.

Every driver call the agent makes for an owner goes through its strand: an ACQUIRE, a RELEASE's
reservation (queued before the reply, run after it), the settle step when a releasing connection
closes, and the release once the QEMU has exited -- so each sees what the ones queued before it
did, with no other ordering between them.

A :class:`Strand` runs the jobs submitted to it one after another, in submission order, each in
the worker thread that finished the one before: a resume's ACQUIRE queued behind the pause's
reservation starts the moment that transaction returns, without a round trip through the event
loop in between.  Jobs of different strands run concurrently on the pool.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any


class Strand:
    """Submit jobs with :meth:`submit`; each gets a Future (see the module docstring)."""

    def __init__(self, pool: Executor) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._jobs: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._running = False

    def submit(self, job: Callable[[], Any]) -> Future[Any]:
        """Run ``job`` after every job submitted before it; its result or exception in the Future."""
        future: Future[Any] = Future()
        with self._lock:
            self._jobs.append((job, future))
            if self._running:
                return future
            self._running = True
        try:
            self._pool.submit(self._drain)
        except BaseException as exc:  # the pool is shut down: nothing queued here will run
            with self._lock:
                self._running = False
                stranded = [f for _, f in self._jobs if f is not future]
                self._jobs.clear()
            for f in stranded:  # queued by another thread meanwhile: told, not left waiting
                if f.set_running_or_notify_cancel():
                    f.set_exception(RuntimeError(f"the agent's thread pool is shut down ({exc})"))
            raise
        return future

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._running = False
                    return
                job, future = self._jobs.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = job()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
