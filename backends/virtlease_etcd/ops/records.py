"""Reading and deleting one owner's holder records (release, unload).

Deletes compare each record's token: a record that was replaced or expired
is not ours any more and is never deleted, only forgotten.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from etcd3 import transactions as tx

from virtlease.errors import StaleStateError
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.session.owners import Held, Owner

from . import transactions as txn
from .domain import Domain


def read_xgens(d: Domain, held: Sequence[Held]) -> dict[str, int]:
    """For each shared resource held: the revision of its last exclusive
    grant (0: never).  Stable while we hold it shared, since no exclusive
    grant can happen meanwhile; a resume requires it unchanged."""
    shared = [h for h in held if h.rid.mode == ks.SHARED]
    if not shared:
        return {}
    gets = [tx.Get(d.keys.gen_key(h.rid.rid, ks.EXCLUSIVE)) for h in shared]
    resp = txn.run(d.session, [], gets, [], deadline=d.session.deadline())
    out: dict[str, int] = {}
    for h, r in zip(shared, resp.responses, strict=True):
        kvs = r.response_range.kvs
        out[h.rid.rid] = int(kvs[0].mod_revision) if kvs else 0
    return out


def delete_held(d: Domain, owner: Owner, held: Sequence[Held], *, also_dom: bool) -> int:
    """Delete the owner's records that are still exactly ours (compare each
    token).  Once etcd has answered, the owner no longer counts them as held
    (a record that was replaced or expired is not ours any more either: a
    StaleStateError names it).  When etcd did not answer (BackendUnavailableError,
    LeaseLostError) the owner keeps them: the records may still be on our lease,
    and a release retried later must find them."""
    try:
        revision = _delete(d, held, also_dom=also_dom)
    except StaleStateError:
        _forget(owner, held, also_dom=also_dom)
        raise
    _forget(owner, held, also_dom=also_dom)
    return revision


def _forget(owner: Owner, held: Sequence[Held], *, also_dom: bool) -> None:
    for h in held:
        owner.held.pop(h.rid.rid, None)
    if also_dom:
        owner.registered = False


def _delete(d: Domain, held: Sequence[Held], *, also_dom: bool) -> int:
    compare = [tx.Mod(h.key) == h.token for h in held]
    success: list[Any] = [tx.Delete(h.key) for h in held]
    if also_dom:
        success.append(tx.Delete(d.keys.dom(d.host, d.spec.uuid)))
    failure = [tx.Get(h.key) for h in held]
    if not success:
        return 0
    d.check_size((compare, success, failure), "release", len(held))
    resp = txn.run(d.session, compare, success, failure, deadline=d.session.deadline(),
                   read_back=txn.deleted(d.session, [(h.key, h.token) for h in held]))
    if resp.succeeded:
        return resp.revision  # 0 from a read-back
    ranges = [r.response_range for r in resp.responses]
    ours = [h for h, rng in zip(held, ranges, strict=False)
            if rng.kvs and int(rng.kvs[0].mod_revision) == h.token]
    lost = [h for h in held if h not in ours]
    if ours or also_dom:
        _delete(d, ours, also_dom=also_dom)
    raise StaleStateError(
        f"release of {d.where()}: {', '.join(sorted({h.rid.readable for h in lost}))} no longer held by this "
        "host (its record was replaced or expired); only this domain's own records were removed")
