"""The etcd transactions of the driver: grant, resume, claim, release, mark.

Each function builds the compare/success/failure lists of ONE transaction;
``run`` sends it with retries and resolves lost replies by reading back our
own records (docs/DESIGN.md §6).  A grant writes, per resource, the holder
key (on the session lease) and the resource's ``gen`` key: two operations,
so one transaction holds ``max_txn_ops // 2`` resources.  With
``legacy_path_keys`` a disk has two keys (identity and legacy path, see
``keyspace``): four operations, ``max_txn_ops // 4`` disks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from etcd3 import transactions as tx

from virtlease.errors import TransactionTooLargeError
from virtlease_etcd.etcd.client import LeaseNotFound, TransientError
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.session.hostsession import HostSession

log = logging.getLogger(__name__)


@dataclass
class Grant:
    """One resource to write for this object."""

    rid: ks.ResourceId
    key: str
    value: bytes
    expect_mod: int | None = None
    """For resume: our previous token; for claim: the giver's token."""
    expect_xgen: int | None = None
    """For a shared resume: the last exclusive grant's revision we saw."""
    granted_before: int | None = None
    """A key the state does not list (this host's legacy path key of a disk
    the state names by identity): nobody may have been granted it after this
    revision (the token of the state's entry for the disk)."""


def check_size(op_counts: Sequence[int], limit: int, what: str, n: int, *, legacy: bool = False) -> None:
    worst = max(op_counts)
    if worst > limit:
        cost = (" legacy_path_keys is on: each disk is locked under two keys (its identity and the "
                f"previous release's path key), so one transaction holds about {limit // 4} disks "
                f"instead of {limit // 2}; turn it off once no host runs the previous release.") if legacy else ""
        raise TransactionTooLargeError(
            f"{what} of {n} resource(s) needs {worst} operations in one etcd transaction, but the "
            f"cluster allows {limit} (etcd --max-txn-ops; set max_txn_ops if your cluster differs). "
            f"Nothing was taken: raise --max-txn-ops on every etcd member, or give the domain fewer "
            f"locked disks (readonly disks are not locked).{cost}"
        )


def grant_ops(session: HostSession, grants: Sequence[Grant], *, uuid: str, resume: bool,
              ) -> tuple[list[Any], list[Any], list[Any]]:
    """Compares and puts of a fresh grant, or of a resume (``expect_mod``
    set).  A state only narrows a grant: a resume compares everything a
    fresh grant does (the present holders allow it) *and* that the history
    matches the state (nobody was granted the resource since its token)."""
    keys = session.keys
    compare: list[Any] = []
    success: list[Any] = []
    failure: list[Any] = []
    for g in grants:
        rid = g.rid.rid
        prefix = keys.resource(rid)
        if resume and g.expect_mod is None:  # a key the state does not list: no grant since its entry
            fresh_compares(session, g, compare)
            bound = int(g.granted_before or 0) + 1
            gp = keys.gen_prefix(rid)
            compare.append(tx.Mod(gp, ks.range_end(gp)) < bound if g.rid.mode == ks.EXCLUSIVE
                           else tx.Mod(keys.gen_key(rid, ks.EXCLUSIVE)) < bound)
        elif g.rid.mode == ks.EXCLUSIVE:
            compare.append(tx.Version(prefix, ks.range_end(prefix)) == 0)  # no holder of any mode now
            if resume:
                # ...and nobody was granted it since our grant at token T: every grant and claim
                # bumps a gen key, so the newest gen revision is still exactly our T
                gp = keys.gen_prefix(rid)
                compare.append(tx.Mod(gp, ks.range_end(gp)) < int(g.expect_mod or 0) + 1)
                compare.append(tx.Mod(keys.gen_key(rid, ks.EXCLUSIVE)) == int(g.expect_mod or 0))
        else:
            compare.append(tx.Version(keys.exclusive(rid)) == 0)  # no exclusive holder now
            compare.append(tx.Version(g.key) == 0)
            if resume:  # ...and no exclusive grant since we last saw one
                compare.append(tx.Mod(keys.gen_key(rid, ks.EXCLUSIVE)) == int(g.expect_xgen or 0))
        success.append(tx.Put(g.key, g.value, lease=session.lease_id))
        success.append(tx.Put(keys.gen_key(rid, g.rid.mode), ks.encode(
            {"res": g.rid.readable, "host": session.cfg.host_id, "uuid": uuid})))
        failure.append(tx.Get(prefix, ks.range_end(prefix)))
    failure.append(tx.Get(keys.handoffs, ks.range_end(keys.handoffs)))
    return compare, success, failure


