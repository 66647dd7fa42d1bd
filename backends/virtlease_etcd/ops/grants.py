"""Grant, resume, register, release, inquire and hotplug of one domain's
resources (docs/DESIGN.md "Grants" and "Owners").

Every function acts for the *owner* (the domain on this host): a fresh lock
object of the same domain releases or inquires what an earlier one took.
A state string is evidence: it can only narrow a grant (``plan.decide``
compares the present holders as for a fresh grant, plus the history the
state claims), never widen what this host may take.  :func:`grant` is the
grant pipeline (``plan``) written out: resolve, decide and commit, then
record or explain.
"""

from __future__ import annotations

from etcd3 import transactions as tx

from virtlease.abi import AcquireFlags, FailureAction, HeldResource, ResourceSpec
from virtlease.errors import ObjectStateError, ResourceBusyError, StaleStateError, ValidationError
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.model import statestring as st
from virtlease_etcd.session.owners import Owner

from . import coverage, handoff, plan, records
from . import transactions as txn
from .domain import Domain


def acquire(d: Domain, resources: list[ResourceSpec], state: str | None, flags: AcquireFlags,
            action: FailureAction) -> None:
    session = d.session
    session.check()
    if d.policy.resolve(action) is FailureAction.RESTART and d.policy.restart_callback is None:
        raise ValidationError("action", "RESTART needs a restart_callback in the etcd driver's "
                              f"configuration; nothing was acquired for {d.where()}")
    rids = d.locked(resources)
    owner = d.owner()
    with owner.lock:
        handoff.refresh(d, owner)
        d.adopt_policy(owner, action)  # before the grant: a fence racing its reply must use it
        if flags & AcquireFlags.REGISTER_ONLY:
            register(d, owner)
            return
        # resolve: what this acquire asks (refusals that need no etcd come first)
        parsed = None if state is None else st.decode(state)
        bounds = {} if parsed is None else coverage.check_identity(d, parsed, rids)
        if parsed is not None and parsed.kind == st.HANDOFF:
            handoff.claim(d, owner, rids, parsed)
            return
        d.refuse_if_migrating(owner, "acquire")
        again = [owner.held[r.rid] for r in rids if r.rid in owner.held and r.legacy_of is None]
        if again:
            raise ObjectStateError(
                f"acquire: {d.where()} already holds {', '.join(h.rid.readable for h in again)} on host "
                f"{d.host} (token {', '.join(str(h.token) for h in again)}); release it first")
        ask = plan.fresh(rids) if parsed is None else plan.resume(parsed, rids, bounds)
        if isinstance(ask, plan.Stale):
            raise StaleStateError(f"cannot resume {d.where()}: {ask.reason}")
        grant(d, owner, ask)


def register(d: Domain, owner: Owner) -> None:
    key = d.keys.dom(d.host, d.spec.uuid)
    value = ks.encode({"host": d.host, "uuid": d.spec.uuid, "name": d.spec.name,
                       "pid": d.spec.pid, "since": round(d.session.clock.wall(), 3)})
    txn.run(d.session, [], [tx.Put(key, value, lease=d.session.lease_id)], [],
            deadline=d.session.deadline(), read_back=txn.written(d.session, [(key, value)]))
    owner.registered = True


def grant(d: Domain, owner: Owner, ask: plan.Ask) -> None:
    """The rest of the grant pipeline (``plan``) for a resolved fresh grant or resume: decide
    and commit its one transaction, then record the granted records on the owner, or raise
    the refusal explained from what the failed transaction read."""
    if not ask.rids:
        return
    result = d.run_grant(ask, ask.kind)
    if result.committed:
        d.commit(owner, result)
        return
    refusal = plan.explain(d.writer(), ask, plan.observe(result.response.responses))
    if isinstance(refusal, plan.Busy):
        raise ResourceBusyError(list(refusal.holders), what=f"acquire for {d.where()}")
    raise StaleStateError(f"cannot resume {d.where()}: {refusal.reason}; nothing was taken. Check the disks "
                          "before acquiring without a state")


def release(d: Domain, resources: list[ResourceSpec]) -> str:
    d.session.check()
    rids = d.locked(resources)
    owner = d.owner()
    with owner.lock:
        handoff.refresh(d, owner)
        d.refuse_if_migrating(owner, "release")
        held = [owner.held[r.rid] for r in rids if r.rid in owner.held]
        if rids and not held and not owner.registered:
            d.session.owners.forget_if_idle(owner)
            raise ObjectStateError(f"release: {d.where()} holds none of "
                                   f"{', '.join(r.readable for r in rids if r.legacy_of is None)} on host {d.host}")
        xgens = records.read_xgens(d, held)
        also_dom = owner.registered and len(held) == len(owner.held)
        try:
            revision = records.delete_held(d, owner, held, also_dom=also_dom)
        finally:
            d.session.owners.forget_if_idle(owner)
        return d.state(st.RESUME, held, revision, xgens=xgens)


def release_owner(d: Domain, owner: Owner) -> None:
    """Drop everything the owner has in etcd: records, registration, marker."""
    with owner.lock:
        handoff.sync(d, owner)
        if owner.handoff is not None:
            marker = owner.handoff
            txn.run(d.session, [tx.Value(marker.key) == marker.value], [tx.Delete(marker.key)], [],
                    deadline=d.session.deadline(), read_back=lambda _t: txn.Outcome.found())
            owner.handoff = None
        try:
            records.delete_held(d, owner, list(owner.held.values()), also_dom=owner.registered)
        except StaleStateError:
            pass  # what was replaced or expired is not ours: nothing to drop
        finally:
            d.session.owners.forget_if_idle(owner)


def inquire(d: Domain, resources: list[ResourceSpec]) -> str:
    d.session.check()
    owner = d.owner()
    with owner.lock:
        handoff.refresh(d, owner)
        held = [owner.held[r.rid] for r in d.locked(resources) if r.rid in owner.held]
        d.session.owners.forget_if_idle(owner)
        return d.state(st.RESUME, held, 0, xgens=records.read_xgens(d, held))


def held(d: Domain, resources: list[ResourceSpec]) -> list[HeldResource]:
    owner = d.session.owners.peek(d.spec.uuid)
    if owner is None:
        return []
    out: list[HeldResource] = []
    for res in resources:
        if res.readonly:
            continue
        h = owner.held.get(d.names.primary(res).rid)
        if h is not None:
            out.append(HeldResource(res.type, res.name, h.rid.readable, h.rid.mode, h.token))
    return out


def acquire_resource(d: Domain, resource: ResourceSpec) -> None:
    d.session.check()
    rids = d.locked([resource])
    if not rids:
        return
    owner = d.owner()
    with owner.lock:
        d.refuse_if_migrating(owner, "acquire_resource")
        for rid in rids[:1]:
            if rid.rid in owner.held:
                raise ValidationError("resource", f"{rid.readable} is already held by {d.where()}")
        grant(d, owner, plan.fresh(rids))


def release_resource(d: Domain, resource: ResourceSpec) -> None:
    d.session.check()
    owner = d.owner()
    with owner.lock:
        d.refuse_if_migrating(owner, "release_resource")
        for rid in d.locked([resource]):
            h = owner.held.get(rid.rid)
            if h is not None:
                records.delete_held(d, owner, [h], also_dom=False)
