"""A TCP proxy the tests own, to cut a host off from etcd, slow it, or drop replies.

Each accepted client connection is piped to ``upstream``.  ``cut()`` closes
every connection and refuses (closes at once) new ones until ``heal()``;
``blackhole()`` keeps connections open but silently drops bytes both ways
(a partition, not a reset); ``delay`` adds latency to every chunk.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from types import TracebackType


class TcpProxy:
    def __init__(self, upstream: str, listen_port: int = 0) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self._srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", listen_port))
        self._srv.listen(64)
        self.port = int(self._srv.getsockname()[1])
        self.delay = 0.0
        self._cut = False
        self._blackhole = False
        self._drop_replies = False
        self._stop = False
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name=f"proxy-{self.port}")
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Reset every connection and refuse new ones."""
        with self._lock:
            self._cut = True
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                c.close()

    def blackhole(self) -> None:
        """Keep connections but drop every byte (requests time out)."""
        with self._lock:
            self._blackhole = True

    def drop_replies(self) -> None:
        """Pass requests to etcd but drop its replies (the outcome is unknown)."""
        with self._lock:
            self._drop_replies = True

    def heal(self) -> None:
        with self._lock:
            self._cut = False
            self._blackhole = False
            self._drop_replies = False
            self.delay = 0.0

    def close(self) -> None:
        self._stop = True
        self.cut()
        with contextlib.suppress(OSError):
            self._srv.close()

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            if self._cut:
                client.close()
                continue
            try:
                up = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, up))
            threading.Thread(target=self._pipe, args=(client, up), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while not self._stop and not self._cut:
                for key, _ in sel.select(timeout=0.2):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = src.recv(65536)
                    if not data:
                        return
                    if self._blackhole or (self._drop_replies and src is b):
                        continue
                    if self.delay:
                        time.sleep(self.delay)
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            with self._lock:
                self._conns.discard(a)
                self._conns.discard(b)
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
