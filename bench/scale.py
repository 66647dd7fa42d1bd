"""Scale: many VMs held across several host sessions, one process per host.

Each host process loads its own driver (its own host session), then on a
common signal acquires its share of the VMs one after another; we time the
whole acquisition, read each process's RSS before and while holding, and
etcd's database size, then release everything."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cluster import Cluster
from measure import progress
from plan import Plan
from subprocs import WorkerProc


def scale(cluster: Cluster, plan: Plan) -> dict[str, Any]:
    hosts, vms, disks = plan.scale_hosts, plan.scale_vms, plan.scale_disks
    db_before, keys_before, live_before = cluster.db_size()
    share = [vms // hosts + (1 if i < vms % hosts else 0) for i in range(hosts)]
    first = [sum(share[:i]) for i in range(hosts)]
    procs = [WorkerProc("scale-holder", {"endpoint": cluster.endpoint, "run_id": cluster.run_id,
                                         "host": f"scale-h{i}", "ttl": plan.lock_ttl, "first": first[i],
                                         "count": share[i], "disks": disks}) for i in range(hosts)]
    try:
        ready = [p.hello() for p in procs]
        progress(f"scale: {hosts} host processes ready; acquiring {vms} VMs x {disks} disks")
        with ThreadPoolExecutor(len(procs)) as pool:  # every host acquires its share at once
            start = time.perf_counter()
            held = list(pool.map(lambda p: p.call("go"), procs))
            wall = time.perf_counter() - start
        db_held, keys_held, live_held = cluster.db_size()
        progress(f"scale: {vms} VMs held after {wall:.1f} s; db {db_held / 2**20:.1f} MiB")
        with ThreadPoolExecutor(len(procs)) as pool:
            start = time.perf_counter()
            released = list(pool.map(lambda p: p.call("release"), procs))
            release_wall = time.perf_counter() - start
        db_after, keys_after, live_after = cluster.db_size()
        for p in procs:
            p.wait()
    finally:
        for p in procs:
            p.kill()
    per_proc = []
    for i, (r, h, rel) in enumerate(zip(ready, held, released, strict=True)):
        delta = h["rss_kib"] - r["rss_kib"]
        per_proc.append({"host": i, "vms": share[i], "rss_ready_kib": r["rss_kib"], "rss_held_kib": h["rss_kib"],
                         "hwm_kib": h["hwm_kib"], "rss_delta_kib": delta,
                         "kib_per_vm": round(delta / share[i], 2) if share[i] else None,
                         "acquire_s": round(h["seconds"], 3), "release_s": round(rel["seconds"], 3),
                         "session_lost": h["lost"]})
    rss_held = [p["rss_held_kib"] for p in per_proc]
    result = {
        "hosts": hosts, "vms": vms, "disks_per_vm": disks, "acquire_wall_s": round(wall, 3),
        "vms_per_s": round(vms / wall, 1), "release_wall_s": round(release_wall, 3),
        "rss_held_kib_mean": round(sum(rss_held) / hosts), "rss_held_kib_max": max(rss_held),
        "rss_ready_kib_mean": round(sum(p["rss_ready_kib"] for p in per_proc) / hosts),
        "kib_per_vm_mean": round(sum(p["rss_delta_kib"] for p in per_proc) / vms, 2),
        "db_size_before": db_before, "db_size_held": db_held,
        "keys_before": keys_before, "keys_held": keys_held, "live_bytes_before": live_before,
        "live_bytes_held": live_held, "db_size_released": db_after, "keys_released": keys_after,
        "live_bytes_released": live_after, "live_bytes_per_disk": round((live_held - live_before) / (vms * disks), 1),
        "processes": per_proc,
    }
    progress(f"scale: released in {release_wall:.1f} s; RSS held {result['rss_held_kib_mean'] / 1024:.1f} MiB "
             f"per process ({result['kib_per_vm_mean']} KiB per VM)")
    return result
