"""The JSON-lines channel between a harness and a host process.

Every harness that runs a "host" as a real process (``hostprocess`` for the demo
and the tests, the nemesis workers in tests/safety) uses this one wire:

* ``launch`` starts the child and writes its configuration as the first line
  on stdin (never on the command line: it may hold a password);
* the child answers one hello line (``{"ready": true, ...}`` or an error),
  then one reply per command, each echoing the command's ``seq``;
* ``Channel`` is the parent side: a reader thread matches replies to calls
  by ``seq``, so several threads may call at once, each with its own timeout;
* ``Replier`` is the child side: one lock, one line per reply.

See docs/DESIGN.md §10 (What runs where).
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

_EOF: dict[str, Any] = {"ok": False, "error": "HostExited"}


def launch(argv: list[str], config: Mapping[str, Any], *, env: Mapping[str, str] | None = None,
           stderr: IO[Any] | int | None = None, new_session: bool = False) -> subprocess.Popen[str]:
    """Start ``argv`` and hand it ``config`` as its first stdin line."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env=dict(env) if env is not None else None, start_new_session=new_session)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(dict(config)) + "\n")
    proc.stdin.flush()
    return proc


def python_argv(module_or_script: str | Path) -> list[str]:
    """This interpreter running a module (``pkg.mod``) or a script path, with ``-P``: neither the
    working directory nor the script's own is put on ``sys.path`` (run next to a clone named
    ``virtlease``, ``python -m`` would import that folder as the ``virtlease`` package).
    ``PYTHONPATH`` still counts: a harness that needs its own folder says so there."""
    if isinstance(module_or_script, Path):
        return [sys.executable, "-P", str(module_or_script)]
    return [sys.executable, "-P", "-m", module_or_script]


class Channel:
    """Parent side: calls matched to replies by ``seq``; the hello kept apart."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.hello: dict[str, Any] | None = None
        self.ready = threading.Event()
        """Set when the hello line arrived (or the child exited before it)."""
        self._lock = threading.Lock()
        self._seq = 0
        self._pending: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._closed = False
        threading.Thread(target=self._read, name=f"hostwire-{proc.pid}", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    continue
                seq = msg.get("seq")
                if seq is None:
                    if self.hello is None:
                        self.hello = msg
                        self.ready.set()
                    continue
                with self._lock:
                    waiter = self._pending.get(int(seq))
                if waiter is not None:
                    waiter.put(msg)
        except (OSError, ValueError):
            pass  # the pipe was closed under us
        with self._lock:
            self._closed = True
            waiters = list(self._pending.values())
        self.ready.set()
        for waiter in waiters:
            waiter.put(_EOF)

    def wait_hello(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The child's hello, or None if it exited (or ``timeout`` passed) first."""
        self.ready.wait(timeout)
        return self.hello

    def call(self, op: str, timeout: float | None = None, **kw: Any) -> dict[str, Any] | None:
        """Send one command; its reply, or None if the child is gone or no
        reply came before ``timeout`` (a late reply is dropped)."""
        waiter: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            if self._closed or self.proc.poll() is not None or self.proc.stdin is None:
                return None
            self._seq += 1
            seq = self._seq
            self._pending[seq] = waiter
            try:
                self.proc.stdin.write(json.dumps({"op": op, "seq": seq, **kw}) + "\n")
                self.proc.stdin.flush()
            except (OSError, ValueError):
                self._pending.pop(seq, None)
                return None
        try:
            reply = waiter.get(timeout=timeout)
        except queue.Empty:
            return None
        finally:
            with self._lock:
                self._pending.pop(seq, None)
        return None if reply is _EOF else reply


class Replier:
    """Child side: read the configuration line, write replies one line each."""

    def __init__(self, stdin: IO[str] = sys.stdin, stdout: IO[str] = sys.stdout) -> None:
        self.stdin = stdin
        self._out = stdout
        self._lock = threading.Lock()

    def config(self) -> dict[str, Any]:
        """The first stdin line: the harness's configuration."""
        return dict(json.loads(self.stdin.readline()))

    def commands(self) -> Any:
        """Every later stdin line, decoded (ends when the harness closes stdin)."""
        for line in self.stdin:
            yield json.loads(line)

    def send(self, data: Mapping[str, Any], seq: object = None) -> None:
        """One line; ``seq`` (the command's) makes it a reply, without it a hello."""
        out = dict(data) if seq is None else {**data, "seq": seq}
        with self._lock:
            self._out.write(json.dumps(out) + "\n")
            self._out.flush()
