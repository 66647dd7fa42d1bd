"""Guest side: a stand-in QEMU that writes tagged blocks to a disk with ``O_DIRECT``.

``python -m virtlease_lab.fencing.writer DEVICE TAG FIRST_BLOCK BLOCKS`` writes 4 KiB blocks
``FIRST_BLOCK .. FIRST_BLOCK + BLOCKS - 1`` of ``DEVICE``, each stamped with ``TAG``, a
sequence number and the time (CLOCK_BOOTTIME), and keeps every attempt's outcome (the
errno of a failed write: ``EBADE`` is a SCSI RESERVATION CONFLICT).  Its pid is the owner pid
the driver fences.  One JSON line per command on stdin, one reply on stdout::

    {"op": "go"}                   write the region over and over, one block every ``gap`` s
    {"op": "stop"}                 stop that
    {"op": "pass"}                 write every block once (now), reply with the outcome
    {"op": "report", "since": T}   the attempts that started at or after T
    {"op": "exit"}

:func:`tags_in` reads a region back and counts each tag's blocks (the checker).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import sys
import threading
import time
from collections import Counter
from typing import Any

BLOCK = 4096
MAGIC = b"VLWRITE1"
HEADER = struct.Struct(">8s16sQQ")


def now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Writer:
    def __init__(self, device: str, tag: str, first: int, blocks: int, gap: float = 0.02) -> None:
        self.fd = os.open(device, os.O_RDWR | os.O_DIRECT)
        self.tag = tag.encode()[:16]
        self.first, self.blocks, self.gap = first, blocks, gap
        self.buf = mmap.mmap(-1, BLOCK)
        self.seq = 0
        self.attempts: list[tuple[float, float, int]] = []  # (start, end, errno or 0)
        self.lock = threading.Lock()
        self.running = threading.Event()
        self.thread: threading.Thread | None = None

    def write_one(self, index: int) -> int:
        self.seq += 1
        start = now()
        self.buf.seek(0)
        self.buf.write(HEADER.pack(MAGIC, self.tag, self.seq, int(start * 1e9)).ljust(BLOCK, b"\xa5"))
        try:
            os.pwrite(self.fd, self.buf, (self.first + index) * BLOCK)
            code = 0
        except OSError as exc:
            code = exc.errno or errno.EIO
        with self.lock:
            self.attempts.append((start, now(), code))
        return code

    def loop(self) -> None:
        index = 0
        while self.running.is_set():
            self.write_one(index % self.blocks)
            index += 1
            time.sleep(self.gap)

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "go":
            if self.thread is None or not self.thread.is_alive():
                self.running.set()
                self.thread = threading.Thread(target=self.loop, daemon=True)
                self.thread.start()
            return {}
        if op == "stop":
            self.running.clear()
            if self.thread is not None:
                self.thread.join()
            return {}
        if op == "pass":
            t0 = now()
            codes = [self.write_one(i) for i in range(self.blocks)]
            return {"t0": t0, "t1": now(), "written": codes.count(0), "failed": len(codes) - codes.count(0)}
        if op == "report":
            since = float(cmd.get("since", 0.0))
            with self.lock:
                mine = [a for a in self.attempts if a[0] >= since]
            failed = Counter(errno.errorcode.get(c, str(c)) for _s, _e, c in mine if c)
            return {"attempts": len(mine), "written": sum(1 for a in mine if a[2] == 0), "errors": dict(failed),
                    "total": len(self.attempts)}
        raise ValueError(f"unknown op {op!r}")


def tags_in(device: str, first: int, blocks: int) -> dict[str, int]:
    """How many blocks of the region carry each writer's tag (``""``: none)."""
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)
    counts: Counter[str] = Counter()
    try:
        for i in range(blocks):
            os.preadv(fd, [buf], (first + i) * BLOCK)
            magic, tag, _seq, _t = HEADER.unpack_from(buf, 0)
            counts[tag.rstrip(b"\0").decode() if magic == MAGIC else ""] += 1
    finally:
        os.close(fd)
    return dict(counts)


def main() -> None:
    device, tag, first, blocks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    writer = Writer(device, tag, first, blocks)
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "exit":
            break
        try:
            reply = {"ok": True, **writer.handle(cmd)}
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
