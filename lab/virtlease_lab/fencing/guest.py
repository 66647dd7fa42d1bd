"""The fencing lab's guest: Debian's kernel under QEMU (TCG), driven from this machine.

What the guest has (see ``image`` and ``init.sh``):

* this machine's root file system read-only at ``/`` of the guest's server (9p, chroot), with
  tmpfs over ``/tmp``, ``/run``, ``/var/tmp`` and ``/dev/shm``: the project's virtualenv runs
  there unchanged; this machine's ``WORKDIR/share`` is writable in the guest at
  ``/run/vl-share`` (``VL_SHARE`` in the guest server's environment): logs kept after the guest;
* an emulated i6300esb watchdog (``/dev/watchdog``); its expiry is QEMU's *watchdog action*
  (``pause`` by default: the guest stops dead, QMP reports ``WATCHDOG`` then ``STOP``;
  ``poweroff``: QEMU exits), settable at run time with :meth:`LabGuest.set_watchdog_action`;
* QEMU user networking: this machine's loopback is ``10.0.2.2`` in the guest (an etcd here on
  127.0.0.1:PORT is ``10.0.2.2:PORT`` there);
* the kernel's SCSI target (LIO ``tcm_loop``) and dm-multipath, set up by the guest-side code
  (``scsilab``) on request.

The host talks to the guest server (``inguest``) over a virtio-serial port (``call``) and to
QEMU over QMP (``qmp``: events are stamped on arrival with :func:`virtlease_lab.fencing.guest.now`).
Boot to a ready server takes about 5-10 s under TCG; the console goes to ``WORKDIR/console.log``.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from .image import Image

log = logging.getLogger(__name__)


def now() -> float:
    """The lab's clock on this machine: CLOCK_BOOTTIME, the driver's fence clock."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _die_with_parent() -> None:
    """In QEMU's child before exec: SIGKILL it if the process that started it dies (a test run
    killed mid-way leaves no guest behind)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class GuestError(RuntimeError):
    """The guest did not boot, a call failed, or QEMU went away."""


@dataclass(frozen=True)
class QmpEvent:
    name: str
    data: dict[str, Any]
    at: float
    """:func:`now` when this machine read it."""
    qemu_time: float
    """QEMU's own timestamp (wall clock, seconds)."""


