"""The grant pipeline's pure core: what a grant asks, the one transaction it
sends, and what a failed one read (docs/DESIGN.md "Grants").

Every grant of locked resources -- a fresh acquire, a resume with a state, a
migration or reservation claim, a hotplug, lockd's ACQUIRE -- runs the same
five steps, each in one place:

1. *resolve*: the caller names the keys (``Domain.locked``) and says what it
   asks (:class:`Ask`: :func:`fresh`, :func:`resume`, :func:`claim`), refusing
   here what no transaction could make right (:func:`resume` on a state that
   does not record a shared disk's last exclusive grant);
2. *decide*: :func:`decide` turns the ask and this attempt's record bytes into
   the one transaction to send (:class:`Txn`: compares, puts, and the reads a
   failure returns) and the records to keep on success.  A state or a marker
   only narrows a grant: whatever it claims, the compares of a fresh grant (or
   the marker's exact bytes and tokens) stay;
3. *commit*: ``Domain.run_grant`` sends it (retries, lost replies resolved by
   reading our own records back);
4. *read*: a failed transaction returns the holders of every key and the
   handoff markers in the same round trip (:func:`observe`: :class:`Observed`),
   so the free path costs one round trip and the busy path no more;
5. *explain* or *record*: :func:`explain` turns what was asked and read into a
   typed refusal (:class:`Busy` naming the holders, :class:`Stale` with the
   reason), or ``Domain.commit`` records the granted records on the owner.

Nothing here talks to etcd, reads a clock or draws a random number: the
safety decisions are unit-tested exhaustively without a server
(tests/test_decide.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from etcd3 import transactions as tx

from virtlease.errors import Holder
from virtlease_etcd.model import holders
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.model import statestring as st


@dataclass(frozen=True)
class Writer:
    """Who writes: the keyspace, this host, the domain and the session lease the records live on."""

    keys: ks.Keys
    host: str
    uuid: str
    lease: int


@dataclass(frozen=True)
class Grant:
    """One record a grant writes: its resource, holder key and value (the value carries the
    attempt's grant id, so a read-back tells our attempts apart)."""

    rid: ks.ResourceId
    key: str
    value: bytes


@dataclass(frozen=True)
class Ask:
    """What one grant asks for, whatever its attempt (use :func:`fresh`, :func:`resume`, :func:`claim`).

    ``tokens``: for a resume, the state's token of each key it lists; for a claim, the giver's
    token of each key the marker lists.  A key of ``rids`` without a token is taken fresh (a
    resume: this host's legacy path key, bounded by ``bounds``; a claim: this host's legacy path
    key of a disk the giver reached by another path)."""

    kind: Literal["acquire", "resume", "claim"]
    rids: tuple[ks.ResourceId, ...]
    tokens: Mapping[str, int] = field(default_factory=dict)
    xgens: Mapping[str, int | None] = field(default_factory=dict)
    """For a shared resume: the revision of the last exclusive grant the state saw (0: never)."""
    bounds: Mapping[str, int] = field(default_factory=dict)
    """For a resume: the token of the state's entry covering each key (nobody may have been
    granted a key the state does not list after it)."""
    marker_key: str = ""
    marker: bytes = b""
    """For a claim: the marker compared byte for byte and deleted."""
    also_delete: tuple[str, ...] = ()
    """For a claim: our own obsolete markers, deleted with it."""
    drop: tuple[tuple[str, int], ...] = ()
    """For a claim: the giver's legacy path keys this host does not use (key, token)."""


@dataclass(frozen=True)
class Stale:
    """A refusal: the state or marker does not match etcd (``reason`` ends the caller's message)."""

    reason: str


@dataclass(frozen=True)
class Busy:
    """A refusal: others hold what was asked (one Holder each, for the error message)."""

    holders: tuple[Holder, ...]


Refusal = Stale | Busy


@dataclass(frozen=True)
class Txn:
    """The one transaction of an attempt, and the records it grants if it succeeds."""

    compare: tuple[Any, ...]
    success: tuple[Any, ...]
    failure: tuple[Any, ...]
    grants: tuple[Grant, ...]

    def ops(self) -> tuple[list[Any], list[Any], list[Any]]:
        return list(self.compare), list(self.success), list(self.failure)


@dataclass(frozen=True)
class Observed:
    """What a failed grant read in its own round trip: each asked key's records (one list per
    key of ``Ask.rids``, in order: the whole resource, every mode) and the markers in flight."""

    holders: tuple[tuple[Any, ...], ...]
    markers: tuple[Any, ...]


# -- resolve ------------------------------------------------------------------------


def fresh(rids: Sequence[ks.ResourceId]) -> Ask:
    """A fresh grant (acquire, hotplug, lockd): no conflicting holder now."""
    return Ask("acquire", tuple(rids))


def resume(state: st.State, rids: Sequence[ks.ResourceId], bounds: Mapping[str, int]) -> Ask | Stale:
    """A grant with a state: everything a fresh grant compares, plus that nobody was granted
    the resources since the state's tokens (``bounds``: ``coverage.covering``).  Refused if the
    state does not record the last exclusive grant of a shared resource it lists."""
    listed = {r.rid for r in rids}
    unknown = [r.res for r in state.resources if r.mode == ks.SHARED and r.rid in listed
               and (r.xgen is None or r.xgen < 0)]
    if unknown:
        return Stale(f"the state does not record the last exclusive grant of shared {', '.join(unknown)}; "
                     "acquire without a state")
    return Ask("resume", tuple(rids), tokens={r.rid: r.token for r in state.resources},
               xgens={r.rid: r.xgen for r in state.resources}, bounds=dict(bounds))


def claim(rids: Sequence[ks.ResourceId], tokens: Mapping[str, int], marker_key: str, marker: bytes, *,
          also_delete: Sequence[str] = (), drop: Sequence[tuple[str, int]] = ()) -> Ask:
    """Take over the records a marker lists, exactly as it marked them (``tokens``)."""
    return Ask("claim", tuple(rids), tokens=dict(tokens), marker_key=marker_key, marker=marker,
               also_delete=tuple(also_delete), drop=tuple(drop))


# -- decide ---------------------------------------------------------------------------


def decide(w: Writer, ask: Ask, values: Mapping[str, bytes]) -> Txn:
    """The transaction of one attempt of ``ask``, with ``values`` the records' bytes by rid."""
    grants = tuple(Grant(rid, w.keys.holder(rid.rid, rid.mode, w.uuid), values[rid.rid]) for rid in ask.rids)
    if ask.kind == "claim":
        compare, success, failure = _claim_ops(w, ask, grants)
    else:
        compare, success, failure = _grant_ops(w, ask, grants)
    return Txn(tuple(compare), tuple(success), tuple(failure), grants)


def _grant_ops(w: Writer, ask: Ask, grants: Sequence[Grant]) -> tuple[list[Any], list[Any], list[Any]]:
    """Compares and puts of a fresh grant, or of a resume.  A state only narrows a grant: a
    resume compares everything a fresh grant does (the present holders allow it) *and* that
    the history matches the state (nobody was granted the resource since its token)."""
    keys = w.keys
    resume = ask.kind == "resume"
    compare: list[Any] = []
    success: list[Any] = []
    failure: list[Any] = []
    for g in grants:
        rid = g.rid.rid
        prefix = keys.resource(rid)
        token = ask.tokens.get(rid)
        if resume and token is None:  # a key the state does not list: no grant since its entry
            _fresh_compares(w, g, compare)
            bound = int(ask.bounds.get(rid) or 0) + 1
            gp = keys.gen_prefix(rid)
            compare.append(tx.Mod(gp, ks.range_end(gp)) < bound if g.rid.mode == ks.EXCLUSIVE
                           else tx.Mod(keys.gen_key(rid, ks.EXCLUSIVE)) < bound)
        elif g.rid.mode == ks.EXCLUSIVE:
            compare.append(tx.Version(prefix, ks.range_end(prefix)) == 0)  # no holder of any mode now
            if resume:
                # ...and nobody was granted it since our grant at token T: every grant and claim
                # bumps a gen key, so the newest gen revision is still exactly our T
                gp = keys.gen_prefix(rid)
                compare.append(tx.Mod(gp, ks.range_end(gp)) < int(token or 0) + 1)
                compare.append(tx.Mod(keys.gen_key(rid, ks.EXCLUSIVE)) == int(token or 0))
        else:
            compare.append(tx.Version(keys.exclusive(rid)) == 0)  # no exclusive holder now
            compare.append(tx.Version(g.key) == 0)
            if resume:  # ...and no exclusive grant since we last saw one
                compare.append(tx.Mod(keys.gen_key(rid, ks.EXCLUSIVE)) == int(ask.xgens.get(rid) or 0))
        success.append(tx.Put(g.key, g.value, lease=w.lease))
        success.append(tx.Put(keys.gen_key(rid, g.rid.mode), ks.encode(
            {"res": g.rid.readable, "host": w.host, "uuid": w.uuid})))
        failure.append(tx.Get(prefix, ks.range_end(prefix)))
    failure.append(tx.Get(keys.handoffs, ks.range_end(keys.handoffs)))
    return compare, success, failure


def _fresh_compares(w: Writer, g: Grant, compare: list[Any]) -> None:
    """What a fresh grant of ``g`` compares: no conflicting holder now."""
    keys = w.keys
    if g.rid.mode == ks.EXCLUSIVE:
        prefix = keys.resource(g.rid.rid)
        compare.append(tx.Version(prefix, ks.range_end(prefix)) == 0)
    else:
        compare.append(tx.Version(keys.exclusive(g.rid.rid)) == 0)
        compare.append(tx.Version(g.key) == 0)


def _claim_ops(w: Writer, ask: Ask, grants: Sequence[Grant]) -> tuple[list[Any], list[Any], list[Any]]:
    """Take over records exactly as the giver marked them: the marker (which names this host
    and domain, checked by the caller from these very bytes) is byte-identical in etcd and
    every holder key still has the giver's token.  The marker is deleted in the same
    transaction, with any of our own obsolete markers (``also_delete``): nothing is left to
    clean up.

    Legacy path keys: a key without a token is a key the marker does not list (this host's
    legacy path key: it reaches the disk under another path), taken fresh; ``drop`` are the
    giver's legacy keys this host does not use, deleted if they still have the giver's token."""
    keys = w.keys
    marker_key = ask.marker_key
    compare: list[Any] = [tx.Value(marker_key) == ask.marker]
    success: list[Any] = []
    failure: list[Any] = []
    for key, token in ask.drop:
        compare.append(tx.Mod(key) == token)
        success.append(tx.Delete(key))
    for g in grants:
        expect_mod = ask.tokens.get(g.rid.rid)
        if expect_mod is None:
            _fresh_compares(w, g, compare)
        else:
            compare.append(tx.Mod(g.key) == int(expect_mod))
        success.append(tx.Put(g.key, g.value, lease=w.lease))
        success.append(tx.Put(keys.gen_key(g.rid.rid, g.rid.mode), ks.encode(
            {"res": g.rid.readable, "host": w.host, "uuid": w.uuid})))
        prefix = keys.resource(g.rid.rid)
        failure.append(tx.Get(prefix, ks.range_end(prefix)))
    success.append(tx.Delete(marker_key))
    success.extend(tx.Delete(key) for key in ask.also_delete if key != marker_key)
    failure.append(tx.Get(keys.handoffs, ks.range_end(keys.handoffs)))
    return compare, success, failure


# -- read and explain -------------------------------------------------------------------


def observe(responses: Sequence[Any]) -> Observed:
    """The reads of a failed :class:`Txn` (its ``failure`` list: one range per asked key, the
    markers last)."""
    ranges = [tuple(r.response_range.kvs) for r in responses if r.WhichOneof("response") == "response_range"]
    if not ranges:
        return Observed((), ())
    return Observed(tuple(ranges[:-1]), ranges[-1])


def explain(w: Writer, ask: Ask, seen: Observed) -> Refusal:
    """Why ``ask`` failed, from what its transaction read: others hold it (:class:`Busy`; for
    a shared ask, other domains' shared holders do not count), or the state or marker no longer
    matches etcd (:class:`Stale`)."""
    if ask.kind == "claim":
        return Stale(_claim_reason(ask, seen))
    busy = holders.from_ranges(seen.holders, seen.markers, ask.rids, w.uuid)
    if busy:
        return Busy(tuple(busy))
    return Stale(f"another holder was granted {', '.join(r.readable for r in ask.rids if r.legacy_of is None)} "
                 f"after the state's tokens {sorted(ask.tokens.values())}")


def _claim_reason(ask: Ask, seen: Observed) -> str:
    marker_kv = [kv for kv in seen.markers if kv.key.decode() == ask.marker_key]
    if not marker_kv:
        return ("the handoff no longer exists (already claimed, cancelled, or the source's lease expired). "
                "If the source is dead its disks are free after its TTL: acquire without a state")
    if marker_kv[0].value != ask.marker:
        return "the state does not match the handoff marker in etcd (tampered or from another handoff)"
    changed: list[str] = []
    busy: list[str] = []
    for kvs, rid in zip(seen.holders, ask.rids, strict=False):
        token = ask.tokens.get(rid.rid)
        if token is None:  # this host's legacy path key, taken fresh: someone holds it
            busy.extend(holders.holder_of(kv, resource=rid.readable).describe() for kv in kvs)
        elif not kvs or any(int(kv.mod_revision) != token for kv in kvs):
            changed.append(rid.readable)
    if busy:
        return "this host's path key of the disk (legacy_path_keys) is held: " + "; ".join(sorted(set(busy)))
    return (f"{', '.join(sorted(set(changed))) or 'the resources'} changed since the handoff was "
            "prepared (already claimed: a replayed or concurrent claim)")
