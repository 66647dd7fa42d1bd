"""lockd's semantics on the etcd driver: the agent's one way in (docs/DESIGN.md §9).

libvirt's lockd plugin takes and drops one resource per call, for an *owner* (a domain's QEMU
on this host), and never sends a state: a start ACQUIREs each disk, a pause or the source of a
live migration RELEASEs each disk of a QEMU that still runs, a hot-unplug or a block-job pivot
RELEASEs one, and a QEMU that exits says nothing (its lifeline closes).  :class:`LockdDomain`
maps those calls onto the driver's owners and the grant pipeline (``plan``), with typed outcomes
(:data:`AcquireOutcome`, :data:`ReleaseOutcome`); ``EtcdDriver.lockd`` is how the agent gets one,
with the domain's uuid, name and pid checked by the core's validation (``virtlease.validation``)
as a lock object's are, and :func:`lockd_resource` checks each resource the same way.

One exemption, written down here: in indirect mode (libvirt's ``file_lockspace_dir``) lockd's
lockspace is that *directory*, an absolute path, where the core's lease lockspace is a name
without '/'.  The agent keeps it as sent (it is part of every lease's key in etcd, so changing
its form would change the keys under running VMs) and checks it as an absolute path instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from virtlease import validation
from virtlease.abi import FailureAction, ResourceFlags, ResourceSpec, ResourceType
from virtlease.errors import Holder, ObjectStateError, ResourceBusyError, StaleStateError, ValidationError

from . import grants, handoff, plan
from .domain import Domain

AcquireOutcome = Literal["held", "resumed", "granted", "claimed", "readonly"]
"""What an ACQUIRE did: ``held`` the owner already held it (nothing sent); ``resumed`` the
owner's own reservation on this host was cancelled (records and tokens unchanged); ``granted`` a
fresh grant; ``claimed`` a reservation of the same domain from another host was taken over (the
disks it lists, new tokens); ``readonly`` not locked."""

ReleaseOutcome = Literal["reserved", "already", "readonly"]
"""What a RELEASE did: ``reserved`` the disk is now reserved for the domain; ``already`` it was;
``readonly`` not locked."""


def lockd_resource(lockspace: str, name: str, *, shared: bool = False) -> ResourceSpec:
    """The driver resource for a lockd (lockspace, name): in direct mode (lockspace ``""``) the
    disk at path ``name``; in indirect mode an opaque lease ``name`` (the sha256 of the disk's
    path) in ``lockspace`` (libvirt's ``file_lockspace_dir``: the exemption of the module
    docstring).  Raises ValidationError naming the field."""
    flags = ResourceFlags.SHARED if shared else ResourceFlags(0)
    if not lockspace:
        _, path, _ = validation.check_resource(ResourceType.DISK, name, {})
        return ResourceSpec(ResourceType.DISK, path, flags)
    key = validation.check_name(name, "lease key")
    directory = validation.check_path(lockspace, "lockspace (lockd's file_lockspace_dir)")
    return ResourceSpec(ResourceType.LEASE, key, flags, {"lockspace": directory})


class LockdDomain:
    """One domain's lockd calls on this host (``EtcdDriver.lockd`` makes one per call)."""

    def __init__(self, d: Domain) -> None:
        self._d = d

    def acquire(self, resource: ResourceSpec, action: FailureAction,
                markers: Sequence[Any] | None = None) -> AcquireOutcome:
        """ACQUIRE_RESOURCE: one resource for the owner (see :data:`AcquireOutcome`).  A busy
        resource raises ResourceBusyError naming its holders.  ``markers``: the domain's
        markers as :meth:`markers` read them just before, if the caller did (then a
        migration's destination does not read them again; a hint either way)."""
        return _acquire(self._d, resource, action, markers)

    def markers(self) -> list[Any] | None:
        """The domain's markers, one serializable read (``handoff.markers_of``; None if it
        failed): a caller that expects an ACQUIRE soon reads them ahead for :meth:`acquire`."""
        return handoff.markers_of(self._d)

    def releasable(self, resource: ResourceSpec) -> bool:
        """Whether a RELEASE of ``resource`` has anything to do, from what this host knows (no
        etcd): False for a readonly disk (not locked); ObjectStateError if the owner does not
        hold it.  Lets the agent answer a RELEASE before its reservation commits."""
        d = self._d
        rids = d.locked([resource])
        if not rids:
            return False
        owner = d.session.owners.peek(d.spec.uuid)
        if owner is None or rids[0].rid not in owner.held:
            raise ObjectStateError(f"{rids[0].readable} is not locked by {d.where()} on host {d.host}")
        return True

    def release(self, resource: ResourceSpec) -> ReleaseOutcome:
        """RELEASE_RESOURCE while the QEMU lives (see :func:`_release`); ObjectStateError if
        the owner does not hold it."""
        return _release(self._d, resource)

    def settle(self) -> list[str]:
        """The lock connection that RELEASEd closed: free an unplugged or pivoted disk now,
        keep a paused domain's reservation (see :func:`_settle`).  Returns the names freed."""
        return _settle(self._d)

    def release_all(self) -> None:
        """The QEMU has exited: drop everything the owner has in etcd (records, registration,
        reservation).  Nothing to do when it holds nothing."""
        owner = self._d.session.owners.peek(self._d.spec.uuid)
        if owner is not None and owner.active:
            grants.release_owner(self._d, owner)

    def reserved(self) -> bool:
        """Some of the owner's disks are reserved for its domain (released by a live QEMU)."""
        owner = self._d.session.owners.peek(self._d.spec.uuid)
        return owner is not None and handoff.reserved(owner)


