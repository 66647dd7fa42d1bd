"""What systemd does for ``virtlockd.socket`` + ``virtlockd.service`` with the package's drop-in,
on a machine without systemd as PID 1: for the handover tests under socket activation.

:class:`SocketUnit` owns the listening socket (``ListenStream=``, ``SocketMode=0600``), starts
the service's command with it as file descriptor 3 (``LISTEN_FDS=1``, ``LISTEN_PID`` = the
command's pid, ``LISTEN_FDNAMES``), starts it again at once whenever it exits
(``Restart=always``, ``RestartSec=0``) until :meth:`stop`, and :meth:`reload` is the drop-in's
``ExecReload=/bin/kill -USR2 $MAINPID``.  Only these parts of systemd are reproduced; the
real ``systemd-socket-activate`` covers the passing of the socket itself (it cannot restart).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

MAX_STARTS = 20
"""A runaway loop of failing starts ends here (the test then sees the failures in the log)."""

_TRAMPOLINE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(sys.argv[2], sys.argv[2:])
"""


class SocketUnit:
    def __init__(self, path: Path, command: Sequence[str], log: Path, *, fdname: str = "virtlockd.socket",
                 env: dict[str, str] | None = None) -> None:
        self.path = path
        self.command = list(command)
        self.log = open(log, "ab")  # closed in stop()
        self.fdname = fdname
        self.env = dict(os.environ if env is None else env)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o600)
        self.sock.listen(128)
        self.starts: list[tuple[float, int]] = []
        """(monotonic time, pid) of every start of the command."""
        self.exits: list[tuple[float, int]] = []
        """(monotonic time, exit status) of every exit."""
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] = self._spawn()
        self._thread = threading.Thread(target=self._restart_loop, daemon=True)
        self._thread.start()

    @property
    def main_pid(self) -> int:
        with self._lock:
            return self.proc.pid

    def _spawn(self) -> subprocess.Popen[bytes]:
        fd = self.sock.fileno()
        env = {**self.env, "LISTEN_FDS": "1", "LISTEN_FDNAMES": self.fdname}
        # A trampoline moves the socket to fd 3 and sets LISTEN_PID to its own pid, which the
        # command keeps (exec), as systemd does.
        proc = subprocess.Popen([sys.executable, "-c", _TRAMPOLINE, str(fd), *self.command],
                                env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                pass_fds=(fd,))
        self.starts.append((time.monotonic(), proc.pid))
        return proc

    def _restart_loop(self) -> None:
        while True:
            with self._lock:
                proc = self.proc
            code = proc.wait()
            self.exits.append((time.monotonic(), code))
            if self._stopping.is_set() or len(self.starts) >= MAX_STARTS:
                return
            with self._lock:
                self.proc = self._spawn()

    def reload(self) -> None:
        """``systemctl reload``: SIGUSR2 to the main process (the agent hands over)."""
        os.kill(self.main_pid, signal.SIGUSR2)

    def wait_started(self, count: int, timeout: float) -> None:
        until = time.monotonic() + timeout
        while len(self.starts) < count:
            if time.monotonic() > until:
                raise TimeoutError(f"{len(self.starts)} start(s) of {self.command[0]}, expected {count}")
            time.sleep(0.01)

    def stop(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Stop restarting, signal the main process, wait for it; close the socket."""
        self._stopping.set()
        with self._lock:
            proc = self.proc
        if proc.poll() is None:
            proc.send_signal(sig)
        self._thread.join(20)
        self.sock.close()
        self.log.close()
