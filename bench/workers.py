"""Subprocess entry points: a host holding many VMs (scale), a holder to be
``kill -9``-ed (failover).  Run as ``python bench/workers.py KIND JSON``;
they talk to the harness with one JSON object per line on stdout and read
commands (``go``, ``release``) from stdin."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from cluster import Cluster
from contenders import disk_paths, vm_uuid
from measure import proc_status_kib
from virtlease import LockObject, ResourceType


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def expect(word: str) -> None:
    line = sys.stdin.readline().strip()
    if line != word:
        raise SystemExit(f"worker: expected {word!r}, got {line!r}")


def scale_holder(cfg: dict[str, Any]) -> None:
    cluster = Cluster(endpoint=cfg["endpoint"], run_id=cfg["run_id"])
    plugin = cluster.load(cfg["host"], ttl=cfg["ttl"])
    say(event="ready", rss_kib=proc_status_kib())
    expect("go")
    objects: list[LockObject] = []
    start = time.perf_counter()
    for index in range(cfg["first"], cfg["first"] + cfg["count"]):
        obj = plugin.new_object(uuid=vm_uuid(cfg["run_id"], "scale", index), name=f"scale-vm{index}")
        for path in disk_paths(cfg["run_id"], "scale", index, cfg["disks"]):
            obj.add_resource(ResourceType.DISK, path)
        obj.acquire()
        objects.append(obj)
    acquired = time.perf_counter() - start
    say(event="held", seconds=acquired, rss_kib=proc_status_kib(), hwm_kib=proc_status_kib("VmHWM"),
        lost=plugin.driver.session.lost)
    expect("release")
    start = time.perf_counter()
    for obj in objects:
        obj.release()
        obj.free()
    say(event="released", seconds=time.perf_counter() - start)
    plugin.unload()


def failover_holder(cfg: dict[str, Any]) -> None:
    cluster = Cluster(endpoint=cfg["endpoint"], run_id=cfg["run_id"])
    plugin = cluster.load(cfg["host"], ttl=cfg["ttl"])
    obj = plugin.new_object(uuid=vm_uuid(cfg["run_id"], cfg["tag"], 0), name=f"{cfg['tag']}-vm")
    for path in disk_paths(cfg["run_id"], cfg["tag"], 0, cfg["disks"]):
        obj.add_resource(ResourceType.DISK, path)
    obj.acquire()
    say(event="ready")
    sys.stdin.readline()  # held until killed (or told to stop)


if __name__ == "__main__":
    kind, raw = sys.argv[1], sys.argv[2]
    {"scale-holder": scale_holder, "failover-holder": failover_holder}[kind](json.loads(raw))
