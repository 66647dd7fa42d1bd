"""The harness of the agent's protocol and server tests: the captured frames, a recording
backend, a server on a background loop, and the table of malformed frames.

The server runs on its own asyncio loop in a daemon thread so that tests drive it with the
blocking LockdClient, as libvirt would.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from virtlease_etcd.agent import protocol as p
from virtlease_etcd.agent.protocol import AcquireResourceFlags, LockdOwner
from virtlease_etcd.agent.server import Connection, LockdServer, ResourceBusy

T = TypeVar("T")


@dataclass(frozen=True)
class Vector:
    """One captured frame: its connection number, direction (C2S/S2C) and bytes."""

    conn: int
    direction: str
    frame: bytes


def load_vectors(path: Path) -> list[Vector]:
    """Every frame of the capture at ``path`` (tests/agent/data/lockd-capture-vectors.txt), in order."""
    vectors = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            conn, direction, hexdata = line.split()
            vectors.append(Vector(int(conn), direction, bytes.fromhex(hexdata)))
    return vectors


@dataclass
class RecordingBackend:
    """A LockBackend with sync methods that records every call.

    ``busy[(op, lockspace, name)] = message`` makes that acquire/release raise ResourceBusy;
    ``fail`` holds method names that raise RuntimeError; ``gate``, if set, makes acquire wait
    for it (to show a blocking backend does not stall other connections)."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    closed: list[Connection] = field(default_factory=list)
    busy: dict[tuple[str, str, str], str] = field(default_factory=dict)
    fail: set[str] = field(default_factory=set)
    gate: threading.Event | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _record(self, *call: Any) -> None:
        with self.lock:
            self.calls.append(call)
        if call[0] in self.fail:
            raise RuntimeError(f"injected failure in {call[0]}")

    def register(self, conn: Connection, owner: LockdOwner) -> None:
        self._record("register", conn, owner)

    def restrict(self, conn: Connection) -> None:
        self._record("restrict", conn)

    def create_lockspace(self, conn: Connection, path: str) -> None:
        self._record("create_lockspace", conn, path)

    def acquire(self, conn: Connection, owner: LockdOwner, lockspace: str, name: str, flags: AcquireResourceFlags) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        self._record("acquire", conn, owner, lockspace, name, flags)
        if (msg := self.busy.get(("acquire", lockspace, name))) is not None:
            raise ResourceBusy(msg)

    def release(self, conn: Connection, owner: LockdOwner, lockspace: str, name: str) -> None:
        self._record("release", conn, owner, lockspace, name)
        if (msg := self.busy.get(("release", lockspace, name))) is not None:
            raise ResourceBusy(msg)

    def connection_closed(self, conn: Connection) -> None:
        with self.lock:
            self.closed.append(conn)

    def ops(self) -> list[str]:
        """The method names called so far, in order."""
        with self.lock:
            return [c[0] for c in self.calls]


class ServerThread:
    """A LockdServer on its own loop in a daemon thread."""

    def __init__(self, path: Path, backend: Any, **kwargs: Any) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="agent-loop", daemon=True)
        self.thread.start()
        self.server = LockdServer(path, backend, **kwargs)
        try:
            self.run(self.server.start())
        except BaseException:
            self._stop_loop()
            raise

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def stop(self) -> None:
        """Close the server (every connection gets connection_closed) and the loop."""
        try:
            self.run(self.server.close())
        finally:
            self._stop_loop()


def frame(proc: int, payload: bytes, *, prog: int = p.PROGRAM, vers: int = 1, mtype: int = 0, status: int = 0) -> bytes:
    """A CALL frame with an arbitrary header and payload."""
    header = struct.pack(">IIiiIi", prog, vers, proc, mtype, 0, status)
    return struct.pack(">I", 4 + len(header) + len(payload)) + header + payload


def xstr(data: bytes, pad: bytes | None = None) -> bytes:
    """An XDR string with (optionally non-zero) padding."""
    n = -len(data) % 4
    return struct.pack(">I", len(data)) + data + (pad[:n] if pad is not None else b"\0" * n)


RESTRICT_OK = struct.pack(">I", 0)
ACQ = xstr(b"") + xstr(b"/d") + struct.pack(">I", 0)

# (id, frame, reason, header readable)
MALFORMED: list[tuple[str, bytes, str, bool]] = [
    ("length-below-header", struct.pack(">I", 27) + bytes(23), "length", False),
    ("length-zero", bytes(28), "length", False),
    ("length-over-limit", struct.pack(">I", p.MAX_CALL_FRAME + 4) + bytes(24), "length", False),
    ("wrong-program", frame(2, RESTRICT_OK, prog=0x20008086), "program", True),
    ("wrong-version", frame(2, RESTRICT_OK, vers=2), "version", True),
    ("reply-not-call", frame(2, RESTRICT_OK, mtype=1), "type", True),
    ("call-with-error-status", frame(2, RESTRICT_OK, status=1), "status", True),
    ("unknown-procedure", frame(9, b""), "procedure", True),
    ("procedure-zero", frame(0, b""), "procedure", True),
    ("truncated-args", frame(2, b""), "truncated", True),
    ("truncated-string", frame(6, struct.pack(">I", 8) + b"abc"), "truncated", True),
    ("truncated-padding", frame(8, struct.pack(">I", 1) + b"a"), "truncated", True),
    ("string-over-limit", frame(8, struct.pack(">I", p.LOCK_STRING_MAX + 1) + bytes(64)), "string-too-long", True),
    ("nul-in-string", frame(8, xstr(b"/a\0b")), "nul-in-string", True),
    ("trailing-bytes", frame(2, RESTRICT_OK + bytes(4)), "trailing", True),
    ("trailing-after-acquire", frame(6, ACQ + b"\0\0\0\0"), "trailing", True),
]


