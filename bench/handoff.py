"""Handoff: migration latency for 1..63 disks (a claim deletes the marker too: 2 ops per disk + 1).

Timed: ``prepare_migrate`` on the source plus ``acquire(state)`` of the
destination's ``NewFlags.MIGRATE`` object (the claim).  The completions
(``complete_migrate_out`` on the source, ``complete_migrate_in`` on the
destination) are timed apart; object creation is not timed."""

from __future__ import annotations

import time
from typing import Any

from cluster import Cluster
from contenders import disk_paths, vm_uuid
from measure import Latency, progress
from plan import Plan
from virtlease import NewFlags, Plugin, ResourceType


def _object(plugin: Plugin, run_id: str, index: int, disks: int, flags: NewFlags) -> Any:
    obj = plugin.new_object(uuid=vm_uuid(run_id, "ho", index), name=f"ho-vm{index}", flags=flags)
    for path in disk_paths(run_id, "ho", index, disks):
        obj.add_resource(ResourceType.DISK, path)
    return obj


def handoff(cluster: Cluster, plan: Plan) -> list[dict[str, Any]]:
    src = cluster.load("ho-src")
    dst = cluster.load("ho-dst")
    dst_host = cluster.host_name("ho-dst")
    rows: list[dict[str, Any]] = []
    try:
        for disks in plan.handoff_disks:
            prep: list[float] = []
            claim: list[float] = []
            total: list[float] = []
            out: list[float] = []
            end = time.monotonic() + plan.handoff_budget
            i = 0
            while i < plan.handoff_max_n and (i < 10 or time.monotonic() < end):
                index = disks * 100_000 + i
                source = _object(src, cluster.run_id, index, disks, NewFlags(0))
                source.acquire()
                dest = _object(dst, cluster.run_id, index, disks, NewFlags.MIGRATE)
                t0 = time.perf_counter()
                state = source.prepare_migrate(dst_host)
                t1 = time.perf_counter()
                dest.acquire(state)
                t2 = time.perf_counter()
                source.complete_migrate_out()
                t3 = time.perf_counter()
                dest.complete_migrate_in()
                if i >= 2:  # the first two are warm-up
                    prep.append(t1 - t0)
                    claim.append(t2 - t1)
                    total.append(t2 - t0)
                    out.append(t3 - t2)
                dest.release()
                dest.free()
                source.free()
                i += 1
            lat = {"handoff": Latency.of(total), "prepare": Latency.of(prep), "claim": Latency.of(claim),
                   "complete_out": Latency.of(out)}
            row: dict[str, Any] = {"disks": disks, **{k: x.as_dict() for k, x in lat.items()}}
            progress(f"handoff {disks:>2} disks: p50 {lat['handoff'].p50_ms:.2f} ms "
                     f"(prepare {lat['prepare'].p50_ms:.2f} + claim {lat['claim'].p50_ms:.2f}), "
                     f"complete_out {lat['complete_out'].p50_ms:.2f} ms (n={len(total)})")
            rows.append(row)
    finally:
        for plugin in (src, dst):
            for obj in plugin.objects:
                obj.free()
            plugin.driver.release_all()
            plugin.unload()
    return rows