class Qmp:
    """A QMP connection: commands, and every event kept with its arrival time."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = _connect(path, timeout)
        self._file = self.sock.makefile("rb")
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self.events: list[QmpEvent] = []
        self._returns: list[dict[str, Any]] = []
        self._closed = False
        greeting = json.loads(self._file.readline())
        if "QMP" not in greeting:
            raise GuestError(f"not a QMP greeting: {greeting}")
        self._thread = threading.Thread(target=self._read, name="lab-qmp", daemon=True)
        self._thread.start()
        self.execute("qmp_capabilities")

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._read_events()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _read_events(self) -> None:
        for line in self._file:
            at = now()
            msg = json.loads(line)
            with self._cond:
                if "event" in msg:
                    ts = msg.get("timestamp", {})
                    self.events.append(QmpEvent(msg["event"], msg.get("data", {}), at,
                                                ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6))
                else:
                    self._returns.append(msg)
                self._cond.notify_all()

    def execute(self, command: str, timeout: float = 30.0, **arguments: Any) -> Any:
        """Run a QMP command; its ``return`` value, or GuestError with QEMU's error."""
        with self._lock:
            msg: dict[str, Any] = {"execute": command}
            if arguments:
                msg["arguments"] = arguments
            with self._cond:
                self._returns.clear()
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
            with self._cond:
                if not self._cond.wait_for(lambda: self._returns or self._closed, timeout):
                    raise GuestError(f"QMP {command}: no answer in {timeout} s")
                if not self._returns:
                    raise GuestError(f"QMP {command}: QEMU closed the connection")
                reply = self._returns.pop(0)
        if "error" in reply:
            raise GuestError(f"QMP {command}: {reply['error']}")
        return reply.get("return")

    def wait_event(self, name: str, timeout: float, since: float = 0.0) -> QmpEvent | None:
        """The first event ``name`` that arrived at or after ``since``, waiting up to ``timeout``."""
        def found() -> QmpEvent | None:
            return next((e for e in self.events if e.name == name and e.at >= since), None)

        with self._cond:
            self._cond.wait_for(lambda: found() is not None or self._closed, timeout)
            return found()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _connect(path: Path, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise GuestError(f"{path}: QEMU did not open it in {timeout} s") from None
            time.sleep(0.05)


MASKED = ("/tmp", "/run", "/var/tmp")
"""Places of this machine's root the guest covers with a fresh tmpfs of its own (init.sh)."""


def masked_trees(*trees: str) -> list[str]:
    """Of ``trees`` (default: this virtualenv and the repository its packages are installed
    from), those under a place the guest masks (a clone in /tmp): the guest mounts them again on
    their own, or its Python would not be there."""
    found = sorted({os.path.realpath(t) for t in trees or (sys.prefix, str(Path(__file__).resolve().parents[3]))})
    outer = [t for t in found if not any(t != o and t.startswith(o + "/") for o in found)]
    return [t for t in outer if any(t == m or t.startswith(m + "/") for m in MASKED)]


class LabGuest:
    """One booted guest (see the module docstring).  Use as a context manager."""

    def __init__(self, workdir: Path, image: Image, *, memory_mb: int = 1536, cpus: int = 2,
                 watchdog_action: str = "pause", python: str | None = None,
                 boot_timeout: float = 180.0) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console = self.workdir / "console.log"
        ctl, qmp = self.workdir / "ctl.sock", self.workdir / "qmp.sock"
        for stale in (ctl, qmp):
            stale.unlink(missing_ok=True)
        python = python or sys.executable
        self.share = self.workdir / "share"
        self.share.mkdir(exist_ok=True)
        binds = masked_trees()
        append = f"console=ttyS0 quiet rdinit=/init panic=-1 vl_python={python}"
        if binds:
            append += " vl_binds=" + ",".join(f"vlbind{n}:{tree}" for n, tree in enumerate(binds))
        argv = [
            "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-m", str(memory_mb),
            "-smp", str(cpus), "-display", "none", "-monitor", "none", "-no-reboot",
            "-serial", f"file:{self.console}",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
            "-fsdev", "local,id=r,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=r,mount_tag=hostroot",
            "-fsdev", f"local,id=w,path={self.share},security_model=none",
            "-device", "virtio-9p-pci,fsdev=w,mount_tag=labshare",
            *(arg for n, tree in enumerate(binds) for arg in (
                "-fsdev", f"local,id=b{n},path={tree},security_model=none,readonly=on,multidevs=remap",
                "-device", f"virtio-9p-pci,fsdev=b{n},mount_tag=vlbind{n}")),
            "-device", "i6300esb", "-action", f"watchdog={watchdog_action}",
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=ctl,path={ctl},server=on,wait=off",
            "-device", "virtserialport,chardev=ctl,name=vl.ctl",
            "-qmp", f"unix:{qmp},server=on,wait=off",
        ]
        self.started = now()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / "qemu.log", "ab"), start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self._ids = itertools.count(1)
        self._call_lock = threading.Lock()
        self._ctl: socket.socket | None = None
        try:
            self.qmp = Qmp(qmp)
            self._ctl = _connect(ctl, 30.0)
            self._buffer = b""
            hello = self._read_line(boot_timeout)
            if not hello.get("hello"):
                raise GuestError(f"unexpected first line from the guest: {hello}")
            self.booted = now()
            log.info("lab guest up in %.1f s (guest uptime %.1f s)", self.booted - self.started, hello["uptime"])
        except BaseException:
            self.close()
            raise

    def _read_line(self, timeout: float) -> dict[str, Any]:
        """The next line from the guest server (a timeout leaves the stream usable: a late reply
        is read, and skipped by its id, on the next call)."""
        assert self._ctl is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"the guest server said nothing in {timeout:.0f} s; console: "
                                 f"{self.console_tail()}")
            self._ctl.settimeout(left)
            try:
                chunk = self._ctl.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise GuestError(f"the guest's control port closed (QEMU exit status {self.proc.poll()}); "
                                 f"console: {self.console_tail()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        result: dict[str, Any] = json.loads(line)
        return result

    def console_tail(self, lines: int = 15) -> str:
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def call(self, function: str, *, wait: float = 300.0, **kwargs: Any) -> Any:
        """Run ``virtlease_lab.fencing.<function>`` (``"module:function"``) in the guest with
        ``kwargs``; its result, waiting at most ``wait`` seconds."""
        if ":" not in function or not function.startswith("virtlease_lab."):
            function = f"virtlease_lab.fencing.{function}"
        with self._call_lock:
            assert self._ctl is not None
            request_id = next(self._ids)
            self._ctl.sendall(json.dumps({"id": request_id, "call": function, "kwargs": kwargs}).encode() + b"\n")
            reply = self._read_line(wait)
            while reply.get("id") != request_id:  # the late reply of a call that timed out
                if not isinstance(reply.get("id"), int) or reply["id"] > request_id:
                    raise GuestError(f"reply {reply.get('id')} to call {request_id}: the wire is out of step")
                reply = self._read_line(wait)
        if not reply.get("ok"):
            raise GuestError(f"{function} failed in the guest: {reply.get('error')}\n{reply.get('traceback')}")
        return reply.get("result")

    def set_watchdog_action(self, action: str) -> None:
        """QEMU's action when the guest's watchdog expires: pause, poweroff, reset, none, ..."""
        self.qmp.execute("set-action", watchdog=action)

    def resume(self) -> None:
        """Continue a guest that QEMU paused (the watchdog's ``pause`` action)."""
        self.qmp.execute("cont")

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Stop QEMU (the guest holds nothing on this machine)."""
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.qmp.execute("quit", timeout=5)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for closer in (getattr(self, "qmp", None), self._ctl):
            if closer is not None:
                with contextlib.suppress(OSError):
                    closer.close()

    def __enter__(self) -> LabGuest:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

