"""The migration handoff: mark, claim, cancel, complete (docs/DESIGN.md
"Migration").

The source marks its records for the destination (a marker key on the
source's lease naming source, destination, domain and every record's
token); the destination claims them all in one transaction that compares
the marker byte for byte and every record's token, rewrites the records on
its own lease with a new token and deletes the marker.  The claimer reads
the destination and the domain from the marker bytes it compares, never
from the state's other fields, so an edited state can only fail.  A claim is
a grant pipeline like any other (``plan.claim``, ``plan.decide``,
``Domain.run_grant``, then ``plan.explain`` or the owner's books).

A *reservation* (the agent: a disk RELEASEd by a QEMU that still runs) is the
same marker with ``to`` = ``"*"`` (:data:`RESERVED`): any host may claim it, but
only for the same domain UUID (checked from the marker bytes the claim
compares).  It lists only the records released so far -- one disk after a
hot-unplug or a block-job pivot, every disk after a pause or at the end of a
live migration -- so a claim can never take a disk the QEMU still uses.  Its
records stay on the source's lease, so the disks are never free in between;
the source cancels it when the domain resumes there, frees what it lists when
the release turns out to be an unplug (:func:`free_reserved`), and releases
everything once its QEMU is gone unclaimed.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from etcd3 import transactions as tx

from virtlease.errors import BackendUnavailableError, ObjectStateError, StaleStateError, ValidationError
from virtlease_etcd.etcd.errors import TransientError
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.model import statestring as st
from virtlease_etcd.session.owners import Handoff, Held, Owner

from . import plan
from . import transactions as txn
from .domain import Domain, GrantResult
from .markers import RESERVED as RESERVED
from .markers import entry, read_marker

HINT_TIMEOUT = 0.25
"""Seconds the destination's look for a reservation may take before the plain grant goes on."""


def prepare(d: Domain, dest_host: str) -> str:
    d.session.check()
    owner = d.owner()
    with owner.lock:
        refresh(d, owner)
        if not owner.held:
            raise ObjectStateError(f"prepare_migrate: {d.where()} holds no locked resource on host {d.host}")
        if dest_host == d.host:
            raise ValidationError("dest_host", f"{dest_host!r} is this host")
        if owner.handoff is not None:
            raise StaleStateError(f"prepare_migrate: a handoff of {d.where()} to host {owner.handoff.to} "
                                  "is already in flight; complete or cancel it first")
        return mark(d, owner, dest_host)


def mark(d: Domain, owner: Owner, dest_host: str, held: Sequence[Held] | None = None) -> str:
    """Mark ``held`` (default: every record of the owner) for ``dest_host``: the marker key on
    this host's lease, in one transaction that compares each record's token."""
    held = list(owner.held.values()) if held is None else list(held)
    # the claim puts a holder and a gen key per record and deletes the marker, and a destination
    # that reaches a disk by another path also deletes our legacy key of it: refuse now what the
    # destination could not claim, rather than leave it a handoff it cannot take
    legacy = sum(1 for h in held if h.rid.legacy_of is not None)
    txn.check_size([2 * len(held) + legacy + 1], d.cfg.max_txn_ops, "migration claim",
                   len(held) - legacy, legacy=d.cfg.legacy_path_keys)
    marker_key = d.keys.handoff(d.spec.uuid, d.host)
    marker = ks.encode({
        "from": d.host, "to": dest_host, "uuid": d.spec.uuid, "name": d.spec.name,
        "nonce": secrets.token_hex(16), "lease": d.session.lease_id, "since": round(d.session.clock.wall(), 3),
        "res": [entry(h) for h in held],
    })
    compare = [tx.Mod(h.key) == h.token for h in held] + [tx.Version(marker_key) == 0]
    success = [tx.Put(marker_key, marker, lease=d.session.lease_id)]
    failure = [tx.Get(marker_key)]
    d.check_size((compare, success, failure), "migration prepare", len(held))
    with unsure_unless_answered(owner):
        resp = txn.run(d.session, compare, success, failure, deadline=d.session.deadline(),
                       read_back=txn.written(d.session, [(marker_key, marker)]))
    if not resp.succeeded:
        if resp.responses and resp.responses[0].response_range.kvs:
            raise StaleStateError(f"prepare_migrate: a handoff of {d.where()} from this host is "
                                  "already in flight; complete or cancel it first")
        raise StaleStateError(f"prepare_migrate: {d.where()} no longer holds all its records")
    revision = resp.revision
    owner.handoff = Handoff(dest_host, marker_key, marker)
    return d.state(st.HANDOFF, held, revision, to=dest_host, marker=marker)


