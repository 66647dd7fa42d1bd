"""Keepalive cost: etcd requests per minute for one host holding N disks.

Every contender talks to etcd through its own counting proxy, so the figure
is what etcd actually received during the window, whatever the client does.
virtlease keeps one session lease per host (one refresh per TTL/3); the
recipe has one lease per Lock and must refresh each of them at TTL/3 (we run
that refresher: python-etcd3's Lock does not refresh by itself).  All
contenders are measured in the same window, side by side.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from cluster import Cluster
from contenders import disk_paths, vm_uuid
from measure import progress
from plan import Plan
from virtlease import LockObject, Plugin, ResourceType
from virtlease_lab.relay import Relay

DISKS_PER_VM = 50  # 100 puts: below etcd's default --max-txn-ops of 128


@dataclass
class VirtleaseHolder:
    disks: int
    proxy: Relay
    plugin: Plugin
    objects: list[LockObject] = field(default_factory=list)
    keepalives_at_reset: int = 0

    def keepalives(self) -> int:
        return int(self.plugin.driver.session.keepalives_sent)

    def close(self) -> None:
        for obj in self.objects:
            obj.release()
            obj.free()
        self.plugin.unload()
        self.proxy.close()


@dataclass
class RecipeHolder:
    locks_n: int
    proxy: Relay
    client: Any
    ttl: int
    locks: list[Any] = field(default_factory=list)
    passes: list[float] = field(default_factory=list)
    late_passes: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def refresh_forever(self) -> None:
        interval = self.ttl / 3
        next_at = time.monotonic() + interval
        while not self.stop.wait(max(0.0, next_at - time.monotonic())):
            started = time.monotonic()
            for lock in self.locks:
                lock.refresh()
            self.passes.append(time.monotonic() - started)
            next_at += interval
            if time.monotonic() > next_at:
                self.late_passes += 1
                next_at = time.monotonic()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        for lock in self.locks:
            lock.release()
        self.client.close()
        self.proxy.close()


def _virtlease_holder(cluster: Cluster, disks: int, ttl: int) -> VirtleaseHolder:
    proxy = Relay.tcp(cluster.endpoint, count_requests=True)
    plugin = cluster.load(f"ka{disks}", ttl=ttl, endpoint=proxy.endpoint)
    holder = VirtleaseHolder(disks, proxy, plugin)
    left, index = disks, 0
    while left > 0:
        n = min(DISKS_PER_VM, left)
        obj = plugin.new_object(uuid=vm_uuid(cluster.run_id, f"ka{disks}", index), name=f"ka{disks}-vm{index}")
        for path in disk_paths(cluster.run_id, f"ka{disks}", index, n):
            obj.add_resource(ResourceType.DISK, path)
        obj.acquire()
        holder.objects.append(obj)
        left -= n
        index += 1
    return holder


def _recipe_holder(cluster: Cluster, locks_n: int, ttl: int) -> RecipeHolder:
    proxy = Relay.tcp(cluster.endpoint, count_requests=True)
    client = cluster.client(proxy.endpoint)
    holder = RecipeHolder(locks_n, proxy, client, ttl)
    for path in disk_paths(cluster.run_id, "ka-rc", locks_n, locks_n):
        lock = client.lock(path, ttl=ttl)
        if not lock.acquire(timeout=5):
            raise RuntimeError(f"recipe lock {path} not acquired")
        holder.locks.append(lock)
    holder.thread = threading.Thread(target=holder.refresh_forever, daemon=True, name=f"refresh-{locks_n}")
    holder.thread.start()
    return holder


def keepalive_cost(cluster: Cluster, plan: Plan) -> dict[str, Any]:
    ttl = plan.lock_ttl
    vls: list[VirtleaseHolder] = []
    rcs: list[RecipeHolder] = []
    try:
        for disks in plan.keepalive_disks:
            vls.append(_virtlease_holder(cluster, disks, ttl))
            progress(f"keepalive: virtlease host holds {disks} disks")
        for n in plan.keepalive_recipe_measured:
            rcs.append(_recipe_holder(cluster, n, ttl))
            progress(f"keepalive: recipe holds {n} locks (one lease each), refreshing every {ttl / 3:.2f} s")
        time.sleep(ttl / 3)  # let every refresher reach its steady state
        for h in vls:
            h.proxy.reset_counts()
            h.keepalives_at_reset = h.keepalives()
        for r in rcs:
            r.proxy.reset_counts()
            r.passes.clear()
            r.late_passes = 0
        progress(f"keepalive: counting requests for {plan.keepalive_window:.0f} s")
        start = time.monotonic()
        time.sleep(plan.keepalive_window)
        window = time.monotonic() - start
        vl_counts = [(h.proxy.requests(), h.keepalives() - h.keepalives_at_reset) for h in vls]
        rc_counts = [(r.proxy.requests(), list(r.passes), r.late_passes) for r in rcs]
    finally:
        for h in vls:
            h.close()
        for r in rcs:
            r.close()
    per_min = 60.0 / window
    virtlease_rows = [{"disks": h.disks, "requests": req, "keepalives_sent": ka,
                       "requests_per_min": round(req * per_min, 1), "keepalives_per_min": round(ka * per_min, 1),
                       "expected_per_min": round(60 / (ttl / 3), 1)}
                      for h, (req, ka) in zip(vls, vl_counts, strict=True)]
    recipe_rows: list[dict[str, Any]] = []
    for r, (req, passes, late) in zip(rcs, rc_counts, strict=True):
        recipe_rows.append({"locks": r.locks_n, "requests": req, "requests_per_min": round(req * per_min, 1),
                            "expected_per_min": round(r.locks_n * 60 / (ttl / 3), 1),
                            "refresh_pass_s": round(max(passes), 4) if passes else None,
                            "late_passes": late, "extrapolated": False})
    measured = {row["locks"] for row in recipe_rows}
    base = recipe_rows[-1]
    for n in plan.keepalive_disks:
        if n in measured:
            continue
        scale = n / base["locks"]
        pass_s = base["refresh_pass_s"] * scale if base["refresh_pass_s"] is not None else None
        recipe_rows.append({"locks": n, "requests": None, "requests_per_min": round(base["requests_per_min"] * scale, 1),
                            "expected_per_min": round(n * 60 / (ttl / 3), 1),
                            "refresh_pass_s": round(pass_s, 3) if pass_s is not None else None,
                            "late_passes": None, "extrapolated": True, "from_locks": base["locks"]})
    for row in virtlease_rows:
        progress(f"keepalive virtlease {row['disks']:>6} disks: {row['requests_per_min']} req/min")
    for row in recipe_rows:
        tag = " (extrapolated)" if row["extrapolated"] else ""
        progress(f"keepalive recipe    {row['locks']:>6} locks: {row['requests_per_min']} req/min{tag}")
    return {"ttl": ttl, "window_s": round(window, 2), "virtlease": virtlease_rows, "recipe": recipe_rows}
