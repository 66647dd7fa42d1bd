"""The grant pipeline's pure core (``virtlease_etcd.ops.plan``), without a server.

Every refusal and every transaction shape of a grant: exclusive and shared, a resource free,
held by another domain (on this host or another), by the same domain elsewhere; a resume whose
state matches etcd's history or not (a grant in between, edited tokens, a shared state without
the last exclusive grant); this host's legacy path key under a resume; a migration claim with
its marker, without it, with another marker, over records replaced behind it.

Each scenario runs the transactions :func:`plan.decide` makes against :class:`Model`, a small
model of etcd's keyspace that evaluates compares and applies puts and deletes as etcd does
(one revision per writing transaction; a compare over an empty range compares zero values, a
value compare on a missing key fails).  The same scenarios also run once against a real etcd
(:func:`test_the_model_answers_as_etcd_does`), so the model cannot drift from etcd unnoticed.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import etcd3
import pytest
from etcd3 import etcdrpc
from etcd3 import transactions as tx
from etcd3.etcdrpc.kv_pb2 import KeyValue

from virtlease_etcd.etcd.endpoints import request_op
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.model import statestring as st
from virtlease_etcd.ops import plan
from virtlease_lab.etcdserver import EtcdServer

X, S = ks.EXCLUSIVE, ks.SHARED
KEYS = ks.Keys("/decide")


# -- the stores: a model of etcd, and a real one ------------------------------------------------


class Store(Protocol):
    def txn(self, compare: tuple[Any, ...], success: tuple[Any, ...], failure: tuple[Any, ...]) -> Any: ...

    def lease(self, name: str) -> int: ...


def _compare(c: Any, kv: Any) -> bool:
    target = {tx.Version: kv.version, tx.Mod: kv.mod_revision, tx.Create: kv.create_revision,
              tx.Value: kv.value}[type(c)]
    want = c.value.encode() if isinstance(c.value, str) else c.value
    return bool({etcdrpc.Compare.EQUAL: target == want, etcdrpc.Compare.NOT_EQUAL: target != want,
                 etcdrpc.Compare.LESS: target < want, etcdrpc.Compare.GREATER: target > want}[c.op])


@dataclass
class Model:
    """etcd's keyspace as a transaction sees it: keys, revisions, versions, leases."""

    kvs: dict[str, Any] = field(default_factory=dict)
    revision: int = 1

    def _range(self, key: str, range_end: str | None) -> list[Any]:
        if range_end is None:
            return [self.kvs[key]] if key in self.kvs else []
        return [self.kvs[k] for k in sorted(self.kvs) if key <= k < range_end]

    def _holds(self, c: Any) -> bool:
        found = self._range(c.key, c.range_end)
        if not found:  # etcd: a value compare on no key fails, others compare zero values
            return not isinstance(c, tx.Value) and _compare(c, KeyValue())
        return all(_compare(c, kv) for kv in found)

    def txn(self, compare: tuple[Any, ...], success: tuple[Any, ...], failure: tuple[Any, ...]) -> Any:
        ok = all(self._holds(c) for c in compare)
        ops = success if ok else failure
        writes = any(isinstance(op, tx.Put) or (isinstance(op, tx.Delete) and op.key in self.kvs) for op in ops)
        rev = self.revision + 1 if writes else self.revision
        responses = []
        for op in ops:
            if isinstance(op, tx.Get):
                found = self._range(op.key, op.range_end)
                responses.append(etcdrpc.ResponseOp(response_range=etcdrpc.RangeResponse(kvs=found, count=len(found))))
            elif isinstance(op, tx.Put):
                old = self.kvs.get(op.key)
                self.kvs[op.key] = KeyValue(
                    key=op.key.encode(), value=op.value, lease=op.lease or 0, mod_revision=rev,
                    create_revision=old.create_revision if old else rev, version=old.version + 1 if old else 1)
                responses.append(etcdrpc.ResponseOp(response_put=etcdrpc.PutResponse()))
            else:
                gone = self.kvs.pop(op.key, None)
                responses.append(etcdrpc.ResponseOp(
                    response_delete_range=etcdrpc.DeleteRangeResponse(deleted=int(gone is not None))))
        self.revision = rev
        return etcdrpc.TxnResponse(succeeded=ok, responses=responses, header=etcdrpc.ResponseHeader(revision=rev))

    def lease(self, name: str) -> int:
        return 1000 + sum(map(ord, name))


