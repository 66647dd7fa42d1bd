"""The etcd :class:`~.server.LockBackend`: lockd's calls on one loaded etcd driver.

The agent owns the host's session (one etcd lease for the host).  What it guarantees:

* **Owners.**  REGISTER names the owner (domain uuid, name, id, QEMU pid).  Holds belong to
  the owner (the driver's :class:`~virtlease_etcd.session.owners.Owner`, by UUID), not to a
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
* **RELEASE** while the QEMU lives does not free the disk at once: it is *reserved* for the
  same domain UUID on this host's lease (``handoff/<uuid>/<host>`` with ``to="*"``, listing
  only the disks released so far) while the owner's other disks stay plainly held.  When the
  lock connection that released closes, the release is settled: libvirt releases every disk
  of a domain on one connection when it pauses it (``virsh suspend``, the source of a live
  migration, managed save), and one disk when it hot-unplugs it or pivots a block job
  (``detach-disk``, ``blockcopy --pivot``, ``blockcommit --pivot``, an external snapshot
  dropping the old top image) while the QEMU goes on writing the others.  So a connection
  that leaves the owner holding disks it did not release was an unplug: its disks are freed
  then (retried until etcd answers or the session is lost).  Otherwise every disk stays
  reserved until that QEMU exits plus ``reserve_grace``.  Another host's ACQUIRE for the same
  UUID claims the reservation (the disks it lists, new tokens, one transaction) -- never a disk
  the QEMU still writes; another domain is refused naming the reservation; this host's own
  ACQUIRE of a reserved disk (resume) cancels it.  A second RELEASE of a disk already
  released is an error ("not locked"), as virtlockd answers.  (A domain whose only locked
  disk is hot-unplugged looks like a pause: that disk stays reserved for the domain until its
  QEMU exits.)
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
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from virtlease.abi import FailureAction, ResourceSpec
from virtlease.errors import (
    BackendUnavailableError,
    Holder,
    LeaseLostError,
    ObjectStateError,
    ResourceBusyError,
    ValidationError,
    VirtleaseError,
)
from virtlease_etcd.driver import EtcdDriver
from virtlease_etcd.ops import handoff
from virtlease_etcd.ops.lockd import LockdDomain, lockd_resource
from virtlease_etcd.session.guard import start_time

from .lockapi import CallRefused, Connection, ResourceBusy
from .protocol import AcquireResourceFlags, ErrorCode, LockdOwner
from .strand import Strand
from .tracking import ProcessWatcher, Tracked

log = logging.getLogger(__name__)
T = TypeVar("T")


def resource_spec(lockspace: str, name: str, flags: AcquireResourceFlags | int = 0) -> ResourceSpec:
    """The driver resource for a lockd (lockspace, name, flags), checked (``ops/lockd.py``);
    an invalid one is an INVALID_ARG error reply."""
    try:
        return lockd_resource(lockspace, name, shared=bool(int(flags) & int(AcquireResourceFlags.SHARED)))
    except ValidationError as exc:
        raise CallRefused(f"resource {name!r}: {exc}", code=ErrorCode.INVALID_ARG) from None


def describe_holder(h: Holder) -> str:
    """One conflicting holder, as ``virsh`` shows it after "resource busy: "."""
    if h.handoff_to == handoff.RESERVED:
        return (f"{h.shown} is reserved for domain {h.domain_name} ({h.domain_uuid}) paused/migrating on "
                f"host {h.host} (virtlease token {h.token}); it is free once that domain's QEMU exits there")
    text = (f"{h.shown} is held {h.mode} by domain {h.domain_name} ({h.domain_uuid}) on host {h.host} "
            f"(virtlease token {h.token})")
    if h.handoff_to:
        text += f", being migrated to host {h.handoff_to}"
    return text + f"; stop that domain, or if host {h.host} is dead wait for its lease to expire"


class EtcdLockBackend:
    """A LockBackend over one loaded etcd driver (see the module docstring): the owners' QEMU
    processes (watched by its ``processes``), killed when their lifeline closes, their leases
    released once they have exited.

    Coroutine methods: driver calls run in a private thread pool, process watching runs on
    the server's loop."""

    def __init__(self, driver: EtcdDriver, *, reserve_grace: float = 2.0, kill_grace: float = 5.0,
                 sigkill_wait: float = 10.0, workers: int = 16) -> None:
        self.driver = driver
        self.reserve_grace = reserve_grace
        self.processes = ProcessWatcher(self._exited, kill_grace=kill_grace, sigkill_wait=sigkill_wait)
        """Watches the owners' QEMUs (pidfd); tells ``_exited`` when one is gone."""
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="virtlease-etcd")
        self._tracked: dict[str, Tracked] = {}
        self._background: set[asyncio.Future[None]] = set()
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
                raise CallRefused(f"the virtlease agent cannot arm its guard process ({exc}); refusing, "
                                "so that no QEMU runs unguarded") from exc

    def owners(self) -> list[Tracked]:
        """Tracked owners whose QEMU has not exited."""
        return [t for t in self._tracked.values() if not t.gone.is_set()]

    def _lockd(self, uuid: str, name: str, pid: int | None) -> LockdDomain:
        """The driver's lockd calls for one owner (a fresh one per call: the session may have
        been renewed meanwhile)."""
        return self.driver.lockd(uuid, name, pid or None)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def in_strand(self, t: Tracked, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue a driver call for the owner now, after every call queued for it before
        (its :class:`~.strand.Strand` on the pool); await the result."""
        return asyncio.wrap_future(self._strand(t).submit(functools.partial(fn, *args)))

    def _in_background(self, work: Awaitable[None]) -> None:
        """Run ``work`` on the loop without waiting for it (kept referenced until done)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _strand(self, t: Tracked) -> Strand:
        if t.strand is None:
            t.strand = Strand(self._pool)
        return t.strand

    # ------------------------------------------------------------------ owner processes

    def _watch(self, t: Tracked) -> None:
        """Watch a registering owner's QEMU; an INVALID_ARG refusal if its pid does not exist."""
        try:
            self.processes.watch(t)
        except ProcessLookupError:
            raise CallRefused(f"owner pid {t.pid} of domain {t.name} ({t.uuid}) does not exist",
                            code=ErrorCode.INVALID_ARG) from None

    def _exited(self, t: Tracked) -> None:
        """The watcher saw ``t``'s process exit: release what it held (``_ending``)."""
        self._end(t, kill=False)

    def _end(self, t: Tracked, *, kill: bool) -> None:
        if t.ending is None:
            t.ending = asyncio.get_running_loop().create_task(self._ending(t, kill))

    async def _ending(self, t: Tracked, kill: bool) -> None:
        """Make sure the QEMU is gone, then (after the reservation grace) release its leases."""
        if kill and not t.gone.is_set():
            await self.processes.stop(t)
        await t.gone.wait()
        self.processes.close_pidfd(t)
        # asked in the owner's strand: after every driver call queued for it (a pause's reservation)
        reserved = await self.in_strand(t, self._lockd(t.uuid, t.name, t.pid).reserved)
        if reserved and self.reserve_grace > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(t.hurry.wait(), self.reserve_grace)
        await self._release_owner(t)
        if self._tracked.get(t.uuid) is t:
            del self._tracked[t.uuid]
        self.changed()

    async def _release_owner(self, t: Tracked) -> None:
        session = self.driver.session
        while True:
            owner = session.owners.peek(t.uuid)
            if owner is None or not owner.active or session.lost is not None:
                return
            try:
                await self.in_strand(t, self._lockd(t.uuid, t.name, t.pid).release_all)
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
                self.processes.watch(t)
            except ProcessLookupError:
                pass
            else:
                if start is None or t.start == start:
                    self._tracked[uuid] = t
                    log.info("re-adopted running %s", t.who())
                    return t
                self.processes.unwatch(t)
        log.warning("%s is no longer running: releasing what it held", t.who())
        t.gone.set()
        await self._release_owner(t)
        return None

    # ------------------------------------------------------------------ shutdown

    async def close(self) -> None:
        """Stop watching (the agent is exiting; call only once nothing is held)."""
        for t in list(self._tracked.values()):
            if t.ending is not None and not t.ending.done():
                t.hurry.set()
            if not t.gone.is_set():
                self.processes.unwatch(t)
        pending = [t.ending for t in self._tracked.values() if t.ending is not None and not t.ending.done()]
        if pending:
            await asyncio.wait(pending, timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _driver_call(self, op: str, what: str, fn: Callable[..., T], *args: Any, counted: bool = True) -> T:
        """A driver call, its errors turned into the lockd error libvirt reports (and counted;
        its result too unless not ``counted``)."""
        return await self._outcome(op, what, self._run(fn, *args), counted=counted)

    async def _outcome(self, op: str, what: str, call: Awaitable[T], *, counted: bool = True) -> T:
        """``call``'s result, its errors turned into the lockd error libvirt reports (and
        counted; its result too unless not ``counted``)."""
        try:
            result = await call
        except ResourceBusyError as exc:
            self.count(op, "busy")
            raise ResourceBusy("; ".join(describe_holder(h) for h in exc.conflicts)) from None
        except BackendUnavailableError as exc:
            self.count(op, "unavailable")
            raise CallRefused(f"{what}: etcd unreachable, nothing changed ({exc}); check the etcd "
                            "endpoints of the virtlease agent") from None
        except LeaseLostError as exc:
            self.count(op, "lost")
            raise CallRefused(f"{what}: this host's virtlease session is lost ({exc}); its domains were "
                            "fenced, and the agent opens a new session at the next acquire once etcd "
                            "answers") from None
        except ObjectStateError as exc:
            self.count(op, "state")
            raise ResourceBusy(f"{what}: {exc}") from None
        except VirtleaseError as exc:
            self.count(op, "error")
            raise CallRefused(f"{what}: {exc}") from None
        if counted:
            self.count(op, str(result))
        return result

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

    def _check_alive(self, uuid: str, name: str) -> Tracked:
        t = self._tracked.get(uuid)
        if t is None:
            raise CallRefused(f"domain {name} ({uuid}) is not registered with the virtlease agent",
                            code=ErrorCode.OPERATION_INVALID)
        if t.gone.is_set() or t.ending is not None:
            raise CallRefused(f"{t.who()} has exited or lost its lock connection; its leases are being "
                            "released", code=ErrorCode.OPERATION_INVALID)
        return t

    # ------------------------------------------------------------------ LockBackend

    async def register(self, conn: Connection, owner: LockdOwner) -> None:
        uuid = str(owner.uuid)
        t = self._tracked.get(uuid)
        if t is not None and t.pid == owner.pid and t.ending is None:
            if t.lifeline is not None and not t.acquired and t.markers_read is None:
                # a QEMU started paused (RESTRICTed holding nothing) about to be resumed: a
                # migration's destination ACQUIREs next, in the guest's downtime; its read of
                # the domain's markers starts now, beside this reply and the ACQUIRE's arrival
                t.markers_read = self._strand(t).submit(self._lockd(t.uuid, t.name, t.pid).markers)
            return
        if t is not None:
            if not t.gone.is_set():
                raise CallRefused(f"domain {owner.name} ({uuid}): QEMU pid {t.pid} is still running on this "
                                f"host; cannot register pid {owner.pid} for the same domain",
                                code=ErrorCode.OPERATION_INVALID)
            t.hurry.set()  # the old QEMU is gone: release what it had now, then track the new one
            if t.ending is not None:
                await t.ending
        t = Tracked(uuid=uuid, name=owner.name, pid=owner.pid)
        self._watch(t)
        self._tracked[uuid] = t
        self.changed()

    async def restrict(self, conn: Connection) -> None:
        owner = conn.owner
        assert owner is not None
        t = self._tracked.get(str(owner.uuid))
        if t is not None and conn.peer.pid == owner.pid == t.pid:
            t.lifeline = conn
            log.info("connection %d is the lifeline of %s", conn.id, t.who())

    async def create_lockspace(self, conn: Connection, path: str) -> None:
        log.debug("CREATE_LOCKSPACE %s (nothing to create: leases live in etcd)", path)

    async def acquire(self, conn: Connection, owner: LockdOwner, lockspace: str, name: str,
                      flags: AcquireResourceFlags) -> None:
        t = self._check_alive(str(owner.uuid), owner.name)
        res = resource_spec(lockspace, name, flags)
        if self.driver.session.lost is not None:
            await self._renew_session(f"acquire of {name} for domain {owner.name} ({t.uuid})")
        lockd = self._lockd(t.uuid, owner.name, t.pid)
        ahead, t.markers_read = t.markers_read, None

        def acquire() -> str:
            # the markers read ahead ran before this in the strand: done (None: read them again)
            markers = ahead.result() if ahead is not None and ahead.exception() is None else None
            return lockd.acquire(res, FailureAction.DEFAULT, markers)

        # in the owner's strand: a resume after the pause's RELEASEs runs after their reservation
        outcome = await self._outcome("acquire", f"acquire of {name} for domain {owner.name} ({t.uuid})",
                                      self.in_strand(t, acquire))
        if t.ending is not None:  # the QEMU ended while the grant was in flight: undo it
            await asyncio.shield(t.ending)
            await self._release_owner(t)
            raise CallRefused(f"{t.who()} exited or lost its lock connection during the acquire of {name}; "
                            "nothing is held for it", code=ErrorCode.OPERATION_INVALID)
        if outcome in ("resumed", "claimed", "granted"):
            t.released.clear()
        if outcome != "readonly":
            t.acquired.add(name)
        self.changed(strict=True)  # before the reply: the guard knows this QEMU before it may start
        log.info("acquire %s %s for %s: %s", lockspace or "-", name, t.who(), outcome)

    async def _renew_session(self, what: str) -> None:
        """The session was lost (its domains fenced): open a new one for this and later grants."""
        lost: list[str] = []

        def renew() -> str:
            why = self.driver.renew_session()
            if why is None:
                return "valid"
            lost.append(why)
            return "renewed"

        if await self._driver_call("renew", what, renew) == "renewed":
            log.warning("the session lease was lost (%s); opened a new session, lease %x, for %s",
                        lost[0], self.driver.session.lease_id, what)
            self.changed()

    async def release(self, conn: Connection, owner: LockdOwner, lockspace: str, name: str) -> None:
        t = self._check_alive(str(owner.uuid), owner.name)
        res = resource_spec(lockspace, name)
        if name in t.released:
            raise ResourceBusy(f"{name} is not locked by domain {owner.name} ({t.uuid}): already released "
                               "(it stays reserved for the domain until its QEMU exits)")
        lockd = self._lockd(t.uuid, owner.name, t.pid)
        what = f"release of {name} for domain {owner.name} ({t.uuid})"
        if name in t.acquired and self.driver.session.lost is None:
            pass  # this QEMU acquired it: held, nothing to look up (the reservation checks in etcd)
        elif not await self._driver_call("release", what, lockd.releasable, res, counted=False):
            return  # readonly: not locked
        t.released.add(name)
        t.releasing.setdefault(conn.id, set()).add(name)

        reservation = self.in_strand(t, lockd.release, res)  # queued now, before any later call

        async def reserve() -> None:
            try:
                outcome = await self._outcome("release", what, reservation)
            except CallRefused as exc:
                log.error("%s: the disk stays held by the domain, not reserved for it (a migration's "
                          "destination cannot take it over; the domain can resume here): %s", what, exc)
                return
            self.changed()
            log.info("release %s %s for %s: %s", lockspace or "-", name, t.who(), outcome)

        # answered now: until the reservation commits the disk stays held by this domain, which no
        # other domain can take either; a migration's destination waits for it (ops/lockd.py)
        self._in_background(reserve())

    async def connection_closed(self, conn: Connection) -> None:
        owner = conn.owner
        if owner is None:
            return
        t = self._tracked.get(str(owner.uuid))
        if t is None:
            return
        if t.lifeline is conn:
            log.info("lifeline connection %d of %s closed", conn.id, t.who())
            self._end(t, kill=True)
            return
        t.to_settle |= t.releasing.pop(conn.id, set())
        if t.to_settle and t.settling is None:
            t.settling = asyncio.get_running_loop().create_task(self._settle(t))

    async def _settle(self, t: Tracked) -> None:
        """After lock connections that RELEASEd disks closed: free those disks if that was an
        unplug or a pivot (``LockdDomain.settle``), retrying until etcd answers, the session
        is lost (fenced) or the QEMU exits (then everything is released anyway)."""
        try:
            while t.to_settle and t.ending is None and self.driver.session.lost is None:
                names = set(t.to_settle)
                try:
                    freed = await self.in_strand(t, self._lockd(t.uuid, t.name, t.pid).settle)
                except VirtleaseError as exc:
                    log.error("cannot settle the release of %s by %s yet (%s); retrying", ", ".join(sorted(names)),
                              t.who(), exc)
                    await asyncio.sleep(1.0)
                    continue
                t.to_settle -= names
                if freed:
                    t.released -= names
                    t.acquired -= names
                    log.info("freed %s: released by %s while it runs (an unplug or a block-job pivot)",
                             ", ".join(freed), t.who())
                    self.changed()
        finally:
            t.settling = None

