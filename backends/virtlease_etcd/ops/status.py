"""The cluster as virtlease sees it: hosts, held resources, handoffs.

Everything under the prefix but the ``gen`` records (bookkeeping of past grants, one per disk
ever locked: never shown), read *as of one revision* in pages of ``PAGE_KEYS`` keys: a
thousand hosts hold some 40,000 records, far more than one gRPC reply (4 MiB) carries.  A
page gRPC refuses as too large is asked again in halves; a revision compacted away during
the read starts it again.  Each host's lease TTL is looked up concurrently.  The reads are
for display and tests, never for a locking decision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from virtlease.errors import BackendUnavailableError
from virtlease_etcd.etcd.client import EtcdClient, ReplyTooLarge, RevisionCompacted
from virtlease_etcd.model import keyspace as ks

T = TypeVar("T")

PAGE_KEYS = 1000
"""Keys per range request (about 0.4 MB of typical records)."""
TTL_LOOKUPS = 16
"""Lease TTL lookups in flight at once (one per live host), while the records are read."""
READ_ATTEMPTS = 3
"""Reads started again after the revision was compacted away mid-read."""


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
        """Plain dicts and lists for JSON (what ``dataclasses.asdict`` gives, without its deep
        copies: 3x faster for a thousand hosts' 40,000 records); lease ids as hex strings, as
        every virtlease output prints them."""
        return {"revision": self.revision, "hosts": [{**vars(h), "lease": f"{h.lease:x}"} for h in self.hosts],
                "resources": [{**vars(r), "lease": f"{r.lease:x}"} for r in self.resources],
                "handoffs": [{**vars(m), "resources": list(m.resources)} for m in self.handoffs],
                "domains": [dict(vars(d)) for d in self.domains], "problems": list(self.problems)}

    def holder_of(self, resource: str) -> list[HeldInfo]:
        return [r for r in self.resources if r.resource == resource]


def read_status(client: EtcdClient, keys: ks.Keys, *, timeout: float) -> ClusterStatus:
    """Read everything under the prefix (but ``gen``) as of one revision.  Each request is
    retried on transient errors for up to ``timeout`` seconds, then BackendUnavailableError;
    a read that goes on answering is not cut short however many pages it takes."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return _read(client, keys, timeout)
        except RevisionCompacted as exc:
            if attempt == READ_ATTEMPTS:
                raise BackendUnavailableError(
                    f"etcd compacted the revision being read {READ_ATTEMPTS} times in a row ({exc})",
                    hint="compaction runs more often than a status read takes; retry, or compact less often") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _request(client: EtcdClient, fn: Callable[[float], T], timeout: float) -> T:
    """One request, retried on transient errors for up to ``timeout`` seconds."""
    return client.retrying(fn, deadline=client.clock.now() + timeout)


def _scan(client: EtcdClient, start: str, end: str, revision: int, timeout: float) -> Iterator[tuple[Any, int]]:
    """Every KeyValue in [start, end) as of ``revision`` (0: the newest; every later page reads
    the revision the first one saw), page by page, each with the revision read."""
    key: bytes = start.encode()
    limit = PAGE_KEYS
    while True:
        def page(t: float, key: bytes = key, limit: int = limit, rev: int = revision) -> tuple[list[Any], int, bool]:
            return client.get_page(key, end, limit=limit, revision=rev, timeout=t)

        try:
            kvs, read, more = _request(client, page, timeout)
        except ReplyTooLarge:
            if limit == 1:
                raise
            limit = max(1, limit // 2)
            continue
        revision = revision or read
        for kv in kvs:
            yield kv, revision
        if not more or not kvs:
            return
        key = kvs[-1].key + b"\0"


def _read(client: EtcdClient, keys: ks.Keys, timeout: float) -> ClusterStatus:
    with ThreadPoolExecutor(max_workers=TTL_LOOKUPS, thread_name_prefix="virtlease-ttl") as pool:
        return _read_with(client, keys, timeout, pool)


def _read_with(client: EtcdClient, keys: ks.Keys, timeout: float, pool: ThreadPoolExecutor) -> ClusterStatus:
    """The read; each host's lease TTL is looked up in ``pool`` while the pages after the
    host keys (``res/``) are read."""
    status = ClusterStatus(revision=0)
    handoff_recs: list[dict[str, Any]] = []
    host_recs: list[tuple[dict[str, Any], int, Future[int] | None]] = []
    tokens: dict[str, int] = {}

    def ttl(lease: int) -> int:
        return _request(client, lambda t: client.lease_ttl(lease, timeout=t), timeout)

    # the prefix in two ranges around gen/: ``root`` < ``dom`` < ``gen`` < ``handoff`` < ``hosts`` < ``res``
    ranges = ((keys.root, keys.gen), (ks.range_end(keys.gen), ks.range_end(keys.root)))
    for start, end in ranges:
        for kv, revision in _scan(client, start, end, status.revision, timeout):
            status.revision = revision
            key = kv.key.decode(errors="replace")
            try:
                rec = ks.decode(kv.value, key)
            except ks.ForeignValue as exc:
                status.problems.append(str(exc))
                continue
            if key.startswith(keys.hosts):
                lease = int(kv.lease)
                host_recs.append((rec, lease, pool.submit(ttl, lease) if lease else None))
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
    for rec, lease, left in host_recs:
        status.hosts.append(HostInfo(host=str(rec.get("host")), lease=lease, ttl_left=left.result() if left else -1,
                                     pid=rec.get("pid"), started=float(rec.get("started") or 0)))
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
    if pending:
        status.resources = [
            replace(r, handoff_to=to) if (to := pending.get((r.domain_uuid, r.host, r.resource))) else r
            for r in status.resources
        ]
    return status
