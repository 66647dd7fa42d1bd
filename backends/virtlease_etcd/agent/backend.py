"""The etcd :class:`~.server.LockBackend`: lockd's calls on one loaded etcd driver.

The agent owns the host's session (one etcd lease for the host).  What it guarantees:

* **Owners.**  REGISTER names the owner (domain uuid, name, id, QEMU pid).  Holds belong to
  the owner (the driver's :class:`~virtlease_etcd.owners.Owner`, by UUID), not to a
  connection: libvirt acquires on a short-lived connection and closes it.
* **Resources.**  Direct mode (lockspace ``""``): the name is the disk path, locked as a
  DISK (canonical path).  Indirect mode (``file_lockspace_dir``): lockspace = that directory,
  name = sha256 of the path; taken as an opaque LEASE ``lockspace:name`` -- every host must
  then use the same ``file_lockspace_dir`` and the same disk paths, or two hosts lock
  different names for one disk.  Flag SHARED: a shared grant.  Nothing is created on disk.
* **ACQUIRE** is a one-resource grant for the owner (lockd sends one per disk).  Busy:
  :class:`~.server.ResourceBusy` naming the holder's host and domain (``virsh start`` prints
  it).  etcd unreachable: an error reply once the driver's deadline (``acquire_timeout``,
  default the TTL) passes, never a hang.
* **RELEASE** while the QEMU lives (pause, the end of a live migration on the source) does
  not free the disks: they stay *reserved* for the same domain UUID on this host's lease
  (``handoff/<uuid>/<host>`` with ``to="*"``) until that QEMU exits plus ``reserve_grace``.
  Another host's ACQUIRE for the same UUID claims the reservation (every disk, new tokens,
  one transaction); another domain is refused naming the reservation; this host's own
  ACQUIRE (resume) cancels it.  A second RELEASE of a disk already released is an error
  ("not locked"), as virtlockd answers.
* **Lifeline.**  The connection libvirt opens in the forked child before exec (peer pid ==
  owner pid, RESTRICTed; QEMU inherits it) is the owner's lifeline.  Its EOF means the QEMU
  is gone or lost its lock connection: the agent makes sure the pid is gone (SIGTERM, SIGKILL
  after ``kill_grace``, via pidfd so a reused pid is never signalled; all asynchronous),
  then releases everything the owner holds.  Every owner pid is also watched with
  ``os.pidfd_open``: liveness does not depend on the socket alone, and nothing is released
  before the process has exited.
* **Lease loss** is the driver's: it fences every owner with its failure action (poweroff by
  default, ``default_action`` = pause / ignore configurable).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from virtlease.abi import FailureAction, ObjectSpec, ObjectType, ResourceFlags, ResourceSpec, ResourceType
from virtlease.errors import (
    BackendUnavailableError,
    Holder,
    LeaseLostError,
    ObjectStateError,
    ResourceBusyError,
    VirtleaseError,
)

from .. import grants, handoff
from ..domain import Domain
from ..driver import EtcdDriver
from .protocol import AcquireFlags, ErrorCode, Owner
from .server import Connection, LockError, ResourceBusy

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(eq=False)
class Tracked:
    """The agent's view of one owner's QEMU process."""

    uuid: str
    name: str
    pid: int
    pidfd: int | None = None
    lifeline: Connection | None = None
    released: set[str] = field(default_factory=set)
    """Disks RELEASEd since the reservation was made (a second RELEASE is an error)."""
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    hurry: asyncio.Event = field(default_factory=asyncio.Event)
    ending: asyncio.Task[None] | None = None

    def who(self) -> str:
        return f"domain {self.name} ({self.uuid}) QEMU pid {self.pid}"


def resource_spec(lockspace: str, name: str, flags: AcquireFlags | int = 0) -> ResourceSpec:
    """The driver resource for a lockd (lockspace, name): a DISK in direct mode, an opaque
    LEASE ``lockspace:name`` in indirect mode (the sha256 of the path)."""
    rflags = ResourceFlags.SHARED if int(flags) & int(AcquireFlags.SHARED) else ResourceFlags(0)
    if not lockspace:
        if not name.startswith("/"):
            raise LockError(f"resource {name!r}: a direct-mode lockd resource must be an absolute disk path",
                            code=ErrorCode.INVALID_ARG)
        return ResourceSpec(ResourceType.DISK, name, rflags)
    return ResourceSpec(ResourceType.LEASE, name, rflags, {"lockspace": lockspace})


def describe_holder(h: Holder) -> str:
    """One conflicting holder, as ``virsh`` shows it after "resource busy: "."""
    if h.handoff_to == handoff.RESERVED:
        return (f"{h.resource} is reserved for domain {h.domain_name} ({h.domain_uuid}) paused/migrating on "
                f"host {h.host} (virtlease token {h.token}); it is free once that domain's QEMU exits there")
    text = (f"{h.resource} is held {h.mode} by domain {h.domain_name} ({h.domain_uuid}) on host {h.host} "
            f"(virtlease token {h.token})")
    if h.handoff_to:
        text += f", being migrated to host {h.handoff_to}"
    return text + f"; stop that domain, or if host {h.host} is dead wait for its lease to expire"


class EtcdLockBackend:
    """A LockBackend over one loaded etcd driver (see the module docstring).

    Coroutine methods: driver calls run in a private thread pool, process watching runs on
    the server's loop."""

    def __init__(self, driver: EtcdDriver, *, reserve_grace: float = 2.0, kill_grace: float = 5.0,
                 workers: int = 16) -> None:
        self.driver = driver
        self.reserve_grace = reserve_grace
        self.kill_grace = kill_grace
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="virtlease-etcd")
        self._tracked: dict[str, Tracked] = {}

    # ------------------------------------------------------------------ helpers

    def _domain(self, uuid: str, name: str, pid: int | None) -> Domain:
        drv = self.driver
        assert drv.cfg is not None
        spec = ObjectSpec(type=ObjectType.DOMAIN, uuid=uuid, name=name, pid=pid)
        return Domain(drv.session, drv.cfg, drv.policy, spec)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    async def _driver_call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """A driver call, its errors turned into the lockd error libvirt reports."""
        try:
            return await self._run(fn, *args)
        except ResourceBusyError as exc:
            raise ResourceBusy("; ".join(describe_holder(h) for h in exc.conflicts)) from None
        except BackendUnavailableError as exc:
            raise LockError(f"{what}: etcd unreachable, nothing changed ({exc}); check the etcd "
                            "endpoints of the virtlease agent") from None
        except LeaseLostError as exc:
            raise LockError(f"{what}: this host's virtlease session is lost ({exc}); restart the "
                            "virtlease agent once etcd is reachable") from None
        except ObjectStateError as exc:
            raise ResourceBusy(f"{what}: {exc}") from None
        except VirtleaseError as exc:
            raise LockError(f"{what}: {exc}") from None

    def tracked(self, uuid: str) -> Tracked | None:
        """The tracked QEMU of a domain (tests, status)."""
        return self._tracked.get(uuid)

    def busy_owners(self) -> list[str]:
        """Domains whose QEMU may run on the strength of this agent's leases."""
        session = self.driver._session
        if session is None or session.lost is not None:
            return []
        return [f"domain {o.name} ({o.uuid}) pid {o.pid}: "
                + ", ".join(h.rid.readable for h in o.held.values())
                + (" (reserved)" if handoff.reserved(o) else "")
                for o in session.owners.all() if o.active]

    # ------------------------------------------------------------------ owner tracking

    def _watch(self, t: Tracked) -> None:
        """Watch the pid with a pidfd (readable once the process has exited)."""
        try:
            t.pidfd = os.pidfd_open(t.pid)
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
                await self._run(grants.release_owner, self._domain(t.uuid, t.name, t.pid), owner)
                log.info("released every lease of %s", t.who())
                return
            except VirtleaseError as exc:
                log.error("cannot release the leases of exited %s yet (%s); retrying", t.who(), exc)
                await asyncio.sleep(1.0)

    def _check_alive(self, uuid: str, name: str) -> Tracked:
        t = self._tracked.get(uuid)
        if t is None:
            raise LockError(f"domain {name} ({uuid}) is not registered with the virtlease agent",
                            code=ErrorCode.OPERATION_INVALID)
        if t.gone.is_set() or t.ending is not None:
            raise LockError(f"{t.who()} has exited or lost its lock connection; its leases are being "
                            "released", code=ErrorCode.OPERATION_INVALID)
        return t

    # ------------------------------------------------------------------ LockBackend

    async def register(self, conn: Connection, owner: Owner) -> None:
        uuid = str(owner.uuid)
        t = self._tracked.get(uuid)
        if t is not None and t.pid == owner.pid and t.ending is None:
            return
        if t is not None:
            if not t.gone.is_set():
                raise LockError(f"domain {owner.name} ({uuid}): QEMU pid {t.pid} is still running on this "
                                f"host; cannot register pid {owner.pid} for the same domain",
                                code=ErrorCode.OPERATION_INVALID)
            t.hurry.set()  # the old QEMU is gone: release what it had now, then track the new one
            if t.ending is not None:
                await t.ending
        t = Tracked(uuid=uuid, name=owner.name, pid=owner.pid)
        self._watch(t)
        self._tracked[uuid] = t

    async def restrict(self, conn: Connection) -> None:
        owner = conn.owner
        assert owner is not None
        t = self._tracked.get(str(owner.uuid))
        if t is not None and conn.peer.pid == owner.pid == t.pid:
            t.lifeline = conn
            log.info("connection %d is the lifeline of %s", conn.id, t.who())

    async def create_lockspace(self, conn: Connection, path: str) -> None:
        log.debug("CREATE_LOCKSPACE %s (nothing to create: leases live in etcd)", path)

    async def acquire(self, conn: Connection, owner: Owner, lockspace: str, name: str,
                      flags: AcquireFlags) -> None:
        t = self._check_alive(str(owner.uuid), owner.name)
        res = resource_spec(lockspace, name, flags)
        d = self._domain(t.uuid, owner.name, t.pid)
        outcome = await self._driver_call(f"acquire of {name} for domain {owner.name} ({t.uuid})",
                                          grants.acquire_one, d, res, FailureAction.DEFAULT)
        if t.ending is not None:  # the QEMU ended while the grant was in flight: undo it
            await asyncio.shield(t.ending)
            await self._release_owner(t)
            raise LockError(f"{t.who()} exited or lost its lock connection during the acquire of {name}; "
                            "nothing is held for it", code=ErrorCode.OPERATION_INVALID)
        if outcome in ("resumed", "claimed", "granted"):
            t.released.clear()
        log.info("acquire %s %s for %s: %s", lockspace or "-", name, t.who(), outcome)

    async def release(self, conn: Connection, owner: Owner, lockspace: str, name: str) -> None:
        t = self._check_alive(str(owner.uuid), owner.name)
        res = resource_spec(lockspace, name)
        if name in t.released:
            raise ResourceBusy(f"{name} is not locked by domain {owner.name} ({t.uuid}): already released "
                               "(it stays reserved for the domain until its QEMU exits)")
        d = self._domain(t.uuid, owner.name, t.pid)
        outcome = await self._driver_call(f"release of {name} for domain {owner.name} ({t.uuid})",
                                          grants.release_one, d, res)
        t.released.add(name)
        log.info("release %s %s for %s: %s", lockspace or "-", name, t.who(), outcome)

    async def connection_closed(self, conn: Connection) -> None:
        owner = conn.owner
        if owner is None:
            return
        t = self._tracked.get(str(owner.uuid))
        if t is not None and t.lifeline is conn:
            log.info("lifeline connection %d of %s closed", conn.id, t.who())
            self._end(t, kill=True)

    # ------------------------------------------------------------------ shutdown

    async def close(self) -> None:
        """Stop watching (the agent is exiting; call only once nothing is held)."""
        loop = asyncio.get_running_loop()
        for t in list(self._tracked.values()):
            if t.ending is not None and not t.ending.done():
                t.hurry.set()
            if t.pidfd is not None and not t.gone.is_set():
                loop.remove_reader(t.pidfd)
                os.close(t.pidfd)
                t.pidfd = None
        pending = [t.ending for t in self._tracked.values() if t.ending is not None and not t.ending.done()]
        if pending:
            await asyncio.wait(pending, timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

