"""Owner processes of the agent: which QEMU is whose, watched by pidfd, stopped safely.

:class:`ProcessWatcher` only watches processes: it opens a pidfd per owner QEMU, tells its user
when one has exited, and stops one (SIGTERM, then SIGKILL after ``kill_grace``, always through
the pidfd: a reused pid is never signalled).  It releases nothing: the backend (``backend``, a
user of one watcher) does, once a process has exited -- see the ``Lifeline`` paragraph there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from virtlease_etcd.session.guard import start_time

from .lockapi import Connection
from .strand import Strand

log = logging.getLogger(__name__)


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
    acquired: set[str] = field(default_factory=set)
    """Disks this QEMU ACQUIREd and holds: a RELEASE of one is answered from memory."""
    released: set[str] = field(default_factory=set)
    """Disks RELEASEd since the reservation was made (a second RELEASE is an error)."""
    releasing: dict[int, set[str]] = field(default_factory=dict)
    """Per lock connection still open: the disks it RELEASEd (settled when it closes)."""
    to_settle: set[str] = field(default_factory=set)
    """Disks RELEASEd on connections that closed, not settled yet."""
    settling: asyncio.Task[None] | None = None
    markers_read: concurrent.futures.Future[list[Any] | None] | None = None
    """The domain's markers, read ahead in the strand when a paused start's QEMU is being
    resumed (``EtcdLockBackend.register``): its ACQUIRE, next in the strand, uses them."""
    strand: Strand | None = None
    """Every driver call for the owner (ACQUIRE, a RELEASE's reservation, the settle step, the
    release once the QEMU exits), in the order queued (``EtcdLockBackend.in_strand``)."""
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    hurry: asyncio.Event = field(default_factory=asyncio.Event)
    ending: asyncio.Task[None] | None = None

    def who(self) -> str:
        return f"domain {self.name} ({self.uuid}) QEMU pid {self.pid}"


class ProcessWatcher:
    """Watches owner QEMU processes by pidfd on the running loop (see the module docstring)."""

    def __init__(self, on_exit: Callable[[Tracked], None], *, kill_grace: float = 5.0,
                 sigkill_wait: float = 10.0) -> None:
        """``on_exit(t)`` is called on the loop once ``t``'s process has exited (``t.gone`` set).
        ``kill_grace``: seconds from SIGTERM to SIGKILL when a lifeline closes while its QEMU
        runs; ``sigkill_wait``: how often a QEMU that outlives its SIGKILL (stuck in I/O) is
        logged while its leases stay held."""
        self.on_exit = on_exit
        self.kill_grace = kill_grace
        self.sigkill_wait = sigkill_wait

    def watch(self, t: Tracked) -> None:
        """Watch ``t.pid`` with a pidfd (readable once the process has exited) and note its
        start time; ProcessLookupError if there is no such process."""
        t.pidfd = os.pidfd_open(t.pid)
        t.start = start_time(t.pid) or 0
        asyncio.get_running_loop().add_reader(t.pidfd, self._exited, t)

    def _exited(self, t: Tracked) -> None:
        if t.pidfd is not None:
            asyncio.get_running_loop().remove_reader(t.pidfd)
        t.gone.set()
        log.info("%s exited", t.who())
        self.on_exit(t)

    def close_pidfd(self, t: Tracked) -> None:
        """Close the pidfd of an exited process."""
        if t.pidfd is not None:
            os.close(t.pidfd)
            t.pidfd = None

    async def stop(self, t: Tracked) -> None:
        """Make sure the watched process has exited: SIGTERM, SIGKILL after ``kill_grace``, then
        wait for as long as it takes (a process stuck in I/O: its leases stay held meanwhile)."""
        assert t.pidfd is not None
        with contextlib.suppress(TimeoutError):  # a QEMU that exited: its pidfd fires right after the EOF
            await asyncio.wait_for(t.gone.wait(), 0.2)
            return
        for sig, wait in ((signal.SIGTERM, self.kill_grace), (signal.SIGKILL, self.sigkill_wait)):
            log.warning("lifeline of %s closed while it runs: sending %s", t.who(), sig.name)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(t.pidfd, sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(t.gone.wait(), wait)
                return
        while not t.gone.is_set():  # stuck in I/O: its leases stay until it has really exited
            log.error("%s does not exit after SIGKILL; its leases stay held until it does", t.who())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(t.gone.wait(), self.sigkill_wait)

    def unwatch(self, t: Tracked) -> None:
        """Stop watching a process that still runs (the agent exits, or it is not the one)."""
        if t.pidfd is not None:
            asyncio.get_running_loop().remove_reader(t.pidfd)
            os.close(t.pidfd)
            t.pidfd = None
