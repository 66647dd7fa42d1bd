"""Subprocess entry point: a holder to be ``kill -9``-ed (failover).  Run as
``python bench/workers.py KIND JSON``; it talks to the harness with one JSON
object per line on stdout.  (The scale section's workers are ``scale/worker.py``.)"""

from __future__ import annotations

import json
import sys
from typing import Any

from cluster import Cluster
from contenders import disk_paths, vm_uuid
from virtlease import ResourceType


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


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
    {"failover-holder": failover_holder}[kind](json.loads(raw))
