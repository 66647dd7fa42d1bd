"""Nemesis suite: prove that no disk ever has two writers under faults.

    python tests/safety/nemesis.py --duration 1800 --seed 7     # the long run
    pytest -m safety tests/safety                               # the short CI run

A run starts a three-member etcd cluster (``EmbeddedEtcd(size=3)``), a storage
model (``storage_model.StorageServer``) and several hosts
(``host_worker.py`` processes, each reaching every etcd member through its own
``TcpProxy``).  The hosts' workers contend for a few disks, write while they
hold them and migrate VMs between hosts (the harness relays the states).  A
nemesis injects faults at random: kill -9 a host (and its VMs) and restart it
with the same host_id; SIGSTOP a host past its TTL; cut or blackhole a host's
links to etcd; add latency; kill and restart the etcd leader; pause an etcd
member; kill the source or the destination in the middle of a migration.  In each
host a misbehaving caller (``misuse.py``, ``Settings.misuse``) replays, edits,
forges and cross-hands the states the hosts gossip, and writes like a real
holder whenever a misuse succeeds.

After each run the checker reads the recorded history (host event logs,
storage log, nemesis log, keyspace snapshots) and reports violations; the
summary of every run goes to stdout and ``tests/safety/results/latest.md``.
See README.md in this directory for what each check means.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

import etcd3  # noqa: E402
from storage_model import StorageServer, Write  # noqa: E402

from virtlease_etcd import clock  # noqa: E402
from virtlease_etcd.devtools.embedded import EmbeddedEtcd, Member  # noqa: E402
from virtlease_etcd.devtools.jsonwire import Channel, launch, python_argv  # noqa: E402
from virtlease_lab.tcpproxy import TcpProxy  # noqa: E402

mono = clock.now
RESULTS = HERE / "results"

HOST_FAULTS = ("kill_host", "stop_host", "cut_host", "blackhole_host", "delay_host")
ETCD_FAULTS = ("kill_etcd_leader", "pause_etcd_member")
MIGRATION_FAULTS = ("kill_source_mid_migration", "kill_dest_mid_migration")


@dataclass
class Settings:
    seed: int = 1
    run_length: float = 120.0
    hosts: int = 3
    workers: int = 3
    disks: int = 5
    ttl: int = 3
    fault_every: float = 2.5
    """Mean seconds between fault injections."""
    migrate_every: float = 1.5
    quiet: bool = False
    misuse: bool = True
    """Run a misbehaving caller in every host (misuse.py)."""


@dataclass
class Fault:
    kind: str
    target: str
    t0: float
    t1: float = 0.0
    inc: int = 0
    detail: str = ""


# --------------------------------------------------------------------------- hosts


class HostHandle:
    """Harness side of one host: its proxies and its current process."""

    def __init__(self, run: Run, host_id: str, members: list[Member]) -> None:
        self.run = run
        self.host_id = host_id
        self.proxies = [TcpProxy(m.endpoint) for m in members]
        self.inc = 0
        self.proc: subprocess.Popen[str] | None = None
        self.wire: Channel | None = None
        self.busy = False  # under a host fault

    @property
    def endpoints(self) -> str:
        return ",".join(p.endpoint for p in self.proxies)

    def events_path(self, inc: int) -> Path:
        return self.run.dir / "events" / f"{self.host_id}.{inc}.jsonl"

    def start(self) -> None:
        self.inc += 1
        cfg = {
            "host_id": self.host_id, "inc": self.inc, "endpoints": self.endpoints,
            "prefix": self.run.prefix, "ttl": self.run.s.ttl, "storage": str(self.run.storage_path),
            "events": str(self.events_path(self.inc)), "disks": self.run.disks,
            "workers": self.run.s.workers, "seed": self.run.rng.randrange(1 << 30),
            "gossip": str(self.run.gossip_path), "misuse": self.run.s.misuse,
        }
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
        with open(self.run.dir / f"{self.host_id}.{self.inc}.stderr", "w") as errf:
            proc = launch(python_argv(HERE / "host_worker.py"), cfg, env=env, stderr=errf, new_session=True)
        self.proc, self.wire = proc, Channel(proc)

    def wait_ready(self, timeout: float) -> bool:
        """True once this incarnation has its session (it sent its hello)."""
        hello = self.wire.wait_hello(timeout) if self.wire is not None else None
        return bool(hello and hello.get("ready"))

    def is_ready(self) -> bool:
        return self.alive() and self.wait_ready(0)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def call(self, op: str, timeout: float, **kw: Any) -> dict[str, Any] | None:
        """Send a command; None if no reply before ``timeout`` (a late
        reply is dropped) or the process is gone."""
        wire = self.wire
        return wire.call(op, timeout=timeout, **kw) if wire is not None else None

    def kill9(self) -> float:
        """The host and its VMs die at once (kill -9 of the process group)."""
        proc = self.proc
        assert proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        at = mono()
        proc.wait()
        return at

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def links(self, how: str, delay: float = 0.0) -> None:
        for p in self.proxies:
            if how == "cut":
                p.cut()
            elif how == "blackhole":
                p.blackhole()
            elif how == "delay":
                p.delay = delay
            else:
                p.heal()

    def stop_gracefully(self) -> None:
        if not self.alive():
            return
        self.signal(signal.SIGCONT)
        self.call("exit", timeout=40)
        assert self.proc is not None
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill9()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill9()
        for p in self.proxies:
            p.close()


# --------------------------------------------------------------------------- a run


class Run:
    def __init__(self, s: Settings, index: int, workdir: Path) -> None:
        self.s = s
        self.index = index
        self.rng = random.Random(s.seed * 1000 + index)
        self.dir = workdir / f"run{index}"
        if self.dir.exists():
            # a reused --workdir: an earlier run's events or etcd data would
            # be read as this run's history (or stop etcd from starting)
            print(f"removing the earlier history in {self.dir}", file=sys.stderr, flush=True)
            shutil.rmtree(self.dir)
        (self.dir / "events").mkdir(parents=True)
        self.prefix = f"/nemesis/r{index}"
        self.storage_path = self.dir / "storage.sock"
        self.gossip_path = self.dir / "gossip.jsonl"  # states the hosts saw, for the misbehaving callers
        self.gossip_path.touch()
        self.disks = [str(self.dir / "disks" / f"disk{i}.qcow2") for i in range(s.disks)]
        self.faults: list[Fault] = []
        self.flock = threading.Lock()
        self.snapshots: list[tuple[float, dict[str, tuple[int, int]]]] = []
        self.stop = threading.Event()
        self.etcd_busy = False
        self.threads: list[threading.Thread] = []
        self.migrations: Counter[str] = Counter()
        self.mid = 0
        self.notes: list[str] = []

    def log(self, msg: str) -> None:
        if not self.s.quiet:
            print(f"[run {self.index} {mono() - self.t_start:7.1f}s] {msg}", flush=True)

    # -- plumbing -----------------------------------------------------------------

    def spawn(self, fn: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def sleep(self, seconds: float) -> bool:
        """Sleep unless the run stops; True if it stopped."""
        return self.stop.wait(seconds)

    def record(self, fault: Fault) -> Fault:
        with self.flock:
            self.faults.append(fault)
        return fault

    def monitor(self) -> None:
        clients = [etcd3.client(host="127.0.0.1", port=m.client_port, timeout=1) for m in self.etcd.members]
        try:
            while not self.stop.is_set():
                t_read = mono()
                for c in self.rng.sample(clients, len(clients)):
                    try:
                        kvs = c.get_prefix(self.prefix + "/")
                        snap = {meta.key.decode(): (int(meta.lease_id), int(meta.mod_revision))
                                for _v, meta in kvs if b"/gen/" not in meta.key}
                        self.snapshots.append((t_read, snap))
                        break
                    except Exception:
                        continue
                self.stop.wait(0.5)
        finally:
            for c in clients:
                c.close()

    # -- nemesis ----------------------------------------------------------------------

    def idle_host(self) -> HostHandle | None:
        cands = [h for h in self.hosts if not h.busy and h.alive() and h.is_ready()]
        return self.rng.choice(cands) if cands else None

    def restart_host(self, h: HostHandle, after: float) -> None:
        self.sleep(after)
        h.links("heal")
        h.start()
        h.wait_ready(6 * self.s.ttl + 10)
        h.busy = False

    def nemesis(self) -> None:
        ttl = self.s.ttl
        while not self.sleep(self.rng.expovariate(1 / self.s.fault_every)):
            kind = self.rng.choice(HOST_FAULTS + HOST_FAULTS + ETCD_FAULTS)
            if kind in ETCD_FAULTS:
                if self.etcd_busy:
                    continue
                self.etcd_busy = True
                self.spawn(self.etcd_fault, kind)
                continue
            h = self.idle_host()
            if h is None:
                continue
            h.busy = True
            if kind == "kill_host":
                f = self.record(Fault(kind, h.host_id, 0.0, inc=h.inc))
                f.t0 = h.kill9()
                f.t1 = f.t0
                self.log(f"kill -9 {h.host_id}.{f.inc}")
                self.spawn(self.restart_host, h, self.rng.uniform(0.2, 2.0) * ttl)
            else:
                self.spawn(self.host_fault, kind, h)

    def host_fault(self, kind: str, h: HostHandle) -> None:
        ttl = self.s.ttl
        f = self.record(Fault(kind, h.host_id, mono(), inc=h.inc))
        if kind == "stop_host":
            h.signal(signal.SIGSTOP)
            f.t0 = mono()
            self.sleep(ttl + self.rng.uniform(0.3, 2.5))
            h.signal(signal.SIGCONT)
        elif kind in ("cut_host", "blackhole_host"):
            h.links("cut" if kind == "cut_host" else "blackhole")
            f.t0 = mono()
            # sometimes shorter than the fence deadline (the session survives)
            self.sleep(self.rng.choice([0.3, 0.5, 1.5, 2.5]) * ttl)
            h.links("heal")
        else:
            d = self.rng.choice([0.05, 0.2, 0.5, 1.0, 1.5])
            f.detail = f"{d}s per chunk"
            h.links("delay", d)
            self.sleep(self.rng.uniform(1, 3) * ttl)
            h.links("heal")
        f.t1 = mono()
        self.log(f"{kind} {h.host_id}.{f.inc} {f.t1 - f.t0:.1f}s {f.detail}")
        h.busy = False

    def etcd_fault(self, kind: str) -> None:
        try:
            if kind == "kill_etcd_leader":
                m = self.etcd.leader()
                if m is None:
                    return
                f = self.record(Fault(kind, m.name, mono()))
                m.kill()
                self.sleep(self.rng.uniform(0.5, 4.0))
                m.start()
            else:
                m = self.rng.choice(self.etcd.members)
                f = self.record(Fault(kind, m.name, mono()))
                m.pause()
                self.sleep(self.rng.uniform(0.5, 4.0))
                m.resume()
            f.t1 = mono()
            self.log(f"{kind} {m.name} {f.t1 - f.t0:.1f}s")
            self.sleep(2.0)  # let the cluster settle before the next etcd fault
        finally:
            self.etcd_busy = False

    # -- migrations ----------------------------------------------------------------------

    def migrator(self) -> None:
        while not self.sleep(self.rng.expovariate(1 / self.s.migrate_every)):
            ready = [h for h in self.hosts if h.alive() and h.is_ready()]
            if len(ready) < 2:
                continue
            src, dst = self.rng.sample(ready, 2)
            mode = "normal"
            roll = self.rng.random()
            if roll < 0.12 and not src.busy:
                mode, src.busy = "kill_source_mid_migration", True
            elif roll < 0.24 and not dst.busy:
                mode, dst.busy = "kill_dest_mid_migration", True
            self.migrate(src, dst, mode)

    def migrate(self, src: HostHandle, dst: HostHandle, mode: str) -> None:
        self.mid += 1
        mid = self.mid
        self.migrations["attempted"] += 1
        out = src.call("migrate_out", timeout=8, dest=dst.host_id, mid=mid)
        if out is None or not out.get("ok"):
            self.migrations[f"prepare refused ({(out or {}).get('error', 'no reply')})"] += 1
            if out is None:
                src.call("complete_out", timeout=8, mid=mid, cancel=True)
            for h in (src, dst):
                if mode != "normal" and h.busy and not any(
                        f.target == h.host_id and f.t1 == 0 for f in self.faults):
                    h.busy = False
            return
        if mode == "kill_source_mid_migration":
            f = self.record(Fault(mode, src.host_id, 0.0, inc=src.inc))
            f.t0 = f.t1 = src.kill9()
            self.log(f"{mode}: kill -9 {src.host_id}.{f.inc}")
            self.spawn(self.restart_host, src, self.rng.uniform(0.2, 2.0) * self.s.ttl)
            if self.rng.random() < 0.5:
                self.sleep(self.s.ttl + 1)  # the claim comes after the source's lease expired
        # the memory copy: the handoff state is in flight for a while (and the
        # misbehaving callers, who saw it in the gossip, may try it meanwhile)
        self.sleep(self.rng.uniform(0.05, 0.6))
        claim = dst.call("migrate_in", timeout=3 * self.s.ttl + 5, state=out["state"], uuid=out["uuid"],
                         name=out["name"], disks=out["disks"])
        ok = bool(claim and claim.get("ok"))
        self.migrations["claimed" if ok else f"claim refused ({(claim or {}).get('error', 'no reply')})"] += 1
        if mode == "kill_dest_mid_migration":
            f = self.record(Fault(mode, dst.host_id, 0.0, inc=dst.inc))
            f.t0 = f.t1 = dst.kill9()
            self.log(f"{mode}: kill -9 {dst.host_id}.{f.inc} (claim {'ok' if ok else 'failed'})")
            self.spawn(self.restart_host, dst, self.rng.uniform(0.2, 2.0) * self.s.ttl)
        if mode != "kill_source_mid_migration":
            done = src.call("complete_out", timeout=3 * self.s.ttl + 5, mid=mid, cancel=not ok)
            self.migrations["completed" if done and done.get("ok") else "complete_failed"] += 1

    # -- the whole run -------------------------------------------------------------------

    def execute(self) -> RunResult:
        s = self.s
        self.t_start = mono()
        self.storage = StorageServer(str(self.storage_path))
        (self.dir / "etcd").mkdir(exist_ok=True)
        self.etcd = EmbeddedEtcd(size=3, workdir=str(self.dir / "etcd")).start()
        self.hosts = [HostHandle(self, f"host{i}", self.etcd.members) for i in range(s.hosts)]
        try:
            for h in self.hosts:
                h.start()
            for h in self.hosts:
                if not h.wait_ready(30):
                    raise RuntimeError(f"{h.host_id} did not start")
            self.t_start = mono()
            self.log(f"started: {s.hosts} hosts x {s.workers} workers, {s.disks} disks, ttl {s.ttl}s")
            mon = threading.Thread(target=self.monitor, daemon=True)
            mon.start()
            workers = [threading.Thread(target=fn, daemon=True) for fn in (self.nemesis, self.migrator)]
            for t in workers:
                t.start()
            self.stop.wait(s.run_length)
            self.stop.set()
            for t in workers:
                t.join(timeout=60)
            for t in list(self.threads):
                t.join(timeout=8 * s.ttl + 20)
            # quiesce: everything healed and running, then a graceful stop
            for m in self.etcd.members:
                m.resume()
                m.start()
            for h in self.hosts:
                h.links("heal")
                h.signal(signal.SIGCONT)
            t_stop = mono()
            stoppers = [threading.Thread(target=h.stop_gracefully) for h in self.hosts]
            for t in stoppers:
                t.start()
            for t in stoppers:
                t.join(timeout=60)
            self.sleep_plain(s.ttl + 2)
            mon.join(timeout=5)
            leftover = self.final_keys()
            t_end = mono()
            with open(self.dir / "storage.jsonl", "w") as fh:
                for w in self.storage.log:
                    fh.write(json.dumps(w.__dict__) + "\n")
            with open(self.dir / "snapshots.jsonl", "w") as fh:
                for t_snap, snap in self.snapshots:
                    fh.write(json.dumps({"t": t_snap, "keys": snap}) + "\n")
            with open(self.dir / "faults.json", "w") as fh:
                json.dump([{**f.__dict__, "t0": f.t0 - self.t_start, "t1": f.t1 - self.t_start}
                           for f in self.faults], fh, indent=1)
        finally:
            for h in self.hosts:
                h.close()
            self.etcd.stop()
            self.storage.close()
            for m in self.etcd.members:
                shutil.rmtree(m.data_dir, ignore_errors=True)
        return check(self, leftover, t_stop, t_end)

    @staticmethod
    def sleep_plain(seconds: float) -> None:
        time.sleep(seconds)

    def final_keys(self) -> dict[str, bytes]:
        for m in self.etcd.members:
            c = etcd3.client(host="127.0.0.1", port=m.client_port, timeout=5)
            try:
                return {meta.key.decode(): v for v, meta in c.get_prefix(self.prefix + "/")}
            except Exception:
                continue
            finally:
                c.close()
        raise RuntimeError("no etcd member answers at the end of the run")


# --------------------------------------------------------------------------- checker


@dataclass
class Interval:
    iid: str
    host: str
    inc: int
    obj: str
    disk: str
    token: int
    start: float
    end: float
    end_reason: str
    via: str
    lease: int
    paused: bool = False


@dataclass
class RunResult:
    index: int
    seconds: float
    ops: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    """Safety: two writers, stale writes, fencing, lease expiry, leftovers."""
    liveness: list[str] = field(default_factory=list)
    """Locks nobody holds but nobody can take either (not a two-writer risk)."""
    errors: list[str] = field(default_factory=list)
    failover: list[float] = field(default_factory=list)
    fence_lead: list[float] = field(default_factory=list)
    release_lead: list[float] = field(default_factory=list)
    """Fence leads of VMs that had already called release() at the fence."""
    notes: list[str] = field(default_factory=list)
    misuse: list[dict[str, Any]] = field(default_factory=list)
    """One record per misuse attempt (misuse_outcomes): reporting only."""


def read_events(run: Run) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted((run.dir / "events").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by kill -9
                out.append(json.loads(line))
    out.sort(key=lambda e: e["t"])
    return out


def overlaps(windows: list[tuple[float, float]], a: float, b: float) -> bool:
    return any(w0 < b and a < w1 for w0, w1 in windows)


def check(run: Run, leftover: dict[str, bytes], t_stop: float, t_end: float) -> RunResult:
    ttl = run.s.ttl
    res = RunResult(run.index, t_end - run.t_start)
    events = read_events(run)
    writes: list[Write] = list(run.storage.log)
    faults = list(run.faults)
    for f in faults:
        res.faults[f.kind] += 1
    kills = {(f.target, f.inc): f.t0 for f in faults if f.kind.startswith("kill_") and "etcd" not in f.kind}
    stops: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for f in faults:
        if f.kind == "stop_host":
            stops[f.target].append((f.t0 - 0.05, (f.t1 or t_end) + 0.05))

    # -- operations ---------------------------------------------------------------
    for e in events:
        kind = e["ev"]
        if kind == "grant":
            res.ops[f"grant ({e['via']})"] += 1
        elif kind in ("acquire_call", "busy", "acquire_failed", "released", "lost", "session",
                      "claim_failed", "resume_refused", "rejected", "prepare_failed", "complete_out_failed",
                      "grant_after_loss", "release_failed"):
            res.ops[kind] += 1
        if kind == "violation":
            res.violations.append(f"{e['kind']}: host {e['host']}.{e['inc']} {e.get('detail', '')}")
        if kind == "unexpected_error":
            res.errors.append(f"non-VirtleaseError from {e.get('where')}: {e['error']}: {e['message']}")
    for k, n in run.migrations.items():
        res.ops[f"migration {k}"] += n
    res.ops["writes accepted"] = sum(1 for w in writes if w.accepted)
    res.ops["writes rejected (stale token)"] = sum(1 for w in writes if not w.accepted)

    # -- intervals ----------------------------------------------------------------
    ends = {e["iid"]: e for e in events if e["ev"] == "end"}
    vm_dead: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for e in events:
        if e["ev"] == "vm_dead":
            vm_dead[(e["host"], e["inc"], e["obj"])].append(e["t"])
    intervals: list[Interval] = []
    for e in events:
        if e["ev"] != "grant":
            continue
        # The writer is the VM: its interval ends at the first of the host's own
        # "end" record, the VM's observed death (recorded after the fact, so never
        # early) and a kill -9 of the whole host.
        candidates: list[tuple[float, str]] = []
        end = ends.get(e["iid"])
        if end is not None:
            candidates.append((float(end["t"]), str(end["reason"])))
        if (e["host"], e["inc"]) in kills and kills[(e["host"], e["inc"])] >= e["t"]:
            candidates.append((kills[(e["host"], e["inc"])], "host killed"))
        deaths = [d for d in vm_dead[(e["host"], e["inc"], e["obj"])] if d >= e["t"]]
        if deaths:
            candidates.append((min(deaths), "vm_dead"))
        t1, why = min(candidates) if candidates else (t_stop, "open at the end")
        deaths = [d for d in vm_dead[(e["host"], e["inc"], e["obj"])] if d >= e["t"]]
        if deaths and min(deaths) < t1:
            t1, why = min(deaths), f"vm_dead ({why} recorded later)"  # a dead VM writes nothing
        for disk, token in e["disks"].items():
            iv = Interval(e["iid"], e["host"], e["inc"], e["obj"], disk, int(token), float(e["t"]), t1, why,
                          e["via"], int(e.get("lease", 0)))
            iv.paused = overlaps(stops[iv.host], iv.start, iv.end)
            intervals.append(iv)
    by_disk: dict[str, list[Interval]] = defaultdict(list)
    for iv in intervals:
        by_disk[iv.disk].append(iv)
    paused_overlaps = 0
    for disk, ivs in by_disk.items():
        ivs.sort(key=lambda i: i.start)
        active: list[Interval] = []
        for b in ivs:
            active = [a for a in active if a.end > b.start]
            for a in active:
                if (a.host, a.inc, a.obj, a.token) == (b.host, b.inc, b.obj, b.token):
                    continue
                old = a if a.token < b.token else b
                if old.paused:
                    paused_overlaps += 1
                    continue
                res.violations.append(
                    f"two writers on {Path(disk).name}: {a.host}.{a.inc} token {a.token} "
                    f"[{a.start - run.t_start:.3f}, {a.end - run.t_start:.3f}] ({a.via}, ended {a.end_reason}) "
                    f"and {b.host}.{b.inc} token {b.token} [{b.start - run.t_start:.3f}, "
                    f"{b.end - run.t_start:.3f}] ({b.via}, ended {b.end_reason})")
            active.append(b)
    res.ops["paused holders overlapping a new holder (tokens protect)"] = paused_overlaps

    # -- tokens at the storage --------------------------------------------------------
    starts_by_disk: dict[str, tuple[list[int], list[float]]] = {}
    for disk, ivs in by_disk.items():
        srt = sorted(ivs, key=lambda i: i.token)
        tokens = [i.token for i in srt]
        suffix_min = [0.0] * len(srt)
        m = float("inf")
        for k in range(len(srt) - 1, -1, -1):
            m = min(m, srt[k].start)
            suffix_min[k] = m
        starts_by_disk[disk] = (tokens, suffix_min)
    by_iid = {(iv.iid, iv.disk): iv for iv in intervals}
    for w in writes:
        if not w.accepted:
            if "already used" in w.why:
                res.violations.append(f"token {w.token} of {Path(w.disk).name} used by two holders: {w.why}")
            continue
        tokens, suffix_min = starts_by_disk.get(w.disk, ([], []))
        k = bisect.bisect_right(tokens, w.token)
        if k < len(tokens) and suffix_min[k] < w.t_server:
            res.violations.append(
                f"stale write accepted on {Path(w.disk).name}: {w.host}.{w.inc} token {w.token} at "
                f"{w.t_server - run.t_start:.3f}, a newer token was granted at {suffix_min[k] - run.t_start:.3f}")
        iv = by_iid.get((w.iid, w.disk))
        if iv is None:
            res.violations.append(f"write by {w.host}.{w.inc} to {Path(w.disk).name} outside any recorded grant")
        elif not iv.start - 0.001 <= w.t_client <= iv.end + 0.001:
            res.violations.append(
                f"write by {w.host}.{w.inc} to {Path(w.disk).name} at {w.t_client - run.t_start:.3f} outside its "
                f"hold interval [{iv.start - run.t_start:.3f}, {iv.end - run.t_start:.3f}]")

    def first_foreign_grant(iv: Interval, after: float) -> Interval | None:
        cands = [o for o in by_disk[iv.disk] if o.token > iv.token and o.start >= after
                 and (o.host, o.inc) != (iv.host, iv.inc)]
        return min(cands, key=lambda o: o.start) if cands else None

    # -- fencing: a lost session kills its VMs before anyone else gets a disk --------------
    # Every object the lost session still held in etcd (granted on that lease, not
    # released, not migrated away) must have its VM dead before the first foreign
    # grant of any of its disks.
    done_at: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for e in events:
        if e["ev"] in ("released", "prepared") or (e["ev"] == "completed_out" and not e.get("cancel")):
            done_at[(e["host"], e["inc"], e["obj"])].append(float(e["t"]))
    grants_of: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e["ev"] == "grant":
            grants_of[(e["host"], e["inc"])].append(e)
    for e in events:
        if e["ev"] != "lost":
            continue
        host, inc, t_lost = e["host"], e["inc"], float(e["t"])
        if overlaps(stops[host], t_lost - ttl - 1, t_lost + 0.01):
            continue  # a paused host cannot fence in time: tokens protect (checked above)
        for g in grants_of[(host, inc)]:
            key = (host, inc, g["obj"])
            if int(g.get("lease", 0)) != int(e.get("lease", -1)) or g["t"] >= t_lost:
                continue
            if any(g["t"] <= d <= t_lost for d in done_at[key]):
                continue
            deaths = [d for d in vm_dead[key] if d >= g["t"]]
            died = min(deaths) if deaths else float("inf")
            if died < t_lost - 0.001:
                continue  # the VM was already gone: nothing to fence
            end = ends.get(g["iid"])
            releasing = end is not None and end["reason"] == "release" and float(end["t"]) < t_lost
            for disk, token in g["disks"].items():
                later = [o for o in by_disk[disk] if o.token > int(token) and (o.host, o.inc) != (host, inc)]
                if not later:
                    continue
                first = min(later, key=lambda o: o.start)
                if died < first.start:
                    # the fence lead; a VM that had already stopped and called
                    # release() before the fence has its lead reported apart, since
                    # the foreign grant may have followed that release, not the fence
                    (res.release_lead if releasing else res.fence_lead).append(first.start - died)
                elif releasing and first.start < t_lost + float(e["margin"]):
                    # the VM had stopped writing and called release(); the grant came
                    # before the lease could have expired in etcd (valid_until is
                    # fence + margin), so the release committed and its reply was
                    # lost (cut/slow link): not a holder any more
                    res.ops["release committed, reply lost (disk re-granted before the fence)"] += 1
                else:
                    res.violations.append(
                        f"{host}.{inc} lost its session at {t_lost - run.t_start:.3f} but the VM holding "
                        f"{Path(disk).name} died at {died - run.t_start:.3f}, after {first.host}.{first.inc} "
                        f"was granted it at {first.start - run.t_start:.3f}")

    # -- failover after kill -9 -----------------------------------------------------------
    for (host, inc), t_kill in kills.items():
        for iv in intervals:
            if (iv.host, iv.inc) == (host, inc) and iv.start < t_kill <= iv.end + 0.001:
                g = first_foreign_grant(iv, t_kill)
                if g is not None:
                    res.failover.append(g.start - t_kill)

    # -- no lease outlives its holder by more than TTL + 2 s ----------------------------------
    etcd_windows = [(f.t0, f.t1 or t_end) for f in faults if f.kind in ETCD_FAULTS]
    sessions: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for e in events:
        if e["ev"] == "session":
            sessions[e["host"]].append((float(e["t"]), int(e["lease"])))
    outages = [(f.target, f.t0, f.t1 or t_end) for f in faults
               if f.kind in ("stop_host", "cut_host", "blackhole_host")]
    outages += [(f.target, f.t0, t_end) for f in faults if f.kind in ("kill_host", *MIGRATION_FAULTS)]
    for host, t0, t1 in outages:
        leases = [lease for t, lease in sessions[host] if t <= t0]
        if not leases:
            continue
        lease = leases[-1]
        deadline = t0 + ttl + 2
        changed = True
        while changed:
            changed = False
            for w0, w1 in etcd_windows:
                if w0 <= deadline and w1 >= t0 - ttl and w1 + ttl + 3 > deadline:
                    deadline, changed = w1 + ttl + 3, True
        for t_snap, snap in run.snapshots:
            if deadline < t_snap <= t1:
                stuck = [k for k, (ls, _rev) in snap.items() if ls == lease]
                if stuck:
                    res.violations.append(
                        f"{len(stuck)} key(s) of {host}'s lease {lease:x} still in etcd "
                        f"{t_snap - t0:.1f}s after it went away ({stuck[0]})")
                    break

    # -- no holder key that nobody was told about (an acquire/claim reported failed
    #    but had committed: the disk stays locked for the rest of the session) ----------
    rid_disk = {hashlib.sha256(b"disk\0" + os.path.realpath(d).encode()).hexdigest(): os.path.realpath(d)
                for d in run.disks}
    granted = {(iv.disk, iv.token) for iv in intervals}
    seen: dict[tuple[str, int], tuple[float, list[float], int]] = {}
    for t_snap, snap in run.snapshots:
        for key, (ls, rev) in snap.items():
            if "/v1/res/" in key:
                span = seen.setdefault((key, rev), (t_snap, [t_snap], ls))
                span[1][0] = t_snap
    limit = 3 * ttl + 3
    for (key, rev), (first, lasts, ls) in seen.items():
        disk = rid_disk.get(key.split("/v1/res/", 1)[1].split("/", 1)[0], "?")
        if (disk, rev) not in granted and lasts[0] - first > limit:
            res.liveness.append(
                f"orphaned lock: {Path(disk).name} token {rev} on live lease {ls:x} held {lasts[0] - first:.1f}s "
                f"from {first - run.t_start:.1f}s by no VM (an acquire/claim reported failure but had committed)")

    # -- nothing left behind ------------------------------------------------------------------
    gen = f"{run.prefix}/v1/gen/"
    for key in leftover:
        if not key.startswith(gen):
            res.violations.append(f"key left in etcd after every host stopped: {key}")
    res.misuse = misuse_outcomes(run, events, by_disk, kills, t_end)
    return res


def parked_sources(events: list[dict[str, Any]], by_disk: dict[str, list[Interval]],
                   kills: dict[tuple[str, int], float], t_end: float) -> dict[str, list[tuple[float, float, str]]]:
    """Per disk, when a migration source held it without writing: from
    ``prepared`` to the destination's claim, the outcome of its complete_out
    or its host's death, whichever is first."""
    last_iv: dict[tuple[str, int, str], list[Interval]] = defaultdict(list)
    for ivs in by_disk.values():
        for iv in ivs:
            last_iv[(iv.host, iv.inc, iv.obj)].append(iv)
    out: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for e in events:
        if e["ev"] != "prepared":
            continue
        key, t0 = (e["host"], e["inc"], e["obj"]), float(e["t"])
        ends = [float(x["t"]) for x in events if x["ev"] in ("completed_out", "complete_out_failed")
                and (x["host"], x["inc"], x["obj"]) == key and float(x["t"]) >= t0]
        # the source stops holding when the destination's claim takes the records
        ends += [float(x["t"]) for x in events if x["ev"] == "grant" and x.get("via") == "claim"
                 and x.get("obj") == key[2] and float(x["t"]) >= t0]
        t1 = min([*ends, kills.get(key[:2], t_end), t_end])
        before = [iv for iv in last_iv[key] if iv.start <= t0]
        if not before:
            continue
        newest = max(iv.start for iv in before)
        for iv in before:
            if iv.start == newest:
                out[iv.disk].append((t0, t1, f"{iv.host}.{iv.inc} (migrating {iv.obj[:8]} to {e.get('dest')})"))
    return out


