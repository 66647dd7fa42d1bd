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
import logging
from collections.abc import Callable
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
from virtlease_etcd.ops import handoff
from virtlease_etcd.ops.lockd import lockd_resource

from .lockapi import Connection, LockError, ResourceBusy
from .protocol import AcquireFlags, ErrorCode, Owner
from .tracking import OwnerTracker, Tracked

log = logging.getLogger(__name__)
T = TypeVar("T")


def resource_spec(lockspace: str, name: str, flags: AcquireFlags | int = 0) -> ResourceSpec:
    """The driver resource for a lockd (lockspace, name, flags), checked (``ops/lockd.py``);
    an invalid one is an INVALID_ARG error reply."""
    try:
        return lockd_resource(lockspace, name, shared=bool(int(flags) & int(AcquireFlags.SHARED)))
    except ValidationError as exc:
        raise LockError(f"resource {name!r}: {exc}", code=ErrorCode.INVALID_ARG) from None


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


class EtcdLockBackend(OwnerTracker):
    """A LockBackend over one loaded etcd driver (see the module docstring).

    Coroutine methods: driver calls run in a private thread pool, process watching runs on
    the server's loop."""

    async def _driver_call(self, op: str, what: str, fn: Callable[..., T], *args: Any, counted: bool = True) -> T:
        """A driver call, its errors turned into the lockd error libvirt reports (and counted;
        its result too unless not ``counted``)."""
        try:
            result = await self._run(fn, *args)
        except ResourceBusyError as exc:
            self.count(op, "busy")
            raise ResourceBusy("; ".join(describe_holder(h) for h in exc.conflicts)) from None
        except BackendUnavailableError as exc:
            self.count(op, "unavailable")
            raise LockError(f"{what}: etcd unreachable, nothing changed ({exc}); check the etcd "
                            "endpoints of the virtlease agent") from None
        except LeaseLostError as exc:
            self.count(op, "lost")
            raise LockError(f"{what}: this host's virtlease session is lost ({exc}); its domains were "
                            "fenced, and the agent opens a new session at the next acquire once etcd "
                            "answers") from None
        except ObjectStateError as exc:
            self.count(op, "state")
            raise ResourceBusy(f"{what}: {exc}") from None
        except VirtleaseError as exc:
            self.count(op, "error")
            raise LockError(f"{what}: {exc}") from None
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

    async def acquire(self, conn: Connection, owner: Owner, lockspace: str, name: str,
                      flags: AcquireFlags) -> None:
        t = self._check_alive(str(owner.uuid), owner.name)
        res = resource_spec(lockspace, name, flags)
        await self.after_pending(t)  # a resume after the pause's RELEASEs: their reservation first
        if self.driver.session.lost is not None:
            await self._renew_session(f"acquire of {name} for domain {owner.name} ({t.uuid})")
        lockd = self._lockd(t.uuid, owner.name, t.pid)
        outcome = await self._driver_call("acquire", f"acquire of {name} for domain {owner.name} ({t.uuid})",
                                          lockd.acquire, res, FailureAction.DEFAULT)
        if t.ending is not None:  # the QEMU ended while the grant was in flight: undo it
            await asyncio.shield(t.ending)
            await self._release_owner(t)
            raise LockError(f"{t.who()} exited or lost its lock connection during the acquire of {name}; "
                            "nothing is held for it", code=ErrorCode.OPERATION_INVALID)
        if outcome in ("resumed", "claimed", "granted"):
            t.released.clear()
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

    async def release(self, conn: Connection, owner: Owner, lockspace: str, name: str) -> None:
        t = self._check_alive(str(owner.uuid), owner.name)
        res = resource_spec(lockspace, name)
        if name in t.released:
            raise ResourceBusy(f"{name} is not locked by domain {owner.name} ({t.uuid}): already released "
                               "(it stays reserved for the domain until its QEMU exits)")
        lockd = self._lockd(t.uuid, owner.name, t.pid)
        what = f"release of {name} for domain {owner.name} ({t.uuid})"
        if not await self._driver_call("release", what, lockd.releasable, res, counted=False):
            return  # readonly: not locked
        t.released.add(name)
        t.releasing.setdefault(conn.id, set()).add(name)

        async def reserve() -> None:
            try:
                outcome = await self._driver_call("release", what, lockd.release, res)
            except LockError as exc:
                log.error("%s: the disk stays held by the domain, not reserved for it (a migration's "
                          "destination cannot take it over; the domain can resume here): %s", what, exc)
                return
            self.changed()
            log.info("release %s %s for %s: %s", lockspace or "-", name, t.who(), outcome)

        # answered now: until the reservation commits the disk stays held by this domain, which no
        # other domain can take either; a migration's destination waits for it (ops/lockd.py)
        self.in_order(t, reserve)

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
            await self.after_pending(t)
            while t.to_settle and t.ending is None and self.driver.session.lost is None:
                names = set(t.to_settle)
                try:
                    freed = await self._run(self._lockd(t.uuid, t.name, t.pid).settle)
                except VirtleaseError as exc:
                    log.error("cannot settle the release of %s by %s yet (%s); retrying", ", ".join(sorted(names)),
                              t.who(), exc)
                    await asyncio.sleep(1.0)
                    continue
                t.to_settle -= names
                if freed:
                    t.released -= names
                    log.info("freed %s: released by %s while it runs (an unplug or a block-job pivot)",
                             ", ".join(freed), t.who())
                    self.changed()
        finally:
            t.settling = None

