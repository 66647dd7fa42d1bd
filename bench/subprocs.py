"""Starting worker subprocesses (``workers.py``) and reading their JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

WORKERS = Path(__file__).with_name("workers.py")


class WorkerProc:
    def __init__(self, kind: str, cfg: dict[str, Any]) -> None:
        self.proc = subprocess.Popen([sys.executable, str(WORKERS), kind, json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"worker {self.proc.pid} exited ({code}) without reporting")
        data: dict[str, Any] = json.loads(line)
        return data

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