def misuse_outcomes(run: Run, events: list[dict[str, Any]], by_disk: dict[str, list[Interval]],
                    kills: dict[tuple[str, int], float], t_end: float) -> list[dict[str, Any]]:
    """Each misuse attempt, and for a success whether it was legitimate:
    when it was granted, nobody else's write interval was open on one of its
    disks and no migration source held one parked (a replayed state after
    the holder released is a legitimate resume).  Reporting only: the rules
    above decide the violations."""
    starts = {e["iid"]: float(e["t"]) for e in events if e["ev"] == "grant"}
    parked = parked_sources(events, by_disk, kills, t_end)
    out: list[dict[str, Any]] = []
    for e in events:
        if e["ev"] != "misuse":
            continue
        rec = {"kind": e["kind"], "variant": e["variant"], "outcome": e["outcome"], "error": e.get("error"),
               "legit": None, "held_by": ""}
        if e["outcome"] == "succeeded" and e.get("iid") in starts:
            t = starts[e["iid"]]
            others = [iv for d in e.get("tokens", {}) for iv in by_disk.get(d, [])
                      if iv.iid != e["iid"] and iv.start <= t < iv.end]
            live = [iv for iv in others if not iv.paused]
            sources = [(d, who) for d in e.get("tokens", {}) for t0, t1, who in parked.get(d, []) if t0 <= t < t1]
            rec["legit"] = not live and not sources
            rec["paused_holder"] = bool(others) and not live
            rec["parked_source"] = bool(sources) and not live
            if live:
                iv = live[0]
                rec["held_by"] = (f"{Path(iv.disk).name} held by {iv.host}.{iv.inc} token {iv.token} "
                                  f"({iv.via}) at {t - run.t_start:.3f}")
            elif sources:
                rec["held_by"] = f"{Path(sources[0][0]).name} held by migration source {sources[0][1]} " \
                                 f"at {t - run.t_start:.3f}"
        out.append(rec)
    return out


