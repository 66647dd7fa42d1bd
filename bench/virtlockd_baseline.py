"""Baseline figures of stock libvirt + virtlockd on the two-host rig (lab/virtlease_lab/libvirt/rig.py).

    python bench/virtlockd_baseline.py [--starts 10] [--migrations 10] [--rtt 2000] [--json OUT]

Measures what the virtlease agent will be compared with, behind the same
libvirt: the rig's start (cold, with an empty QEMU capabilities cache, and
warm), ``virsh start`` of a small TCG domain, ``virsh migrate --live`` wall
time and guest downtime (source QMP STOP to destination QMP RESUME, QEMU's own
timestamps from the libvirtd logs; plus the gap between the source's lock
release at pause and the destination's acquire at resume, from the lockd
plugin's log lines), the lease release after ``kill -9`` of a QEMU, and the
ACQUIRE_RESOURCE + RELEASE_RESOURCE round trip on virtlockd's socket, spoken
with the agent's lockd client (``virtlease_etcd.agent.lockdclient``).  Needs root and deploy/libvirt/install.sh.
Prints a markdown report; ``--json`` also writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from virtlease_etcd.agent.lockdclient import LockdClient, RemoteCallError, make_owner
from virtlease_lab.libvirt.rig import Rig, RigError
from virtlease_lab.stats import summary
from virtlease_lab.waiting import wait_for


# ---------------------------------------------------------------- measurements
def measure_up(workdir: Path, cache: Path) -> dict[str, float]:
    """Rig start, first define and first start of a domain, with the capabilities cache in ``cache``."""
    r = Rig(workdir, cache_dir=cache)
    up = r.up()
    try:
        t0 = time.monotonic()
        r.define_domain("A", "first", ["first.img"])
        define = time.monotonic() - t0
        _, start = r.start("A", "first")
    finally:
        r.down()
    return {"up_s": up, "first_define_s": define, "first_start_s": start, "up_to_running_s": up + define + start}


def measure_starts(r: Rig, n: int) -> list[float]:
    """``virsh start`` wall times of one domain, destroyed between starts."""
    r.define_domain("A", "starter", ["starter.img"])
    out = []
    for _ in range(n):
        out.append(r.start("A", "starter")[1])
        r.virsh("A", "destroy", "starter")
    return out


def _lock_line_times(r: Rig, host: str, func: str, since: float) -> list[float]:
    """Times of the lockd plugin's ``func`` debug lines in the host's libvirtd log."""
    out = []
    for line in (r.hosts[host].log / "libvirtd.log").read_text(errors="replace").splitlines():
        if f" {func}:" in line:
            t = Rig.log_time(line)
            if t >= since:
                out.append(t)
    return out


def measure_migrations(r: Rig, n: int) -> dict[str, list[float]]:
    """Live migrations back and forth: wall time, QMP STOP→RESUME downtime, lock pause→resume gap."""
    r.define_domain("A", "mover", ["mover.img"])
    r.start("A", "mover")
    wall, downtime, gap = [], [], []
    src, dst = "A", "B"
    for _ in range(n):
        t0 = time.time() - 0.001
        wall.append(r.migrate("mover", src, dst))
        stop, resume = r.qmp_events(src, "STOP", t0), r.qmp_events(dst, "RESUME", t0)
        downtime.append(resume[-1] - stop[0])
        pause = _lock_line_times(r, src, "virDomainLockProcessPause", t0)
        res = _lock_line_times(r, dst, "virDomainLockProcessResume", t0)
        gap.append(res[-1] - pause[0])
        src, dst = dst, src
    r.reset()
    return {"wall": wall, "downtime": downtime, "lock_gap": gap}


def measure_kill9(r: Rig, n: int) -> list[float]:
    """Seconds from ``kill -9`` of the lease holder's QEMU on A until our own ACQUIRE on B succeeds."""
    disk = r.image("kill.img")
    r.define_domain("A", "victim", [disk])
    out = []
    client = LockdClient(r.hosts["B"].lockd_socket)
    client.register(make_owner("kill-probe"))
    try:
        for _ in range(n):
            r.start("A", "victim")
            pid = r.qemu_pid("A", "victim")
            assert pid
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            while True:
                try:
                    client.acquire(str(disk))
                    break
                except RemoteCallError:
                    time.sleep(0.001)
            out.append(time.monotonic() - t0)
            client.release(str(disk))
            wait_for(lambda: r.domstate("A", "victim") == "shut off", 5.0, 0.01, "A to see the crash")
    finally:
        client.close()
    r.reset()
    return out


