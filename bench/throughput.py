"""Throughput: VMs acquired+released per second with 1..64 concurrent
callers (threads), each caller with its own etcd client, its own VM and its
own disks (no contention).  For virtlease each caller is its own driver
instance, i.e. its own host session; the ceiling counts transactions."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cluster import Cluster
from contenders import Ceiling, RecipeVM, VirtleaseVM
from measure import Worker, progress, run_concurrent
from plan import Plan


def _ceiling(cluster: Cluster, callers: int, seconds: float) -> dict[str, Any]:
    clients = [cluster.client() for _ in range(callers)]
    workers = [Ceiling(c, f"/bench-{cluster.run_id}/ceiling/tp{callers}/{i}") for i, c in enumerate(clients)]
    try:
        return run_concurrent(workers, seconds).as_dict()
    finally:
        for w in workers:
            w.close()
        for c in clients:
            c.close()


def _virtlease(cluster: Cluster, callers: int, seconds: float, disks: int) -> dict[str, Any]:
    plugins = [cluster.load(f"tp{callers}-c{i}") for i in range(callers)]
    workers: list[Worker] = [VirtleaseVM(p, cluster.run_id, f"tp{callers}-vl", i, disks)
                             for i, p in enumerate(plugins)]
    try:
        return run_concurrent(workers, seconds).as_dict()
    finally:
        for w in workers:
            w.close()
        for p in plugins:
            p.driver.release_all()
            p.unload()


def _recipe(cluster: Cluster, callers: int, seconds: float, disks: int, ttl: int) -> dict[str, Any]:
    clients = [cluster.client() for _ in range(callers)]
    workers = [RecipeVM(c, cluster.run_id, f"tp{callers}-rc", i, disks, ttl) for i, c in enumerate(clients)]
    try:
        return run_concurrent(workers, seconds).as_dict()
    finally:
        with ThreadPoolExecutor(max_workers=8) as pool:  # revoke the leaked leases (not timed)
            list(pool.map(RecipeVM.close, workers))
        for c in clients:
            c.close()


def throughput(cluster: Cluster, plan: Plan) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for callers in plan.callers:
        row: dict[str, Any] = {"callers": callers}
        row["ceiling"] = _ceiling(cluster, callers, plan.throughput_seconds)
        row["virtlease"] = _virtlease(cluster, callers, plan.throughput_seconds, plan.throughput_disks)
        row["recipe"] = _recipe(cluster, callers, plan.throughput_seconds, plan.throughput_disks, plan.lock_ttl)
        progress(f"throughput {callers:>2} callers: ceiling {row['ceiling']['per_second']:.0f} txn/s, "
                 f"virtlease {row['virtlease']['per_second']:.0f} VM/s, "
                 f"recipe {row['recipe']['per_second']:.0f} VM/s")
        rows.append(row)
    return rows
