"""The host key: one record per live session, on the session's lease.

Registering it is how a second live session with the same ``host_id`` is
refused (docs/DESIGN.md §5, rule 1); its deletion, watched by the session,
means the lease was revoked from outside.
"""

from __future__ import annotations

import os

from etcd3 import transactions as tx

from virtlease.errors import ConfigError
from virtlease_etcd.config import EtcdConfig
from virtlease_etcd.etcd.client import EtcdClient, TransientError
from virtlease_etcd.model import keyspace as ks


class HostKeyTaken(ConfigError):
    """Another live session holds this host's key; ``lease`` is its lease id (0 if unknown)."""

    def __init__(self, message: str, lease: int) -> None:
        super().__init__(message)
        self.lease = lease


def register(client: EtcdClient, keys: ks.Keys, cfg: EtcdConfig, *, lease_id: int, ttl: int,
             session_id: str, deadline: float) -> None:
    """Write this session's host record, unless another live session has one:
    then HostKeyTaken naming it (the caller revokes its fresh lease)."""
    host_key = keys.host(cfg.host_id)
    record = ks.encode({"host": cfg.host_id, "lease": lease_id, "pid": os.getpid(),
                        "ttl": ttl, "started": round(client.clock.wall(), 3), "session": session_id})

    def attempt(timeout: float) -> object:
        return client.txn([tx.Version(host_key) == 0], [tx.Put(host_key, record, lease=lease_id)],
                          [tx.Get(host_key)], timeout=timeout)

    def already(_: TransientError) -> object | None:
        kvs, _rev = client.get_range(host_key, timeout=client.attempt_timeout(deadline))
        return True if kvs and kvs[0].value == record else None

    resp = client.retrying(attempt, deadline=deadline, on_ambiguous=already)
    if resp is True or resp.succeeded:  # type: ignore[attr-defined]
        return
    kvs = resp.responses[0].response_range.kvs  # type: ignore[attr-defined]
    other = ks.decode(kvs[0].value, host_key) if kvs else {}
    lease = other.get("lease")
    raise HostKeyTaken(
        f"host_id: {cfg.host_id!r} already has a live session (pid {other.get('pid')}, "
        f"lease {lease}); host_id must be unique per host. If that host died, "
        f"its lease expires within {other.get('ttl', cfg.ttl)} s",
        lease if isinstance(lease, int) else 0,
    )