class Real:
    """A real etcd, one fresh prefix per scenario (leases granted for real)."""

    def __init__(self, client: etcd3.Etcd3Client) -> None:
        self.client = client
        self.leases: dict[str, int] = {}

    def txn(self, compare: tuple[Any, ...], success: tuple[Any, ...], failure: tuple[Any, ...]) -> Any:
        request = etcdrpc.TxnRequest(compare=[c.build_message() for c in compare],
                                     success=[request_op(op) for op in success],
                                     failure=[request_op(op) for op in failure])
        return self.client.kvstub.Txn(request, 5)

    def lease(self, name: str) -> int:
        if name not in self.leases:
            self.leases[name] = int(self.client.lease(60).id)
        return self.leases[name]


# -- who asks ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Who:
    host: str
    uuid: str

    def writer(self, store: Store, keys: ks.Keys) -> plan.Writer:
        return plan.Writer(keys, self.host, self.uuid, store.lease(self.host))


US = Who("host-a", "dom-1")
SAME_ELSEWHERE = Who("host-b", "dom-1")
OTHER_ELSEWHERE = Who("host-b", "dom-2")
OTHER_HERE = Who("host-a", "dom-3")

_grant_ids = itertools.count()


def rid(mode: str, name: str = "d1", legacy_of: str | None = None) -> ks.ResourceId:
    """A disk's key; a legacy path key (``legacy_of``) is named as its disk is."""
    readable = f"/img/{name.split('-')[0]}"
    return ks.ResourceId("disk", readable, f"rid-{name}", mode, f"dir://{name}", f"/img/{name}", legacy_of=legacy_of)


def values(who: Who, store: Store, ask: plan.Ask) -> dict[str, bytes]:
    grant = f"g{next(_grant_ids)}"
    return {r.rid: ks.encode(ks.holder_record(r, host=who.host, lease=store.lease(who.host), uuid=who.uuid,
                                              name=who.uuid, pid=None, since=0.0, grant=grant))
            for r in ask.rids}


@dataclass(frozen=True)
class Sent:
    ask: plan.Ask
    txn: plan.Txn
    resp: Any

    @property
    def tokens(self) -> dict[str, int]:
        return {g.rid.rid: int(self.resp.header.revision) for g in self.txn.grants}


def send(store: Store, keys: ks.Keys, who: Who, ask: plan.Ask) -> Sent:
    t = plan.decide(who.writer(store, keys), ask, values(who, store, ask))
    return Sent(ask, t, store.txn(t.compare, t.success, t.failure))


def outcome(store: Store, keys: ks.Keys, who: Who, sent: Sent) -> str:
    """``granted``, ``busy: host/uuid, ...`` or ``stale: reason``."""
    if sent.resp.succeeded:
        return "granted"
    refusal = plan.explain(who.writer(store, keys), sent.ask, plan.observe(sent.resp.responses))
    if isinstance(refusal, plan.Busy):
        return "busy: " + ", ".join(sorted(f"{h.host}/{h.domain_uuid}" for h in refusal.holders))
    return "stale: " + refusal.reason


def release(store: Store, keys: ks.Keys, sent: Sent) -> None:
    store.txn((), tuple(tx.Delete(g.key) for g in sent.txn.grants), ())