def claim(d: Domain, owner: Owner, rids: Sequence[ks.ResourceId], parsed: st.State) -> None:
    """Take the marked records (``grants.check_identity`` checked that the
    state covers every disk of the object by its identity).  With legacy path
    keys, a destination that reaches a disk under another path than the
    source takes its own legacy key fresh and drops the source's."""
    marker, listed = read_marker(d, parsed)
    marker_key = d.keys.handoff(d.spec.uuid, parsed.host)
    mine = {r.rid for r in rids}
    tokens = {rid: token for rid, token in listed.items() if rid in mine}
    drop = [(d.keys.holder(r.rid, r.mode, d.spec.uuid), r.token) for r in parsed.resources if r.rid not in mine]
    ask = _claim_ask(owner, rids, marker_key, marker, tokens, drop)
    result = d.run_grant(ask, "migration claim")
    if not result.committed:
        refusal = plan.explain(d.writer(), ask, plan.observe(result.response.responses))
        assert isinstance(refusal, plan.Stale)  # a claim is refused as stale, never as busy
        raise StaleStateError(f"cannot claim the handoff of {d.where()} from host {parsed.host}; nothing "
                              f"changed: {refusal.reason}")
    _adopt_claim(d, owner, [*mine, *(r.rid for r in parsed.resources)], result, parsed.host)


def _claim_ask(owner: Owner, rids: Sequence[ks.ResourceId], marker_key: str, marker: bytes,
               tokens: dict[str, int], drop: Sequence[tuple[str, int]] = ()) -> plan.Ask:
    """A claim of ``marker_key``: our own marker, if any, goes with it."""
    own = [owner.handoff.key] if owner.handoff is not None else []
    return plan.claim(rids, tokens, marker_key, marker, also_delete=own, drop=drop)


def _adopt_claim(d: Domain, owner: Owner, taken: Sequence[str], result: GrantResult, from_host: str) -> None:
    for rid in taken:  # a handback to us: our old entries are the records we take back
        owner.held.pop(rid, None)
    d.commit(owner, result)
    owner.claimed_from = from_host
    owner.handoff = None
    owner.handed_back = False


def _fates(d: Domain, owner: Owner, held: Sequence[Held] | None = None) -> dict[str, str]:
    """For each record the owner marked (or of ``held``): ``ours`` (unchanged), ``claimed``
    (the marker's destination, or any host for a reservation, holds it for this domain) or
    ``gone`` (deleted or replaced by anyone else: our lease expired or was revoked)."""
    assert owner.handoff is not None
    held = list(owner.held.values()) if held is None else list(held)
    resp = txn.run(d.session, [], [tx.Get(h.key) for h in held], [], deadline=d.session.deadline())
    fates: dict[str, str] = {}
    for h, r in zip(held, resp.responses, strict=True):
        kvs = r.response_range.kvs
        if kvs and int(kvs[0].mod_revision) == h.token:
            fates[h.rid.rid] = "ours"
            continue
        try:
            rec = ks.decode(kvs[0].value) if kvs else {}
        except ks.ForeignValue:
            rec = {}
        claimed = (rec.get("host") == owner.handoff.to or owner.handoff.to == RESERVED) \
            and rec.get("uuid") == d.spec.uuid and rec.get("host") != d.host
        fates[h.rid.rid] = "claimed" if claimed else "gone"
    for h in held:  # a legacy path key the destination does not use: its claim deleted it
        if h.rid.legacy_of is not None and fates[h.rid.rid] == "gone" and fates.get(h.rid.legacy_of) == "claimed":
            fates[h.rid.rid] = "claimed"
    return fates


