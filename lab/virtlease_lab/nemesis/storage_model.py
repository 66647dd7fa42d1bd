"""The shared storage of the nemesis suite: a unix-socket server that checks
fencing tokens the way real storage would (SCSI persistent reservations,
Ceph's blocklist, NFS with a token-checking proxy).

Every write names the disk, the writer (host, incarnation, domain uuid, write
interval) and the fencing token from ``inquire()``.  The server rejects a
token lower than the newest it has seen for that disk, and a write with the
newest token from a different holder (two holders with one token is itself
a violation).  Every request is logged with the writer's time (the fence clock) and
the server's.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from dataclasses import dataclass

from virtlease_etcd.clock import SYSTEM


@dataclass
class Write:
    disk: str
    host: str
    inc: int
    obj: str
    iid: str
    token: int
    t_client: float
    t_server: float
    accepted: bool
    why: str


class StorageServer:
    def __init__(self, path: str) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(path)
        self._srv.listen(128)
        self._lock = threading.Lock()
        self.newest: dict[str, tuple[int, tuple[str, int, str]]] = {}
        self.log: list[Write] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True, name="storage").start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn, conn.makefile("rwb") as fh:  # a host killed mid-request
            for line in fh:
                req = json.loads(line)
                ok, why = self.write(req)
                try:
                    fh.write((json.dumps({"ok": ok, "why": why}) + "\n").encode())
                    fh.flush()
                except OSError:
                    return

    def write(self, req: dict[str, object]) -> tuple[bool, str]:
        disk = str(req["disk"])
        token = int(req["token"])  # type: ignore[call-overload]
        holder = (str(req["host"]), int(req["inc"]), str(req["obj"]))  # type: ignore[call-overload]
        with self._lock:
            t_server = SYSTEM.now()
            prev = self.newest.get(disk)
            if prev is not None and token < prev[0]:
                ok, why = False, f"stale token {token} < {prev[0]}"
            elif prev is not None and token == prev[0] and prev[1] != holder:
                ok, why = False, f"token {token} already used by {prev[1]}"
            else:
                ok, why = True, ""
                self.newest[disk] = (token, holder)
            self.log.append(Write(disk, holder[0], holder[1], holder[2], str(req.get("iid")), token,
                                  float(req["t"]), t_server, ok, why))  # type: ignore[arg-type]
        return ok, why

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._srv.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
