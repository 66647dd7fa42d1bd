"""A model fitted to the runs at several sizes, predicting a larger cluster.

Every run has the same workload per host (VMs, disks, TTL) and the same churn (grant attempts
per second, cluster-wide), and measures each figure twice: with keepalives only (the *idle*
window) and with the churn (the *steady* window).  So:

* what grows with the hosts (keepalives/s, keys, memory, the idle CPU, the status read) is
  fitted as ``a + b * hosts`` by least squares over the runs and read at the predicted size;
* what the churn adds (CPU per grant attempt per second, DB growth per grant) is the steady
  window minus the idle one, divided by the attempts/s, averaged over the runs;
* CPU at the predicted size is the idle fit there plus the churn's cost at the churn rate
  assumed there (the measured rate, and the rate grown with the hosts).

Latencies are *not* extrapolated that way: on this shared machine they are set by how busy the
cores are.  The prediction says instead how busy the leader would be (its CPU need against the
cores a member gets) and what that does to a queue (M/M/1: waiting grows as 1 / (1 - load)).
``ASSUMPTIONS`` says what the prediction rests on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

ASSUMPTIONS = (
    "Per host the workload of the runs: 10 VMs x 4 disks, one lease refreshed every TTL/3 "
    "(TTL 10 s), one host-key watch; churn is read both at the measured cluster-wide rate and "
    "grown with the hosts (the same rate per host).",
    "etcd's cost is linear in what it serves (keepalives/s, transactions/s, keys, watchers): "
    "nothing at these sizes points to super-linear costs (bbolt's B-tree, the watcher index and "
    "the lease heap are logarithmic per operation).",
    "Members on machines of their own (>= 2 cores each, an SSD for the WAL): on this machine "
    "the three members, the harness and other work share 2 cores, so measured latencies carry "
    "the machine's load; the CPU figures are what etcd itself used.",
    "No leader change in the window (a leader change renews every lease: a failover then takes "
    "up to an election timeout longer).",
    "Hosts that die together expire spread over one keepalive interval (TTL/3), as measured: "
    "etcd revokes expired leases in batches every 500 ms, up to 1,000 per second.",
    "Sizes marked 'generated' are etcd under the traffic of that many hosts from one asyncio "
    "process (bench/scale/etcdload.py), not the product's sessions: etcd's figures only.",
)

Read = Callable[[dict[str, Any]], float | None]


def _w(run: dict[str, Any], window: str) -> dict[str, Any]:
    return run.get(window) or {}


def _leader(run: dict[str, Any], window: str) -> dict[str, Any]:
    w = _w(run, window)
    found: dict[str, Any] = (w.get("etcd") or {}).get(w.get("leader") or "", {})
    return found


def _status_part(run: dict[str, Any], *parts: str) -> float | None:
    """The quickest of the runs' in-process status timings: the sum of ``parts``."""
    ok = [sum(s["parts"][p] for p in parts) for s in run.get("status") or [] if s.get("parts")]
    return min(ok) if ok else None


HOST_FIGURES: dict[str, tuple[str, Read]] = {
    "keepalives_per_s": ("keepalives/s", lambda r: _w(r, "idle").get("keepalives_per_s")),
    "leader_cpu_idle": ("leader CPU with keepalives only (cores)", lambda r: _w(r, "idle").get("leader_cpu_cores")),
    "etcd_cpu_idle": ("3 members' CPU with keepalives only (cores)", lambda r: _w(r, "idle").get("etcd_cpu_cores")),
    "keys": ("keys in etcd", lambda r: _leader(r, "steady").get("keys")),
    "leader_rss_mib": ("leader RSS (MiB)", lambda r: _leader(r, "steady").get("rss_mib")),
    "status_read_s": ("status: reading etcd (s)", lambda r: _status_part(r, "read_s")),
    "status_print_s": ("status: printing the table (s)", lambda r: _status_part(r, "print_s")),
    "status_json_s": ("status --json: making the JSON (s)", lambda r: _status_part(r, "json_s")),
    "status_rss_mib": ("status peak RSS (MiB)", lambda r: max(
        [s["rss_peak_mib"] for s in r.get("status") or [] if s["exit"] == 0], default=None)),
    "harness_cpu_idle": ("harness CPU with keepalives only (cores)", lambda r: _w(r, "idle").get("harness_cpu_cores")),
}
"""name -> (label, how to read it from one run): fitted as a + b * hosts."""


def _per_attempt(run: dict[str, Any], key: str) -> float | None:
    idle, steady = _w(run, "idle").get(key), _w(run, "steady").get(key)
    rate = _w(run, "steady").get("attempts_per_s")
    if idle is None or steady is None or not rate:
        return None
    return float(steady - idle) / float(rate)