def complete_out(d: Domain, cancel: bool) -> None:
    session = d.session
    session.check()
    owner = d.owner()
    with owner.lock:
        if owner.handoff is None:
            raise ObjectStateError(f"complete_migrate_out: no handoff of {d.where()} in flight")
        if cancel:
            _cancel(d, owner)
            return
        fates = _fates(d, owner)
        if "ours" in fates.values():
            raise StaleStateError(f"complete_migrate_out: the destination has not claimed {d.where()} yet; "
                                  "wait for its acquire, or cancel")
        to = owner.handoff.to
        gone = sorted({owner.held[r].rid.readable for r, fate in fates.items() if fate == "gone"})
        _forget(d, owner)
        if gone:
            raise StaleStateError(
                f"complete_migrate_out: {', '.join(gone)} of {d.where()} vanished from etcd without host {to} "
                "claiming them (this host's lease expired or was revoked): nobody holds them now. The "
                "migration did not hand them over; the domain must not run on either host before it "
                "acquires them again")


def _cancel(d: Domain, owner: Owner) -> None:
    assert owner.handoff is not None
    held = list(owner.held.values())
    marker = owner.handoff
    compare = [tx.Value(marker.key) == marker.value] + [tx.Mod(h.key) == h.token for h in held]

    def cancelled(timeout: float) -> txn.Outcome | None:
        # a claim deletes the marker too: only "marker gone and every record still ours" is our cancel
        kvs, _ = d.session.client.get_range(marker.key, timeout=timeout)
        if kvs:
            return None
        for h in held:
            got, _ = d.session.client.get_range(h.key, timeout=timeout)
            if not got or int(got[0].mod_revision) != h.token:
                return txn.Outcome.found(succeeded=False)  # claimed: our cancel did not happen
        return txn.Outcome.found()

    with unsure_unless_answered(owner):
        resp = txn.run(d.session, compare, [tx.Delete(marker.key)], [], deadline=d.session.deadline(),
                       read_back=cancelled)
    if resp.succeeded:
        owner.handoff = None
        return
    fates = _fates(d, owner)
    if "claimed" in fates.values():
        _forget(d, owner)
        raise StaleStateError(
            f"cannot cancel the migration of {d.where()}: host {marker.to} already claimed it. "
            "Reclaim with acquire(state) using the state of its complete_migrate_in(cancel=True)")
    _forget(d, owner)
    raise StaleStateError(f"cannot cancel the migration of {d.where()}: its records vanished from etcd "
                          "(this host's lease expired or was revoked); nobody holds them now")


def _forget(d: Domain, owner: Owner, *, drop: bool = True) -> None:
    owner.held.clear()
    owner.handoff = None
    if drop:
        d.session.owners.forget_if_idle(owner)


def complete_in(d: Domain, cancel: bool) -> str | None:
    if not cancel:
        return None
    d.session.check()
    owner = d.owner()
    with owner.lock:
        if owner.claimed_from is None or not owner.held:
            raise ObjectStateError(f"complete_migrate_in: {d.where()} was not claimed from a handoff")
        state = mark(d, owner, owner.claimed_from)
        owner.handed_back = True
        return state


def refresh(d: Domain, owner: Owner) -> None:
    """Before any call of a lock object: the owner's view of its marker and records is right
    (:func:`sync`, :func:`refresh_handed_back`)."""
    sync(d, owner)
    refresh_handed_back(d, owner)