def misuse_section(results: list[RunResult], violations: list[str]) -> list[str]:
    attempts: Counter[str] = Counter()
    refused: dict[str, Counter[str]] = defaultdict(Counter)
    ok: dict[str, Counter[str]] = defaultdict(Counter)
    variants: dict[str, Counter[str]] = defaultdict(Counter)
    examples: dict[str, list[str]] = defaultdict(list)
    for r in results:
        for m in r.misuse:
            k = m["kind"]
            attempts[k] += 1
            if m["outcome"] == "refused":
                refused[k][str(m["error"])] += 1
                variants[k][f"{m['variant']} refused"] += 1
                continue
            label = ("granted after the session was lost" if m["outcome"] != "succeeded"
                     else "legitimate (nobody held the disk)" if m["legit"] and not m.get("paused_holder")
                     else "legitimate (only a paused holder past its TTL)" if m["legit"]
                     else "while a migration source held the disk (handoff taken)" if m.get("parked_source")
                     else "while another holder held the disk")
            ok[k][label] += 1
            variants[k][f"{m['variant']} succeeded {'legitimately' if m['legit'] else 'while held'}"] += 1
            if m["legit"] is False and len(examples[k]) < 5:
                examples[k].append(f"run {r.index}: {k}/{m['variant']}: {m['held_by']}")
    by_kind: Counter[str] = Counter()
    for v in violations:
        for k in attempts:
            if f"misuse:{k}/" in v:
                by_kind[k] += 1
    lines = ["## Misuse (the misbehaving caller)", ""]
    if not attempts:
        return [*lines, "none (misuse disabled)", ""]
    for k in sorted(attempts):
        lines.append(f"- **{k}**: {attempts[k]} attempt(s), {sum(refused[k].values())} refused, "
                     f"{sum(ok[k].values())} succeeded; two-writer violations naming it: {by_kind[k]}")
        lines += [f"  - refused ({err}): {n}" for err, n in sorted(refused[k].items())]
        lines += [f"  - succeeded {label}: {n}" for label, n in sorted(ok[k].items())]
        lines += [f"  - variant {label}: {n}" for label, n in sorted(variants[k].items())]
    if examples:
        lines += ["", "Successes while someone else held the disk (first 5 of each kind):", "",
                  *(f"- {x}" for k in sorted(examples) for x in examples[k])]
    return [*lines, ""]