def _acquire(d: Domain, resource: ResourceSpec, action: FailureAction,
             markers: Sequence[Any] | None = None) -> AcquireOutcome:
    """lockd's ACQUIRE_RESOURCE for the owner: one resource; what happened:

    ``held``: the owner already holds it (nothing sent); ``resumed``: the
    owner's own reservation on this host was cancelled (records and tokens
    unchanged); ``granted``: a fresh grant; ``claimed``: a reservation of the
    same domain from another host was taken over, all its disks at once,
    with new tokens; ``readonly``: not locked.  A busy resource raises
    ResourceBusyError naming the holders."""
    d.session.check()
    rids = d.locked([resource])
    if not rids:
        return "readonly"
    rid = rids[0]
    owner = d.owner()
    with owner.lock:
        handoff.sync(d, owner)
        d.adopt_policy(owner, action)
        outcome: AcquireOutcome = "held"
        if owner.handoff is not None:
            if not handoff.reserved(owner):
                d.refuse_if_migrating(owner, "acquire")
            if rid.rid in owner.handoff.rids:  # a resume: cancel the reservation, keep the records
                handoff.unreserve(d, owner)
                outcome = "resumed"
            # else a hotplug beside a disk still reserved (an unplug or a pivot in flight)
        have = owner.held.get(rid.rid)
        if have is not None:
            if have.rid.mode != rid.mode:
                raise ValidationError("resource", f"{rid.readable} is held {have.rid.mode} by {d.where()} on "
                                      f"host {d.host}; release it before acquiring it {rid.mode}")
            d.secure_storage(rids)  # e.g. taken by a claim with another disk: fenced before QEMU runs
            return outcome

        def claimed(found: tuple[str, bytes]) -> bool:
            """Take over a reservation (or handoff) of this domain from another host."""
            try:
                handoff.claim_reservation(d, owner, *found)
            except StaleStateError:
                return False  # the reservation changed meanwhile: look again
            return rid.rid in owner.held

        # a migration's destination: one read (or the caller's, made ahead) finds the source's
        # reservation, one claim takes it
        found = None
        if not owner.held:
            found = (handoff.reservation_of(d, rid.rid) if markers is None
                     else handoff.reservation_among(d, markers, rid.rid))
        if found is not None and claimed(found):
            return "claimed"
        for _ in range(3):
            ask = plan.fresh(rids)
            result = d.run_grant(ask, "acquire")
            if result.committed:
                d.commit(owner, result)
                return "granted"
            seen = plan.observe(result.response.responses)
            found = handoff.reservation_among(d, seen.markers, rid.rid)
            if found is not None:
                if claimed(found):
                    return "claimed"
                continue
            refusal = plan.explain(d.writer(), ask, seen)
            busy = list(refusal.holders) if isinstance(refusal, plan.Busy) else []
            if busy and all(_same_domain_elsewhere(d, h) for h in busy):
                # the same domain holds it on another host: a migration's source whose reservation
                # is still on its way (the agent answers the pause RELEASE before it commits; this
                # owner may have claimed the source's earlier disks already, their reservation
                # having committed first)
                found = _wait_for_reservation(d, rid.rid)
                if found is not None:
                    if claimed(found):
                        return "claimed"
                    continue
            if busy:
                raise ResourceBusyError(busy, what=f"acquire for {d.where()}")
        raise StaleStateError(f"acquire for {d.where()}: {rid.readable} kept changing under three attempts "
                              "(a reservation claimed or released meanwhile); nothing was taken, retry")


