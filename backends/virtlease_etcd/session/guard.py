"""The guard: a minimal process that stops the owners if nothing keeps the lease any more.

Used by the agent and by ``virtlease hold``: whatever holds a host session for running
processes.  Why: the holder's own fence thread dies with it.  After a SIGKILL (OOM, a crash, a
service manager's final kill) the host's etcd lease runs out by itself and the disks go to
other hosts while the QEMUs here still run.  The guard closes that hole from outside the agent.

How: the agent starts it (``Guard.spawn``) before serving, runs it as a script with ``-I`` (only
the standard library: nothing to import that could fail, a few MB of memory) and the id of the
session's fence clock as its argument (``virtlease_etcd.clock``: the guard reads that same clock,
the one module outside it that reads the time), and writes one JSON line to its stdin whenever
the fence deadline or the owner list changes::

    {"fence_at": <seconds on the fence clock>, "grace": <s>,
     "owners": [{"pid": 123, "start": <starttime from /proc/123/stat>, "sig": 9, "who": "..."}]}

``"fence_at": null`` (no owner holds anything on a live lease: none yet, or the session was
lost and its owners were fenced by the agent already) leaves the guard idle, with no deadline.

The guard opens a pidfd per owner (a reused pid is never signalled: the start time must match)
and, at the deadline, sends each owner its signal (9 = poweroff, 19 = pause; "ignore" owners are
not listed) and exits.  The deadline is ``fence_at`` once the agent is gone (its stdin hit EOF),
or ``fence_at + grace`` while the agent lives but stopped sending (frozen: its own fence thread
cannot run either; ``grace`` < the fence margin, so this is still before etcd can expire the
lease).  Lines ``{"disarm": true}`` (the agent exits with nothing held) end it without signalling.

This module is both the guard (run as a script) and the holder's handle on it (:class:`Guard`);
it imports only the standard library.

A restarted agent that re-attached to the lease starts a guard of its own first, then sends the
old guard SIGUSR1: it exits without signalling.  SIGTERM, SIGINT and SIGHUP are ignored (logged):
stopping the guard while owners run must not silently drop their protection; only SIGKILL
stops it, which the unit file never sends to it (KillMode=process, see deploy/libvirt/).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

def start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), None if no such process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class Guard:
    """The holder's end of one guard process (the module docstring)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.start = start_time(proc.pid) or 0
        self._last: str | None = None

    @classmethod
    def spawn(cls, clock_id: int, *, log_lines: bool = False) -> Guard:
        """Start a guard that reads the clock ``clock_id`` (the session's fence clock);
        ``log_lines``: its lines in the agent's log format (``log_line``)."""
        script = Path(__file__)
        proc = subprocess.Popen([sys.executable, "-I", str(script), str(clock_id), *([LOG_LINES] if log_lines else [])],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True, close_fds=True)
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


LOGGER = "virtlease_etcd.session.guard"
LOG_LINES = "--log-lines"
"""The guard's argument for writing its lines in the agent's log format (``log_line``)."""
_lines = False


def log_line(level: str, logger: str, msg: str, created: float | None = None) -> str:
    """``ts=<iso> level=<level> logger=<name> msg=<json string>``: the agent's log format, one
    line per event (``agent.main.LineFormatter`` writes its records with it, the guard its own)."""
    created = time.time() if created is None else created
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"
    return f"ts={ts} level={level} logger={logger} msg={json.dumps(msg)}"


def say(msg: str, level: str = "info") -> None:
    """One line on stderr (the holder's: the agent's log, or hold's terminal)."""
    text = f"guard pid {os.getpid()}: {msg}"
    print(log_line(level, LOGGER, text) if _lines else f"virtlease-guard[{os.getpid()}]: {msg}", file=sys.stderr,
          flush=True)


class GuardState:
    """What the guard knows: the fence deadline, the grace, and a pidfd per owner it stops."""

    def __init__(self) -> None:
        self.fence_at: float | None = None
        self.grace = 0.0
        self.owners: dict[tuple[int, int], tuple[int, int, str]] = {}  # (pid, start) -> (pidfd, sig, who)
        self.agent_gone = False
        self.stand_down = False

    def update(self, msg: dict[str, Any]) -> None:
        self.fence_at = None if msg["fence_at"] is None else float(msg["fence_at"])
        self.grace = float(msg.get("grace", 0.0))
        want = {(int(o["pid"]), int(o["start"])): o for o in msg.get("owners", [])}
        for key in [k for k in self.owners if k not in want]:
            os.close(self.owners.pop(key)[0])
        for key, o in want.items():
            if key in self.owners or start_time(key[0]) != key[1]:
                continue
            try:
                self.owners[key] = (os.pidfd_open(key[0]), int(o["sig"]), str(o.get("who", key[0])))
            except ProcessLookupError:
                continue

    def deadline(self) -> float | None:
        if self.fence_at is None:
            return None
        return self.fence_at if self.agent_gone else self.fence_at + self.grace

    def fire(self) -> None:
        for pidfd, sig, who in self.owners.values():
            try:
                signal.pidfd_send_signal(pidfd, sig)
                say(f"no virtlease agent kept the lease up to the fence deadline: sent signal {sig} to {who}",
                    "error")
            except ProcessLookupError:
                say(f"{who} already gone")


def main(argv: list[str]) -> int:
    """``argv[0]``: the id of the clock ``fence_at`` is a time on (``time.clock_gettime``);
    ``--log-lines``: write the agent's log format."""
    clock_id = int(argv[0])

    def now() -> float:
        return time.clock_gettime(clock_id)

    global _lines
    _lines = LOG_LINES in argv
    state = GuardState()

    def on_usr1(_sig: int, _frame: object) -> None:
        state.stand_down = True

    def on_ignored(sig: int, _frame: object) -> None:
        say(f"ignoring signal {sig}: the owners it guards would lose their protection", "warning")

    signal.signal(signal.SIGUSR1, on_usr1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_ignored)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    buf = b""
    print("ready", flush=True)
    while True:
        if state.stand_down:
            say("a new agent took over: standing down")
            return 0
        if state.agent_gone and not state.owners:
            return 0
        deadline = state.deadline()
        if deadline is not None and now() >= deadline:
            state.fire()
            return 0
        timeout = 1.0 if deadline is None else min(1.0, max(0.0, deadline - now()))
        if state.agent_gone:
            time.sleep(timeout)
            continue
        try:
            ready, _, _ = select.select([stdin], [], [], timeout)
        except InterruptedError:
            continue
        if not ready:
            continue
        chunk = os.read(stdin.fileno(), 65536)
        if not chunk:
            state.agent_gone = True
            say(f"agent gone; owners stopped at the fence deadline unless a new agent takes over "
                f"({len(state.owners)} guarded)", "warning")
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)
            if msg.get("disarm"):
                return 0
            state.update(msg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