# --------------------------------------------------------------------------- suite and report


def violation_kind(v: str) -> str:
    """A violation's rule, and whether a misuse grant is named in it."""
    text = v.split(": ", 1)[1] if v.startswith("run ") else v
    rule = next((r for r in ("two writers", "stale write accepted", "used by two holders", "outside",
                             "lost its session", "still in etcd", "key left", "vm_survived_loss")
                 if r in text), text.split(":", 1)[0])
    return f"{rule}{' (a misuse grant is one side)' if 'misuse:' in text else ''}"


def dist(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) >= 2 else [xs[0]] * 9
    return (f"n={len(xs)} min={xs[0]:.2f}s p50={statistics.median(xs):.2f}s p90={q[8]:.2f}s "
            f"max={xs[-1]:.2f}s")


@dataclass
class Summary:
    settings: Settings
    results: list[RunResult]
    wall: float

    @property
    def violations(self) -> list[str]:
        return [f"run {r.index}: {v}" for r in self.results for v in r.violations]

    @property
    def liveness(self) -> list[str]:
        return [f"run {r.index}: {v}" for r in self.results for v in r.liveness]

    @property
    def errors(self) -> list[str]:
        return [f"run {r.index}: {v}" for r in self.results for v in r.errors]

    def render(self) -> str:
        s = self.settings
        ops: Counter[str] = Counter()
        faults: Counter[str] = Counter()
        failover: list[float] = []
        lead: list[float] = []
        release_lead: list[float] = []
        for r in self.results:
            ops.update(r.ops)
            faults.update(r.faults)
            failover += r.failover
            lead += r.fence_lead
            release_lead += r.release_lead
        lines = [
            "# virtlease nemesis summary",
            "",
            f"- seed {s.seed}, {len(self.results)} run(s) of {s.run_length:.0f}s, wall time {self.wall:.0f}s",
            f"- {s.hosts} hosts x {s.workers} workers, {s.disks} disks, session TTL {s.ttl}s, "
            "3-member etcd",
            f"- **safety violations: {len(self.violations)}**",
            f"- liveness violations (orphaned locks): {len(self.liveness)}",
            f"- errors outside the API contract: {len(self.errors)}",
            f"- failover (host kill -9 -> another host's grant): {dist(failover)}",
            f"- fence lead (lost session's VM killed -> first foreign grant; must be > 0): {dist(lead)}",
            f"- fence lead of VMs whose release() was already in flight at the fence: {dist(release_lead)}",
            "",
            "## Faults injected",
            "",
            *(f"- {k}: {n}" for k, n in sorted(faults.items())),
            f"- total: {sum(faults.values())}",
            "",
            "## Operations",
            "",
            *(f"- {k}: {n}" for k, n in sorted(ops.items())),
            "",
            *misuse_section(self.results, self.violations),
            "## Safety violations",
            "",
            *(f"- {k}: {n}" for k, n in sorted(Counter(violation_kind(v) for v in self.violations).items())),
            *([""] if self.violations else []),
            *([f"- {v}" for v in self.violations[:200]] or ["none"]),
            "",
            "## Liveness violations",
            "",
            *([f"- {v}" for v in self.liveness[:100]] or ["none"]),
            "",
            "## Errors",
            "",
            *([f"- {v}" for v in self.errors[:100]] or ["none"]),
            "",
        ]
        return "\n".join(lines)