@contextlib.contextmanager
def unsure_unless_answered(owner: Owner) -> Iterator[None]:
    """Around a transaction on the owner's marker: if etcd never answered it (reply lost and
    no read-back before the deadline: BackendUnavailableError), the marker may hold what it
    wrote or what was there before; the owner is ``marker_unsure`` until :func:`sync`."""
    try:
        yield
    except BackendUnavailableError:
        owner.marker_unsure = True
        raise


def sync(d: Domain, owner: Owner) -> None:
    """After a marker transaction etcd never confirmed (``owner.marker_unsure``), before the
    owner's view is relied on: read its marker key and every record it holds in one
    transaction; forget the records that are no longer ours (another host claimed them under a
    marker we did not know was there, or our lease ended) and adopt the marker etcd has if it is
    this owner's (else none).  A release whose reply was lost may have reserved a disk the QEMU
    then uses again (a resume, the disk attached again): a plain "held" on that view would leave
    the disk claimable by the same UUID on another host while it is written.  No-op unless
    unsure; BackendUnavailableError while etcd does not answer (the call fails, nothing is
    decided on an unsure view)."""
    if not owner.marker_unsure:
        return
    key = d.keys.handoff(d.spec.uuid, d.host)
    held = list(owner.held.values())
    resp = txn.run(d.session, [], [tx.Get(key), *(tx.Get(h.key) for h in held)], [], deadline=d.session.deadline())
    found, *records = [r.response_range.kvs for r in resp.responses]
    for h, kvs in zip(held, records, strict=True):
        if not kvs or int(kvs[0].mod_revision) != h.token:
            owner.held.pop(h.rid.rid, None)
    owner.handoff = None
    if found:
        try:
            marker = ks.decode(found[0].value, key)
        except ks.ForeignValue:
            marker = {}
        if (marker.get("from"), marker.get("uuid"), int(found[0].lease)) == (d.host, d.spec.uuid,
                                                                              d.session.lease_id):
            owner.handoff = Handoff(str(marker.get("to")), key, bytes(found[0].value))
    owner.marker_unsure = False


def refresh_handed_back(d: Domain, owner: Owner) -> None:
    """An owner that handed its records back learns whether the source took
    them (then it holds nothing here any more) before any new call."""
    if not owner.handed_back or owner.handoff is None:
        return
    if "ours" not in _fates(d, owner).values():
        owner.handed_back = False
        _forget(d, owner, drop=False)  # the caller goes on with this owner


# -- reservations (the agent: no window in which a paused or migrating domain's disks are free) --


def reserve(d: Domain, owner: Owner, held: Sequence[Held]) -> Literal["reserved", "already"]:
    """Keep ``held`` (the records of one released disk) reserved for the owner's domain: any
    host may claim them for the same UUID; the owner's other records stay plainly held.  The
    first release writes the marker ``to="*"``; each further one rewrites it to list one disk
    more (one transaction comparing the marker and the new records' tokens).  Returns
    ``reserved`` or ``already`` (every record of ``held`` was listed)."""
    marker = owner.handoff
    if marker is None:
        mark(d, owner, RESERVED, held)
        return "reserved"
    assert reserved(owner)
    more = [h for h in held if h.rid.rid not in marker.rids]
    if not more:
        return "already"
    listed = [owner.held[rid] for rid in marker.rids if rid in owner.held]
    try:
        return "reserved" if _remark(d, owner, marker, [*listed, *more]) else "already"
    except StaleStateError:
        if owner.handoff is not None or not all(h.rid.rid in owner.held for h in more):
            raise
        # the reservation of the disks released before was claimed meanwhile (a migration's
        # destination took them while the source released its last ones): reserve these anew
        mark(d, owner, RESERVED, [owner.held[h.rid.rid] for h in more])
        return "reserved"


