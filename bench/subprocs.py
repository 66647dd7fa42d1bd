"""Worker subprocesses (``workers.py``) driven over the one JSON-lines wire of the project
(``virtlease_etcd.devtools.jsonwire``: configuration on the first stdin line, a hello, then one
reply per command)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from virtlease_etcd.devtools.jsonwire import Channel, launch, python_argv

WORKERS = Path(__file__).with_name("workers.py")
BENCH = str(WORKERS.parent)
"""The bench's own modules (cluster, contenders, measure) for the worker: its interpreter runs with
``-P`` (the script's folder is not put on the path), so the folder is named on PYTHONPATH."""


class WorkerProc:
    """One worker of ``kind`` (see workers.py) started with ``cfg``."""

    def __init__(self, kind: str, cfg: dict[str, Any]) -> None:
        path = os.pathsep.join(p for p in (BENCH, os.environ.get("PYTHONPATH", "")) if p)
        self.proc = launch(python_argv(WORKERS), {**cfg, "kind": kind}, env={**os.environ, "PYTHONPATH": path})
        self.wire = Channel(self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def hello(self, timeout: float = 120) -> dict[str, Any]:
        """The worker's hello (sent once it is ready); RuntimeError if it exited first."""
        hello = self.wire.wait_hello(timeout)
        if hello is None:
            raise RuntimeError(f"worker {self.proc.pid} exited ({self.proc.poll()}) without reporting")
        return hello

    def call(self, op: str, timeout: float = 600) -> dict[str, Any]:
        """Send ``op``; the worker's reply (RuntimeError if none came)."""
        reply = self.wire.call(op, timeout=timeout)
        if reply is None:
            raise RuntimeError(f"worker {self.proc.pid}: no reply to {op} (exit status {self.proc.poll()})")
        return reply

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
