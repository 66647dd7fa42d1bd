"""The etcd lock driver: the LOCK_DRIVER class and its lock objects.

One driver instance = one host session (shared with other instances of the
same host in this process).  A lock object's resources are taken in one
transaction, held on the session lease, released with compare-before-delete,
and handed to another host during migration by a mark-then-claim handoff
(DESIGN.md "Safety model").
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from etcd3 import transactions as tx

from virtlease.abi import (
    ABI_VERSION,
    AcquireFlags,
    Capability,
    FailureAction,
    HeldResource,
    ObjectSpec,
    ResourceSpec,
    format_version,
    version_major,
)
from virtlease.errors import (
    BackendUnavailableError,
    LeaseLostError,
    ObjectStateError,
    PluginVersionError,
    ResourceBusyError,
    StaleStateError,
    ValidationError,
)

from . import keyspace as ks
from . import state as st
from . import transactions as txn
from .config import EtcdConfig, load_config
from .failure import resolve, run_failure_action
from .session import HostSession, close_session, open_session
from .status import ClusterStatus, read_status

log = logging.getLogger(__name__)


@dataclass
class Held:
    """A resource this object holds: its key and the grant's token."""

    rid: ks.ResourceId
    key: str
    token: int
    value: bytes

    def as_state(self, xgen: int | None = None) -> st.StateResource:
        return st.StateResource(self.rid.kind, self.rid.readable, self.rid.rid, self.rid.mode, self.token, xgen)


class EtcdDriver:
    """LOCK_DRIVER of the etcd plugin."""

    name = "etcd"
    version = ABI_VERSION
    capabilities = Capability.RESOURCES | Capability.MIGRATE | Capability.HOTPLUG | Capability.USES_STATE

    def __init__(self) -> None:
        self.cfg: EtcdConfig | None = None
        self._session: HostSession | None = None
        self.objects: set[EtcdObject] = set()
        self._lock = threading.Lock()

    # -- plugin hooks ------------------------------------------------------------

    def load(self, version: int, capabilities: Capability, config: Mapping[str, Any]) -> None:
        if version_major(version) != version_major(self.version) or version > self.version:
            raise PluginVersionError(
                f"etcd driver: requested ABI {format_version(version)}, offers {format_version(self.version)}")
        missing = Capability(capabilities) & ~self.capabilities
        if missing:
            raise PluginVersionError(f"etcd driver: requested capabilities {missing!r} not offered "
                                     f"(offers {self.capabilities!r})")
        self.cfg = load_config(config)
        self._session = open_session(self.cfg)
        self._session.add_listener(self._on_lost)

    def unload(self) -> None:
        if self._session is not None:
            self._session.remove_listener(self._on_lost)
            close_session(self._session)
            self._session = None

    @property
    def session(self) -> HostSession:
        if self._session is None:
            raise LeaseLostError("etcd driver: not loaded (or already unloaded)")
        return self._session

    @property
    def host_id(self) -> str:
        return self.session.cfg.host_id

    def new_object(self, spec: ObjectSpec) -> EtcdObject:
        self.session.check()
        obj = EtcdObject(self, spec)
        with self._lock:
            self.objects.add(obj)
        return obj

    def status(self) -> ClusterStatus:
        """Hosts, held resources and handoffs under this driver's prefix."""
        session = self.session
        return read_status(session.client, session.keys, timeout=session.cfg.request_timeout * 2)

    def _forget(self, obj: EtcdObject) -> None:
        with self._lock:
            self.objects.discard(obj)

    def _on_lost(self, reason: str) -> None:
        """Fence: run every holding object's failure action (session thread)."""
        with self._lock:
            objects = list(self.objects)
        for obj in objects:
            obj.fence(reason)