def _remark(d: Domain, owner: Owner, marker: Handoff, held: Sequence[Held]) -> bool:
    """Rewrite the owner's reservation marker to list ``held``; False if it is gone (claimed by
    another host or vanished with our lease: the owner's view is refreshed, StaleStateError)."""
    raw = ks.decode(marker.value, marker.key)
    raw["res"] = [entry(h) for h in held]
    value = ks.encode(raw)
    compare = [tx.Value(marker.key) == marker.value] + [tx.Mod(h.key) == h.token for h in held]
    with unsure_unless_answered(owner):
        resp = txn.run(d.session, compare, [tx.Put(marker.key, value, lease=d.session.lease_id)], [],
                       deadline=d.session.deadline(), read_back=txn.written(d.session, [(marker.key, value)]))
    if resp.succeeded:
        owner.handoff = Handoff(marker.to, marker.key, value)
        return True
    _settle_lost(d, owner)
    raise StaleStateError(f"release of {d.where()}: its reservation on host {d.host} was taken over by another "
                          "host or its records vanished meanwhile; nothing changed")


def _settle_lost(d: Domain, owner: Owner) -> None:
    """The owner's reservation changed under it: forget the records it listed that another host
    claimed or that are gone; keep those still ours, and the marker if it is still there."""
    assert owner.handoff is not None
    listed = [owner.held[rid] for rid in owner.handoff.rids if rid in owner.held]
    for rid, fate in _fates(d, owner, listed).items():
        if fate != "ours":
            owner.held.pop(rid, None)
    resp = txn.run(d.session, [], [tx.Get(owner.handoff.key)], [], deadline=d.session.deadline())
    kvs = resp.responses[0].response_range.kvs
    if not kvs or bytes(kvs[0].value) != owner.handoff.value:
        owner.handoff = None


def reserved(owner: Owner) -> bool:
    """The owner's marker, if any, is a reservation."""
    return owner.handoff is not None and owner.handoff.to == RESERVED


def all_reserved(owner: Owner) -> bool:
    """The owner's reservation lists every record it holds (a pause, or the source at the end of
    a live migration), not only some of them (an unplug or a pivot)."""
    return reserved(owner) and set(owner.held) <= (owner.handoff.rids if owner.handoff else frozenset())


def free_reserved(d: Domain, owner: Owner) -> list[str]:
    """A release that turned out to be an unplug or a block-job pivot (the QEMU still runs and
    still holds other disks): free the reserved disks now, in one transaction that deletes the
    marker and their records (comparing each).  Returns the readable names freed; the owner
    forgets what another host claimed meanwhile.  No-op unless part of the records is reserved."""
    marker = owner.handoff
    if marker is None or not reserved(owner) or all_reserved(owner):
        return []
    listed = [owner.held[rid] for rid in marker.rids if rid in owner.held]
    compare = [tx.Value(marker.key) == marker.value] + [tx.Mod(h.key) == h.token for h in listed]
    success = [tx.Delete(marker.key)] + [tx.Delete(h.key) for h in listed]

    def freed(timeout: float) -> txn.Outcome | None:
        kvs, _ = d.session.client.get_range(marker.key, timeout=timeout)
        if kvs:
            return None if bytes(kvs[0].value) == marker.value else txn.Outcome.found(succeeded=False)
        return txn.deleted(d.session, [(h.key, h.token) for h in listed])(timeout)

    with unsure_unless_answered(owner):
        resp = txn.run(d.session, compare, success, [], deadline=d.session.deadline(), read_back=freed)
    if not resp.succeeded:
        _settle_lost(d, owner)
        if owner.handoff is not None:
            raise StaleStateError(f"cannot free the released disks of {d.where()}: their records changed")
        return []
    for h in listed:
        owner.held.pop(h.rid.rid, None)
    owner.handoff = None
    return sorted({h.rid.readable for h in listed if h.rid.legacy_of is None})


