"""The virtlease agent: lock round trip on its socket, and what a crash costs.

    python bench/agent.py [--quick] [--endpoints HOST:PORT] [--json OUT]   # standalone
    (also the ``agent`` section of bench/run.py)

* ``rtt``: ACQUIRE + RELEASE of one disk on one registered connection, over the agent's socket
  (the agent as a real process, as libvirt talks to it), p50/p99.  The owner stays alive, so
  after the first grant each RELEASE reserves the disk and each ACQUIRE resumes it (libvirt's
  pause/resume): one etcd transaction each; beside it the same on stock
  **virtlockd** on this machine (started in a private mount namespace, so it never touches the
  host's /run/libvirt; skipped with the reason if virtlockd or unshare is missing or not root) and
  the **etcd floor**: one compare-and-swap transaction (an ACQUIRE is one txn, a RELEASE one).
* ``python_call_ms``: the least one call to a Python lockd server costs here, with no lock work
  (bench/pycall.py: an asyncio echo, answered in its loop or through a worker thread as the agent
  hands its driver calls over): the pair's cost above its two transactions cannot go below two.
* ``crash``: ``kill -9`` of the agent while a stand-in QEMU (``sleep``) holds a disk through it:
  without a restart, seconds until the guard kills the QEMU (vs the TTL: it must be before the
  lease can expire); with an immediate restart, seconds until the new agent serves and whether the
  QEMU survived past the TTL.
* ``libvirt`` (full run, or ``--libvirt``): ``virsh start`` of a small TCG domain and live
  migrations back and forth (wall time, guest downtime) on the two-host libvirt rig
  (lab/virtlease_lab/libvirt/) with stock virtlockd and with the agent over a three-member etcd that
  each host's agent dials itself, as on a real host (no test relay on its path); root and
  deploy/libvirt/install.sh, skipped with the reason otherwise.  Beside it, one etcd transaction
  coming *alone* on the rig's members (after 30 ms of quiet, as a migration's claim comes), where
  the floor above is back to back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import etcd3

from cluster import Cluster
from contenders import Ceiling
from measure import Latency, progress, time_calls
from plan import Plan
from pycall import python_call_floor
from virtlease_etcd.agent.lockdclient import LockdClient, make_owner
from virtlease_lab.agentprocess import AgentProcess


def _owner_process() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "3600"])


def socket_rtt(path: Path, disk: str, owner_pid: int, n: int, budget: float) -> dict[str, Any]:
    """ACQUIRE+RELEASE pairs on one connection; p50/p99 in ms."""
    with LockdClient(path) as c:
        c.register(make_owner("bench-rtt", pid=owner_pid, owner_uuid=uuid.uuid4()))

        def pair() -> None:
            c.acquire(disk)
            c.release(disk)

        return Latency.of(time_calls(pair, max_n=n, budget=budget, warmup=20)).as_dict()


def virtlockd_rtt(tmp: Path, disk: str, owner_pid: int, n: int, budget: float) -> dict[str, Any]:
    """The same pairs on a stock virtlockd in its own mount namespace."""
    if os.geteuid() != 0 or not shutil.which("virtlockd") or not shutil.which("unshare"):
        return {"skipped": "needs root, virtlockd and unshare"}
    (tmp / "vl").mkdir()
    script = ("mount -t tmpfs tmpfs /run/libvirt 2>/dev/null || { mkdir -p /run/libvirt && "
              "mount -t tmpfs tmpfs /run/libvirt; } && exec virtlockd")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sock = Path(f"/proc/{proc.pid}/root/run/libvirt/virtlockd-sock")
        until = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > until:
                return {"skipped": f"virtlockd did not start (exit {proc.poll()})"}
            time.sleep(0.05)
        return socket_rtt(sock, disk, owner_pid, n, budget)
    finally:
        proc.terminate()
        proc.wait(10)


def etcd_floor(cluster: Cluster, n: int, budget: float) -> dict[str, Any]:
    client = cluster.client()
    try:
        worker = Ceiling(client, f"/bench-{cluster.run_id}/agent/floor")
        lat = Latency.of(time_calls(worker.op, max_n=n, budget=budget, warmup=20))
        worker.close()
        return lat.as_dict()
    finally:
        client.close()


def _hold(agent: Any, disk: str, pid: int) -> None:
    with LockdClient(agent.socket) as c:
        c.register(make_owner("bench-crash", pid=pid, owner_uuid=uuid.uuid4()))
        c.acquire(disk)


def crash(cluster: Cluster, tmp: Path, disk: str, ttl: int) -> dict[str, Any]:
    """kill -9 with and without a restart (see the module docstring)."""
    out: dict[str, Any] = {"ttl_s": ttl}
    for restart in (False, True):
        run = tmp / f"crash-{int(restart)}"
        run.mkdir(mode=0o700)
        agents: list[Any] = [AgentProcess(run, cluster.endpoint, cluster.prefix, cluster.host_name(f"crash{int(restart)}"),
                               ttl=ttl)]
        owner = _owner_process()
        try:
            _hold(agents[0], f"{disk}.crash{int(restart)}", owner.pid)  # the first trial's disk stays held a TTL
            killed = time.monotonic()
            agents[0].proc.kill()
            if not restart:
                owner.wait(ttl + 5)
                out["owner_killed_after_s"] = round(time.monotonic() - killed, 3)
                continue
            agents.append(AgentProcess(run, cluster.endpoint, cluster.prefix,
                                       cluster.host_name(f"crash{int(restart)}"), ttl=ttl))
            out["restart_serving_after_s"] = round(time.monotonic() - killed, 3)
            time.sleep(max(0.0, killed + ttl + 1 - time.monotonic()))
            out["owner_survived_restart"] = owner.poll() is None
        finally:
            if owner.poll() is None:
                owner.kill()
            owner.wait(10)
            for a in agents:
                a.stop()
    return out


def libvirt_rig(n: int) -> dict[str, Any]:
    """On the two-host rig, stock virtlockd vs the agent over a three-member etcd (the rig's own,
    ``virtlease_lab.libvirt.agentrig``): ``virsh start`` wall times (s) and ``virsh migrate --live``
    back and forth: wall time (s) and guest downtime (ms, QEMU's STOP on the source to RESUME on
    the destination).  The two are measured in turns of ``n // 2`` (virtlockd, agent, virtlockd,
    agent), so both meet the same machine load."""
    if os.geteuid() != 0 or not shutil.which("libvirtd"):
        return {"skipped": "needs root and libvirt (deploy/libvirt/install.sh)"}
    from virtlease_lab.libvirt.agentrig import agent_rig
    from virtlease_lab.libvirt.rig import Rig
    from virtlease_lab.stats import summary
    from virtlockd_baseline import measure_migrations, measure_starts

    raw: dict[str, dict[str, list[float]]] = {label: {"start": [], "wall": [], "downtime": []}
                                              for label in ("virtlockd", "agent")}
    lone: list[float] = []
    with tempfile.TemporaryDirectory(prefix="vl-bench-rig-", dir="/tmp") as name:
        tmp = Path(name)
        for turn in range(2):
            for label in ("virtlockd", "agent"):
                work = tmp / f"{label}-{turn}"
                with contextlib.ExitStack() as stack:
                    if label == "virtlockd":
                        r = stack.enter_context(Rig(work, cache_dir=tmp / "cache", lock_daemon="virtlockd"))
                    else:
                        # no test relays: the agents dial the members, as on a real host
                        env = stack.enter_context(agent_rig(work, relays=False))
                        r = env.rig
                    raw[label]["start"] += measure_starts(r, max(1, n // 4))
                    mig = measure_migrations(r, n // 2)
                    raw[label]["wall"] += mig["wall"]
                    raw[label]["downtime"] += mig["downtime"]
                    if label == "agent":
                        lone += lone_txns(f"127.0.0.1:{env.etcd.members[0].client_port}",
                                          f"{env.prefix}/bench-lone", 40)
    out: dict[str, Any] = {"start_s": {}, "migrate_s": {}, "downtime_ms": {}, "etcd_members": {"agent": 3},
                           "load_after": os.getloadavg()[0], "lone_txn_ms": summary(lone, 1000.0),
                           "lone_gap_ms": LONE_GAP * 1000}
    for label, got in raw.items():
        out["start_s"][label] = summary(got["start"])
        out["migrate_s"][label] = summary(got["wall"])
        out["downtime_ms"][label] = summary(got["downtime"], 1000.0)
        progress(f"{label} on the rig: virsh start p50 {out['start_s'][label]['p50']:.3f} s, migrate p50 "
                 f"{out['migrate_s'][label]['p50']:.3f} s, guest downtime p50 "
                 f"{out['downtime_ms'][label]['p50']:.1f} ms p99 {out['downtime_ms'][label]['p99']:.1f} ms "
                 f"(n={len(got['downtime'])})")
    progress(f"one transaction alone on the rig's three members (after {LONE_GAP * 1000:.0f} ms idle): p50 "
             f"{out['lone_txn_ms']['p50']:.2f} ms p99 {out['lone_txn_ms']['p99']:.2f} ms")
    return out


LONE_GAP = 0.03
"""Seconds of quiet before each lone transaction (a migration's claim follows no other call)."""


def lone_txns(endpoint: str, key: str, n: int) -> list[float]:
    """Seconds each of ``n`` of the floor's transactions (:class:`contenders.Ceiling`, the same
    client library) takes at ``endpoint`` when it comes alone, after :data:`LONE_GAP` of quiet (as
    the claim in a migration's downtime does), not back to back as the floor's: the members and
    their threads have gone idle in between."""
    host, _, port = endpoint.rpartition(":")
    client = etcd3.client(host=host, port=int(port), timeout=10)
    worker = Ceiling(client, key)
    try:
        out = []
        for _ in range(n):
            time.sleep(LONE_GAP)
            start = time.perf_counter()
            worker.op()
            out.append(time.perf_counter() - start)
        return out
    finally:
        worker.close()
        client.close()


def agent_section(cluster: Cluster, plan: Plan, *, libvirt: bool | None = None) -> dict[str, Any]:
    n, budget = (300, 1.5) if plan.quick else (3000, 8.0)
    ttl = 4 if plan.quick else 10
    res: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="virtlease-bench-agent-") as name:
        tmp = Path(name)
        os.chmod(tmp, 0o700)
        disk = tmp / "bench.img"
        disk.write_bytes(b"")
        owner = _owner_process()
        run = tmp / "rtt"
        run.mkdir(mode=0o700)
        agent = AgentProcess(run, cluster.endpoint, cluster.prefix, cluster.host_name("agent"), ttl=10)
        try:
            res["agent_ms"] = socket_rtt(agent.socket, str(disk), owner.pid, n, budget)
        finally:
            owner.kill()  # a RELEASE from a live owner keeps the disk reserved until it exits
            owner.wait()
            agent.signal(signal.SIGTERM)  # exits once the reservation is released
            agent.wait(15)
            agent.stop()
        progress(f"agent ACQUIRE+RELEASE: p50 {res['agent_ms']['p50_ms']:.3f} ms, p99 "
                 f"{res['agent_ms']['p99_ms']:.3f} ms")
        res["virtlockd_ms"] = virtlockd_rtt(tmp, str(disk), os.getpid(), n, budget)
        progress(f"virtlockd ACQUIRE+RELEASE: {res['virtlockd_ms']}")
        res["etcd_txn_ms"] = etcd_floor(cluster, n, budget)
        progress(f"etcd floor (one txn; a pair is two): p50 {res['etcd_txn_ms']['p50_ms']:.3f} ms")
        res["python_call_ms"] = python_call_floor(n, budget)
        progress("the least one call to a Python lockd server costs (no lock work): p50 "
                 f"{res['python_call_ms']['bare']['p50_ms']:.3f} ms answered in its event loop, "
                 f"{res['python_call_ms']['pool_hop']['p50_ms']:.3f} ms through a worker thread")
        res["crash"] = crash(cluster, tmp, str(disk), ttl)
        progress(f"agent crash: {res['crash']}")
    if libvirt if libvirt is not None else not plan.quick:
        res["libvirt"] = libvirt_rig(6 if plan.quick else 24)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--endpoints")
    p.add_argument("--json", type=Path)
    p.add_argument("--libvirt", action="store_true", help="also virsh start and migrate on the rig (default: full run only)")
    args = p.parse_args(argv)
    cluster = Cluster.start(args.endpoints)
    try:
        res = agent_section(cluster, Plan.make(args.quick), libvirt=args.libvirt or None)
    finally:
        cluster.stop()
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
