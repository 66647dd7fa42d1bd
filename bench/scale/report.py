"""The scale figures as markdown tables and PNG plots.

``rows(runs)`` is the per-size table both reports use (``make bench``'s one run, and
``make bench-scale``'s sweep, one column per size); ``sweep_markdown`` adds the targets, the
model's prediction and its assumptions; ``plots`` draws CPU, latency and failover.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Run = dict[str, Any]


def _num(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:,.{digits}f}"


def _ms(summary: dict[str, Any] | None, key: str = "p99_ms") -> str:
    return _num((summary or {}).get(key), 1)


def _pair(summary: dict[str, Any] | None) -> str:
    if not summary or not summary.get("n"):
        return "-"
    return f"{_ms(summary, 'p50_ms')} / {_ms(summary, 'p99_ms')}"


def _q(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    data = sorted(values)
    return data[min(len(data) - 1, max(0, math.ceil(q * len(data)) - 1))]


def _status(run: Run, as_json: bool) -> str:
    runs = [s for s in run.get("status") or [] if s["json"] == as_json]
    if not runs:
        return "-"
    bad = [s for s in runs if s["exit"] != 0]
    if bad:
        return f"failed (exit {bad[0]['exit']}: {bad[0]['error']})"
    best = min(runs, key=lambda s: s["seconds"])
    floor, parts = best.get("startup_s"), best.get("parts") or {}
    inside = (f"read {parts['read_s']:.2f} s + {'JSON' if as_json else 'table'} "
              f"{parts['json_s' if as_json else 'print_s']:.2f} s in-process; " if parts else "")
    return (f"{best['seconds']:.2f} s, {best['rss_peak_mib']:.0f} MiB ({inside}"
            + (f"start-up alone {floor:.2f} s" if floor is not None else "") + ")")


def _leader(run: Run, window: str) -> dict[str, Any]:
    w = run.get(window) or {}
    found: dict[str, Any] = (w.get("etcd") or {}).get(w.get("leader") or "", {})
    return found


def _machine_limited(window: dict[str, Any]) -> str:
    proc = window.get("proc") or {}
    busy, cores = proc.get("machine_busy_cores"), proc.get("machine_cores")
    if busy is None or not cores:
        return "-"
    verdict = "machine-bound" if busy >= 0.95 * cores else "not machine-bound"
    return f"{busy:.2f} of {cores:.0f} cores busy ({verdict}); load {proc.get('load1_mean', 0):.1f}"


ROWS: list[tuple[str, Callable[[Run], str]]] = [
    ("hosts x VMs x disks", lambda r: f"{r['load']['hosts']:,} x {r['load']['vms_per_host']} x "
                                      f"{r['load']['disks_per_vm']} = {r['load']['hosts'] * r['load']['vms_per_host'] * r['load']['disks_per_vm']:,} disks"),
    ("keys in etcd (records + gen + hosts)", lambda r: f"{(r.get('populate') or {}).get('keys', 0):,}"),
    ("sessions opened / VMs started", lambda r: f"{r.get('open_s', 0):.1f} s / {(r.get('populate') or {}).get('seconds', 0):.0f} s "
                                                f"({(r.get('populate') or {}).get('vms_per_s', 0):.0f} VMs/s)"),
    ("keepalives/s (expected hosts x 3 / TTL)", lambda r: f"{(r.get('steady') or {}).get('keepalives_per_s', 0):.0f} "
                                                          f"({r['load']['hosts'] * 3 / r['load']['ttl']:.0f})"),
    ("keepalive RTT p50 / p99 / max, ms", lambda r: f"{_pair((r.get('steady') or {}).get('keepalive_rtt'))} / "
                                                    f"{_ms((r.get('steady') or {}).get('keepalive_rtt'), 'max_ms')}"),
    ("worker threads woken late p99 / max, ms (0.1 s sleeps)", lambda r: f"{_ms((r.get('steady') or {}).get('probe_late'))} / "
                                                                   f"{_ms((r.get('steady') or {}).get('probe_late'), 'max_ms')}"),
    ("closest to a fence (least headroom), s", lambda r: _num((r.get("steady") or {}).get("keepalive_headroom_min_s"), 2)),
    ("false fences: steady window / whole run", lambda r: f"{len((r.get('steady') or {}).get('lost') or [])} / "
                                                          f"{len(r.get('false_fences') or [])}"),
    ("grant attempts/s (grants)", lambda r: f"{(r.get('steady') or {}).get('attempts_per_s', 0):.1f} "
                                            f"({(r.get('steady') or {}).get('grants_per_s', 0):.1f})"),
    ("driver start (one txn, 4 disks) p50 / p99, ms", lambda r: _pair(_g(r, "grant.driver.start"))),
    ("agent ACQUIRE (one disk) p50 / p99, ms", lambda r: _pair(_g(r, "agent.acquire"))),
    ("agent start (4 ACQUIREs) p50 / p99, ms", lambda r: _pair(_g(r, "grant.agent.start"))),
    ("etcd's own answer to a Txn p50 / p99, ms (bucket bounds)", lambda r: _handling(r, "Txn")),
    ("migration claim driver / agent p99, ms", lambda r: f"{_ms(_g(r, 'grant.driver.claim'))} / {_ms(_g(r, 'grant.agent.claim'))}"),
    ("conflicting start refused p99 driver / agent, ms", lambda r: f"{_ms(_g(r, 'refuse.driver'))} / {_ms(_g(r, 'refuse.agent'))}"),
    ("conflicting starts granted (must be 0)", lambda r: str((r.get("steady") or {}).get("conflicts_granted", "-"))),
    ("churn ops started late p99, ms (harness backlog)", lambda r: _ms(_g(r, "churn.lag"))),
    ("dead hosts: disks free after p50 / max, s", lambda r: _dead(r)),
    ("dead hosts: every VM taken by another host, max s", lambda r: _num(max((r.get("die") or {}).get("all_taken_s") or [math.nan]), 2)),
    ("cut hosts: fenced / fence lead min, s", lambda r: _cut(r)),
    ("virtlease status (table)", lambda r: _status(r, False)),
    ("virtlease status --json", lambda r: _status(r, True)),
    ("etcd DB size before / after the churn window (no compaction), MiB", lambda r: (
        f"{_leader(r, 'steady').get('db_bytes_before', 0) / 2**20:.0f} / {_leader(r, 'steady').get('db_bytes', 0) / 2**20:.0f}"
        f" ({_leader(r, 'steady').get('revisions', 0):,} revisions)")),
    ("leader CPU idle / steady, cores", lambda r: f"{_num((r.get('idle') or {}).get('leader_cpu_cores'), 3)} / "
                                                  f"{_num((r.get('steady') or {}).get('leader_cpu_cores'), 3)}"),
    ("all three members' CPU steady, cores", lambda r: _num((r.get("steady") or {}).get("etcd_cpu_cores"), 3)),
    ("leader RSS, MiB; goroutines", lambda r: f"{_leader(r, 'steady').get('rss_mib', 0):.0f}; "
                                              f"{_leader(r, 'steady').get('goroutines', 0):,}"),
    ("leader WAL fsync / backend commit p99, ms", lambda r: f"{_num(_leader(r, 'steady').get('wal_fsync_p99_ms'), 0)} / "
                                                            f"{_num(_leader(r, 'steady').get('backend_commit_p99_ms'), 0)}"),
    ("etcd stall warnings, whole run: WAL fsync > 1 s; heartbeat late (count, longest s)", lambda r: _stalls(r)),
    ("leader changes, slow applies (steady)", lambda r: f"{_leader(r, 'steady').get('leader_changes', '-')}, "
                                                        f"{_leader(r, 'steady').get('slow_applies', '-')}"),
    ("harness CPU idle / steady, cores", lambda r: f"{_num((r.get('idle') or {}).get('harness_cpu_cores'), 2)} / "
                                                   f"{_num((r.get('steady') or {}).get('harness_cpu_cores'), 2)}"),
    ("other tenants of the machine, cores (steady)", lambda r: _num((r.get("steady") or {}).get("other_cpu_cores"), 2)),
    ("the machine (steady)", lambda r: _machine_limited(r.get("steady") or {})),
]


def _g(run: Run, name: str) -> dict[str, Any] | None:
    result: dict[str, Any] | None = ((run.get("steady") or {}).get("grant") or {}).get(name)
    return result


def _stalls(run: Run) -> str:
    st = run.get("etcd_stalls")
    if st is None:
        return "-"
    parts = []
    for msg in ("slow fdatasync", "leader failed to send out heartbeat on time"):
        e = st.get(msg) or {"count": 0, "longest_s": 0.0}
        parts.append(f"{e['count']}" + (f" ({e['longest_s']:.1f})" if e["count"] else ""))
    return "; ".join(parts)


def _handling(run: Run, method: str) -> str:
    h = ((run.get("steady") or {}).get("etcd_handling_ms") or {}).get(method) or {}
    if h.get("p99") is None:
        return "-"
    return f"<= {_num(h.get('p50'), 0)} / <= {_num(h.get('p99'), 0)}"


def _dead(run: Run) -> str:
    d = run.get("die")
    if not d:
        return "-"
    freed = d.get("freed_s") or []
    late = sum(1 for x in freed if x > d["target_s"])
    return (f"{_num(_q(freed, 0.5), 2)} / {_num(max(freed, default=None), 2)} (target {d['target_s']}; "
            f"{d['hosts']} hosts, {late + len(d.get('not_freed') or [])} late)")


def _cut(run: Run) -> str:
    c = run.get("cut")
    if not c:
        return "-"
    return (f"{c['fenced']}/{c['hosts']} / {_num(min(c.get('fence_lead_s') or [math.nan]), 2)}"
            f" ({c['freed_before_fence']} freed before their fence)")


def rows(runs: Sequence[Run]) -> list[str]:
    """The per-size table, one column per run (a run stopped early says why instead)."""
    stopped = [f"- {r['load']['hosts']:,} hosts: stopped: {r['aborted']}" for r in runs if r.get("aborted")]
    runs = [r for r in runs if not r.get("aborted")]
    if not runs:
        return [*stopped, ""]
    head = ["", *(f"{r['load']['hosts']:,} hosts" + (" (generated)" if r.get("generated") else "") for r in runs)]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for label, fn in ROWS:
        cells = []
        for r in runs:
            try:
                cells.append(fn(r))
            except (KeyError, TypeError, ValueError):
                cells.append("-")
        out.append("| " + " | ".join([label, *cells]) + " |")
    return [*out, "", *stopped, *([""] if stopped else [])]


TARGETS: list[tuple[str, Callable[[Run], tuple[str, bool | None]]]] = [
    ("0 false fences over the steady window", lambda r: (
        f"{len(r.get('false_fences') or [])} over {(r.get('steady') or {}).get('seconds', 0):.0f} s",
        not r.get("false_fences"))),
    ("grant p99 <= 50 ms at 20 grants/s (driver start; agent ACQUIRE)", lambda r: (
        f"{_ms(_g(r, 'grant.driver.start'))} ms; {_ms(_g(r, 'agent.acquire'))} ms",
        max((_g(r, "grant.driver.start") or {}).get("p99_ms", math.inf),
            (_g(r, "agent.acquire") or {}).get("p99_ms", math.inf)) <= 50)),
    ("every disk of the dead hosts free within TTL + 2 s", lambda r: (
        f"max {_num(max((r.get('die') or {}).get('freed_s') or [math.nan]), 2)} s",
        bool((r.get("die") or {}).get("freed_s")) and not (r.get("die") or {}).get("not_freed")
        and max(r["die"]["freed_s"]) <= r["die"]["target_s"])),
    ("virtlease status <= 2 s", lambda r: (
        _status(r, False), any(s["exit"] == 0 and s["seconds"] <= 2 for s in r.get("status") or [] if not s["json"]))),
]


def targets(run: Run) -> list[str]:
    out = [f"Targets at {run['load']['hosts']:,} hosts:", "", "| target | measured | met |", "|---|---|---|"]
    for label, fn in TARGETS:
        try:
            text, ok = fn(run)
        except (KeyError, TypeError, ValueError):
            text, ok = "-", None
        out.append(f"| {label} | {text} | {'yes' if ok else 'no' if ok is not None else '-'} |")
    return [*out, ""]


def model_lines(model: dict[str, Any]) -> list[str]:
    at = model["predict_at"]
    out = [f"### Model: {at:,} hosts", "",
           f"What grows with the hosts, fitted as `a + b x hosts` (least squares over the runs), read at {at:,}:", "",
           "| figure | measured (hosts: value) | per 1,000 hosts | r² | predicted |", "|---|---|---|---|---|"]
    gen = set(model.get("generated") or [])

    def host_label(x: float) -> str:
        return f"{int(x):,}{'g' if int(x) in gen else ''}"

    for f in model["figures"].values():
        pts = ", ".join(f"{host_label(x)}: {y:,.3g}" for x, y in f["points"])
        out.append(f"| {f['label']} | {pts} | {f['per_1000_hosts']:+,.3g} | {f['r2']:.3f} | {f['predicted']:,.3g} |")
    out += ["", "What the churn adds (steady window minus keepalives only, per grant attempt/s), averaged:", "",
            "| figure | per run (hosts: value) | mean |", "|---|---|---|"]
    for c in model["churn"].values():
        pts = ", ".join(f"{host_label(x)}: {y:,.3g}" for x, y in c["points"])
        out.append(f"| {c['label']} | {pts} | {c['mean']:,.3g} |")
    out += ["", f"CPU at {at:,} hosts (cores): keepalives-only fit + churn cost x rate:", "",
            "| churn | leader | 3 members | harness (this Python, many hosts per process) |", "|---|---|---|---|"]
    for label, cpu in (model.get("cpu") or {}).items():
        what = "as measured" if label == "measured" else "grown with the hosts"
        out.append(f"| {cpu['rate']:,.0f} attempts/s ({what}) | {_num(cpu.get('leader'), 2)} | "
                   f"{_num(cpu.get('etcd'), 2)} | {_num(cpu.get('harness'), 2)} |")
    q = model.get("queue") or {}
    if q:
        out += ["", f"With the grown churn the leader needs {q['leader_cores_needed']:.2f} cores: a load of "
                f"{q['load_on_1_core']:.0%} on one dedicated core (M/M/1 waiting x{_num(q['wait_factor_on_1_core'], 2)}), "
                f"{q['load_on_2_core']:.0%} on two (x{_num(q['wait_factor_on_2_core'], 2)})."]
    if gen:
        out += ["", "(g: measured with the load generator, etcd's side only.)"]
    out += ["", "Assumptions:", "", *(f"- {a}" for a in model["assumptions"]), ""]
    return out


def sweep_markdown(res: dict[str, Any]) -> str:
    runs = res["runs"]
    m = res.get("machine") or {}
    lines = ["# virtlease at scale", "",
             f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('ram_gib', '?')} GiB, shared with "
             "other work (the load average and the other tenants' CPU are in the table). etcd "
             f"{m.get('etcd', '?')}: three members on loopback, each a process with its own data dir "
             f"({m.get('etcd_storage', '?')}). Runs: {', '.join(_layout(r) for r in runs if not r.get('aborted'))}.", "",
             *rows(runs)]
    done = [r for r in runs if not r.get("aborted")]
    if done:
        lines += targets(done[-1])
    if res.get("model"):
        lines += model_lines(res["model"])
    if res.get("plots"):
        lines += ["Plots: " + ", ".join(f"`{p}`" for p in res["plots"]), ""]
    return "\n".join(lines)


def _layout(run: Run) -> str:
    load = run["load"]
    if run.get("generated"):
        return f"{load['hosts']:,} generated hosts (one asyncio process)"
    return f"{load['hosts']:,} hosts in {run.get('workers', '?')} processes"


def plots(res: dict[str, Any], out: Path) -> list[str]:
    """scale-failover.png, and with several sizes scale-cpu.png and scale-latency.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    out.mkdir(parents=True, exist_ok=True)
    made = []
    if len(runs) > 1:
        made += _trend_plots(plt, runs, res.get("model") or {"figures": {}}, out)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        freed = sorted((r.get("die") or {}).get("freed_s") or [])
        if freed:
            ax.step(freed, [(i + 1) / len(freed) for i in range(len(freed))], where="post",
                    label=f"{r['load']['hosts']:,} hosts ({len(freed)} dead)")
    if runs:
        ttl = runs[-1]["load"]["ttl"]
        ax.axvline(ttl, color="tab:gray", ls=":", label=f"TTL {ttl} s")
        ax.axvline(ttl + 2, color="tab:red", ls=":", label="target TTL + 2 s")
    ax.set_xlabel("seconds from kill -9 to every disk of the host free in etcd")
    ax.set_ylabel("fraction of dead hosts")
    ax.set_title("Failover of hosts that died together")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scale-failover.png", dpi=110)
    plt.close(fig)
    made.append("scale-failover.png")
    return made


