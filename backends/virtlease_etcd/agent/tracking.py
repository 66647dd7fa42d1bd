"""Owner processes of the agent: which QEMU is whose, watched by pidfd, ended safely.

See the ``Lifeline`` paragraph of ``backend``: nothing is released before the process has
exited; a lifeline EOF while it runs means SIGTERM, then SIGKILL after ``kill_grace``, always
through the pidfd (a reused pid is never signalled).  ``adopt_running`` takes over an owner a
previous agent left running (``restart``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from virtlease.errors import VirtleaseError
from virtlease_etcd.driver import EtcdDriver
from virtlease_etcd.ops import handoff
from virtlease_etcd.ops.lockd import LockdDomain
from virtlease_etcd.session.guard import start_time

from .lockapi import Connection, LockError
from .protocol import ErrorCode

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(eq=False)
class Tracked:
    """The agent's view of one owner's QEMU process."""

    uuid: str
    name: str
    pid: int
    start: int = 0
    """The pid's start time (``/proc/<pid>/stat`` field 22): a pid and this name one process."""
    pidfd: int | None = None
    lifeline: Connection | None = None
    released: set[str] = field(default_factory=set)
    """Disks RELEASEd since the reservation was made (a second RELEASE is an error)."""
    releasing: dict[int, set[str]] = field(default_factory=dict)
    """Per lock connection still open: the disks it RELEASEd (settled when it closes)."""
    to_settle: set[str] = field(default_factory=set)
    """Disks RELEASEd on connections that closed, not settled yet."""
    settling: asyncio.Task[None] | None = None
    pending: asyncio.Task[None] | None = None
    """The last driver call queued for this owner after its reply was sent (a RELEASE's
    reservation); later calls for the owner wait for it (``OwnerTracker.in_order``)."""
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    hurry: asyncio.Event = field(default_factory=asyncio.Event)
    ending: asyncio.Task[None] | None = None

    def who(self) -> str:
        return f"domain {self.name} ({self.uuid}) QEMU pid {self.pid}"