def unreserve(d: Domain, owner: Owner) -> None:
    """The domain resumes on this host: delete the reservation marker only
    (records stay, tokens unchanged).  Raises StaleStateError if another host
    already claimed it or the records vanished (the owner then holds nothing)."""
    assert reserved(owner)
    try:
        _cancel(d, owner)
    except StaleStateError as exc:
        raise StaleStateError(
            f"cannot resume {d.where()} on host {d.host}: its reservation was taken over by another "
            f"host or its records vanished ({exc}); this host holds nothing for it now") from None


def markers_of(d: Domain) -> list[Any] | None:
    """One read of this domain's markers, every host's (no transaction, a serializable read: no
    quorum round, it may lag): a hint for :func:`reservation_among`, as what it finds is claimed
    only by a transaction that compares the marker byte for byte.  None when the read fails."""
    prefix = d.keys.handoff(d.spec.uuid, "")
    try:
        kvs, _ = d.session.client.get_range(prefix, ks.range_end(prefix), timeout=HINT_TIMEOUT, serializable=True)
    except (TransientError, BackendUnavailableError):
        return None
    return kvs


def reservation_of(d: Domain, rid: str) -> tuple[str, bytes] | None:
    """One read of this domain's markers (:func:`markers_of`): as :func:`reservation_among`.
    Lets a migration's destination claim with one transaction instead of a failed grant and a
    claim.  None as well when the read fails: the grant that follows retries, and reports, as
    always."""
    kvs = markers_of(d)
    return None if kvs is None else reservation_among(d, kvs, rid)


def reservation_among(d: Domain, kvs: Sequence[Any], rid: str) -> tuple[str, bytes] | None:
    """Among markers ``kvs`` (e.g. what a failed grant read: ``plan.Observed.markers``): a
    marker of another host for this very domain that lists ``rid`` and names this host or
    :data:`RESERVED`.  Returns its key and bytes."""
    for kv in kvs:
        try:
            marker = ks.decode(kv.value, kv.key.decode(errors="replace"))
        except ks.ForeignValue:
            continue
        if (marker.get("uuid") == d.spec.uuid and marker.get("to") in (d.host, RESERVED)
                and marker.get("from") != d.host
                and any(isinstance(r, dict) and r.get("rid") == rid for r in marker.get("res") or [])):
            return kv.key.decode(), bytes(kv.value)
    return None


def claim_reservation(d: Domain, owner: Owner, marker_key: str, raw: bytes) -> list[ks.ResourceId]:
    """Take over every record a marker lists, in one transaction that
    compares the marker byte for byte and each record's token, writes the
    records on this host's lease (new tokens) and deletes the marker.  The
    domain and destination are read from ``raw`` itself: a marker of another
    domain, or naming another host, is refused before anything is sent."""
    head = f"cannot take over the reservation {marker_key} for {d.where()}; nothing changed: "
    try:
        marker = ks.decode(raw, marker_key)
        rids = [ks.ResourceId(str(r.get("kind", "disk")), str(r["res"]), str(r["rid"]), str(r["mode"]),
                              legacy_of=None if r.get("legacy") is None else str(r["legacy"]))
                for r in marker["res"]]
        tokens = {str(r["rid"]): int(r["token"]) for r in marker["res"]}
    except (ks.ForeignValue, KeyError, TypeError, ValueError):
        raise StaleStateError(head + "the marker is unreadable") from None
    if marker.get("uuid") != d.spec.uuid:
        raise StaleStateError(head + f"it is for domain {marker.get('name')} ({marker.get('uuid')})")
    if marker.get("to") not in (d.host, RESERVED) or marker.get("from") in (None, d.host):
        raise StaleStateError(head + f"it is from host {marker.get('from')} to host {marker.get('to')}")
    result = d.run_grant(_claim_ask(owner, rids, marker_key, raw, tokens), "reservation claim")
    if not result.committed:
        raise StaleStateError(head + "the marker or its records changed meanwhile (claimed by another "
                              "host, cancelled by the source, or the source's lease expired)")
    _adopt_claim(d, owner, [r.rid for r in rids], result, str(marker.get("from")))
    return rids
