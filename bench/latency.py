"""Latency: the ceiling transaction, and acquire+release of one VM with N
disks for virtlease and for the python-etcd3 Lock recipe."""

from __future__ import annotations

from typing import Any

from cluster import Cluster
from contenders import Ceiling, RecipeVM, VirtleaseVM
from measure import Latency, progress, time_calls
from plan import Plan


def ceiling_latency(cluster: Cluster, plan: Plan) -> dict[str, Any]:
    client = cluster.client()
    try:
        worker = Ceiling(client, f"/bench-{cluster.run_id}/ceiling/latency")
        lat = Latency.of(time_calls(worker.op, max_n=plan.ceiling_n, budget=60, min_n=plan.ceiling_n))
        worker.close()
    finally:
        client.close()
    progress(f"ceiling txn: p50 {lat.p50_ms:.3f} ms, p99 {lat.p99_ms:.3f} ms (n={lat.n})")
    return lat.as_dict()


def vm_latency(cluster: Cluster, plan: Plan) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    plugin = cluster.load("lat")
    client = cluster.client()
    try:
        for disks in plan.latency_disks:
            vm = VirtleaseVM(plugin, cluster.run_id, "lat-vl", disks, disks)
            vl = Latency.of(time_calls(vm.op, max_n=plan.latency_max_n, budget=plan.latency_budget))
            vm.close()
            progress(f"virtlease {disks:>2} disks: p50 {vl.p50_ms:.2f} ms, p99 {vl.p99_ms:.2f} ms (n={vl.n})")
            recipe = RecipeVM(client, cluster.run_id, "lat-rc", disks, disks, plan.lock_ttl)
            rc = Latency.of(time_calls(recipe.op, max_n=plan.latency_max_n, budget=plan.latency_budget))
            recipe.close()
            progress(f"recipe    {disks:>2} disks: p50 {rc.p50_ms:.2f} ms, p99 {rc.p99_ms:.2f} ms (n={rc.n})")
            rows.append({"disks": disks, "virtlease": vl.as_dict(), "recipe": rc.as_dict()})
    finally:
        client.close()
        plugin.driver.release_all()
        plugin.unload()
    return rows
