"""Subprocess entry point: a holder to be ``kill -9``-ed (failover).  Started by
``subprocs.WorkerProc`` over the JSON-lines wire (``virtlease_etcd.devtools.jsonwire``): the
configuration (with ``kind``) is the first stdin line; the worker says hello when ready.  (The
scale section's workers are ``scale/worker.py``.)"""

from __future__ import annotations

from typing import Any

from cluster import Cluster
from contenders import disk_paths, vm_uuid
from virtlease import ResourceType
from virtlease_etcd.devtools.jsonwire import Replier


def failover_holder(wire: Replier, cfg: dict[str, Any]) -> None:
    cluster = Cluster(endpoint=cfg["endpoint"], run_id=cfg["run_id"])
    plugin = cluster.load(cfg["host"], ttl=cfg["ttl"])
    obj = plugin.new_object(uuid=vm_uuid(cfg["run_id"], cfg["tag"], 0), name=f"{cfg['tag']}-vm")
    for path in disk_paths(cfg["run_id"], cfg["tag"], 0, cfg["disks"]):
        obj.add_resource(ResourceType.DISK, path)
    obj.acquire()
    wire.send({"ready": True})
    for _cmd in wire.commands():  # held until killed (or stdin closes)
        pass


if __name__ == "__main__":
    replier = Replier()
    config = replier.config()
    {"failover-holder": failover_holder}[config["kind"]](replier, config)