def run_suite(s: Settings, duration: float, workdir: str | None = None,
              write_report: bool = True) -> Summary:
    started = mono()
    base = Path(workdir or tempfile.mkdtemp(prefix="virtlease-nemesis-"))
    results: list[RunResult] = []
    index = 0
    keep = False
    try:
        while not results or mono() - started + s.run_length * 0.5 < duration:
            index += 1
            length = min(s.run_length, max(20.0, duration - (mono() - started)))
            run = Run(Settings(**{**s.__dict__, "run_length": length}), index, base)
            result = run.execute()
            results.append(result)
            if not s.quiet:
                print(f"run {index}: {len(result.violations)} safety violation(s), {len(result.liveness)} "
                      f"liveness, {sum(result.faults.values())} fault(s), {result.ops['writes accepted']} writes",
                      flush=True)
                for v in result.violations[:20]:
                    print("  VIOLATION", v, flush=True)
                for v in result.liveness[:20]:
                    print("  LIVENESS", v, flush=True)
            keep = keep or bool(result.violations or result.errors or result.liveness)
            if not keep and workdir is None:
                shutil.rmtree(run.dir, ignore_errors=True)
    finally:
        summary = Summary(s, results, mono() - started)
        if keep:
            print(f"history kept in {base}", flush=True)
        elif workdir is None:
            shutil.rmtree(base, ignore_errors=True)
        if write_report and results:
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / "latest.md").write_text(summary.render())
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=1800, help="total seconds (default 1800)")
    p.add_argument("--run-length", type=float, default=150, help="seconds per run (fresh etcd per run)")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    p.add_argument("--hosts", type=int, default=3)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--disks", type=int, default=5)
    p.add_argument("--ttl", type=int, default=3)
    p.add_argument("--fault-every", type=float, default=2.5, help="mean seconds between faults")
    p.add_argument("--workdir", help="keep the histories here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-misuse", action="store_true", help="no misbehaving caller in the hosts")
    p.add_argument("--strict", action="store_true", help="also fail (exit 1) on liveness violations")
    a = p.parse_args(argv)
    s = Settings(seed=a.seed, run_length=a.run_length, hosts=a.hosts, workers=a.workers, disks=a.disks,
                 ttl=a.ttl, fault_every=a.fault_every, quiet=a.quiet, misuse=not a.no_misuse)
    summary = run_suite(s, a.duration, a.workdir)
    print(summary.render())
    failed = summary.violations or summary.errors or (a.strict and summary.liveness)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
