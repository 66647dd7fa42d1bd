"""The one byte relay of the lab: a link to etcd the test owns, to cut, blackhole, slow or count.

Every accepted connection is piped to a new upstream connection, one thread per direction; when
either side ends, both are closed (with only a half-close, requests after a blackhole were seen
reset stream after stream for seconds).  TCP sockets set TCP_NODELAY on both sides, as etcd's and gRPC's
own do (with Nagle's algorithm a reply relayed in two writes waits for the peer's delayed ACK:
40 ms, which once showed as a bimodal migration downtime on the libvirt rig).  Three shapes:

* :meth:`Relay.tcp`: ``127.0.0.1:<free port>`` -> ``host:port`` (a host's link to one etcd
  member: the driver tests, the nemesis, the benchmarks);
* :meth:`Relay.unix_to_tcp` / :meth:`Relay.tcp_to_unix`: carry a member's client port into a
  network namespace of the libvirt rig through a UNIX socket both sides see
  (``libvirt/agent_in_host.py`` runs the inner half).

Faults, all undone by :meth:`Relay.heal`:

* :meth:`Relay.cut`: reset every connection and refuse (close at once) new ones;
* :meth:`Relay.blackhole`: a dead network: every byte relayed is dropped both ways, new
  connections are accepted and then hang (nothing read from them), nothing is closed (the
  client sees timeouts, not resets);
* :meth:`Relay.drop_replies`: requests reach etcd, its replies are dropped (the outcome of a
  write is unknown to the client);
* ``delay``: seconds added to every chunk relayed.

:meth:`Relay.heal` relays again: the connections that lost bytes go on (gRPC's streams whose
frames were dropped time out; the connection survives) and the hanging ones are connected
upstream, what they sent meanwhile delivered.  ``heal(reset=True)`` closes both kinds instead,
as TCP would have timed them out after a long partition (the libvirt rig's ``AgentRig.heal``).

``count_requests=True`` counts the gRPC requests clients send (:meth:`Relay.requests`): gRPC
runs over HTTP/2 and every call opens a stream with one HEADERS frame from the client, so
counting those counts requests (unary calls and each single-message keepalive stream alike);
SETTINGS, PING and WINDOW_UPDATE frames are connection upkeep, not requests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS = 0x1


class FrameCounter:
    """Counts the HEADERS frames in the client-to-server bytes of one HTTP/2 connection."""

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


class _Link:
    """One relayed connection: the accepted socket, its upstream, and whether it lost bytes."""

    def __init__(self, down: socket.socket, up: socket.socket | None) -> None:
        self.down = down
        self.up = up
        self.lost_bytes = False
        self.counter: FrameCounter | None = None

    def close(self) -> None:
        for s in (self.down, self.up):
            if s is None:
                continue
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


def _nodelay(s: socket.socket) -> socket.socket:
    if s.family in (socket.AF_INET, socket.AF_INET6):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class Relay:
    """Accept on ``listener``, pipe each connection to a new ``connect()`` socket (see the module
    docstring).  Use as a context manager or call :meth:`close`."""

    def __init__(self, listener: socket.socket, connect: Callable[[], socket.socket], *,
                 count_requests: bool = False) -> None:
        self.listener = listener
        self.connect = connect
        self.count_requests = count_requests
        self.delay = 0.0
        """Seconds added to every chunk relayed (either way)."""
        self._cut = False
        self._blackhole = False
        self._drop_replies = False
        self._closed = False
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._counters: list[FrameCounter] = []
        self._base = 0
        self._bytes_up = 0
        name = f"relay-{self.port}" if listener.family != socket.AF_UNIX else "relay-unix"
        self.thread = threading.Thread(target=self._accept_loop, name=name, daemon=True)
        self.thread.start()

    # -- the three shapes ------------------------------------------------------------

    @classmethod
    def tcp(cls, upstream: str, listen_port: int = 0, *, count_requests: bool = False) -> Relay:
        """Listen on ``127.0.0.1:listen_port`` (0: a free port), connect to ``upstream`` (host:port)."""
        host, _, port = upstream.rpartition(":")
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", listen_port))
        ls.listen(64)
        return cls(ls, lambda: _nodelay(socket.create_connection((host, int(port)), timeout=5)),
                   count_requests=count_requests)

    @classmethod
    def unix_to_tcp(cls, path: str, host: str, port: int) -> Relay:
        """Listen on UNIX socket ``path``, connect to ``host:port``."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(path)
        ls.listen(64)
        return cls(ls, lambda: _nodelay(socket.create_connection((host, port), timeout=5)))

    @classmethod
    def tcp_to_unix(cls, port: int, path: str) -> Relay:
        """Listen on ``127.0.0.1:port``, connect to UNIX socket ``path``."""
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", port))
        ls.listen(64)

        def connect() -> socket.socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
            except OSError:
                s.close()
                raise
            return s

        return cls(ls, connect)

    @property
    def port(self) -> int:
        """The TCP port it listens on."""
        return int(self.listener.getsockname()[1])

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:<port>``: what a client configures instead of the member's address."""
        return f"127.0.0.1:{self.port}"

    # -- faults ----------------------------------------------------------------------

    def cut(self) -> None:
        """Reset every connection and refuse new ones."""
        with self._lock:
            self._cut = True
            links = list(self._links)
        for link in links:
            link.close()

    def blackhole(self) -> None:
        """Drop every byte both ways from now on; new connections are accepted and hang."""
        with self._lock:
            self._blackhole = True

    def drop_replies(self) -> None:
        """Pass requests upstream but drop the replies (the outcome of a write is unknown)."""
        with self._lock:
            self._drop_replies = True

    def heal(self, *, reset: bool = False) -> None:
        """Undo every fault (``delay`` too).  ``reset``: close the connections that lost bytes
        or hung, rather than let them go on (see the module docstring)."""
        with self._lock:
            self._cut = self._blackhole = self._drop_replies = False
            self.delay = 0.0
            hanging = [link for link in self._links if link.up is None]
            broken = [link for link in self._links if link.lost_bytes and link.up is not None]
            for link in broken:
                link.lost_bytes = False
            if reset:
                self._links.difference_update(hanging + broken)
        if reset:
            for link in hanging + broken:
                link.close()
            return
        for link in hanging:
            with self._lock:
                self._links.discard(link)
            self._relay(link.down)

    # -- counting --------------------------------------------------------------------

    def requests(self) -> int:
        """gRPC requests counted since the last :meth:`reset_counts` (``count_requests=True``)."""
        with self._lock:
            return sum(c.headers for c in self._counters) - self._base

    def bytes_up(self) -> int:
        """Bytes relayed client -> upstream since the last :meth:`reset_counts` (``count_requests=True``)."""
        with self._lock:
            return self._bytes_up

    def reset_counts(self) -> None:
        """Count :meth:`requests` and :meth:`bytes_up` from now on."""
        with self._lock:
            self._base = sum(c.headers for c in self._counters)
            self._bytes_up = 0

    # -- the work --------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            links = list(self._links)
            self._links.clear()
        for link in links:
            link.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            _nodelay(down)
            with self._lock:
                cut, hang = self._cut, self._blackhole
            if cut:
                down.close()
                continue
            if hang:
                with self._lock:
                    self._links.add(_Link(down, None))  # hangs until heal() or close()
                continue
            self._relay(down)

    def _relay(self, down: socket.socket) -> None:
        """Connect ``down`` upstream and start pumping both ways."""
        try:
            up = self.connect()
        except OSError as exc:
            log.warning("relay: cannot connect upstream: %s", exc)
            down.close()
            return
        up.settimeout(None)
        link = _Link(down, up)
        with self._lock:
            if self.count_requests:
                link.counter = FrameCounter()
                self._counters.append(link.counter)
            self._links.add(link)
        for src, dst, upstream in ((down, up, True), (up, down, False)):
            threading.Thread(target=self._pump, args=(link, src, dst, upstream), daemon=True,
                             name="relay-pump").start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if link.counter is not None and upstream:
                    with self._lock:
                        link.counter.feed(data)
                        self._bytes_up += len(data)
                if self._blackhole or (self._drop_replies and not upstream):
                    link.lost_bytes = True
                    continue
                if self.delay:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:  # one side ended: close both, as a dead peer's TCP would (no half-open stream)
            with self._lock:
                self._links.discard(link)
            link.close()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
