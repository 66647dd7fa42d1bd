"""The etcd transactions of the driver: grant, resume, claim, release, mark.

Each function builds the compare/success/failure lists of ONE transaction;
``run`` (``session/writes``, re-exported here) sends it with retries and
resolves lost replies by reading back our own records (docs/DESIGN.md §6).
A grant writes, per resource, the holder key (on the session lease) and the
resource's ``gen`` key: two operations, so one transaction holds
``max_txn_ops // 2`` keys.  A file disk has two keys (its directory id and
its name, see ``keyspace``), three with ``legacy_path_keys`` (its legacy path
key): ``max_txn_ops // 4`` or ``// 6`` disks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from etcd3 import transactions as tx

from virtlease.errors import TransactionTooLargeError
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.session.hostsession import HostSession
from virtlease_etcd.session.writes import Outcome as Outcome
from virtlease_etcd.session.writes import ReadBack as ReadBack
from virtlease_etcd.session.writes import deleted as deleted
from virtlease_etcd.session.writes import lease_checked as lease_checked
from virtlease_etcd.session.writes import run as run
from virtlease_etcd.session.writes import withdraw_in_background as withdraw_in_background
from virtlease_etcd.session.writes import written as written

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
        cost = (f" A file disk takes two keys (its directory id and its name): about {limit // 4} disks fit"
                + (f", and {limit // 6} with legacy_path_keys on (a third key: its path; turn it off once "
                   "no host runs the release before the previous one)." if legacy else "."))
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
