"""The host key: one record per live session, on the session's lease.

Registering it is how a second live session with the same ``host_id`` is
refused (docs/DESIGN.md §5, rule 1); its deletion, watched by the session,
means the lease was revoked from outside.  It is written like every other
record of the driver: one transaction through ``writes.run`` (retries, lease
check, a lost reply resolved by reading the record back).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from etcd3 import transactions as tx

from virtlease.errors import ConfigError
from virtlease_etcd.model import keyspace as ks

from . import writes

if TYPE_CHECKING:
    from .hostsession import HostSession


class HostKeyTaken(ConfigError):
    """Another live session holds this host's key; ``lease`` is its lease id (0 if unknown)."""

    def __init__(self, message: str, lease: int) -> None:
        super().__init__(message)
        self.lease = lease


def register(session: HostSession, *, deadline: float) -> None:
    """Write ``session``'s host record on its lease, unless another live session has one:
    then HostKeyTaken naming it (the caller revokes its fresh lease)."""
    cfg = session.cfg
    host_key = session.keys.host(cfg.host_id)
    record = ks.encode({"host": cfg.host_id, "lease": session.lease_id, "pid": os.getpid(),
                        "ttl": session.ttl, "started": round(session.clock.wall(), 3),
                        "session": session.session_id})
    outcome = writes.run(session, [tx.Version(host_key) == 0], [tx.Put(host_key, record, lease=session.lease_id)],
                         [tx.Get(host_key)], deadline=deadline,
                         read_back=writes.written(session, [(host_key, record)]))
    if outcome.succeeded:
        return
    kvs = outcome.responses[0].response_range.kvs
    other = ks.decode(kvs[0].value, host_key) if kvs else {}
    lease = other.get("lease")
    raise HostKeyTaken(
        f"host_id: {cfg.host_id!r} already has a live session (pid {other.get('pid')}, "
        f"lease {lease}); host_id must be unique per host. If that host died, "
        f"its lease expires within {other.get('ttl', cfg.ttl)} s",
        lease if isinstance(lease, int) else 0,
    )