def fresh_compares(session: HostSession, g: Grant, compare: list[Any]) -> None:
    """What a fresh grant of ``g`` compares: no conflicting holder now."""
    keys = session.keys
    if g.rid.mode == ks.EXCLUSIVE:
        prefix = keys.resource(g.rid.rid)
        compare.append(tx.Version(prefix, ks.range_end(prefix)) == 0)
    else:
        compare.append(tx.Version(keys.exclusive(g.rid.rid)) == 0)
        compare.append(tx.Version(g.key) == 0)


def claim_ops(session: HostSession, grants: Sequence[Grant], *, marker_key: str, marker: bytes,
              uuid: str, also_delete: Sequence[str] = (), drop: Sequence[tuple[str, int]] = (),
              ) -> tuple[list[Any], list[Any], list[Any]]:
    """Take over records exactly as the giver marked them: the marker (which
    names this host and domain, checked by the caller from these very bytes)
    is byte-identical in etcd and every holder key still has the giver's
    token.  The marker is deleted in the same transaction, with any of our
    own obsolete markers (``also_delete``): nothing is left to clean up.

    Legacy path keys: a grant without ``expect_mod`` is a key the marker does
    not list (this host's legacy path key: it reaches the disk under another
    path), taken fresh; ``drop`` are the giver's legacy keys this host does
    not use, deleted if they still have the giver's token."""
    keys = session.keys
    compare: list[Any] = [tx.Value(marker_key) == marker]
    success: list[Any] = []
    failure: list[Any] = []
    for key, token in drop:
        compare.append(tx.Mod(key) == token)
        success.append(tx.Delete(key))
    for g in grants:
        if g.expect_mod is None:
            fresh_compares(session, g, compare)
        else:
            compare.append(tx.Mod(g.key) == int(g.expect_mod))
        success.append(tx.Put(g.key, g.value, lease=session.lease_id))
        success.append(tx.Put(keys.gen_key(g.rid.rid, g.rid.mode), ks.encode(
            {"res": g.rid.readable, "host": session.cfg.host_id, "uuid": uuid})))
        prefix = keys.resource(g.rid.rid)
        failure.append(tx.Get(prefix, ks.range_end(prefix)))
    success.append(tx.Delete(marker_key))
    success.extend(tx.Delete(key) for key in also_delete if key != marker_key)
    failure.append(tx.Get(keys.handoffs, ks.range_end(keys.handoffs)))
    return compare, success, failure


@dataclass(frozen=True)
class Outcome:
    """What one transaction did: from etcd's reply, or found by a read-back
    after the reply was lost (then there are no responses and no revision)."""

    succeeded: bool
    revision: int = 0
    """The reply's header revision (the fencing token of what it wrote); 0 from a read-back."""
    responses: Sequence[Any] = ()
    """The reply's response ops, in request order (the failure branch's gets, say)."""
    revisions: Mapping[str, int] = field(default_factory=dict)
    """From a read-back: the mod revision of each key found written."""
    read_back: bool = False

    @classmethod
    def of(cls, reply: Any) -> Outcome:
        """From etcd's TxnResponse."""
        return cls(bool(reply.succeeded), int(reply.header.revision), list(reply.responses))

    @classmethod
    def found(cls, revisions: Mapping[str, int] | None = None, *, succeeded: bool = True) -> Outcome:
        """From a read-back: did the lost transaction take effect."""
        return cls(succeeded, revisions=dict(revisions or {}), read_back=True)


