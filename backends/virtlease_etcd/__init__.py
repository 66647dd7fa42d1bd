"""The ``etcd`` lock driver: cluster-wide VM disk leases kept in etcd.

Status: the product's main driver.  Load it through the core::

    plugin = virtlease.load_driver("etcd", config={
        "endpoints": "10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379",
        "host_id": "hv-07", "ttl": 10})

Safety model (DESIGN.md): one etcd lease per host session; every held key on
it; self-fencing before the lease can expire elsewhere (``session``); all of
a VM's resources in one transaction (``transactions``); fencing tokens =
grant revisions (``keyspace``); mark-then-claim migration handoff
(``driver``).  Configuration: ``config``.
"""

# First, before anything imports grpc: its C core reads its log settings once, at import.
from .etcd import grpclog as grpclog

# isort: split
from virtlease_etcd.ops.status import ClusterStatus, read_status

from .config import EtcdConfig, load_config
from .driver import EtcdDriver, EtcdObject

LOCK_DRIVER = EtcdDriver

__all__ = ["LOCK_DRIVER", "ClusterStatus", "EtcdConfig", "EtcdDriver", "EtcdObject", "load_config", "read_status"]