def cycle(store: Store, keys: ks.Keys, who: Who, ask: plan.Ask) -> Sent:
    """Grant ``ask`` to ``who`` and release it at once (its gen keys stay: the history)."""
    sent = send(store, keys, who, ask)
    assert sent.resp.succeeded
    release(store, keys, sent)
    return sent


def state_of(sent: Sent, *, xgen: int | None = 0, tokens: dict[str, int] | None = None) -> st.State:
    """The state a release of ``sent`` returns (``tokens``: edited ones)."""
    toks = tokens or sent.tokens
    return st.State(kind=st.RESUME, cluster="c", prefix="/decide", host=US.host, uuid=US.uuid, name=US.uuid,
                    resources=tuple(st.StateResource(r.kind, r.readable, r.rid, r.mode, toks[r.rid],
                                                     xgen if r.mode == S else None, r.legacy_of)
                                    for r in sent.ask.rids), revision=0)


def resume_ask(sent: Sent, state: st.State | None = None) -> plan.Ask:
    s = state or state_of(sent)
    ask = plan.resume(s, sent.ask.rids, {r.rid: r.token for r in s.resources})
    assert isinstance(ask, plan.Ask), ask
    return ask


# -- the scenarios ---------------------------------------------------------------------------------

Scenario = Callable[[Store, ks.Keys], str]
SCENARIOS: dict[str, tuple[Scenario, str]] = {}


