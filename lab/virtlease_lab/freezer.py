"""Processes stuck as if in storage I/O, on demand: the cgroup v1 freezer.

A VM process blocked in uninterruptible I/O (a hung NFS server, a suspended multipath device) is
in state ``D``, and a SIGKILL sent to it stays pending: it exits only once the I/O completes.
The fencing rules depend on that (a fenced lease is not revoked early while a killed VM still
exists).  Such I/O cannot be produced on demand without a storage device to hang, but a process
frozen by the cgroup v1 freezer behaves the same way as far as those rules can see: the kernel
reports it in state ``D``, and a SIGKILL sent to it takes effect only when it is thawed.

``Freezer()`` uses the mounted v1 freezer hierarchy, or mounts one of its own (root needed);
:func:`unavailable` says why it cannot be used here.  Each ``Freezer`` is one cgroup::

    with Freezer() as fz:
        fz.freeze(pid)      # state D from now on; SIGKILL stays pending
        ...
        fz.thaw()           # the pending SIGKILL (if any) takes effect now
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

MOUNTED = Path("/sys/fs/cgroup/freezer")


def unavailable() -> str | None:
    """Why the freezer cannot be used on this machine (None: it can)."""
    if os.geteuid() != 0:
        return "the cgroup freezer needs root"
    if MOUNTED.is_dir() and (MOUNTED / "cgroup.procs").exists():
        return None
    try:
        with open("/proc/cgroups") as fh:
            if not any(line.split()[0] == "freezer" for line in fh if not line.startswith("#")):
                return "the kernel has no cgroup v1 freezer (/proc/cgroups)"
    except OSError as exc:
        return f"cannot read /proc/cgroups: {exc}"
    return None


def state(pid: int) -> str:
    """The state letter of ``pid`` in /proc (``D`` while frozen); ``-`` once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "-"


class Freezer:
    """One cgroup of the v1 freezer (see the module docstring)."""

    def __init__(self) -> None:
        why = unavailable()
        if why is not None:
            raise RuntimeError(why)
        self._mount: Path | None = None
        root = MOUNTED
        if not (root / "cgroup.procs").exists():
            self._mount = Path(tempfile.mkdtemp(prefix="virtlease-freezer-"))
            subprocess.run(["mount", "-t", "cgroup", "-o", "freezer", "virtlease-freezer", str(self._mount)],
                           check=True, capture_output=True)
            root = self._mount
        self.path = root / f"virtlease-test-{uuid.uuid4().hex[:12]}"
        self.path.mkdir()
        self.pids: list[int] = []

    def freeze(self, pid: int, timeout: float = 5.0) -> None:
        """Move ``pid`` into this cgroup and freeze it; returns once it is in state D."""
        (self.path / "cgroup.procs").write_text(f"{pid}\n")
        self.pids.append(pid)
        (self.path / "freezer.state").write_text("FROZEN\n")
        until = time.monotonic() + timeout
        while (self.path / "freezer.state").read_text().strip() != "FROZEN" or state(pid) != "D":
            if time.monotonic() > until:
                raise RuntimeError(f"pid {pid} not frozen after {timeout}s (state {state(pid)})")
            time.sleep(0.01)

    def thaw(self) -> None:
        (self.path / "freezer.state").write_text("THAWED\n")

    def close(self) -> None:
        """Thaw, then remove the cgroup once its processes have left it (exited or moved)."""
        with contextlib.suppress(OSError):
            self.thaw()
        until = time.monotonic() + 5
        while time.monotonic() < until:
            try:
                self.path.rmdir()
                break
            except OSError:  # still has members: move them back to the root cgroup
                with contextlib.suppress(OSError):
                    for pid in (self.path / "cgroup.procs").read_text().split():
                        (self.path.parent / "cgroup.procs").write_text(f"{pid}\n")
                time.sleep(0.05)
        if self._mount is not None:
            subprocess.run(["umount", str(self._mount)], check=False, capture_output=True)
            with contextlib.suppress(OSError):
                self._mount.rmdir()

    def __enter__(self) -> Freezer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
