"""The agent before its etcd session opens: the socket serves at once, the session comes later.

After a site-wide power-on the hypervisors may boot before etcd.  An agent that waited for etcd
before opening its socket would leave libvirt with "cannot connect to virtlockd-sock" (and an
agent that exited would leave nothing at all); so the agent listens at once and opens its
session in the background, retrying (``open_driver``).  Meanwhile :class:`StartingBackend`
answers libvirt:

* ACQUIRE and RELEASE: held until the session opens, for at most the acquire deadline (an agent
  just started answers its first calls as soon as its session is up), then refused, ``etcd
  unreachable, nothing changed``, with the reason the last attempt gave (connection refused, a
  TLS refusal, another live session of this host_id...) -- so ``virsh start`` fails with a
  message that says what to fix, and no lease is ever granted before the session and the guard
  exist;
* REGISTER, RESTRICT, CREATE_LOCKSPACE: accepted, as they touch no lease.  When the session
  opens, the backend switches to the real one and replays every live registration into it (a
  diskless domain started meanwhile is tracked from then on, its lifeline included), under a
  lock every call takes, so no call falls between the two.

A configuration error (a bad setting, a TLS file that cannot serve) is not retried: the agent
exits 2 before listening.  See docs/DESIGN.md §9.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from virtlease.errors import BackendUnavailableError
from virtlease_etcd.session.hostrecord import HostKeyTaken

from .lockapi import Connection, LockBackend, LockError
from .protocol import AcquireFlags, Owner

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_MIN, RETRY_MAX = 0.5, 5.0
"""Seconds between two attempts to open the session: doubling from the first to the second."""
REMIND_EVERY = 60.0
"""While etcd stays unreachable, the log repeats why at most this often (and on every change)."""


class StartingBackend:
    """A :class:`~.lockapi.LockBackend` that refuses leases until ``switch`` gives it the real
    backend, and delegates every call to it from then on (the module docstring)."""

    def __init__(self, wait: float = 0.0) -> None:
        """``wait``: how long an ACQUIRE or RELEASE waits for the session before it is refused."""
        self.wait = wait
        self._ready = asyncio.Event()
        self.inner: LockBackend | None = None
        self.reason = "the agent is opening its etcd session"
        """Why there is no session yet (the last attempt's error), for the refusals."""
        self._lock = asyncio.Lock()

    async def switch(self, backend: LockBackend, connections: Iterable[Connection]) -> None:
        """From now on every call goes to ``backend``; the live connections' registrations (and
        restrictions) are replayed into it first."""
        async with self._lock:
            for conn in connections:
                if conn.owner is None:
                    continue
                try:
                    await _maybe(backend.register(conn, conn.owner))
                    if conn.restricted:
                        await _maybe(backend.restrict(conn))
                except LockError as exc:
                    log.warning("connection %d: its registration of domain %s could not be carried over: %s",
                                conn.id, conn.owner.name, exc.message)
            self.inner = backend
            self._ready.set()

    async def _inner(self) -> LockBackend | None:
        """The real backend, waiting up to ``wait`` seconds for it."""
        if self.inner is None and self.wait > 0:
            try:
                await asyncio.wait_for(self._ready.wait(), self.wait)
            except TimeoutError:
                pass
        async with self._lock:
            return self.inner

    def _refuse(self, what: str) -> LockError:
        return LockError(f"{what}: etcd unreachable, nothing changed: the virtlease agent has no etcd session yet "
                         f"({self.reason}); it keeps trying, and grants leases once it has one")

    async def register(self, conn: Connection, owner: Owner) -> None:
        async with self._lock:
            if self.inner is not None:
                await _maybe(self.inner.register(conn, owner))

    async def restrict(self, conn: Connection) -> None:
        async with self._lock:
            if self.inner is not None:
                await _maybe(self.inner.restrict(conn))

    async def create_lockspace(self, conn: Connection, path: str) -> None:
        async with self._lock:
            if self.inner is not None:
                await _maybe(self.inner.create_lockspace(conn, path))

    async def acquire(self, conn: Connection, owner: Owner, lockspace: str, name: str, flags: AcquireFlags) -> None:
        inner = await self._inner()
        if inner is None:
            raise self._refuse(f"acquire of {name} for domain {owner.name} ({owner.uuid})")
        await _maybe(inner.acquire(conn, owner, lockspace, name, flags))

    async def release(self, conn: Connection, owner: Owner, lockspace: str, name: str) -> None:
        inner = await self._inner()
        if inner is None:
            raise self._refuse(f"release of {name} for domain {owner.name} ({owner.uuid})")
        await _maybe(inner.release(conn, owner, lockspace, name))

    async def connection_closed(self, conn: Connection) -> None:
        async with self._lock:
            inner = self.inner
        if inner is not None:
            await _maybe(inner.connection_closed(conn))


async def _maybe(result: Awaitable[None] | None) -> None:
    """A backend method may be a coroutine function or a plain one (``LockBackend``)."""
    if result is not None:
        await result


async def open_driver(load: Callable[[], T], gate: StartingBackend, *, endpoints: str) -> T:
    """Call ``load`` (blocking: in a thread) until it succeeds; while etcd does not answer (or
    this host_id's previous session is still live in it) say why in ``gate`` and in the log
    (at once, on every change of reason, and every ``REMIND_EVERY`` seconds), and retry with a
    backoff.  Any other error (a configuration error) is raised."""
    loop = asyncio.get_running_loop()
    delay, said, said_at, since = RETRY_MIN, "", 0.0, time.monotonic()
    while True:
        try:
            return await loop.run_in_executor(None, load)
        except (BackendUnavailableError, HostKeyTaken) as exc:
            gate.reason = str(exc)
        now = time.monotonic()
        if gate.reason != said or now - said_at >= REMIND_EVERY:
            log.warning("no etcd session yet after %.0fs (%s); serving the socket meanwhile: every ACQUIRE is "
                        "refused as 'etcd unreachable' until it opens; retrying every %.0fs at most (endpoints "
                        "%s)", now - since, gate.reason, RETRY_MAX, endpoints)
            said, said_at = gate.reason, now
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)