RESERVATION_WAIT = 2.0
"""Seconds a destination waits for the source's reservation of the same domain to appear in etcd
before it reports the disk busy (the source answers libvirt's RELEASE before its reservation
commits, to keep it out of the migration's guest downtime)."""


RESERVATION_POLL = 0.001
"""Seconds between two looks for that reservation during the first
:data:`RESERVATION_POLL_FAST_FOR` seconds: each look is one serializable read of the domain's
markers on the nearest member (a fraction of a millisecond); a migration's guest is paused
meanwhile, so the wait is guest downtime, and the source's reservation is a transaction away."""
RESERVATION_POLL_FAST_FOR = 0.05
RESERVATION_POLL_SLOW = 0.02
"""Seconds between two looks after that (the same domain started on two hosts: no reservation
is coming, and the start is refused at the end of the wait)."""


def _same_domain_elsewhere(d: Domain, h: Holder) -> bool:
    return h.domain_uuid == d.spec.uuid and h.host != d.host and h.handoff_to is None


def _wait_for_reservation(d: Domain, rid: str) -> tuple[str, bytes] | None:
    """Look for a reservation of this domain listing ``rid`` every few milliseconds, for at
    most :data:`RESERVATION_WAIT` (never past the session's deadline); its key and bytes."""
    start = d.session.clock.now()
    until = min(start + RESERVATION_WAIT, d.session.deadline())
    while (now := d.session.clock.now()) < until:
        found = handoff.reservation_of(d, rid)
        if found is not None:
            return found
        d.session.clock.sleep(RESERVATION_POLL if now - start < RESERVATION_POLL_FAST_FOR else RESERVATION_POLL_SLOW)
    return None


def _release(d: Domain, resource: ResourceSpec) -> ReleaseOutcome:
    """lockd's RELEASE_RESOURCE while the owner's QEMU lives: the disk is *not*
    freed but reserved for the domain (its records listed in the owner's marker
    ``to="*"``) while the owner's other disks stay plainly held.  A pause, or
    the source at the end of a live migration, releases every disk (then the
    reservation lists them all: :meth:`LockdDomain.settle` keeps it until the QEMU
    exits); a hot-unplug or a block-job pivot releases one disk of a QEMU that
    keeps writing the others (then :meth:`LockdDomain.settle` frees it).  Returns
    ``reserved``, ``already`` (it was reserved) or ``readonly``;
    ObjectStateError if the owner does not hold it."""
    d.session.check()
    rids = d.locked([resource])
    if not rids:
        return "readonly"
    owner = d.owner()
    with owner.lock:
        handoff.sync(d, owner)
        if rids[0].rid not in owner.held:
            raise ObjectStateError(f"{rids[0].readable} is not locked by {d.where()} on host {d.host}")
        if owner.handoff is not None and not handoff.reserved(owner):
            d.refuse_if_migrating(owner, "release")
        return handoff.reserve(d, owner, [owner.held[r.rid] for r in rids if r.rid in owner.held])


def _settle(d: Domain) -> list[str]:
    """The lock connection that RELEASEd some of the owner's disks closed: if the owner still
    holds disks it did not release, those releases were a hot-unplug or a block-job pivot (the
    QEMU goes on writing the others), so the released disks are freed now; if it released every
    disk (a pause, a migration's source), the reservation stays until the QEMU exits.  Returns
    the readable names freed (none when it stays reserved)."""
    owner = d.session.owners.peek(d.spec.uuid)
    if owner is None:
        return []
    d.session.check()
    with owner.lock:
        handoff.sync(d, owner)
        return handoff.free_reserved(d, owner)
