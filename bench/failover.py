"""Failover: time from a holder's ``kill -9`` to another host's grant.

The holder is a subprocess with its own host session of TTL t; after it has
acquired, we wait a random part of its keepalive interval (so the kill
falls anywhere between two keepalives), SIGKILL it, and a driver of another
host in this process tries ``acquire`` every 50 ms until it is granted.
Expect between 2/3 TTL and TTL, plus etcd's lease-expiry sweep (up to
~0.5 s) and the 50 ms poll."""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any

from cluster import Cluster
from contenders import VirtleaseVM
from measure import progress
from plan import Plan
from subprocs import WorkerProc
from virtlease import ResourceBusyError

POLL = 0.05
DISKS = 4


def _trial(cluster: Cluster, taker: Any, ttl: int, trial: int, rng: random.Random) -> dict[str, Any]:
    tag = f"fo-{ttl}-{trial}"
    holder = WorkerProc("failover-holder", {"endpoint": cluster.endpoint, "run_id": cluster.run_id,
                                            "host": f"fo-holder-{ttl}-{trial}", "ttl": ttl, "tag": tag,
                                            "disks": DISKS})
    try:
        holder.hello()
        delay = rng.uniform(0, ttl / 3)
        time.sleep(delay)
        vm = VirtleaseVM(taker, cluster.run_id, tag, 0, DISKS)
        killed = time.monotonic()
        os.kill(holder.pid, signal.SIGKILL)
        attempts = 0
        while True:
            attempts += 1
            try:
                vm.acquire()
                break
            except ResourceBusyError:
                pass
            if time.monotonic() - killed > ttl * 3 + 10:
                raise RuntimeError(f"failover TTL {ttl}: no grant after {ttl * 3 + 10} s")
            next_tick = killed + attempts * POLL
            time.sleep(max(0.0, next_tick - time.monotonic()))
        granted = time.monotonic() - killed
        vm.release()
        vm.close()
    finally:
        holder.kill()
    progress(f"failover TTL {ttl:>2} s (trial {trial + 1}): granted {granted:.2f} s after kill -9 "
             f"({attempts} attempts)")
    return {"ttl": ttl, "trial": trial, "seconds": round(granted, 3), "attempts": attempts,
            "kill_after_ready_s": round(delay, 3)}


def failover(cluster: Cluster, plan: Plan) -> list[dict[str, Any]]:
    rng = random.Random(20240611)
    taker = cluster.load("fo-taker")
    try:
        trials = [_trial(cluster, taker, ttl, t, rng) for ttl in plan.failover_ttls
                  for t in range(plan.failover_trials)]
    finally:
        taker.driver.release_all()
        taker.unload()
    rows = []
    for ttl in plan.failover_ttls:
        secs = [t["seconds"] for t in trials if t["ttl"] == ttl]
        rows.append({"ttl": ttl, "trials": secs, "mean_s": round(sum(secs) / len(secs), 3),
                     "min_s": min(secs), "max_s": max(secs),
                     "bound_low_s": round(ttl * 2 / 3, 2), "bound_high_s": float(ttl)})
    return rows