def _trend_plots(plt: Any, runs: Sequence[Run], model: dict[str, Any], out: Path) -> list[str]:
    hosts = [r["load"]["hosts"] for r in runs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, color in (("leader_cpu_idle", "tab:blue"), ("etcd_cpu_idle", "tab:purple"),
                        ("harness_cpu_idle", "tab:orange")):
        f = model["figures"].get(name)
        if not f:
            continue
        xs = [x for x, _ in f["points"]]
        ax.plot(xs, [y for _, y in f["points"]], "o-", color=color, label=f["label"])
        ax.plot([xs[-1], model["predict_at"]], [f["a"] + f["per_1000_hosts"] / 1000 * xs[-1], f["predicted"]],
                ":", color=color)
    for window, marker in (("steady", "s"), ):
        ax.plot(hosts, [(r.get(window) or {}).get("leader_cpu_cores") for r in runs], marker, color="tab:blue",
                alpha=0.5, label="leader CPU with churn")
    ax.set_xlabel("hosts (dotted: the model's extrapolation)")
    ax.set_ylabel("CPU (cores)")
    ax.set_title("etcd and harness CPU vs hosts (keepalives only)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scale-cpu.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: tuple[tuple[str, Callable[[Run], Any]], ...] = (
        ("keepalive RTT p99", lambda r: (r.get("steady") or {}).get("keepalive_rtt", {}).get("p99_ms")),
        ("keepalive RTT p50", lambda r: (r.get("steady") or {}).get("keepalive_rtt", {}).get("p50_ms")),
        ("driver start p99", lambda r: (_g(r, "grant.driver.start") or {}).get("p99_ms")),
        ("agent ACQUIRE p99", lambda r: (_g(r, "agent.acquire") or {}).get("p99_ms")))
    for label, fn in series:
        ax.plot(hosts, [fn(r) for r in runs], "o-", label=label)
    ax.axhline(50, color="tab:red", ls=":", label="grant target 50 ms")
    ax.set_yscale("log")
    ax.set_xlabel("hosts")
    ax.set_ylabel("ms (log)")
    ax.set_title("Latency under churn vs hosts (this shared machine)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scale-latency.png", dpi=110)
    plt.close(fig)
    return ["scale-cpu.png", "scale-latency.png"]
