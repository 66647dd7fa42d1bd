"""Re-attach a restarted process to its host's etcd lease, and re-adopt what it held.

A process that owned the host session (the agent) may die or be replaced (upgrade) while
its VMs run.  Within the TTL its lease still exists, with every record on it.  A successor
that knows the lease id and session id (the agent's state file) can continue that session
instead of starting a new one -- which would be refused anyway while the old host key lives.

Checks before anything is adopted (any failure: :class:`CannotReattach`, nothing changed):

* ``LeaseTimeToLive`` says the lease still has more than the fence margin left;
* the host key ``P/v1/hosts/<host_id>`` exists, is on that lease and names that session;
* one keepalive succeeds.  The adopted session is valid until *that keepalive's send time*
  plus the TTL it returned (the same clock rule as ``session``), and keeps itself alive and
  fences itself from then on exactly like a fresh one.

``readopt_owners`` then rebuilds the session's owner table from the records on the lease:
holder keys (``res/``), reservation/handoff markers (``handoff/``) and registrations
(``dom/``) of this host whose ``lease`` is ours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from virtlease.abi import FailureAction
from virtlease_etcd.clock import SYSTEM, Clock
from virtlease_etcd.config import EtcdConfig
from virtlease_etcd.etcd.client import LeaseNotFound
from virtlease_etcd.model import keyspace as ks

from .hostsession import HostSession
from .owners import Handoff, Held, Owner, Policy

log = logging.getLogger(__name__)


class CannotReattach(Exception):
    """The lease cannot be continued (gone, about to expire, or not this session's)."""


@dataclass(frozen=True)
class Adopted:
    """What a reattach found (for the log and the caller's checks)."""

    session: HostSession
    ttl_left: int
    """What LeaseTimeToLive reported before the adoption keepalive."""


def adopt_session(cfg: EtcdConfig, lease_id: int, session_id: str, clock: Clock = SYSTEM) -> Adopted:
    """Continue ``lease_id`` as ``session_id`` of ``cfg.host_id`` (see the module docstring).
    ``clock``: the session's clock (``HostSession``; a fake one in tests)."""
    session = HostSession(cfg, clock=clock)
    client = session.client
    try:
        # each step fails over to another member if one does not answer, within a budget the
        # guard's fence deadline leaves room for (a handover must not fail on one slow member)
        deadline = session.clock.now() + 2 * cfg.request_timeout
        ttl_left = client.retrying(lambda t: client.lease_ttl(lease_id, timeout=t), deadline=deadline)
        if ttl_left < 0:
            raise CannotReattach(f"its lease {lease_id:x} is gone from etcd (expired or revoked)")
        if ttl_left <= cfg.margin:
            raise CannotReattach(f"its lease {lease_id:x} has {ttl_left}s left, within the fence margin "
                                 f"({cfg.margin:g}s): too late to continue it")
        host_key = session.keys.host(cfg.host_id)
        kvs, _rev = client.retrying(lambda t: client.get_range(host_key, timeout=t), deadline=deadline)
        record = ks.decode(kvs[0].value, host_key) if kvs else None
        if record is None or int(kvs[0].lease) != lease_id or record.get("session") != session_id:
            raise CannotReattach(f"host key {host_key} is not on lease {lease_id:x} of session {session_id} "
                                 f"(found {record})")
        sent = 0.0  # set by the keepalive attempt that worked

        def keepalive(timeout: float) -> int:
            nonlocal sent
            sent = session.clock.now()  # the validity counts from the send of the attempt that worked
            return client.lease_keepalive(lease_id, timeout=timeout)

        try:
            ttl = client.retrying(keepalive, deadline=deadline)
        except LeaseNotFound:
            ttl = 0
        if ttl <= 0:
            raise CannotReattach(f"lease {lease_id:x} expired during the reattach")
    except CannotReattach:
        session.client.close()
        raise
    except Exception as exc:
        session.client.close()
        raise CannotReattach(f"cannot check lease {lease_id:x}: {exc}") from exc
    session.lease_id, session.ttl, session.session_id = lease_id, int(record.get("ttl", ttl)), session_id
    session.run(valid_until=sent + ttl)
    log.info("host %s: re-attached to lease %x (session %s, %ss were left)", cfg.host_id, lease_id,
             session_id, ttl_left)
    return Adopted(session, ttl_left)


def readopt_owners(session: HostSession, policy: Policy,
                   actions: dict[str, FailureAction] | None = None) -> list[Owner]:
    """Rebuild ``session.owners`` from this host's records on its lease; return the owners.
    ``actions``: each domain's resolved failure action (default: the policy's)."""
    actions = actions or {}
    timeout = session.cfg.request_timeout * 2
    host, lease = session.cfg.host_id, session.lease_id
    found: dict[str, Owner] = {}

    def owner_of(rec: dict[str, object]) -> Owner:
        uuid, name = str(rec.get("uuid")), str(rec.get("name"))
        owner = session.owners.get(uuid, name)
        owner.policy = policy
        owner.action = actions.get(uuid, policy.resolve(FailureAction.DEFAULT))
        pid = rec.get("pid")
        if owner.pid is None and isinstance(pid, int):
            owner.pid = pid
        found[uuid] = owner
        return owner

    keys = session.keys
    for prefix in (keys.res, keys.handoffs, keys.doms + host + "/"):
        kvs, _rev = session.client.get_range(prefix, ks.range_end(prefix), timeout=timeout)
        for kv in kvs:
            if int(kv.lease) != lease:
                continue
            key = kv.key.decode()
            try:
                rec = ks.decode(kv.value, key)
            except ks.ForeignValue:
                continue
            if prefix == keys.res:
                if rec.get("host") != host:
                    continue
                rid = ks.ResourceId(str(rec["kind"]), str(rec["res"]), key[len(keys.res):].split("/")[0],
                                    str(rec["mode"]), str(rec.get("identity") or ""), str(rec.get("path") or ""),
                                    None if rec.get("legacy") is None else str(rec["legacy"]))
                owner_of(rec).held[rid.rid] = Held(rid, key, int(kv.mod_revision), bytes(kv.value))
            elif prefix == keys.handoffs:
                if rec.get("from") == host:
                    owner_of(rec).handoff = Handoff(str(rec.get("to")), key, bytes(kv.value))
            else:
                owner_of(rec).registered = True
    log.info("host %s: re-adopted %d owner(s) from lease %x: %s", host, len(found), lease,
             ", ".join(f"{o.name} ({len(o.held)} held)" for o in found.values()) or "none")
    return list(found.values())
