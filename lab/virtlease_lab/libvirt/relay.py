"""Byte relays that carry etcd's client ports into a rig host's network namespace.

The rig's hosts have their own network namespaces (only a veth pair between them), but they
see the machine's file system.  So the test runs one :class:`Relay` ``unix PATH -> tcp member``
per etcd member and host in the root namespace, and the agent launcher (``agent_in_host.py``)
runs ``tcp 127.0.0.1:PORT -> unix PATH`` inside the host's namespace: the agent there reaches
the members at ``127.0.0.1:PORT...``.  Nothing leaves the machine.  Both TCP sides set TCP_NODELAY, as etcd's and gRPC's own sockets
do: with Nagle's algorithm a reply relayed in two writes waits for the peer's delayed ACK
(40 ms), which showed as a bimodal migration downtime.

:meth:`Relay.partition` cuts a host off the way a dead network does: bytes in flight are
dropped, new connections are accepted and then hang, nothing is closed (the agent sees
timeouts, not resets).  :meth:`Relay.heal` drops the connections the partition broke (TCP
would have timed them out) and relays new ones again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Relay:
    """Accept on ``listener`` and pipe each connection to a new ``connect()`` socket."""

    def __init__(self, listener: socket.socket, connect: Callable[[], socket.socket]) -> None:
        self.listener = listener
        self.connect = connect
        self._closed = False
        self._cut = threading.Event()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept_loop, name="etcd-relay", daemon=True)
        self.thread.start()

    @classmethod
    def unix_to_tcp(cls, path: str, host: str, port: int) -> Relay:
        """Listen on UNIX socket ``path``, connect to ``host:port``."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(path)
        ls.listen(64)
        def connect() -> socket.socket:
            s = socket.create_connection((host, port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s

        return cls(ls, connect)

    @classmethod
    def tcp_to_unix(cls, port: int, path: str) -> Relay:
        """Listen on ``127.0.0.1:port``, connect to UNIX socket ``path``."""
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", port))
        ls.listen(64)

        def connect() -> socket.socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            return s

        return cls(ls, connect)

    def partition(self) -> None:
        """From now on drop every byte both ways and leave new connections hanging."""
        self._cut.set()

    def heal(self) -> None:
        """Close the connections the partition broke; relay new ones again."""
        with self._lock:
            broken, self._open = self._open, []
            self._cut.clear()
        for s in broken:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        """Stop accepting (open connections end with their peers)."""
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            if a.family == socket.AF_INET:
                a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._cut.is_set():
                with self._lock:
                    self._open.append(a)  # hangs until heal() closes it
                continue
            try:
                b = self.connect()
            except OSError as exc:
                log.warning("relay: cannot connect upstream: %s", exc)
                a.close()
                continue
            with self._lock:
                self._open += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self._cut.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