def scenario(expected: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[fn.__name__] = (fn, expected)
        return fn
    return register


def _fresh_over(ask_mode: str, holder: Who | None, holder_mode: str) -> Scenario:
    def run(store: Store, keys: ks.Keys) -> str:
        if holder is not None:
            assert send(store, keys, holder, plan.fresh([rid(holder_mode)])).resp.succeeded
        return outcome(store, keys, US, send(store, keys, US, plan.fresh([rid(ask_mode)])))
    return run


FRESH = {
    # (asked, held by, held mode): expected
    (X, None, X): "granted",
    (S, None, S): "granted",
    (X, OTHER_ELSEWHERE, X): "busy: host-b/dom-2",
    (X, OTHER_ELSEWHERE, S): "busy: host-b/dom-2",
    (S, OTHER_ELSEWHERE, X): "busy: host-b/dom-2",
    (S, OTHER_ELSEWHERE, S): "granted",  # shared holders coexist
    (X, OTHER_HERE, X): "busy: host-a/dom-3",
    (S, OTHER_HERE, S): "granted",
    (S, OTHER_HERE, X): "busy: host-a/dom-3",
    (X, SAME_ELSEWHERE, X): "busy: host-b/dom-1",
    (X, SAME_ELSEWHERE, S): "busy: host-b/dom-1",
    (S, SAME_ELSEWHERE, X): "busy: host-b/dom-1",
    (S, SAME_ELSEWHERE, S): "busy: host-b/dom-1",  # one domain, one shared record: not on two hosts
    (X, US, X): "busy: host-a/dom-1",  # the caller refuses a second acquire before; etcd would too
    (S, US, S): "busy: host-a/dom-1",
}
for (_asked, _by, _mode), _expected in FRESH.items():
    _name = f"fresh_{_asked}_over_{_mode}_of_{_by.host + '_' + _by.uuid if _by else 'nobody'}"
    SCENARIOS[_name] = (_fresh_over(_asked, _by, _mode), _expected)


@scenario("granted")
def fresh_after_the_holder_released(store: Store, keys: ks.Keys) -> str:
    cycle(store, keys, OTHER_ELSEWHERE, plan.fresh([rid(X)]))
    return outcome(store, keys, US, send(store, keys, US, plan.fresh([rid(X)])))


@scenario("busy: host-b/dom-2")
def fresh_of_two_disks_one_busy_takes_neither(store: Store, keys: ks.Keys) -> str:
    send(store, keys, OTHER_ELSEWHERE, plan.fresh([rid(X, "d2")]))
    sent = send(store, keys, US, plan.fresh([rid(X, "d1"), rid(X, "d2")]))
    assert not any(k.startswith(keys.resource("rid-d1")) for k in getattr(store, "kvs", {}))
    return outcome(store, keys, US, sent)


def _resume_after(mode: str, between: Callable[[Store, ks.Keys], None]) -> Scenario:
    def run(store: Store, keys: ks.Keys) -> str:
        first = send(store, keys, US, plan.fresh([rid(mode)]))
        release(store, keys, first)
        between(store, keys)
        return outcome(store, keys, US, send(store, keys, US, resume_ask(first)))
    return run


def _nothing(store: Store, keys: ks.Keys) -> None:
    pass


def _held_then_released(who: Who, mode: str) -> Callable[[Store, ks.Keys], None]:
    def run(store: Store, keys: ks.Keys) -> None:
        cycle(store, keys, who, plan.fresh([rid(mode)]))
    return run


def _held_now(who: Who, mode: str) -> Callable[[Store, ks.Keys], None]:
    def run(store: Store, keys: ks.Keys) -> None:
        assert send(store, keys, who, plan.fresh([rid(mode)])).resp.succeeded
    return run


STALE_RESUME = "stale: another holder was granted /img/d1 after the state's tokens [0]"
RESUME = {
    # (resumed mode, what happened while released): expected
    (X, "nothing"): "granted",
    (X, "exclusive grant, released"): STALE_RESUME,
    (X, "shared grant, released"): STALE_RESUME,
    (X, "exclusive holder now"): "busy: host-b/dom-2",
    (X, "shared holder now"): "busy: host-b/dom-2",
    (S, "nothing"): "granted",
    (S, "shared grant, released"): "granted",  # other readers do not change the disk
    (S, "shared holder now"): "granted",
    (S, "exclusive grant, released"): STALE_RESUME,
    (S, "exclusive holder now"): "busy: host-b/dom-2",
}
BETWEEN = {
    "nothing": _nothing,
    "exclusive grant, released": _held_then_released(OTHER_ELSEWHERE, X),
    "shared grant, released": _held_then_released(OTHER_ELSEWHERE, S),
    "exclusive holder now": _held_now(OTHER_ELSEWHERE, X),
    "shared holder now": _held_now(OTHER_ELSEWHERE, S),
}
for (_mode, _between), _expected in RESUME.items():
    SCENARIOS[f"resume_{_mode}_after_{_between.replace(' ', '_').replace(',', '')}"] = (
        _resume_after(_mode, BETWEEN[_between]), _expected)


@scenario(STALE_RESUME)
def resume_with_a_raised_token_after_another_grant(store: Store, keys: ks.Keys) -> str:
    first = cycle(store, keys, US, plan.fresh([rid(X)]))
    other = cycle(store, keys, OTHER_ELSEWHERE, plan.fresh([rid(X)]))
    raised = state_of(first, tokens={"rid-d1": other.tokens["rid-d1"] + 3})  # edited past the other grant
    return outcome(store, keys, US, send(store, keys, US, resume_ask(first, raised)))


@scenario(STALE_RESUME)
def resume_with_a_lowered_token(store: Store, keys: ks.Keys) -> str:
    first = cycle(store, keys, US, plan.fresh([rid(X)]))
    lowered = state_of(first, tokens={"rid-d1": first.tokens["rid-d1"] - 1})
    return outcome(store, keys, US, send(store, keys, US, resume_ask(first, lowered)))


@scenario(STALE_RESUME.replace("/img/d1", "/img/d1, /img/d2"))
def resume_of_two_disks_one_granted_in_between_takes_neither(store: Store, keys: ks.Keys) -> str:
    first = cycle(store, keys, US, plan.fresh([rid(X, "d1"), rid(X, "d2")]))
    cycle(store, keys, OTHER_ELSEWHERE, plan.fresh([rid(X, "d2")]))
    sent = send(store, keys, US, resume_ask(first))
    assert not any(k.startswith(keys.resource("rid-d1")) for k in getattr(store, "kvs", {}))
    return outcome(store, keys, US, sent)


@scenario(STALE_RESUME)
def shared_resume_whose_state_saw_an_older_exclusive_grant(store: Store, keys: ks.Keys) -> str:
    cycle(store, keys, OTHER_ELSEWHERE, plan.fresh([rid(X)]))
    first = cycle(store, keys, US, plan.fresh([rid(S)]))
    # the state says "never granted exclusively" (xgen 0): etcd knows better
    return outcome(store, keys, US, send(store, keys, US, resume_ask(first, state_of(first, xgen=0))))


@scenario("granted")
def shared_resume_whose_state_saw_the_last_exclusive_grant(store: Store, keys: ks.Keys) -> str:
    before = cycle(store, keys, OTHER_ELSEWHERE, plan.fresh([rid(X)]))
    first = cycle(store, keys, US, plan.fresh([rid(S)]))
    xgen = before.tokens["rid-d1"]
    return outcome(store, keys, US, send(store, keys, US, resume_ask(first, state_of(first, xgen=xgen))))


@scenario(STALE_RESUME)
def shared_resume_after_a_second_exclusive_grant(store: Store, keys: ks.Keys) -> str:
    before = cycle(store, keys, OTHER_ELSEWHERE, plan.fresh([rid(X)]))
    first = cycle(store, keys, US, plan.fresh([rid(S)]))
    cycle(store, keys, OTHER_ELSEWHERE, plan.fresh([rid(X)]))  # the last one, after
    state = state_of(first, xgen=before.tokens["rid-d1"])
    return outcome(store, keys, US, send(store, keys, US, resume_ask(first, state)))


# this host's legacy path key of a disk the state names by identity only
IDENTITY, LEGACY = rid(X, "d1"), rid(X, "d1-path", legacy_of="rid-d1")


def _legacy_resume(between: Callable[[Store, ks.Keys], None]) -> Scenario:
    def run(store: Store, keys: ks.Keys) -> str:
        first = send(store, keys, US, plan.fresh([IDENTITY]))
        release(store, keys, first)
        between(store, keys)
        s = state_of(first)
        ask = plan.resume(s, [IDENTITY, LEGACY], {IDENTITY.rid: s.resources[0].token,
                                                  LEGACY.rid: s.resources[0].token})
        assert isinstance(ask, plan.Ask)
        return outcome(store, keys, US, send(store, keys, US, ask))
    return run


def _path_granted(store: Store, keys: ks.Keys) -> None:
    cycle(store, keys, OTHER_ELSEWHERE, plan.fresh([LEGACY]))


def _path_held(store: Store, keys: ks.Keys) -> None:
    send(store, keys, OTHER_ELSEWHERE, plan.fresh([LEGACY]))


SCENARIOS["resume_takes_its_legacy_path_key_fresh"] = (_legacy_resume(_nothing), "granted")
SCENARIOS["resume_refused_once_the_path_was_granted_since"] = (
    _legacy_resume(_path_granted), STALE_RESUME)
SCENARIOS["resume_refused_while_the_path_is_held"] = (_legacy_resume(_path_held), "busy: host-b/dom-2")


# -- claims --------------------------------------------------------------------------------------


def _marked(store: Store, keys: ks.Keys, rids: list[ks.ResourceId]) -> tuple[Sent, str, bytes]:
    """The same domain on host-b holds ``rids`` and marks them for host-a."""
    giver = send(store, keys, SAME_ELSEWHERE, plan.fresh(rids))
    assert giver.resp.succeeded
    marker_key = keys.handoff(US.uuid, SAME_ELSEWHERE.host)
    marker = ks.encode({"from": SAME_ELSEWHERE.host, "to": US.host, "uuid": US.uuid, "nonce": "n",
                        "res": [{"rid": r.rid, "mode": r.mode, "token": giver.tokens[r.rid]} for r in rids]})
    store.txn((), (tx.Put(marker_key, marker, lease=store.lease(SAME_ELSEWHERE.host)),), ())
    return giver, marker_key, marker


def _claim(store: Store, keys: ks.Keys, meddle: Callable[[Store, ks.Keys, Sent, str], None]) -> str:
    giver, marker_key, marker = _marked(store, keys, [rid(X), rid(S, "d2")])
    meddle(store, keys, giver, marker_key)
    ask = plan.claim(giver.ask.rids, giver.tokens, marker_key, marker)
    sent = send(store, keys, US, ask)
    if sent.resp.succeeded:  # the marker went with the claim, the records are ours, on our lease
        assert not store.txn((), (tx.Get(marker_key),), ()).responses[0].response_range.kvs
        for g in sent.txn.grants:
            kv = store.txn((), (tx.Get(g.key),), ()).responses[0].response_range.kvs[0]
            assert kv.value == g.value and kv.lease == store.lease(US.host)
    return outcome(store, keys, US, sent)


def _meddle_none(store: Store, keys: ks.Keys, giver: Sent, marker_key: str) -> None:
    pass


def _cancelled(store: Store, keys: ks.Keys, giver: Sent, marker_key: str) -> None:
    store.txn((), (tx.Delete(marker_key),), ())


def _remarked(store: Store, keys: ks.Keys, giver: Sent, marker_key: str) -> None:
    store.txn((), (tx.Put(marker_key, ks.encode({"to": "host-c"}), lease=store.lease(SAME_ELSEWHERE.host)),), ())


def _replaced(store: Store, keys: ks.Keys, giver: Sent, marker_key: str) -> None:
    g = giver.txn.grants[0]  # rewritten behind the marker: a new token
    store.txn((), (tx.Put(g.key, g.value, lease=store.lease(SAME_ELSEWHERE.host)),), ())


CLAIM_HEAD = "stale: "
CLAIMS = {
    "claim_of_a_marker_as_it_was": (_meddle_none, "granted"),
    "claim_of_a_cancelled_handoff": (_cancelled, CLAIM_HEAD + "the handoff no longer exists (already claimed, "
                                     "cancelled, or the source's lease expired). If the source is dead its "
                                     "disks are free after its TTL: acquire without a state"),
    "claim_of_a_marker_rewritten": (_remarked, CLAIM_HEAD + "the state does not match the handoff marker in "
                                    "etcd (tampered or from another handoff)"),
    "claim_over_a_record_replaced_behind_the_marker": (
        _replaced, CLAIM_HEAD + "/img/d1 changed since the handoff was prepared (already claimed: a replayed or "
        "concurrent claim)"),
}
for _name, (_meddle, _expected) in CLAIMS.items():
    SCENARIOS[_name] = ((lambda m: lambda store, keys: _claim(store, keys, m))(_meddle), _expected)


@scenario(CLAIM_HEAD + "/img/d1 changed since the handoff was prepared (already claimed: a replayed or concurrent "
          "claim)")
def claim_replayed_after_it_committed(store: Store, keys: ks.Keys) -> str:
    giver, marker_key, marker = _marked(store, keys, [rid(X)])
    ask = plan.claim(giver.ask.rids, giver.tokens, marker_key, marker)
    assert send(store, keys, US, ask).resp.succeeded
    store.txn((), (tx.Put(marker_key, marker, lease=store.lease(SAME_ELSEWHERE.host)),), ())  # replayed
    return outcome(store, keys, US, send(store, keys, US, ask))


@scenario("granted")
def claim_takes_its_own_legacy_path_key_fresh_and_drops_the_givers(store: Store, keys: ks.Keys) -> str:
    giver_path = rid(X, "d1-b-path", legacy_of="rid-d1")
    giver, marker_key, marker = _marked(store, keys, [IDENTITY, giver_path])
    drop = ((keys.holder(giver_path.rid, X, US.uuid), giver.tokens[giver_path.rid]),)
    ask = plan.claim([IDENTITY, LEGACY], {IDENTITY.rid: giver.tokens[IDENTITY.rid]}, marker_key, marker,
                     drop=drop)
    sent = send(store, keys, US, ask)
    gone = store.txn((), (tx.Get(drop[0][0]),), ()).responses[0].response_range.kvs
    assert sent.resp.succeeded and not gone
    return outcome(store, keys, US, sent)


@scenario(CLAIM_HEAD + "this host's path key of the disk (legacy_path_keys) is held: ")
def claim_whose_own_path_key_is_held(store: Store, keys: ks.Keys) -> str:
    giver, marker_key, marker = _marked(store, keys, [IDENTITY])
    send(store, keys, OTHER_ELSEWHERE, plan.fresh([LEGACY]))
    ask = plan.claim([IDENTITY, LEGACY], {IDENTITY.rid: giver.tokens[IDENTITY.rid]}, marker_key, marker)
    return outcome(store, keys, US, send(store, keys, US, ask))


@scenario(CLAIM_HEAD + "the resources changed since the handoff was prepared (already claimed: a replayed or "
          "concurrent claim)")
def claim_whose_dropped_giver_key_was_replaced(store: Store, keys: ks.Keys) -> str:
    giver_path = rid(X, "d1-b-path", legacy_of="rid-d1")
    giver, marker_key, marker = _marked(store, keys, [IDENTITY, giver_path])
    drop_key = keys.holder(giver_path.rid, X, US.uuid)
    store.txn((), (tx.Put(drop_key, b"replaced"),), ())
    ask = plan.claim([IDENTITY], {IDENTITY.rid: giver.tokens[IDENTITY.rid]}, marker_key, marker,
                     drop=((drop_key, giver.tokens[giver_path.rid]),))
    return outcome(store, keys, US, send(store, keys, US, ask))


# -- the tests ---------------------------------------------------------------------------------------

_prefixes = itertools.count()


def _keys() -> ks.Keys:
    return ks.Keys(f"/decide/{next(_prefixes)}")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario(name: str) -> None:
    run, expected = SCENARIOS[name]
    got = run(Model(), _keys())
    assert got.startswith(expected) if expected.endswith(": ") else _normal(got) == _normal(expected), got


@pytest.fixture(scope="module")
def real_etcd(etcd_process: EtcdServer) -> Iterator[etcd3.Etcd3Client]:
    client = etcd_process.client()
    yield client
    client.close()


def test_the_model_answers_as_etcd_does(real_etcd: etcd3.Etcd3Client) -> None:
    """Every scenario, against a real etcd: the same outcome as against the model."""
    real = Real(real_etcd)
    base = f"/decide-real/{etcdrpc.__name__}-{id(real)}"
    differ = {}
    for n, name in enumerate(sorted(SCENARIOS)):
        run, _ = SCENARIOS[name]
        model, etcd = run(Model(), ks.Keys(f"{base}/m{n}")), run(real, ks.Keys(f"{base}/{n}"))
        if _normal(model) != _normal(etcd):
            differ[name] = (model, etcd)
    for lease in real.leases.values():
        real_etcd.revoke_lease(lease)
    real_etcd.delete_prefix(base)
    assert not differ, differ


def _normal(text: str) -> str:
    """Outcomes that name tokens (revisions) differ between stores only in those numbers."""
    return re.sub(r"tokens \[[\d, ]*\]|token \d+", "token #", text)


# -- the shape of what decide sends ----------------------------------------------------------------


def test_decide_is_a_function_of_what_is_asked() -> None:
    w = US.writer(Model(), KEYS)
    ask = plan.fresh([rid(X), rid(S, "d2")])
    vals = {"rid-d1": b"v1", "rid-d2": b"v2"}
    assert _wire(plan.decide(w, ask, vals)) == _wire(plan.decide(w, ask, vals))


def _wire(t: plan.Txn) -> tuple[Any, ...]:
    """What etcd would receive of ``t``, and what it records on success."""
    return (etcdrpc.TxnRequest(compare=[c.build_message() for c in t.compare],
                               success=[request_op(op) for op in t.success],
                               failure=[request_op(op) for op in t.failure]).SerializeToString(), t.grants)


@pytest.mark.parametrize("ask", [
    plan.fresh([rid(X), rid(S, "d2")]),
    plan.Ask("resume", (rid(X), rid(S, "d2"), LEGACY), tokens={"rid-d1": 5, "rid-d2": 6},
             xgens={"rid-d2": 0}, bounds={"rid-d1": 5, "rid-d2": 6, LEGACY.rid: 5}),
    plan.claim([rid(X), LEGACY], {"rid-d1": 5}, "/m", b"marker", also_delete=["/mine"], drop=[("/old", 4)]),
], ids=["fresh", "resume", "claim"])
def test_every_record_is_put_on_our_lease_with_its_gen_key_and_read_back_on_failure(ask: plan.Ask) -> None:
    w = US.writer(Model(), KEYS)
    t = plan.decide(w, ask, {r.rid: r.rid.encode() for r in ask.rids})
    puts = {op.key: op for op in t.success if isinstance(op, tx.Put)}
    for r, g in zip(ask.rids, t.grants, strict=True):
        assert g.rid == r and g.key == KEYS.holder(r.rid, r.mode, US.uuid) and g.value == r.rid.encode()
        assert puts[g.key].lease == w.lease and puts[g.key].value == g.value
        assert KEYS.gen_key(r.rid, r.mode) in puts and puts[KEYS.gen_key(r.rid, r.mode)].lease in (None, 0)
    # one range per asked key, in order, then the markers: what explain reads
    assert [op.key for op in t.failure] == [*(KEYS.resource(r.rid) for r in ask.rids), KEYS.handoffs]
    deletes = [op.key for op in t.success if isinstance(op, tx.Delete)]
    assert deletes == (["/old", "/m", "/mine"] if ask.kind == "claim" else [])


def test_a_shared_resume_state_without_the_last_exclusive_grant_is_refused_before_sending() -> None:
    first = Sent(plan.fresh([rid(S)]), plan.Txn((), (), (), ()), etcdrpc.TxnResponse(
        header=etcdrpc.ResponseHeader(revision=9)))
    first_grant = plan.Grant(rid(S), KEYS.holder("rid-d1", S, US.uuid), b"")
    first = Sent(first.ask, plan.Txn((), (), (), (first_grant,)), first.resp)
    for xgen in (None, -1):
        s = state_of(first, xgen=xgen)
        refused = plan.resume(s, [rid(S)], {"rid-d1": 9})
        assert refused == plan.Stale("the state does not record the last exclusive grant of shared /img/d1; "
                                     "acquire without a state")
    assert isinstance(plan.resume(state_of(first, xgen=0), [rid(S)], {"rid-d1": 9}), plan.Ask)
    # an exclusive entry needs no xgen; a shared entry of a disk not asked is not this grant's business
    assert isinstance(plan.resume(state_of(first, xgen=None), [rid(X, "d9")], {"rid-d9": 9}), plan.Ask)


def test_busy_names_each_grant_once_and_the_handoff_it_is_in() -> None:
    store, keys = Model(), _keys()
    _marked(store, keys, [IDENTITY, LEGACY])  # one grant, two records
    sent = send(store, keys, OTHER_ELSEWHERE, plan.fresh([IDENTITY, LEGACY]))
    refusal = plan.explain(OTHER_ELSEWHERE.writer(store, keys), sent.ask, plan.observe(sent.resp.responses))
    assert isinstance(refusal, plan.Busy)
    (holder,) = refusal.holders
    assert (holder.host, holder.domain_uuid, holder.handoff_to) == (SAME_ELSEWHERE.host, US.uuid, US.host)
