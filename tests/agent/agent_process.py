"""The agent as a real process (``python -m virtlease_etcd.agent.main``) for restart tests:
start it on a socket and state directory, signal or SIGKILL it, read its log."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from virtlease_etcd.agent.runfile import load, state_path
from virtlease_etcd.session.guard import start_time

SERVING = "virtlease agent serving"
"""The agent's log line once it has an etcd session and grants leases."""
LISTENING = "virtlease agent listening on"
"""Its line once the socket is open (before the session, when etcd does not answer yet)."""


class AgentProcess:
    """One ``virtlease-agent`` process of ``host`` (TTL 4 s unless ``ttl`` says otherwise)."""

    def __init__(self, run: Path, endpoints: str, prefix: str, host: str, *, ttl: int = 4,
                 extra: tuple[str, ...] = (), via_virtlease: bool = False, ready: str = SERVING) -> None:
        """``via_virtlease``: run it as ``virtlease --endpoints E agent ...`` (the subcommand,
        etcd options before its name) instead of the ``virtlease-agent`` module.  ``ready``: the
        log line to wait for (``LISTENING``: the socket is open, the etcd session maybe not)."""
        self.run, self.host = run, host
        self.socket = run / "virtlockd-sock"
        self.state_dir = run / "state"
        self.log_path = run / f"agent-{time.monotonic_ns()}.log"
        head = ([str(Path(sys.executable).with_name("virtlease")), "--endpoints", endpoints, "agent"]
                if via_virtlease else [sys.executable, "-P", "-m", "virtlease_etcd.agent.main", "--endpoints", endpoints])
        cmd = [*head, "--prefix", prefix, "--host-id", host, "--ttl", str(ttl), "--socket", str(self.socket), "--state-dir",
               str(self.state_dir), "--reserve-grace", "0.3", *extra]
        self.log = open(self.log_path, "w")  # closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_ready(ready)

    def wait_ready(self, line: str = SERVING, timeout: float = 60.0) -> None:
        """Wait until the log says ``line``."""
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}: {self.text()}")
            if line in self.text():
                return
            time.sleep(0.05)
        raise RuntimeError(f"agent log without {line!r} after {timeout}s: {self.text()}")

    def text(self) -> str:
        return self.log_path.read_text()

    def guard_pid(self) -> int:
        state = load(state_path(self.state_dir, self.host))
        assert state is not None and state.guard
        return state.guard["pid"]

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Teardown: SIGKILL the agent (and its guard, so nothing outlives the test)."""
        try:
            guard = self.guard_pid()
        except (AssertionError, OSError):
            guard = 0
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if guard and start_time(guard) is not None:
            os.kill(guard, signal.SIGKILL)
        self.log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