def measure_rtt(r: Rig, n: int) -> dict[str, list[float]]:
    """REGISTER (new connection) and ACQUIRE_RESOURCE + RELEASE_RESOURCE round trips on A's virtlockd."""
    disk = str(r.image("rtt.img"))
    register = []
    for i in range(min(n, 200)):
        t0 = time.perf_counter()
        c = LockdClient(r.hosts["A"].lockd_socket)
        c.register(make_owner(f"reg{i}"))
        register.append(time.perf_counter() - t0)
        c.close()
    c = LockdClient(r.hosts["A"].lockd_socket)
    c.register(make_owner("rtt"))
    pair, acquire, release = [], [], []
    try:
        for _ in range(100):  # warm-up
            c.acquire(disk)
            c.release(disk)
        for _ in range(n):
            t0 = time.perf_counter()
            c.acquire(disk)
            t1 = time.perf_counter()
            c.release(disk)
            t2 = time.perf_counter()
            pair.append(t2 - t0)
            acquire.append(t1 - t0)
            release.append(t2 - t1)
        # the refusal path: B's virtlockd, same kernel, while A holds the disk
        c.acquire(disk)
        other = LockdClient(r.hosts["B"].lockd_socket)
        other.register(make_owner("rtt-b"))
        refused = []
        for _ in range(min(n, 500)):
            t0 = time.perf_counter()
            try:
                other.acquire(disk)
                raise RuntimeError("B acquired a disk A holds")
            except RemoteCallError:
                refused.append(time.perf_counter() - t0)
        other.close()
        c.release(disk)
    finally:
        c.close()
    return {"register_new_conn": register, "acquire_release": pair, "acquire": acquire,
            "release": release, "acquire_refused": refused}


def report(fig: dict[str, Any]) -> str:
    """The figures as a markdown report."""
    lines = ["# Stock virtlockd baseline on the two-host rig", "",
             f"libvirt {fig['libvirt']}, QEMU under TCG, 64 MiB guests without an OS; {fig['cpus']} CPUs.", "",
             "| what | n | min | p50 | p99 | max |", "|---|---|---|---|---|---|"]

    def row(label: str, s: dict[str, float], unit: str) -> None:
        lines.append(f"| {label} ({unit}) | {s['n']} | {s['min']:.3f} | {s['p50']:.3f} | {s['p99']:.3f} "
                     f"| {s['max']:.3f} |")

    row("virsh start", fig["start"], "s")
    row("virsh migrate --live, wall", fig["migrate_wall"], "s")
    row("guest downtime, src STOP → dst RESUME", fig["downtime"], "ms")
    row("no lease held, src lock pause → dst lock resume (log, ms resolution)", fig["lock_gap"], "ms")
    row("kill -9 of QEMU on A → ACQUIRE on B succeeds", fig["kill9"], "ms")
    row("REGISTER on a new connection", fig["register_new_conn"], "µs")
    row("ACQUIRE_RESOURCE + RELEASE_RESOURCE", fig["acquire_release"], "µs")
    row("ACQUIRE_RESOURCE", fig["acquire"], "µs")
    row("RELEASE_RESOURCE", fig["release"], "µs")
    row("ACQUIRE_RESOURCE refused (busy, other host)", fig["acquire_refused"], "µs")
    lines += ["", "| rig start | up | first define | first start | up → running |", "|---|---|---|---|---|"]
    for kind in ("cold", "warm"):
        u = fig["up"][kind]
        lines.append(f"| {kind} | {u['up_s']:.2f} s | {u['first_define_s']:.2f} s | {u['first_start_s']:.2f} s "
                     f"| {u['up_to_running_s']:.2f} s |")
    lines.append(f"| rig down | {fig['down_s']:.2f} s | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every measurement and print the report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--migrations", type=int, default=10)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--rtt", type=int, default=2000, help="ACQUIRE+RELEASE iterations (>= 1000 for p99)")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    ns = ap.parse_args(argv)
    fig: dict[str, Any] = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="virtlockd-baseline-") as tmp:
        base = Path(tmp)
        print("rig start, cold capabilities cache ...", file=sys.stderr)
        fig["up"] = {"cold": measure_up(base / "cold", base / "cache")}
        print("rig start, warm ...", file=sys.stderr)
        fig["up"]["warm"] = measure_up(base / "warm", base / "cache")
        r = Rig(base / "rig", cache_dir=base / "cache")
        r.up()
        try:
            fig["libvirt"] = r.virsh("A", "version", "--daemon").stdout.split("\n")[0].split()[-1]
            print("virsh start ...", file=sys.stderr)
            fig["start"] = summary(measure_starts(r, ns.starts))
            r.reset()
            print("live migrations ...", file=sys.stderr)
            mig = measure_migrations(r, ns.migrations)
            fig["migrate_wall"] = summary(mig["wall"])
            fig["downtime"] = summary(mig["downtime"], 1e3)
            fig["lock_gap"] = summary(mig["lock_gap"], 1e3)
            print("kill -9 ...", file=sys.stderr)
            fig["kill9"] = summary(measure_kill9(r, ns.kills), 1e3)
            print(f"lockd round trips x{ns.rtt} ...", file=sys.stderr)
            for key, values in measure_rtt(r, ns.rtt).items():
                fig[key] = summary(values, 1e6)
        finally:
            t0 = time.monotonic()
            r.down()
            fig["down_s"] = time.monotonic() - t0
    print(report(fig))
    if ns.json:
        ns.json.write_text(json.dumps(fig, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RigError as e:
        print(f"rig: {e}", file=sys.stderr)
        sys.exit(1)
