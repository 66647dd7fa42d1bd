"""The results as markdown (every figure) and JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scale import report as scale_report


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _x(value: float) -> str:
    return f"{value:.1f}x"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out.append("")
    return out


def _machine(res: dict[str, Any]) -> list[str]:
    m = res["machine"]
    rows = [["CPU", f"{m['cpu']}"], ["cores", str(m["cores"])], ["RAM", f"{m['ram_gib']} GiB"],
            ["kernel", m["kernel"]], ["Python", m["python"]],
            ["client", f"python3-etcd3 {m['python_etcd3']}, grpcio {m['grpcio']}"],
            ["etcd", f"{m['etcd']}, {m['etcd_setup']}"], ["etcd storage", m["etcd_storage"]],
            ["git commit", m["git"]],
            ["load average (1/5/15 min)", f"{m['load_at_start']} at start, {m.get('load_at_end', '?')} at end "
                                          "(other processes on this machine share its cores)"],
            ["run", f"{'--quick' if res['plan']['quick'] else 'full'}, {res['started']}, "
                    f"{res['wall_s']:.0f} s wall"]]
    return _table(["", ""], rows)


def _latency(res: dict[str, Any]) -> list[str]:
    c = res["ceiling"]["p50_ms"]
    out = ["## Latency: acquire + release of one VM", "",
           f"Ceiling: one plain etcd transaction (compare + put) from python-etcd3, one caller: "
           f"**p50 {_ms(c)} ms, p99 {_ms(res['ceiling']['p99_ms'])} ms** (n={res['ceiling']['n']}). "
           "virtlease needs two transactions per acquire+release, so 2x is its floor; the recipe needs "
           "three requests per disk (lease grant, txn, release txn).", ""]
    rows = []
    for r in res["latency"]:
        v, k = r["virtlease"], r["recipe"]
        rows.append([str(r["disks"]), _ms(v["p50_ms"]), _ms(v["p99_ms"]), _x(v["p50_ms"] / c),
                     _ms(k["p50_ms"]), _ms(k["p99_ms"]), _x(k["p50_ms"] / c), _x(k["p50_ms"] / v["p50_ms"]),
                     f"{v['n']} / {k['n']}"])
    return out + _table(["disks", "virtlease p50 ms", "p99 ms", "/ceiling", "recipe p50 ms", "p99 ms",
                         "/ceiling", "recipe / virtlease", "n (vl / recipe)"], rows)


def _throughput(res: dict[str, Any]) -> list[str]:
    disks = res["plan"]["throughput_disks"]
    out = ["## Throughput: concurrent callers", "",
           f"Threads in one process, each with its own python-etcd3 client (for virtlease: its own driver "
           f"instance, i.e. its own host session); each caller its own VM of {disks} disks (no contention). "
           "Ceiling = compare+put transactions per second; the others = VMs acquired and released per "
           f"second ({res['plan']['throughput_seconds']} s per cell).", ""]
    rows = []
    for r in res["throughput"]:
        c, v, k = r["ceiling"], r["virtlease"], r["recipe"]
        errs = c["errors"] + v["errors"] + k["errors"]
        rows.append([str(r["callers"]), f"{c['per_second']:.0f}", f"{v['per_second']:.0f}",
                     f"{k['per_second']:.0f}", _x(v["per_second"] / k["per_second"]) if k["per_second"] else "-",
                     str(errs)])
    return out + _table(["callers", "ceiling txn/s", "virtlease VM/s", "recipe VM/s",
                         "virtlease / recipe", "errors"], rows)


def _keepalive(res: dict[str, Any]) -> list[str]:
    ka = res["keepalive"]
    out = ["## Keepalive cost: etcd requests per minute for one host", "",
           f"TTL {ka['ttl']} s, refresh every TTL/3; requests counted by a gRPC-counting TCP proxy in front of "
           f"etcd over a {ka['window_s']:.0f} s window, all contenders at once. virtlease: one session lease "
           "per host. Recipe: one lease per Lock, each refreshed by our refresher thread at TTL/3 "
           "(python-etcd3 does not refresh locks by itself).", ""]
    recipe = {r["locks"]: r for r in ka["recipe"]}
    virtlease = {v["disks"]: v for v in ka["virtlease"]}
    rows = []
    for n in sorted(set(recipe) | set(virtlease)):
        v, r = virtlease.get(n), recipe.get(n)
        row = [f"{n:,}"] + ([f"{v['requests_per_min']:.0f}", f"{v['keepalives_per_min']:.0f}",
                             f"{v['expected_per_min']:.0f}"] if v else ["-", "-", "-"])
        rc, expected, pass_s, note = "-", "-", "-", ""
        if r is not None:
            rc, expected = f"{r['requests_per_min']:.0f}", f"{r['expected_per_min']:.0f}"
            pass_s = f"{r['refresh_pass_s']:.3f}" if r["refresh_pass_s"] is not None else "-"
            if r["extrapolated"]:
                rc += f" (extrapolated from {r['from_locks']:,} locks)"
                pass_s += " (extrapolated)"
            elif r["late_passes"]:
                note = f"{r['late_passes']} refresh passes late"
        rows.append([*row, rc, expected, pass_s, note])
    return out + _table(["disks held", "virtlease req/min", "virtlease keepalives_sent/min", "virtlease expected",
                         "recipe req/min", "recipe expected", "recipe refresh pass (s)", "note"], rows) + [
        f"A refresh pass must finish within TTL/3 = {ka['ttl'] / 3:.2f} s or the recipe's locks start to "
        "expire.", ""]


def _scale(res: dict[str, Any]) -> list[str]:
    s = res.get("scale")
    if not s:
        return []
    load = s["load"]
    head = ["## Scale: many host sessions on a three-member etcd", "",
            f"{load['hosts']:,} real host sessions in {s.get('workers', '?')} worker processes, each host "
            f"{load['vms_per_host']} VMs x {load['disks_per_vm']} disks (half on the driver's path, half on the "
            f"agent's), TTL {load['ttl']} s, against a three-member etcd of the section's own: "
            f"{s.get('idle_s', 0):.0f} s of keepalives only, {load['steady_s']:.0f} s of churn at "
            f"{load['churn_rate']:.0f} grant attempts/s, then {round(load['hosts'] * load['die_share'])} hosts killed "
            f"at once and {round(load['hosts'] * load['cut_share'])} cut off from etcd past their TTL "
            "(bench/README.md, \"Scale\"; `make bench-scale` runs 100, 300 and 1,000 hosts and fits a model).", ""]
    return [*head, *scale_report.rows([s]), *scale_report.targets(s)]


def _failover(res: dict[str, Any]) -> list[str]:
    rows = [[str(f["ttl"]), ", ".join(f"{t:.2f}" for t in f["trials"]), f"{f['mean_s']:.2f}",
             f"{f['bound_low_s']:.2f} - {f['bound_high_s']:.2f} (+ expiry sweep <= 0.5)"] for f in res["failover"]]
    head = ["## Failover: kill -9 of the holder to another host's grant", "",
            "Holder in a subprocess (4-disk VM), killed at a random point of its keepalive interval; another "
            "host tries acquire every 50 ms.", ""]
    return [*head, *_table(["TTL s", "seconds to grant (each trial)", "mean s", "expected s"], rows)]


def _handoff(res: dict[str, Any]) -> list[str]:
    c = res["ceiling"]["p50_ms"]
    rows = []
    for h in res["handoff"]:
        rows.append([str(h["disks"]), _ms(h["handoff"]["p50_ms"]), _ms(h["handoff"]["p99_ms"]),
                     _ms(h["prepare"]["p50_ms"]), _ms(h["claim"]["p50_ms"]), _x(h["handoff"]["p50_ms"] / c),
                     _ms(h["complete_out"]["p50_ms"]), str(h["handoff"]["n"])])
    head = ["## Handoff: migration latency", "",
            f"prepare_migrate on the source + acquire(state) claim on the destination; ceiling txn p50 "
            f"{_ms(c)} ms from the same client library. complete_migrate_out is timed apart.", ""]
    return [*head, *_table(["disks", "handoff p50 ms", "p99 ms", "prepare p50", "claim p50", "/ceiling",
                            "complete_migrate_out p50", "n"], rows)]


def _agent(res: dict[str, Any]) -> list[str]:
    a = res.get("agent")
    if not a:
        return []
    rows = [[label, _ms(a[key]["p50_ms"]), _ms(a[key]["p99_ms"]), str(a[key]["n"])]
            for label, key in (("virtlease agent (socket, 2 etcd txns)", "agent_ms"),
                               ("virtlockd (local fcntl only)", "virtlockd_ms"),
                               ("one etcd txn (the floor is two)", "etcd_txn_ms"))
            if isinstance(a.get(key), dict) and "p50_ms" in a[key]]
    lines = ["## Agent: the lockd socket", "",
             "ACQUIRE + RELEASE of one disk over the lockd protocol (a REGISTERed owner, one connection).", "",
             *_table(["daemon", "p50 ms", "p99 ms", "n"], rows)]
    crash = a.get("crash")
    if crash:
        lines += [f"Agent `kill -9`, TTL {crash['ttl_s']} s: with no restart its guard killed the owner after "
                  f"{crash['owner_killed_after_s']:.2f} s (before the lease could expire); restarted at once, "
                  f"the new agent served after {crash['restart_serving_after_s']:.2f} s and the owner "
                  f"{'survived' if crash['owner_survived_restart'] else 'did NOT survive'}.", ""]
    floor, pair = a.get("etcd_txn_ms") or {}, a.get("agent_ms") or {}
    if "p50_ms" in floor and "p50_ms" in pair:
        lines += [f"The agent's pair is {pair['p50_ms'] / floor['p50_ms']:.2f}x one etcd transaction (p50, same run).", ""]
    py = a.get("python_call_ms") or {}
    if all("p50_ms" in py.get(k, {}) for k in ("bare", "pool_hop")):
        lines += [f"The least one call to a Python lockd server costs here, with no lock work (bench/pycall.py, "
                  f"p50): {py['bare']['p50_ms']:.3f} ms answered in its event loop, {py['pool_hop']['p50_ms']:.3f} "
                  "ms through a worker thread (as the agent hands a driver call over); a pair is two calls.", ""]
    rig = a.get("libvirt") or {}
    rows = [[what, *(f"{rig[key][d]['p50']:.{digits}f} / {rig[key][d]['p99']:.{digits}f} / "
                     f"{rig[key][d]['max']:.{digits}f}" for d in ("agent", "virtlockd")),
             str(rig[key]["agent"]["n"])]
            for what, key, digits in (("`virsh start`, s", "start_s", 3), ("`virsh migrate --live`, s", "migrate_s", 3),
                                      ("guest downtime, ms", "downtime_ms", 1))
            if all("p50" in rig.get(key, {}).get(d, {}) for d in ("agent", "virtlockd"))]
    if rows:
        members = (rig.get("etcd_members") or {}).get("agent", 1)
        lines += [f"On the two-host libvirt rig (the agent over {members} etcd member(s), the two measured in "
                  f"turns; p50 / p99 / max; load average after: {rig.get('load_after', float('nan')):.1f}):", "",
                  *_table(["", "agent", "virtlockd", "n"], rows)]
        lone = rig.get("lone_txn_ms") or {}
        if "p50" in lone:
            lines += [f"One etcd transaction coming alone on the rig's three members (after "
                      f"{rig.get('lone_gap_ms', 30):.0f} ms of quiet, as a "
                      f"migration's claim comes): p50 {lone['p50']:.2f} ms, p99 {lone['p99']:.2f} ms (n={lone['n']}); "
                      "the floor above is back to back on one member.", ""]
    return lines


def _identity(res: dict[str, Any]) -> list[str]:
    rows = [[r["case"], str(r["disks"]), str(r["keys"]), _ms(r["driver_p50_ms"]), _ms(r["hand_p50_ms"]),
             _x(r["ratio"])] for r in res.get("identity") or []]
    head = ["## Disk identity: driver vs the same transactions by hand", "",
            "One domain's acquire + release through the etcd driver (identity resolution included) and the "
            "same two etcd transactions built by hand on the same client, called in turn (bench/identity.py; "
            "the target: at most about 2.8x).", ""]
    return [*head, *_table(["case", "disks", "keys", "driver p50 ms", "by hand p50 ms", "ratio"], rows)] if rows else []


def markdown(res: dict[str, Any]) -> str:
    lines = ["# virtlease benchmarks", "", *_machine(res)]
    for section in (_latency, _throughput, _keepalive, _scale, _failover, _handoff, _identity, _agent):
        lines += section(res)
    if res.get("plots"):
        lines += ["Plots: " + ", ".join(f"`{p}`" for p in res["plots"]), ""]
    return "\n".join(lines)


def write(res: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "latest.md", out / "latest.json"
    md.write_text(markdown(res))
    js.write_text(json.dumps(res, indent=2) + "\n")
    return md, js
