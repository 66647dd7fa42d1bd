"""A TCP proxy in front of etcd that counts gRPC requests.

gRPC runs over HTTP/2 and every call opens a stream with one HEADERS frame
from the client, so counting the HEADERS frames a client sends counts its
requests (unary calls and each single-message keepalive stream alike);
SETTINGS, PING and WINDOW_UPDATE frames are connection upkeep, not requests.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS = 0x1


class FrameCounter:
    """Parses the client-to-server byte stream of one HTTP/2 connection."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.preface_left = len(PREFACE)
        self.headers = 0

    def feed(self, data: bytes) -> None:
        self.buf += data
        if self.preface_left:
            take = min(self.preface_left, len(self.buf))
            del self.buf[:take]
            self.preface_left -= take
        pos = 0
        while len(self.buf) - pos >= 9:
            length = int.from_bytes(self.buf[pos:pos + 3], "big")
            if len(self.buf) - pos < 9 + length:
                break
            if self.buf[pos + 3] == HEADERS:
                self.headers += 1
            pos += 9 + length
        del self.buf[:pos]


class CountingProxy:
    """Listen on a free loopback port, pipe to ``upstream``, count requests."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self._srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(64)
        self.port = int(self._srv.getsockname()[1])
        self._lock = threading.Lock()
        self._counters: list[FrameCounter] = []
        self._base = 0
        self._bytes = 0
        self._socks: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name=f"count-proxy-{self.port}").start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def requests(self) -> int:
        """Requests counted since the last ``reset``."""
        with self._lock:
            return sum(c.headers for c in self._counters) - self._base

    def bytes_up(self) -> int:
        with self._lock:
            return self._bytes

    def reset(self) -> None:
        with self._lock:
            self._base = sum(c.headers for c in self._counters)
            self._bytes = 0

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._srv.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5)
                up.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            counter = FrameCounter()
            with self._lock:
                self._counters.append(counter)
                self._socks += [client, up]
            threading.Thread(target=self._pump, args=(client, up, counter), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, None), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counter: FrameCounter | None) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if counter is not None:
                    with self._lock:
                        counter.feed(data)
                        self._bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> CountingProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
