"""Subprocess entry points: a host holding many VMs (scale), a holder to be ``kill -9``-ed
(failover).  Started by ``subprocs.WorkerProc`` over the JSON-lines wire
(``virtlease_etcd.devtools.jsonwire``): the configuration (with ``kind``) is the first stdin
line; the worker says hello when ready, then answers ``go`` and ``release`` (scale)."""

from __future__ import annotations

import time
from typing import Any

from cluster import Cluster
from contenders import disk_paths, vm_uuid
from measure import proc_status_kib
from virtlease import LockObject, ResourceType
from virtlease_etcd.devtools.jsonwire import Replier


def scale_holder(wire: Replier, cfg: dict[str, Any]) -> None:
    cluster = Cluster(endpoint=cfg["endpoint"], run_id=cfg["run_id"])
    plugin = cluster.load(cfg["host"], ttl=cfg["ttl"])
    wire.send({"ready": True, "rss_kib": proc_status_kib()})
    objects: list[LockObject] = []
    for cmd in wire.commands():
        if cmd["op"] == "go":
            start = time.perf_counter()
            for index in range(cfg["first"], cfg["first"] + cfg["count"]):
                obj = plugin.new_object(uuid=vm_uuid(cfg["run_id"], "scale", index), name=f"scale-vm{index}")
                for path in disk_paths(cfg["run_id"], "scale", index, cfg["disks"]):
                    obj.add_resource(ResourceType.DISK, path)
                obj.acquire()
                objects.append(obj)
            acquired = time.perf_counter() - start
            wire.send({"seconds": acquired, "rss_kib": proc_status_kib(), "hwm_kib": proc_status_kib("VmHWM"),
                       "lost": plugin.driver.session.lost}, cmd["seq"])
        elif cmd["op"] == "release":
            start = time.perf_counter()
            for obj in objects:
                obj.release()
                obj.free()
            wire.send({"seconds": time.perf_counter() - start}, cmd["seq"])
            break
    plugin.unload()


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
    {"scale-holder": scale_holder, "failover-holder": failover_holder}[config["kind"]](replier, config)
