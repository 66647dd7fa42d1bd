"""What every lock operation of one domain needs: its owner, names, records,
state strings, and the one grant runner (docs/DESIGN.md "Grants").

``Domain`` binds a lock object's spec to its host session, the driver
instance's policy and configuration.  ``run_grant`` is the *commit* step of
the grant pipeline (``plan``): it sends the transaction ``plan.decide`` makes
of what is asked, with a fresh grant id per attempt, and recognises its own earlier attempts:
a lost reply is resolved by reading back every attempt's records, and a
retry that meets a record of an earlier attempt (which committed after the
read-back) adopts it instead of reporting the caller's own domain as busy.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from virtlease.abi import ObjectSpec, ResourceSpec
from virtlease.errors import BackendUnavailableError, LeaseLostError, ObjectStateError, ValidationError
from virtlease_etcd.config import EtcdConfig
from virtlease_etcd.fence.errors import FencingError
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.model import statestring as st
from virtlease_etcd.session.hostsession import HostSession
from virtlease_etcd.session.owners import Held, Owner, Policy

from . import plan
from . import transactions as txn
from .disks import DiskNames

log = logging.getLogger(__name__)

Ops = tuple[list[Any], list[Any], list[Any]]


@dataclass(frozen=True)
class GrantResult:
    """A grant or claim's outcome: committed (``grants`` with ``tokens``) or the
    failed response, with conflicting records of our own attempts removed."""

    committed: bool
    grants: tuple[plan.Grant, ...]
    tokens: dict[str, int]
    response: Any = None


class Domain:
    """One domain's view of its host session (a lock object's working context)."""

    def __init__(self, session: HostSession, cfg: EtcdConfig, policy: Policy, spec: ObjectSpec,
                 names: DiskNames) -> None:
        self.session = session
        self.names = names
        """The driver instance's disk namer (one resolver, not one per disk)."""
        self.cfg = cfg
        self.policy = policy
        self.spec = spec
        self.host = session.cfg.host_id
        self.keys = session.keys
        self._paths: dict[str, str] = {}
        """The caller's path of each disk ``locked`` named, by rid (storage fencing)."""

    # -- names -------------------------------------------------------------------

    def where(self) -> str:
        return f"domain {self.spec.name} ({self.spec.uuid})"

    def cluster(self) -> str:
        cid = self.session.client.cluster_id
        return f"{cid:x}" if cid else "unknown"

    def owner(self) -> Owner:
        return self.session.owners.get(self.spec.uuid, self.spec.name)

    def locked(self, resources: Sequence[ResourceSpec]) -> list[ks.ResourceId]:
        """The keys of the resources that take a lock (readonly ones do not),
        each once: a disk's identity key, then its legacy path key if any
        (``ResourceId.legacy_of`` set).  This is the one place disks get
        their identity."""
        seen: dict[str, str] = {}
        out: list[ks.ResourceId] = []
        locking = [res for res in resources if not res.readonly]  # readonly: not locked (as lockd, sanlock)
        for res, ids in zip(locking, self.names.ids_many(locking), strict=True):
            for rid in ids:
                if rid.rid in seen:
                    raise ValidationError("resource", f"{res.name!r} and {seen[rid.rid]!r} are the same "
                                          f"resource ({rid.readable}) of {self.where()}")
                seen[rid.rid] = res.name
                out.append(rid)
                if rid.kind == "disk":
                    self._paths[rid.rid] = res.name
        return out

    def disk_paths(self, rids: Iterable[ks.ResourceId]) -> list[str]:
        """This host's paths of the disks among ``rids`` (each once): what storage fencing
        maps to LUNs.  A claimed record names no path; the path ``locked`` saw is used."""
        out: list[str] = []
        for rid in rids:
            path = (rid.path or self._paths.get(rid.rid, "")) if rid.kind == "disk" and rid.legacy_of is None else ""
            if path and path not in out:
                out.append(path)
        return out

    def secure_storage(self, rids: Iterable[ks.ResourceId]) -> None:
        """Storage fencing before a grant is reported (``HostSession.secure_storage``): also
        for a disk the owner already holds, e.g. one a migration claim took with another."""
        self.session.secure_storage(self.disk_paths(rids))

    def refuse_if_migrating(self, owner: Owner, call: str) -> None:
        if owner.handoff is not None:
            raise ObjectStateError(
                f"{call}: {self.where()} is being handed to host {owner.handoff.to}; complete or cancel "
                "the migration first (or reclaim with the handback state)")

    # -- records and states ----------------------------------------------------------

    def record(self, rid: ks.ResourceId, grant: str) -> bytes:
        return ks.encode(ks.holder_record(
            rid, host=self.host, lease=self.session.lease_id, uuid=self.spec.uuid,
            name=self.spec.name, pid=self.spec.pid, since=self.session.clock.wall(), grant=grant))

    def writer(self) -> plan.Writer:
        """Who writes this domain's records (the pure grant core's context)."""
        return plan.Writer(self.keys, self.host, self.spec.uuid, self.session.lease_id)

    def state(self, kind: str, held: Sequence[Held], revision: int, *, to: str | None = None,
              marker: bytes | None = None, xgens: Mapping[str, int] | None = None) -> str:
        xg = xgens or {}
        return st.State(
            kind=kind, cluster=self.cluster(), prefix=self.cfg.prefix, host=self.host,
            uuid=self.spec.uuid, name=self.spec.name,
            resources=tuple(st.StateResource(h.rid.kind, h.rid.readable, h.rid.rid, h.rid.mode, h.token,
                                             xg.get(h.rid.rid), h.rid.legacy_of) for h in held),
            revision=revision, to=to, marker=None if marker is None else marker.decode(),
        ).encode()

    def check_size(self, ops: Ops, what: str, n: int) -> None:
        txn.check_size([len(x) for x in ops], self.cfg.max_txn_ops, what, n,
                       legacy=self.cfg.legacy_path_keys)

    # -- granting ----------------------------------------------------------------------

    def run_grant(self, ask: plan.Ask, what: str) -> GrantResult:
        """Send the transaction :func:`plan.decide` makes of ``ask`` until it has a known
        outcome, a new grant id per attempt.  If the outcome stays unknown (etcd unreachable
        until the deadline, or the session lost meanwhile), every attempt's records are
        withdrawn in the background, so no grant is left that nobody knows of."""
        session = self.session
        session.before_grant()
        sent: list[tuple[plan.Grant, ...]] = []

        def attempt(timeout: float) -> GrantResult:
            session.check()
            grant_id = secrets.token_hex(8)  # one fresh grant id for all of this attempt's records
            t = plan.decide(self.writer(), ask, {rid.rid: self.record(rid, grant_id) for rid in ask.rids})
            grants = t.grants
            ops = t.ops()
            if not sent:
                self.check_size(ops, what, len({g.rid.primary for g in grants}))
            sent.append(grants)
            resp = txn.lease_checked(session, lambda: session.client.txn(*ops, timeout=timeout))
            if resp.succeeded:
                return GrantResult(True, grants, {g.key: int(resp.header.revision) for g in grants})
            return self._own_attempt(sent, resp) or GrantResult(False, grants, {}, resp)

        def read_back(_exc: Exception) -> GrantResult | None:
            for grants in sent:
                found = txn.written(session, [(g.key, g.value) for g in grants])(
                    session.client.attempt_timeout(session.deadline()))
                if found is not None:
                    log.info("lost reply resolved by read-back: the %s had committed", what)
                    return GrantResult(True, grants, dict(found.revisions))
            return None

        try:
            return session.client.retrying(attempt, deadline=min(session.deadline(), session.fence_at),
                                           on_ambiguous=read_back)
        except (BackendUnavailableError, LeaseLostError):
            for grants in sent:
                txn.withdraw_in_background(session, [(g.key, g.value) for g in grants])
            raise

    @staticmethod
    def _own_attempt(sent: Sequence[Sequence[plan.Grant]], resp: Any) -> GrantResult | None:
        """A failed attempt that met every record of one of our earlier attempts:
        that attempt committed after its read-back.  Adopt it."""
        ranges = [r.response_range for r in resp.responses if r.WhichOneof("response") == "response_range"]
        seen = {kv.key.decode(): (kv.value, int(kv.mod_revision)) for rng in ranges for kv in rng.kvs}
        for grants in sent[:-1]:
            found = {g.key: seen[g.key][1] for g in grants if seen.get(g.key, (None, 0))[0] == g.value}
            if found and len(found) == len(grants):
                log.info("a retried grant met its own earlier attempt, which had committed: adopted")
                return GrantResult(True, tuple(grants), found)
        return None

    def commit(self, owner: Owner, result: GrantResult) -> None:
        """Record a committed grant on the owner, then close the fence race: if
        the session was lost while the reply was in flight, the fence may have
        run before these records were known, so fence now and fail."""
        for g in result.grants:
            owner.held[g.rid.rid] = Held(g.rid, g.key, result.tokens[g.key], g.value)
        session = self.session
        if session.lost is not None or session.clock.now() >= session.fence_at:
            session.fence(owner, session.lost or "fence deadline passed while the grant was in flight")
            session.check()
        try:
            self.secure_storage(g.rid for g in result.grants)
        except FencingError:
            for g in result.grants:  # not reported: the grant is withdrawn (its records, by value)
                owner.held.pop(g.rid.rid, None)
            txn.withdraw_in_background(session, [(g.key, g.value) for g in result.grants])
            raise

    def adopt_policy(self, owner: Owner, action: Any) -> None:
        """Before a grant (a fence racing its reply must use these)."""
        owner.action = self.policy.resolve(action)
        owner.policy = self.policy
        owner.name = self.spec.name
        if self.spec.pid is not None:
            owner.pid = self.spec.pid