class OwnerTracker:
    """The owners' QEMU processes of one loaded etcd driver: watched by pidfd, killed when
    their lifeline closes, their leases released once they have exited."""

    def __init__(self, driver: EtcdDriver, *, reserve_grace: float = 2.0, kill_grace: float = 5.0,
                 workers: int = 16) -> None:
        self.driver = driver
        self.reserve_grace = reserve_grace
        self.kill_grace = kill_grace
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="virtlease-etcd")
        self._tracked: dict[str, Tracked] = {}
        self.on_change: Callable[[], None] | None = None
        """Called on the loop whenever an owner starts or stops being tracked or holding
        (the restart machinery keeps the guard and the state file in step)."""
        self.count: Callable[[str, str], None] = lambda op, result: None
        """``count(op, result)`` after every ACQUIRE/RELEASE: the driver's outcome ("granted",
        "resumed", "claimed", "released", ...) or the refusal ("busy", "unavailable", "lost",
        "state", "error"); the metrics replace it."""

    def changed(self, *, strict: bool = False) -> None:
        """Run the change hook; with ``strict`` its failure refuses the call in progress
        (an ACQUIRE must not let a QEMU start that the guard does not know)."""
        if self.on_change is None:
            return
        try:
            self.on_change()
        except Exception as exc:
            log.exception("owner change hook failed")
            if strict:
                raise LockError(f"the virtlease agent cannot arm its guard process ({exc}); refusing, "
                                "so that no QEMU runs unguarded") from exc

    def owners(self) -> list[Tracked]:
        """Tracked owners whose QEMU has not exited."""
        return [t for t in self._tracked.values() if not t.gone.is_set()]

    def _lockd(self, uuid: str, name: str, pid: int | None) -> LockdDomain:
        """The driver's lockd calls for one owner (a fresh one per call: the session may have
        been renewed meanwhile)."""
        return self.driver.lockd(uuid, name, pid or None)

    def in_order(self, t: Tracked, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` in the background after every call queued before it for this owner."""
        before = t.pending

        async def queued() -> None:
            if before is not None:
                await asyncio.wait([before])
            await work()

        t.pending = asyncio.get_running_loop().create_task(queued())

    @staticmethod
    async def after_pending(t: Tracked) -> None:
        """Wait until what was queued for the owner so far is done (its errors were logged)."""
        if t.pending is not None and not t.pending.done():
            await asyncio.wait([t.pending])

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    # ------------------------------------------------------------------ owner tracking

    def _watch(self, t: Tracked) -> None:
        """Watch the pid with a pidfd (readable once the process has exited)."""
        try:
            t.pidfd = os.pidfd_open(t.pid)
            t.start = start_time(t.pid) or 0
        except ProcessLookupError:
            raise LockError(f"owner pid {t.pid} of domain {t.name} ({t.uuid}) does not exist",
                            code=ErrorCode.INVALID_ARG) from None
        asyncio.get_running_loop().add_reader(t.pidfd, self._exited, t)

    def _exited(self, t: Tracked) -> None:
        if t.pidfd is not None:
            asyncio.get_running_loop().remove_reader(t.pidfd)
        t.gone.set()
        log.info("%s exited", t.who())
        self._end(t, kill=False)

    def _end(self, t: Tracked, *, kill: bool) -> None:
        if t.ending is None:
            t.ending = asyncio.get_running_loop().create_task(self._ending(t, kill))

    async def _ending(self, t: Tracked, kill: bool) -> None:
        """Make sure the QEMU is gone, then (after the reservation grace) release its leases."""
        if kill and not t.gone.is_set():
            await self._kill(t)
        await t.gone.wait()
        await self.after_pending(t)
        if t.pidfd is not None:
            os.close(t.pidfd)
            t.pidfd = None
        session = self.driver.session
        owner = session.owners.peek(t.uuid)
        if owner is not None and handoff.reserved(owner) and self.reserve_grace > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(t.hurry.wait(), self.reserve_grace)
        await self._release_owner(t)
        if self._tracked.get(t.uuid) is t:
            del self._tracked[t.uuid]
        self.changed()

    async def _kill(self, t: Tracked) -> None:
        assert t.pidfd is not None
        with contextlib.suppress(TimeoutError):  # a QEMU that exited: its pidfd fires right after the EOF
            await asyncio.wait_for(t.gone.wait(), 0.2)
            return
        for sig, wait in ((signal.SIGTERM, self.kill_grace), (signal.SIGKILL, 10.0)):
            log.warning("lifeline of %s closed while it runs: sending %s", t.who(), sig.name)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(t.pidfd, sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(t.gone.wait(), wait)
                return
        while not t.gone.is_set():  # stuck in I/O: its leases stay until it has really exited
            log.error("%s does not exit after SIGKILL; its leases stay held until it does", t.who())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(t.gone.wait(), 10.0)

    async def _release_owner(self, t: Tracked) -> None:
        session = self.driver.session
        while True:
            owner = session.owners.peek(t.uuid)
            if owner is None or not owner.active or session.lost is not None:
                return
            try:
                await self._run(self._lockd(t.uuid, t.name, t.pid).release_all)
                log.info("released every lease of %s", t.who())
                return
            except VirtleaseError as exc:
                log.error("cannot release the leases of exited %s yet (%s); retrying", t.who(), exc)
                await asyncio.sleep(1.0)

    async def adopt_running(self, uuid: str, name: str, pid: int | None, start: int | None) -> Tracked | None:
        """Track an owner a previous agent left (its records already re-adopted on the session).
        Its QEMU runs if ``pid`` exists with start time ``start`` (None: not checked): watched
        from now on, without a lifeline.  Otherwise its leases are released; returns None."""
        t = Tracked(uuid=uuid, name=name, pid=pid or 0)
        if pid and (start is None or start_time(pid) == start):
            try:
                self._watch(t)
            except LockError:
                pass
            else:
                if start is None or t.start == start:
                    self._tracked[uuid] = t
                    log.info("re-adopted running %s", t.who())
                    return t
                self._stop_watching(t)
        log.warning("%s is no longer running: releasing what it held", t.who())
        t.gone.set()
        await self._release_owner(t)
        return None

    def _stop_watching(self, t: Tracked) -> None:
        if t.pidfd is not None:
            asyncio.get_running_loop().remove_reader(t.pidfd)
            os.close(t.pidfd)
            t.pidfd = None

    # ------------------------------------------------------------------ shutdown

    async def close(self) -> None:
        """Stop watching (the agent is exiting; call only once nothing is held)."""
        for t in list(self._tracked.values()):
            if t.ending is not None and not t.ending.done():
                t.hurry.set()
            if not t.gone.is_set():
                self._stop_watching(t)
        pending = [t.ending for t in self._tracked.values() if t.ending is not None and not t.ending.done()]
        if pending:
            await asyncio.wait(pending, timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

