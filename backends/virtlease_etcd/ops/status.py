"""The cluster as virtlease sees it: hosts, held resources, handoffs.

One range read per key family (all at one revision would need a txn; the
reads are for display and tests, never for a locking decision).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from virtlease_etcd import clock
from virtlease_etcd.etcd.client import EtcdClient
from virtlease_etcd.model import keyspace as ks


@dataclass(frozen=True)
class HostInfo:
    host: str
    lease: int
    ttl_left: int
    """Seconds etcd still grants the host's lease (-1: gone)."""
    pid: int | None
    started: float


@dataclass(frozen=True)
class HeldInfo:
    resource: str
    kind: str
    mode: str
    host: str
    domain_name: str
    domain_uuid: str
    token: int
    since: float
    lease: int
    handoff_to: str | None = None
    identity: str = ""
    """A disk's identity key (``path://...``: this host's path only); empty for a lease."""


@dataclass(frozen=True)
class HandoffInfo:
    domain_name: str
    domain_uuid: str
    from_host: str
    to_host: str
    resources: list[str]
    since: float
    claimed: bool
    """True once the destination took the records (the source has not yet
    completed and removed its marker)."""


@dataclass(frozen=True)
class DomainInfo:
    host: str
    domain_name: str
    domain_uuid: str
    pid: int | None
    since: float


@dataclass
class ClusterStatus:
    revision: int
    hosts: list[HostInfo] = field(default_factory=list)
    resources: list[HeldInfo] = field(default_factory=list)
    handoffs: list[HandoffInfo] = field(default_factory=list)
    domains: list[DomainInfo] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Keys under the prefix that are not virtlease records of this format."""

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON; lease ids as hex strings, as every virtlease output prints them."""
        data = asdict(self)
        for row in (*data["hosts"], *data["resources"]):
            row["lease"] = f"{row['lease']:x}"
        return data

    def holder_of(self, resource: str) -> list[HeldInfo]:
        return [r for r in self.resources if r.resource == resource]


def read_status(client: EtcdClient, keys: ks.Keys, *, timeout: float) -> ClusterStatus:
    """Read everything under the prefix; transient errors are retried until
    ``timeout``, then BackendUnavailableError."""
    deadline = clock.now() + timeout
    return client.retrying(lambda _t: _read(client, keys, deadline), deadline=deadline)


def _read(client: EtcdClient, keys: ks.Keys, deadline: float) -> ClusterStatus:
    kvs, revision = client.get_range(keys.root, ks.range_end(keys.root),
                                     timeout=client.attempt_timeout(deadline))
    status = ClusterStatus(revision=revision)
    handoff_recs: list[dict[str, Any]] = []
    tokens: dict[str, int] = {}
    for kv in kvs:
        key = kv.key.decode(errors="replace")
        try:
            rec = ks.decode(kv.value, key)
        except ks.ForeignValue as exc:
            status.problems.append(str(exc))
            continue
        if key.startswith(keys.hosts):
            ttl = client.lease_ttl(int(kv.lease), timeout=client.attempt_timeout(deadline)) if kv.lease else -1
            status.hosts.append(HostInfo(host=str(rec.get("host")), lease=int(kv.lease), ttl_left=ttl,
                                         pid=rec.get("pid"), started=float(rec.get("started") or 0)))
        elif key.startswith(keys.res):
            if rec.get("legacy") is not None:
                continue  # a disk's legacy path key: its identity key's record names it
            tokens[f"{rec.get('uuid')}|{rec.get('res')}"] = int(kv.mod_revision)
            status.resources.append(HeldInfo(
                resource=str(rec.get("res")), kind=str(rec.get("kind")), mode=str(rec.get("mode")),
                host=str(rec.get("host")), domain_name=str(rec.get("name")), domain_uuid=str(rec.get("uuid")),
                token=int(kv.mod_revision), since=float(rec.get("since") or 0), lease=int(kv.lease),
                identity=str(rec.get("identity") or "")))
        elif key.startswith(keys.handoffs):
            handoff_recs.append(rec)
        elif key.startswith(keys.doms):
            status.domains.append(DomainInfo(host=str(rec.get("host")), domain_name=str(rec.get("name")),
                                             domain_uuid=str(rec.get("uuid")), pid=rec.get("pid"),
                                             since=float(rec.get("since") or 0)))
    pending: dict[tuple[str, str, str], str] = {}  # (uuid, giver, resource) -> to: what a marker lists
    for rec in handoff_recs:
        res = [r for r in rec.get("res") or [] if r.get("legacy") is None]  # a legacy key: its disk is listed
        claimed = any(tokens.get(f"{rec.get('uuid')}|{r.get('res')}") != r.get("token") for r in res)
        if not claimed:
            for r in res:
                pending[(str(rec.get("uuid")), str(rec.get("from")), str(r.get("res")))] = str(rec.get("to"))
        status.handoffs.append(HandoffInfo(
            domain_name=str(rec.get("name")), domain_uuid=str(rec.get("uuid")), from_host=str(rec.get("from")),
            to_host=str(rec.get("to")), resources=[str(r.get("res")) for r in res],
            since=float(rec.get("since") or 0), claimed=claimed))
    status.resources = [
        HeldInfo(**{**asdict(r), "handoff_to": pending.get((r.domain_uuid, r.host, r.resource))})
        for r in status.resources
    ]
    return status