def _db_per_attempt(run: dict[str, Any]) -> float | None:
    lead = _leader(run, "steady")
    attempts = (_w(run, "steady").get("attempts_per_s") or 0) * (_w(run, "steady").get("seconds") or 0)
    if not lead or not attempts:
        return None
    return float(lead["db_bytes"] - lead.get("db_bytes_before", lead["db_bytes"])) / attempts


CHURN_FIGURES: dict[str, tuple[str, Read]] = {
    "leader_cpu_per_attempt": ("leader CPU per grant attempt/s (cores)", lambda r: _per_attempt(r, "leader_cpu_cores")),
    "etcd_cpu_per_attempt": ("3 members' CPU per grant attempt/s (cores)", lambda r: _per_attempt(r, "etcd_cpu_cores")),
    "harness_cpu_per_attempt": ("harness CPU per grant attempt/s (cores)",
                                lambda r: _per_attempt(r, "harness_cpu_cores")),
    "db_bytes_per_attempt": ("DB growth per grant attempt, no compaction (bytes)", _db_per_attempt),
}
"""name -> (label, per-run value): averaged over the runs."""


def _measured_by(name: str, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs a figure is read from: the harness's own figures only from real sessions (a
    generated run has no harness), etcd's from both."""
    return [r for r in runs if not (name.startswith("harness") and r.get("generated"))]


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """(a, b, r2) of the least-squares line ``a + b x``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return a, b, (1 - ss_res / ss_tot) if ss_tot else 1.0


def fit(runs: Sequence[dict[str, Any]], predict_at: int = 5000) -> dict[str, Any]:
    """The fits over ``runs`` and the prediction at ``predict_at`` hosts."""
    out: dict[str, Any] = {"predict_at": predict_at, "assumptions": list(ASSUMPTIONS), "figures": {}, "churn": {},
                           "generated": sorted({int(r["load"]["hosts"]) for r in runs if r.get("generated")})}
    for name, (label, read) in HOST_FIGURES.items():
        points = [(float(r["load"]["hosts"]), float(v)) for r in _measured_by(name, runs) if (v := read(r)) is not None]
        if len({x for x, _ in points}) < 2:
            continue
        a, b, r2 = linear_fit([x for x, _ in points], [y for _, y in points])
        out["figures"][name] = {"label": label, "points": points, "a": a, "per_1000_hosts": b * 1000, "r2": r2,
                                "predicted": a + b * predict_at}
    for name, (label, read) in CHURN_FIGURES.items():
        values = [(float(r["load"]["hosts"]), v) for r in _measured_by(name, runs) if (v := read(r)) is not None]
        if values:
            out["churn"][name] = {"label": label, "points": values,
                                  "mean": sum(v for _, v in values) / len(values)}
    rates = [float(r["load"]["churn_rate"]) for r in runs]
    largest = max(runs, key=lambda r: r["load"]["hosts"])
    measured_rate = rates[-1] if rates else 0.0
    grown = measured_rate * predict_at / largest["load"]["hosts"]
    out["rates"] = {"measured": measured_rate, "grown": round(grown, 1)}
    out["cpu"] = {label: _cpu_at(out, rate) for label, rate in (("measured", measured_rate), ("grown", grown))}
    out["queue"] = _queue(out["cpu"]["grown"].get("leader"))
    return out


def _cpu_at(model: dict[str, Any], rate: float) -> dict[str, Any]:
    """CPU (cores) at the predicted size and ``rate`` grant attempts/s: idle fit + churn cost."""
    out: dict[str, Any] = {"rate": round(rate, 1)}
    for who, idle, per in (("leader", "leader_cpu_idle", "leader_cpu_per_attempt"),
                           ("etcd", "etcd_cpu_idle", "etcd_cpu_per_attempt"),
                           ("harness", "harness_cpu_idle", "harness_cpu_per_attempt")):
        f, c = model["figures"].get(idle), model["churn"].get(per)
        if f is not None and c is not None:
            out[who] = round(max(0.0, f["predicted"]) + max(0.0, c["mean"]) * rate, 3)
    return out


def _queue(need: float | None) -> dict[str, Any]:
    """The leader's load at the predicted size on one or two dedicated cores, and the M/M/1
    factor on waiting."""
    if need is None:
        return {}
    out: dict[str, Any] = {"leader_cores_needed": need}
    for cores in (1, 2):
        rho = need / cores
        out[f"load_on_{cores}_core"] = round(rho, 3)
        out[f"wait_factor_on_{cores}_core"] = round(1 / (1 - rho), 2) if rho < 1 else math.inf
    return out