ReadBack = Callable[[float], "Outcome | None"]
"""Given a timeout, return the outcome of a transaction whose reply was
lost, or None if it did not commit (then it is retried)."""


def run(session: HostSession, compare: list[Any], success: list[Any], failure: list[Any], *,
        deadline: float, read_back: ReadBack | None = None) -> Outcome:
    """Send one transaction with retries until ``deadline`` (never past the
    session's fence deadline).  A lost reply is resolved with ``read_back``
    before any retry, so a retry never conflicts with our own write."""
    client = session.client

    def attempt(timeout: float) -> Outcome:
        session.check()
        return Outcome.of(lease_checked(session, lambda: client.txn(compare, success, failure, timeout=timeout)))

    def resolve(exc: TransientError) -> Outcome | None:
        assert read_back is not None
        outcome = read_back(client.attempt_timeout(deadline))
        if outcome is not None:
            log.info("lost reply (%s) resolved by read-back: the transaction had committed", exc)
        return outcome

    started = session.clock.now()
    result: Outcome = client.retrying(attempt, deadline=min(deadline, session.fence_at),
                             on_ambiguous=resolve if read_back is not None else None)
    log.debug("txn of %d ops took %.1f ms", len(success), (session.clock.now() - started) * 1000)
    return result


T = TypeVar("T")


def lease_checked(session: HostSession, request: Callable[[], T]) -> T:
    """Run one request; if etcd says our lease does not exist (revoked from
    outside, or expired), the session is lost: fence now and raise
    LeaseLostError instead of the backend's internal error."""
    try:
        return request()
    except LeaseNotFound as exc:
        session.lease_gone(f"a request was refused: {exc}")
        session.check()
        raise  # pragma: no cover - check() raised


def written(session: HostSession, records: list[tuple[str, bytes]]) -> ReadBack:
    """Read-back for a write: committed iff every record is there, byte-equal."""
    def read(timeout: float) -> Outcome | None:
        found: dict[str, int] = {}
        for key, value in records:
            kvs, _ = session.client.get_range(key, timeout=timeout)
            if kvs and kvs[0].value == value:
                found[key] = int(kvs[0].mod_revision)
        if len(found) == len(records):
            return Outcome.found(found)
        if found:  # an atomic txn cannot half-commit: never guess, retry the read
            raise TransientError(f"read-back saw {len(found)}/{len(records)} records", ambiguous=True)
        return None
    return read


def deleted(session: HostSession, records: list[tuple[str, int]]) -> ReadBack:
    """Read-back for a delete: committed iff none of our (key, token) is left."""
    def read(timeout: float) -> Outcome | None:
        for key, token in records:
            kvs, _ = session.client.get_range(key, timeout=timeout)
            if kvs and int(kvs[0].mod_revision) == token:
                return None
        return Outcome.found()
    return read


def withdraw_in_background(session: HostSession, records: list[tuple[str, bytes]]) -> None:
    """Delete our records if a grant whose outcome we never learned did
    commit: one transaction comparing every value byte for byte (a record we
    wrote carries a unique grant id, so nobody else's is touched).  Retried
    until it is known done or the session ends; if the session is lost, its
    lease revocation or expiry removes them anyway."""
    def work() -> None:
        compare = [tx.Value(key) == value for key, value in records]
        delete = [tx.Delete(key) for key, _ in records]
        while session.lost is None and not session.closed:
            try:
                resp = session.client.txn(compare, delete, [], timeout=session.cfg.request_timeout)
            except Exception as exc:
                log.debug("withdrawing an uncertain grant: %s; retrying", exc)
                session.clock.sleep(0.5)
                continue
            if resp.succeeded:
                log.warning("an acquire reported as failed had committed; withdrew %d record(s)", len(records))
            return

    threading.Thread(target=work, name="virtlease-withdraw", daemon=True).start()
