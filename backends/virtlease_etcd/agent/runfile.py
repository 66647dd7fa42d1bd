"""The agent's state file and its handle on the guard process.

``<state dir>/agent-<host_id>.json`` (default ``/run/virtlease``; directory 0700, file 0600,
both root-owned, replaced atomically) says what a successor needs to continue the session::

    {"host": ..., "prefix": ..., "lease": <id>, "session": <id>, "agent_pid": ...,
     "guard": {"pid": ..., "start": ...},
     "owners": [{"uuid", "name", "pid", "start", "action"}]}

It lives under /run (tmpfs): after a reboot nothing in it can be true any more.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from virtlease.abi import FailureAction

from .guard import start_time

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/run/virtlease"
GUARD_SIGNALS = {FailureAction.POWEROFF: signal.SIGKILL, FailureAction.RESTART: signal.SIGKILL,
                 FailureAction.PAUSE: signal.SIGSTOP}
"""What the guard sends each owner, by its failure action (IGNORE: not guarded)."""


@dataclass
class OwnerEntry:
    uuid: str
    name: str
    pid: int
    start: int
    action: str = FailureAction.POWEROFF.name.lower()


@dataclass
class AgentState:
    host: str
    prefix: str
    lease: int
    session: str
    agent_pid: int
    guard: dict[str, int] = field(default_factory=dict)
    owners: list[OwnerEntry] = field(default_factory=list)


def state_path(state_dir: str | os.PathLike[str], host_id: str) -> Path:
    return Path(state_dir) / f"agent-{host_id}.json"


def ensure_dir(state_dir: str | os.PathLike[str]) -> None:
    """Create the directory 0700; refuse one that others could write to."""
    d = Path(state_dir)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(d)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(f"state directory {d} must be owned by uid {os.geteuid()} with mode 0700 "
                              f"(is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")


def save(path: Path, state: AgentState) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(state), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: Path) -> AgentState | None:
    """The state a previous agent left, or None (absent or unreadable: logged)."""
    try:
        raw = json.loads(path.read_text())
        owners = [OwnerEntry(**o) for o in raw.pop("owners", [])]
        return AgentState(**raw, owners=owners)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.error("ignoring unreadable agent state file %s: %s", path, exc)
        return None


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class Guard:
    """The agent's end of one guard process (see ``guard``)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.start = start_time(proc.pid) or 0
        self._last: str | None = None

    @classmethod
    def spawn(cls, clock_id: int) -> Guard:
        """Start a guard that reads the clock ``clock_id`` (the session's fence clock)."""
        script = Path(__file__).with_name("guard.py")
        proc = subprocess.Popen([sys.executable, "-I", str(script), str(clock_id)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                start_new_session=True, close_fds=True)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            proc.kill()
            raise RuntimeError("the virtlease guard process did not start")
        proc.stdout.close()
        return cls(proc)

    def send(self, fence_at: float | None, grace: float, owners: list[dict[str, Any]]) -> None:
        """Arm (or re-arm) the guard; ``fence_at`` None leaves it idle.  Repeated identical
        messages are not sent."""
        line = json.dumps({"fence_at": None if fence_at is None else round(fence_at, 3), "grace": grace,
                           "owners": owners})
        if line == self._last:
            return
        self._write(line)
        self._last = line

    def disarm(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._write(json.dumps({"disarm": True}))
        self.abandon()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def abandon(self) -> None:
        """Close our end (the guard then counts down to the deadline on its own)."""
        stdin: IO[bytes] | None = self.proc.stdin
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.close()

    def _write(self, line: str) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(line.encode() + b"\n")
        stdin.flush()


def stand_down(pid: int, start: int) -> bool:
    """Tell a previous agent's guard (by pid and start time) to exit without signalling."""
    if not pid or start_time(pid) != start:
        return False
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if start_time(pid) != start:
            return False
        signal.pidfd_send_signal(fd, signal.SIGUSR1)
        log.info("told the previous agent's guard (pid %d) to stand down", pid)
        return True
    finally:
        os.close(fd)