class EtcdObject:
    """The locks of one VM on one host."""

    def __init__(self, driver: EtcdDriver, spec: ObjectSpec) -> None:
        self.driver = driver
        self.spec = spec
        self.holds: dict[str, Held] = {}
        self.action = FailureAction.DEFAULT
        self.registered = False
        self.marker: tuple[str, bytes] | None = None
        self.claimed_from: str | None = None
        self.gone = False
        self.fenced_reason: str | None = None

    # -- helpers -----------------------------------------------------------------

    @property
    def session(self) -> HostSession:
        return self.driver.session

    @property
    def cfg(self) -> EtcdConfig:
        return self.session.cfg

    def _where(self) -> str:
        return f"domain {self.spec.name} ({self.spec.uuid})"

    def _cluster(self) -> str:
        cid = self.session.client.cluster_id
        return f"{cid:x}" if cid else "unknown"

    def _state(self, kind: str, held: Sequence[Held], revision: int, *, to: str | None = None,
               marker: bytes | None = None, xgens: Mapping[str, int] | None = None) -> str:
        xg = xgens or {}
        return st.State(
            kind=kind, cluster=self._cluster(), prefix=self.cfg.prefix, host=self.cfg.host_id,
            uuid=self.spec.uuid, name=self.spec.name,
            resources=tuple(h.as_state(xg.get(h.rid.rid)) for h in held),
            revision=revision, to=to, marker=None if marker is None else marker.decode(),
        ).encode()

    def _locked(self, resources: Sequence[ResourceSpec]) -> list[ks.ResourceId]:
        seen: dict[str, str] = {}
        out: list[ks.ResourceId] = []
        for res in resources:
            if res.readonly:
                continue  # readonly disks are not locked (as libvirt's lockd and sanlock)
            rid = ks.ResourceId.of(res)
            if rid.rid in seen:
                raise ValidationError("resource", f"{res.name!r} and {seen[rid.rid]!r} are the same "
                                      f"resource ({rid.readable}) of {self._where()}")
            seen[rid.rid] = res.name
            out.append(rid)
        return out

    def _record(self, rid: ks.ResourceId, grant: str) -> bytes:
        return ks.encode(ks.holder_record(
            rid, host=self.cfg.host_id, lease=self.session.lease_id, uuid=self.spec.uuid,
            name=self.spec.name, pid=self.spec.pid, since=time.time(), grant=grant))

    def _grants(self, rids: Sequence[ks.ResourceId], tokens: Mapping[str, int] | None = None,
                xgens: Mapping[str, int | None] | None = None) -> list[txn.Grant]:
        grant_id = secrets.token_hex(8)
        keys = self.session.keys
        return [txn.Grant(rid, keys.holder(rid.rid, rid.mode, self.spec.uuid), self._record(rid, grant_id),
                          expect_mod=None if tokens is None else tokens[rid.rid],
                          expect_xgen=None if xgens is None else xgens.get(rid.rid)) for rid in rids]

    def _commit(self, grants: Sequence[txn.Grant], resp: Any) -> None:
        if isinstance(resp, txn.Committed):
            tokens = {g.key: resp.revisions[g.key] for g in grants}
        else:
            tokens = {g.key: int(resp.header.revision) for g in grants}
        self.holds = {g.rid.rid: Held(g.rid, g.key, tokens[g.key], g.value) for g in grants}
        session = self.session
        if session.lost is not None or time.monotonic() >= session.fence_at:
            # The reply came in while the session was being fenced: the fence
            # listener may have run before these grants were recorded and found
            # nothing to fence.  Fence now and fail (tests/safety/test_fence_races.py).
            self.fence(session.lost or "fence deadline passed while the grant was in flight")
            session.check()

    def _check_size(self, ops: tuple[list[Any], list[Any], list[Any]], what: str, n: int) -> None:
        txn.check_size([len(x) for x in ops], self.cfg.max_txn_ops, what, n)

    # -- acquire -----------------------------------------------------------------

    def acquire(self, resources: list[ResourceSpec], state: str | None, flags: AcquireFlags,
                action: FailureAction) -> None:
        session = self.session
        session.check()
        if resolve(action, self.cfg.default_action) is FailureAction.RESTART and self.cfg.restart_callback is None:
            raise ValidationError("action", "RESTART needs a restart_callback in the etcd driver's "
                                  f"configuration; nothing was acquired for {self._where()}")
        if self.gone:
            raise ObjectStateError(f"acquire: {self._where()} was handed to another host")
        rids = self._locked(resources)
        self.action = action  # before the grant: a fence racing its reply must use it
        if flags & AcquireFlags.REGISTER_ONLY:
            self._register()
        elif state is None:
            if self.marker is not None:
                raise ObjectStateError(f"acquire: {self._where()} is being migrated; pass the handback state")
            self._grant(rids, None)
        else:
            parsed = st.decode(state)
            self._check_identity(parsed, rids)
            if parsed.kind == st.RESUME:
                if self.marker is not None:
                    raise ObjectStateError(f"acquire: {self._where()} is being migrated; pass the handback state")
                self._grant(rids, parsed)
            else:
                self._claim(rids, parsed)

    def _register(self) -> None:
        key = self.session.keys.dom(self.cfg.host_id, self.spec.uuid)
        value = ks.encode({"host": self.cfg.host_id, "uuid": self.spec.uuid, "name": self.spec.name,
                           "pid": self.spec.pid, "since": round(time.time(), 3)})
        txn.run(self.session, [], [tx.Put(key, value, lease=self.session.lease_id)], [],
                deadline=self.session.deadline(), read_back=txn.written(self.session, [(key, value)]))
        self.registered = True

    def _check_identity(self, parsed: st.State, rids: Sequence[ks.ResourceId]) -> None:
        where = self._where()
        if parsed.prefix != self.cfg.prefix:
            raise StaleStateError(f"state is for prefix {parsed.prefix}, this driver uses {self.cfg.prefix}")
        cluster = self._cluster()
        if parsed.cluster != cluster:
            raise StaleStateError(f"state is from etcd cluster {parsed.cluster}, this is cluster {cluster}")
        if parsed.uuid != self.spec.uuid:
            raise StaleStateError(f"state is for domain {parsed.name} ({parsed.uuid}), not {where}")
        want = {(r.rid, r.mode) for r in rids}
        have = {(r.rid, r.mode) for r in parsed.resources}
        if want != have:
            names = {r.rid: r.readable for r in rids} | {r.rid: r.res for r in parsed.resources}
            missing = sorted(names[r] for r, _ in have - want)
            extra = sorted(names[r] for r, _ in want - have)
            raise StaleStateError(f"state does not describe the resources of {where}: "
                                  f"only in state {missing}, only in object {extra}")

    def _grant(self, rids: Sequence[ks.ResourceId], resume: st.State | None) -> None:
        if not rids:
            self.holds = {}
            return
        tokens = None if resume is None else {r.rid: r.token for r in resume.resources}
        xgens = None
        if resume is not None:
            xgens = {r.rid: r.xgen for r in resume.resources}
            unknown = [r.res for r in resume.resources if r.mode == ks.SHARED and (r.xgen is None or r.xgen < 0)]
            if unknown:
                raise StaleStateError(f"cannot resume {self._where()}: the state does not record the last "
                                      f"exclusive grant of shared {', '.join(unknown)}; acquire without a state")
        grants = self._grants(rids, tokens, xgens)
        ops = txn.grant_ops(self.session, grants, uuid=self.spec.uuid, resume=resume is not None)
        self._check_size(ops, "acquire", len(grants))
        resp = self._run_grant(grants, ops)
        if not isinstance(resp, txn.Committed) and not resp.succeeded:
            holders = txn.holders_from_failure(resp.responses, [g.rid for g in grants], self.spec.uuid)
            if holders:
                raise ResourceBusyError(holders, what=f"acquire for {self._where()}")
            raise StaleStateError(
                f"cannot resume {self._where()}: another holder was granted "
                f"{', '.join(g.rid.readable for g in grants)} after the state's tokens "
                f"{sorted(tokens.values()) if tokens else []}; nothing was taken. Check the disks "
                "before acquiring without a state")
        self._commit(grants, resp)

    def _claim(self, rids: Sequence[ks.ResourceId], parsed: st.State) -> None:
        me = self.cfg.host_id
        if parsed.to != me:
            raise StaleStateError(f"handoff of {self._where()} is to host {parsed.to}, this host is {me}; "
                                  "nothing changed")
        assert parsed.marker is not None
        keys = self.session.keys
        marker_key = keys.handoff(self.spec.uuid, parsed.host)
        tokens = {r.rid: r.token for r in parsed.resources}
        grants = self._grants(rids, tokens)
        for g in grants:  # the giver's key: the same as ours (per uuid), asserted
            if g.key != keys.holder(g.rid.rid, g.rid.mode, parsed.uuid):
                raise StaleStateError(f"handoff key mismatch for {g.rid.readable}")
        ops = txn.claim_ops(self.session, grants, marker_key=marker_key, marker=parsed.marker.encode(),
                            uuid=self.spec.uuid)
        self._check_size(ops, "migration claim", len(grants))
        resp = self._run_grant(grants, ops)
        if not isinstance(resp, txn.Committed) and not resp.succeeded:
            raise StaleStateError(self._claim_failure(resp, marker_key, parsed))
        own_marker = self.marker
        self._commit(grants, resp)
        self.claimed_from = parsed.host
        if own_marker is not None:  # a handback to us: our old marker is obsolete
            self._delete_marker(own_marker)
            self.marker = None

    def _run_grant(self, grants: Sequence[txn.Grant], ops: tuple[list[Any], list[Any], list[Any]]) -> Any:
        """Send a grant or claim.  If it fails without a known outcome (etcd
        unreachable until the deadline, or the session lost meanwhile), the
        transaction may still have committed: withdraw our records in the
        background so no grant is left that nobody knows of."""
        try:
            return txn.run(self.session, *ops, deadline=self.session.deadline(),
                           read_back=txn.written(self.session, [(g.key, g.value) for g in grants]))
        except (BackendUnavailableError, LeaseLostError):
            txn.withdraw_in_background(self.session, [(g.key, g.value) for g in grants])
            raise

    def _claim_failure(self, resp: Any, marker_key: str, parsed: st.State) -> str:
        ranges = [r.response_range for r in resp.responses if r.WhichOneof("response") == "response_range"]
        marker_kv = [kv for kv in (ranges[-1].kvs if ranges else []) if kv.key.decode() == marker_key]
        head = f"cannot claim the handoff of {self._where()} from host {parsed.host}; nothing changed: "
        if not marker_kv:
            return head + ("the handoff no longer exists (cancelled, completed, or the source's lease "
                           "expired). If the source is dead its disks are free after its TTL: acquire "
                           "without a state")
        if marker_kv[0].value != parsed.marker.encode():  # type: ignore[union-attr]
            return head + "the state does not match the handoff marker in etcd (tampered or from another handoff)"
        changed = []
        for rng, res in zip(ranges[:-1], parsed.resources, strict=False):
            kvs = [kv for kv in rng.kvs if int(kv.mod_revision) != res.token]
            if kvs or not rng.kvs:
                changed.append(res.res)
        return head + (f"{', '.join(changed) or 'the resources'} changed since the handoff was prepared "
                       "(already claimed: a replayed or concurrent claim)")

    # -- release / inquire -----------------------------------------------------------

    def release(self) -> str:
        session = self.session
        session.check()
        held = list(self.holds.values())
        xgens = self._read_xgens(held)
        revision = self._delete_held(held, also_dom=self.registered)
        self.holds = {}
        self.registered = False
        return self._state(st.RESUME, held, revision, xgens=xgens)

    def _read_xgens(self, held: Sequence[Held]) -> dict[str, int]:
        """For each shared resource held: the revision of its last exclusive
        grant (0: never).  Stable while we hold it shared, since no exclusive
        grant can happen meanwhile; a resume requires it unchanged."""
        shared = [h for h in held if h.rid.mode == ks.SHARED]
        if not shared:
            return {}
        keys = self.session.keys
        gets = [tx.Get(keys.gen_key(h.rid.rid, ks.EXCLUSIVE)) for h in shared]
        resp = txn.run(self.session, [], gets, [], deadline=self.session.deadline())
        out: dict[str, int] = {}
        for h, r in zip(shared, resp.responses, strict=True):
            kvs = r.response_range.kvs
            out[h.rid.rid] = int(kvs[0].mod_revision) if kvs else 0
        return out

    def _delete_held(self, held: Sequence[Held], *, also_dom: bool) -> int:
        keys = self.session.keys
        compare = [tx.Mod(h.key) == h.token for h in held]
        success: list[Any] = [tx.Delete(h.key) for h in held]
        if also_dom:
            success.append(tx.Delete(keys.dom(self.cfg.host_id, self.spec.uuid)))
        failure = [tx.Get(h.key) for h in held]
        if not success:
            return 0
        self._check_size((compare, success, failure), "release", len(held))
        resp = txn.run(self.session, compare, success, failure, deadline=self.session.deadline(),
                       read_back=txn.deleted(self.session, [(h.key, h.token) for h in held]))
        if isinstance(resp, txn.Committed):
            return 0
        if resp.succeeded:
            return int(resp.header.revision)
        ranges = [r.response_range for r in resp.responses]
        ours = [h for h, rng in zip(held, ranges, strict=False)
                if rng.kvs and int(rng.kvs[0].mod_revision) == h.token]
        lost = [h for h in held if h not in ours]
        if ours:
            self._delete_held(ours, also_dom=also_dom)
        raise StaleStateError(
            f"release of {self._where()}: {', '.join(h.rid.readable for h in lost)} no longer held by this "
            "host (its record was replaced or expired); only this object's own records were removed")

    def held(self, resources: list[ResourceSpec]) -> list[HeldResource]:
        out: list[HeldResource] = []
        for res in resources:
            if res.readonly:
                continue
            h = self.holds.get(ks.ResourceId.of(res).rid)
            if h is not None:
                out.append(HeldResource(res.type, res.name, h.rid.readable, h.rid.mode, h.token))
        return out

    def inquire(self) -> str:
        self.session.check()
        held = list(self.holds.values())
        return self._state(st.RESUME, held, 0, xgens=self._read_xgens(held))

    # -- hotplug ---------------------------------------------------------------------

    def acquire_resource(self, resource: ResourceSpec) -> None:
        self.session.check()
        rids = self._locked([resource])
        if not rids:
            return
        for rid in rids:
            if rid.rid in self.holds:
                raise ValidationError("resource", f"{rid.readable} is already held by {self._where()}")
        previous = dict(self.holds)
        self._grant(rids, None)
        self.holds = previous | self.holds

    def release_resource(self, resource: ResourceSpec) -> None:
        self.session.check()
        rids = self._locked([resource])
        for rid in rids:
            held = self.holds.get(rid.rid)
            if held is None:
                continue
            self._delete_held([held], also_dom=False)
            del self.holds[rid.rid]

    # -- migration -------------------------------------------------------------------

    def prepare_migrate(self, dest_host: str) -> str:
        session = self.session
        session.check()
        if not self.holds:
            raise ObjectStateError(f"prepare_migrate: {self._where()} holds no locked resource")
        if dest_host == self.cfg.host_id:
            raise ValidationError("dest_host", f"{dest_host!r} is this host")
        return self._mark(dest_host)

    def _mark(self, dest_host: str) -> str:
        keys = self.session.keys
        held = list(self.holds.values())
        marker_key = keys.handoff(self.spec.uuid, self.cfg.host_id)
        marker = ks.encode({
            "from": self.cfg.host_id, "to": dest_host, "uuid": self.spec.uuid, "name": self.spec.name,
            "nonce": secrets.token_hex(16), "lease": self.session.lease_id, "since": round(time.time(), 3),
            "res": [{"res": h.rid.readable, "rid": h.rid.rid, "mode": h.rid.mode, "token": h.token} for h in held],
        })
        compare = [tx.Mod(h.key) == h.token for h in held] + [tx.Version(marker_key) == 0]
        success = [tx.Put(marker_key, marker, lease=self.session.lease_id)]
        failure = [tx.Get(marker_key)]
        self._check_size((compare, success, failure), "migration prepare", len(held))
        resp = txn.run(self.session, compare, success, failure, deadline=self.session.deadline(),
                       read_back=txn.written(self.session, [(marker_key, marker)]))
        if not isinstance(resp, txn.Committed) and not resp.succeeded:
            if resp.responses and resp.responses[0].response_range.kvs:
                raise StaleStateError(f"prepare_migrate: a handoff of {self._where()} from this host is "
                                      "already in flight; complete or cancel it first")
            raise StaleStateError(f"prepare_migrate: {self._where()} no longer holds all its records")
        revision = 0 if isinstance(resp, txn.Committed) else int(resp.header.revision)
        self.marker = (marker_key, marker)
        return self._state(st.HANDOFF, held, revision, to=dest_host, marker=marker)

    def _delete_marker(self, marker: tuple[str, bytes]) -> None:
        key, value = marker
        try:
            txn.run(self.session, [tx.Value(key) == value], [tx.Delete(key)], [],
                    deadline=self.session.deadline(), read_back=lambda _t: None)
        except LeaseLostError:
            pass

    def complete_migrate_out(self, cancel: bool) -> None:
        if self.marker is None:
            raise ObjectStateError(f"complete_migrate_out: no handoff of {self._where()} in flight")
        session = self.session
        held = list(self.holds.values())
        marker_key, marker = self.marker
        if not cancel:
            # one read-only transaction: do all our records still carry our tokens?
            unclaimed = txn.run(session, [tx.Mod(h.key) == h.token for h in held], [], [],
                                deadline=time.monotonic() + self.cfg.deadline)
            if held and unclaimed.succeeded:
                raise StaleStateError(
                    f"complete_migrate_out: the destination has not claimed {self._where()} yet; "
                    "wait for its acquire, or cancel")
            self._delete_marker(self.marker)
            self.marker = None
            self.holds = {}
            self.gone = True
            return
        session.check()
        compare = [tx.Value(marker_key) == marker] + [tx.Mod(h.key) == h.token for h in held]

        def cancelled(timeout: float) -> txn.Committed | None:
            kvs, _ = session.client.get_range(marker_key, timeout=timeout)
            return None if kvs else txn.Committed({})

        resp = txn.run(session, compare, [tx.Delete(marker_key)], [], deadline=session.deadline(),
                       read_back=cancelled)
        if isinstance(resp, txn.Committed):
            self.marker = None
            return
        if not resp.succeeded:
            raise StaleStateError(
                f"cannot cancel the migration of {self._where()}: the destination already claimed it. "
                "Reclaim with acquire(state) using the state of its complete_migrate_in(cancel=True)")
        self.marker = None

    def complete_migrate_in(self, cancel: bool) -> str | None:
        if not cancel:
            return None
        if self.claimed_from is None:
            raise ObjectStateError(f"complete_migrate_in: {self._where()} was not claimed from a handoff")
        self.session.check()
        state = self._mark(self.claimed_from)
        self.gone = True
        return state

    # -- end of life -------------------------------------------------------------

    def free(self) -> None:
        try:
            if self.fenced_reason is None and self.driver._session is not None \
                    and self.session.lost is None and not self.gone:
                if self.marker is not None:
                    self._delete_marker(self.marker)
                    self.marker = None
                if self.holds or self.registered:
                    try:
                        self._delete_held(list(self.holds.values()), also_dom=self.registered)
                    except StaleStateError as exc:
                        log.warning("free: %s", exc)
        finally:
            self.holds = {}
            self.registered = False
            self.driver._forget(self)

    def fence(self, reason: str) -> None:
        """Run the failure action if this object holds anything."""
        if self.gone or not (self.holds or self.registered or self.marker):
            return
        self.fenced_reason = reason
        action = resolve(self.action, self.cfg.default_action)
        killed = action in (FailureAction.POWEROFF, FailureAction.RESTART) and self.spec.pid is not None
        self.session.hold_revocation(self.spec.pid if killed else None)
        run_failure_action(action, self.spec, reason=reason, restart=self.cfg.restart_callback)
