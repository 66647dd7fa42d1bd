"""One scale run at one size: the phases, in order, and the figures each leaves.

1. **etcd**: three members (``rig.EtcdRig``), a watch on the host keys, the /proc sampler.
2. **workers**: the die group, the cut group (its endpoints are TCP proxies the run controls)
   and the steady hosts in processes of ``hosts_per_worker``; each ``open``\\ s its sessions.
3. **populate**: every host starts ``vms_per_host`` VMs of ``disks_per_vm`` disks.
4. **idle**: keepalives only, for ``idle_s``: what a thousand sessions cost etcd by themselves.
5. **steady**: keepalives + churn at ``churn_rate`` grant attempts/s for ``steady_s``, with
   ``virtlease status`` timed at full population now and then: the false-fence window.
6. **die**: SIGKILL of the die group's process (``die_share`` of the hosts at once); the
   steady workers take over every VM of the dead hosts (probe, then the rest); the host-key
   watch says when etcd freed each dead host's disks.
7. **cut**: the cut group's proxies drop every byte for ``ttl + cut_extra_s``: each of its
   hosts must fence itself before etcd expires its lease (``fence lead`` > 0).

Churn goes on through 6 and 7.  Sessions lost outside the die and cut groups are *false
fences*.  Returns one JSON-able dict (see ``report.py`` for what is shown).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from virtlease_etcd.cli.tables import PLAIN_ROWS, print_status
from virtlease_etcd.config import load_config
from virtlease_etcd.devtools import jsonwire
from virtlease_etcd.etcd.client import EtcdClient
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.ops.status import read_status
from virtlease_lab.relay import Relay

from .rig import HANDLING, EtcdRig, HostKeyWatch, Sampler, etcd_stalls, histogram_quantile, machine_jiffies
from .stats import Histograms
from .workload import CUT, DIE, STEADY, Workload

BENCH = Path(__file__).resolve().parent.parent


def progress(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[scale {stamp}] {message}", file=sys.stderr, flush=True)


class WorkerHandle:
    """One worker process and its wire."""

    def __init__(self, number: int, group: str, hosts: list[int], load: Workload, endpoints: str,
                 steady_hosts: list[int], logdir: Path) -> None:
        self.number, self.group, self.hosts = number, group, hosts
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(BENCH), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.log_path = logdir / f"worker-{number}-{group}.log"
        with open(self.log_path, "wb") as log:
            proc = jsonwire.launch(jsonwire.python_argv("scale.worker"),
                                   {"load": load.as_dict(), "group": group, "worker": number,
                                    "hosts": hosts, "endpoints": endpoints, "steady_hosts": steady_hosts},
                                   env=env, stderr=log)
        self.proc = proc
        self.wire = jsonwire.Channel(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def hello(self, timeout: float = 60) -> None:
        if self.wire.wait_hello(timeout) is None:
            raise RuntimeError(f"worker {self.number} ({self.group}) did not start: see {self.log_path}")

    def call(self, op: str, timeout: float = 600, **kw: Any) -> dict[str, Any]:
        reply = self.wire.call(op, timeout=timeout, **kw)
        if reply is None:
            raise RuntimeError(f"worker {self.number} ({self.group}): no reply to {op} (see {self.log_path})")
        if not reply.get("ok"):
            raise RuntimeError(f"worker {self.number} ({self.group}): {op} failed: {reply.get('error')}")
        return reply

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def each(workers: list[WorkerHandle], fn: Callable[[WorkerHandle], dict[str, Any]]) -> list[dict[str, Any]]:
    """``fn`` on every worker at once (threads); the replies in worker order."""
    out: list[dict[str, Any] | BaseException] = [RuntimeError("no reply")] * len(workers)

    def run(i: int, w: WorkerHandle) -> None:
        try:
            out[i] = fn(w)
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i, w), daemon=True) for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return [r for r in out if not isinstance(r, BaseException)]


def time_command(argv: list[str]) -> tuple[float, Any, int, int, list[str]]:
    """Run ``argv`` with its output to a file: (wall seconds, its rusage, exit status, output
    bytes, stderr lines)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        size = out.seek(0, os.SEEK_END)
        err.seek(0)
        problem = err.read().decode(errors="replace").strip().splitlines()
    return wall, usage, proc.returncode, size, problem


def time_status(load: Workload, endpoints: str, as_json: bool) -> dict[str, Any]:
    """Run the ``virtlease status`` command (a process of its own, as an operator would) and
    time it: wall seconds, peak RSS, CPU, exit status, output bytes; and, just before,
    ``virtlease --help`` (``startup_s``: the interpreter and imports, which any command pays)."""
    exe = str(Path(sys.executable).with_name("virtlease"))
    startup = time_command([exe, "--help"])[0]
    wall, usage, code, size, problem = time_command(
        [exe, "--endpoints", endpoints, "--prefix", load.prefix, "status", *(["--json"] if as_json else [])])
    return {"json": as_json, "seconds": round(wall, 3), "rss_peak_mib": round(usage.ru_maxrss / 1024, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3), "exit": code,
            "output_bytes": size, "error": problem[0] if code and problem else None, "startup_s": round(startup, 3)}


def time_status_parts(load: Workload, endpoints: str) -> dict[str, Any]:
    """The parts of ``virtlease status`` in this process, as the command runs them: the read
    (``read_status``), the table printed (to /dev/null) and the JSON made."""
    cfg = load_config({"endpoints": endpoints, "prefix": load.prefix})
    client = EtcdClient(cfg)
    try:
        t0 = time.perf_counter()
        st = read_status(client, ks.Keys(cfg.prefix), timeout=max(cfg.request_timeout * 2, 4.0))
        t1 = time.perf_counter()
        with open(os.devnull, "w") as null:
            print_status(st, Console(file=null, width=160, highlight=False, soft_wrap=False))
        t2 = time.perf_counter()
        compact = len(st.resources) > PLAIN_ROWS  # as the command prints it
        text = json.dumps(st.as_dict(), indent=None if compact else 2, sort_keys=True, default=str,
                          separators=(",", ":") if compact else None)
        t3 = time.perf_counter()
    finally:
        client.close()
    return {"read_s": round(t1 - t0, 3), "print_s": round(t2 - t1, 3), "json_s": round(t3 - t2, 3),
            "records": len(st.resources), "hosts": len(st.hosts), "json_bytes": len(text)}


class Run:
    """One run at ``load.hosts`` hosts (see the module docstring)."""

    def __init__(self, load: Workload, workdir: Path, *, idle_s: float) -> None:
        self.load = load
        self.workdir = workdir
        self.idle_s = idle_s
        self.result: dict[str, Any] = {"load": load.as_dict(), "idle_s": idle_s}
        self.workers: list[WorkerHandle] = []
        self.proxies: list[Relay] = []
        self.rig: EtcdRig | None = None
        self.sampler: Sampler | None = None
        self.watch: HostKeyWatch | None = None
        self.marks: dict[str, float] = {}

    # -- helpers -------------------------------------------------------------------

    def _pids(self) -> dict[str, int]:
        pids: dict[str, int] = {}
        if self.rig is not None:
            pids.update({f"etcd.{n}": p for n, p in self.rig.pids().items()})
        for w in self.workers:
            if w.proc.poll() is None:
                pids[f"worker.{w.number}.{w.group}"] = w.pid
        pids["coordinator"] = os.getpid()
        return pids

    def mark(self, name: str) -> float:
        self.marks[name] = t = time.monotonic()
        return t

    def _stats(self, workers: list[WorkerHandle], reset: bool) -> dict[str, Any]:
        replies = each(workers, lambda w: w.call("stats", reset=reset))
        hist = Histograms.merge_json(r["hist"] for r in replies)
        counters: dict[str, int] = {}
        for r in replies:
            for k, v in r["counters"].items():
                counters[k] = counters.get(k, 0) + v
        return {"hist": {k: v.summary_ms() for k, v in sorted(hist.items())}, "counters": counters,
                "threads": {f"{w.number}.{w.group}": r["threads"] for w, r in zip(workers, replies, strict=True)},
                "running_vms": sum(r["running_vms"] for r in replies),
                "lost": [x for r in replies for x in r["lost"]], "_hist": hist}

    def _etcd_window(self, before: dict[str, Any], after: dict[str, Any], seconds: float) -> dict[str, Any]:
        """Per member: counter rates over a window, gauges at its end, fsync/commit p99."""
        out = {}
        for name, a in after.items():
            b = before.get(name, {})

            def rate(key: str, a: dict[str, Any] = a, b: dict[str, Any] = b) -> float:
                return round(float(a.get(key, 0.0) - b.get(key, 0.0)) / seconds, 2)

            hb, ha = b.get("histograms", {}), a.get("histograms", {})
            out[name] = {
                "leader": a.get("etcd_server_is_leader") == 1.0,
                "proposals_per_s": rate("etcd_server_proposals_committed_total"),
                "lease_renewals_per_s": rate("etcd_debugging_lease_renewed_total"),
                "txn_per_s": rate("etcd_mvcc_txn_total"), "range_per_s": rate("etcd_mvcc_range_total"),
                "leader_changes": int(a.get("etcd_server_leader_changes_seen_total", 0)
                                      - b.get("etcd_server_leader_changes_seen_total", 0)),
                "slow_applies": int(a.get("etcd_server_slow_apply_total", 0) - b.get("etcd_server_slow_apply_total", 0)),
                "heartbeat_failures": int(a.get("etcd_server_heartbeat_send_failures_total", 0)
                                          - b.get("etcd_server_heartbeat_send_failures_total", 0)),
                "db_bytes": int(a.get("etcd_mvcc_db_total_size_in_bytes", 0)),
                "db_bytes_before": int(b.get("etcd_mvcc_db_total_size_in_bytes", 0)),
                "revisions": int(a.get("etcd_debugging_mvcc_current_revision", 0)
                                 - b.get("etcd_debugging_mvcc_current_revision", 0)),
                "db_in_use_bytes": int(a.get("etcd_mvcc_db_total_size_in_use_in_bytes", 0)),
                "keys": int(a.get("etcd_debugging_mvcc_keys_total", 0)),
                "watchers": int(a.get("etcd_debugging_mvcc_watcher_total", 0)),
                "watch_streams": int(a.get("etcd_debugging_mvcc_watch_stream_total", 0)),
                "slow_watchers": int(a.get("etcd_debugging_mvcc_slow_watcher_total", 0)),
                "goroutines": int(a.get("go_goroutines", 0)),
                "rss_mib": round(a.get("process_resident_memory_bytes", 0) / 2**20, 1),
                "wal_fsync_p99_ms": _ms(histogram_quantile(hb.get("etcd_disk_wal_fsync_duration_seconds", []),
                                                           ha.get("etcd_disk_wal_fsync_duration_seconds", []), 0.99)),
                "backend_commit_p99_ms": _ms(histogram_quantile(
                    hb.get("etcd_disk_backend_commit_duration_seconds", []),
                    ha.get("etcd_disk_backend_commit_duration_seconds", []), 0.99)),
                "handling_ms": {key.split(":", 1)[1]: {
                    q: _ms(histogram_quantile(hb.get(key, []), ha.get(key, []), p)) for q, p in (("p50", 0.5), ("p99", 0.99))}
                    for key in ha if key.startswith(HANDLING + ":")},
            }
        return out

    def _window(self, name: str, t0: float, t1: float, m0: dict[str, Any], m1: dict[str, Any]) -> dict[str, Any]:
        assert self.sampler is not None
        proc = self.sampler.window(t0, t1)
        etcd = self._etcd_window(m0, m1, t1 - t0)
        leader = next((n for n, e in etcd.items() if e["leader"]), None)
        cpu = proc.get("cpu_cores", {})
        harness = sum(v for k, v in cpu.items() if k.startswith("worker."))
        etcd_cpu = sum(v for k, v in cpu.items() if k.startswith("etcd."))
        busy = proc.get("machine_busy_cores", 0.0)
        handling = {}
        for method in ("Txn", "Range"):  # every member's answers together (clients use all three)
            key = f"{HANDLING}:{method}"
            before = _merge_buckets(m.get("histograms", {}).get(key, []) for m in m0.values())
            after = _merge_buckets(m.get("histograms", {}).get(key, []) for m in m1.values())
            handling[method] = {q: _ms(histogram_quantile(before, after, p)) for q, p in (("p50", 0.5), ("p99", 0.99))}
        return {"window": name, "etcd_handling_ms": handling, "seconds": round(t1 - t0, 1), "proc": proc, "etcd": etcd, "leader": leader,
                "leader_cpu_cores": cpu.get(f"etcd.{leader}") if leader else None,
                "etcd_cpu_cores": round(etcd_cpu, 3), "harness_cpu_cores": round(harness, 3),
                "coordinator_cpu_cores": cpu.get("coordinator"),
                "other_cpu_cores": round(busy - etcd_cpu - harness - (cpu.get("coordinator") or 0.0), 3)}

    # -- the run -------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            self._start()
            self._populate()
            if self._setup_failed():
                return self.result
            self._idle()
            self._steady()
            self._die()
            self._cut()
            self._finish()
        finally:
            self._teardown()
        return self.result

    def _start(self) -> None:
        load = self.load
        self.result["load1_at_start"] = os.getloadavg()[0]
        self.result["machine_at_start"] = machine_jiffies()
        progress(f"{load.hosts} hosts: starting a three-member etcd")
        self.rig = EtcdRig(self.workdir / "etcd", load.etcd_args).start()
        first = self.rig.members[0].endpoint
        self.watch = HostKeyWatch(first, load.prefix).start()
        self.sampler = Sampler(self._pids).start()
        layout = load.workers()
        steady_hosts = [i for g, hosts in layout if g == STEADY for i in hosts]
        for number, (group, hosts) in enumerate(layout):
            endpoints = self.rig.endpoints
            if group == CUT:
                self.proxies = [Relay.tcp(m.endpoint) for m in self.rig.members]
                endpoints = ",".join(p.endpoint for p in self.proxies)
            self.workers.append(WorkerHandle(number, group, hosts, load, endpoints, steady_hosts, self.workdir))
        for w in self.workers:
            w.hello()
        self.result["workers"] = len(self.workers)
        progress(f"{len(self.workers)} worker processes: " + ", ".join(
            f"{w.group} {len(w.hosts)}" for w in self.workers) + "; opening sessions")
        t0 = self.mark("open")
        opened = each(self.workers, lambda w: w.call("open", timeout=3600))
        self.result["open_s"] = round(time.monotonic() - t0, 2)
        self.result["open_failed"] = {h: why for r in opened for h, why in r["failed"].items()}
        leases = sum(len(r["leases"]) for r in opened)
        progress(f"{leases} sessions open in {self.result['open_s']} s"
                 + (f"; {len(self.result['open_failed'])} failed to open" if self.result["open_failed"] else ""))

    def _populate(self) -> None:
        load = self.load
        t0 = self.mark("populate")
        each(self.workers, lambda w: w.call("populate", timeout=3600))
        took = time.monotonic() - t0
        stats = self._stats(self.workers, reset=True)
        assert self.rig is not None
        met = self.rig.metrics()
        keys = max((m.get("etcd_debugging_mvcc_keys_total", 0) for m in met.values()), default=0)
        self.result["populate"] = {"seconds": round(took, 1), "vms": stats["running_vms"],
                                   "vms_per_s": round(stats["running_vms"] / took, 1),
                                   "grant": {k: v for k, v in stats["hist"].items() if k.startswith("populate")},
                                   "keys": int(keys), "lost": stats["lost"],
                                   "errors": {k: v for k, v in stats["counters"].items() if ".error." in k},
                                   "probe_late": stats["hist"].get("probe.late")}
        progress(f"populated {stats['running_vms']} VMs x {load.disks_per_vm} disks in {took:.0f} s; "
                 f"{int(keys)} keys in etcd")

    def _setup_failed(self) -> bool:
        """More than 1% of the sessions lost (or never opened) before the measuring starts: the
        run is stopped and says why (with how late this machine ran the workers' threads)."""
        pop = self.result["populate"]
        bad = len(pop["lost"]) + len(self.result.get("open_failed") or {})
        if bad <= self.load.hosts / 100:
            return False
        late = pop.get("probe_late") or {}
        load1 = os.getloadavg()[0]
        stalls = etcd_stalls(self.workdir / "etcd")
        self.result["setup_stalls"] = stalls
        fsync = stalls.get("slow fdatasync")
        self.result["aborted"] = (
            f"{bad} of {self.load.hosts} sessions lost or not opened while the hosts started (load average "
            f"{load1:.0f} on {os.cpu_count()} cores; a worker thread asked to wake after 0.1 s ran up to "
            f"{(late.get('max_ms') or 0) / 1000:.1f} s late"
            + (f"; etcd logged {fsync['count']} WAL fsyncs over 1 s, the longest {fsync['longest_s']:.1f} s"
               if fsync else "")
            + "): the machine, not etcd's design, was the limit")
        progress("run stopped: " + self.result["aborted"])
        return True

    def _idle(self) -> None:
        if self.idle_s <= 0:
            return
        assert self.rig is not None
        progress(f"idle: keepalives only for {self.idle_s:.0f} s")
        m0, t0 = self.rig.metrics(), self.mark("idle")
        time.sleep(self.idle_s)
        m1, t1 = self.rig.metrics(), time.monotonic()
        stats = self._stats(self.workers, reset=True)
        self.result["idle"] = {**self._window("idle", t0, t1, m0, m1), **_keepalive_figures(stats, t1 - t0),
                               "lost": stats["lost"]}
        w = self.result["idle"]
        progress(f"idle: {w['keepalives_per_s']} keepalives/s, rtt p99 {w['keepalive_rtt'].get('p99_ms')} ms, "
                 f"leader {w['leader']} {w['leader_cpu_cores']} cores, harness {w['harness_cpu_cores']} cores")

    def _steady(self) -> None:
        load = self.load
        assert self.rig is not None
        steady = [w for w in self.workers if w.group == STEADY]
        share = sum(len(w.hosts) for w in steady)
        progress(f"steady: churn at {load.churn_rate}/s for {load.steady_s:.0f} s"
                 f" + virtlease status x{load.status_runs}")
        m0, t0 = self.rig.metrics(), self.mark("steady")
        each(steady, lambda w: w.call("churn", rate=load.churn_rate * len(w.hosts) / share))
        status_runs: list[dict[str, Any]] = []
        for i in range(load.status_runs):  # spread over the window, starting at its first third
            at = t0 + load.steady_s * (i + 1) / (load.status_runs + 2)
            time.sleep(max(0.0, at - time.monotonic()))
            status_runs.append(time_status(load, self.rig.endpoints, as_json=bool(i % 2)))
            status_runs[-1]["parts"] = time_status_parts(load, self.rig.endpoints)
            progress(f"virtlease status{' --json' if i % 2 else ''}: {status_runs[-1]['seconds']} s, "
                     f"{status_runs[-1]['rss_peak_mib']} MiB, exit {status_runs[-1]['exit']}"
                     + (f" ({status_runs[-1]['error']})" if status_runs[-1]["error"] else ""))
        time.sleep(max(0.0, t0 + load.steady_s - time.monotonic()))
        m1, t1 = self.rig.metrics(), time.monotonic()
        stats = self._stats(self.workers, reset=True)
        self.result["status"] = status_runs
        self.result["steady"] = {**self._window("steady", t0, t1, m0, m1), **_keepalive_figures(stats, t1 - t0),
                                 **_churn_figures(stats, t1 - t0), "lost": stats["lost"],
                                 "threads": stats["threads"]}
        w = self.result["steady"]
        progress(f"steady: {w['keepalives_per_s']} keepalives/s (rtt p99 {w['keepalive_rtt'].get('p99_ms')} ms, "
                 f"min headroom {w['keepalive_headroom_min_s']} s), {w['grants_per_s']} grants/s, "
                 f"driver p99 {w['grant'].get('grant.driver.start', {}).get('p99_ms')} ms, "
                 f"agent ACQUIRE p99 {w['grant'].get('agent.acquire', {}).get('p99_ms')} ms, "
                 f"lost {len(stats['lost'])}")

    def _die(self) -> None:
        load = self.load
        assert self.rig is not None and self.watch is not None
        dying = [w for w in self.workers if w.group == DIE]
        steady = [w for w in self.workers if w.group == STEADY]
        if not dying or not steady:
            return
        dead = [i for w in dying for i in w.hosts]
        dead_ids = {load.host_id(i) for i in dead}
        m0 = self.rig.metrics()
        progress(f"die: kill -9 of {len(dead)} hosts ({len(dying)} process)")
        killed = self.mark("die")
        for w in dying:
            os.kill(w.pid, signal.SIGKILL)
        for w in dying:
            w.proc.wait()
        parts = [dead[i::len(steady)] for i in range(len(steady))]
        probe_from = killed + load.ttl * 2 / 3 - 0.5
        takes = each([w for w, p in zip(steady, parts, strict=True) if p],
                     lambda w: w.call("take", timeout=8 * load.ttl + 60, dead=parts[steady.index(w)],
                                      killed_at=killed, probe_from=probe_from, poll=0.25))
        missing = self.watch.wait_for(dead_ids, timeout=1)
        t1 = time.monotonic()
        m1 = self.rig.metrics()
        freed = {h: round(t - killed, 3) for h, t in self.watch.deleted.items() if h in dead_ids}
        taken = {load.host_id(int(k)): v for r in takes for k, v in r["hosts"].items()}
        stats = self._stats(steady, reset=False)
        self.result["die"] = {
            "hosts": len(dead), "freed_s": sorted(freed.values()), "not_freed": sorted(missing),
            "first_take_s": sorted(v["first_s"] for v in taken.values() if v["first_s"] is not None),
            "all_taken_s": sorted(v["all_s"] for v in taken.values() if v["all_s"] is not None),
            "not_taken": sorted(h for h, v in taken.items() if v["first_s"] is None),
            "take_failures": sum(v.get("failed", 0) for v in taken.values()),
            "target_s": load.ttl + 2, **self._window("die", killed, t1, m0, m1),
            "take": {k: v for k, v in stats["hist"].items() if k.startswith("take.")},
        }
        d = self.result["die"]
        progress(f"die: every disk of {len(freed)}/{len(dead)} hosts freed after "
                 f"{min(freed.values(), default=0):.2f}-{max(freed.values(), default=0):.2f} s "
                 f"(target {load.ttl + 2} s); all taken by {max(d['all_taken_s'], default=0):.2f} s")

    def _cut(self) -> None:
        load = self.load
        assert self.rig is not None and self.watch is not None
        cut = [w for w in self.workers if w.group == CUT]
        if not cut or not self.proxies:
            return
        cut_ids = {load.host_id(i) for w in cut for i in w.hosts}
        m0 = self.rig.metrics()
        duration = load.ttl + load.cut_extra_s
        progress(f"cut: {len(cut_ids)} hosts cut off from etcd for {duration:.0f} s")
        t0 = self.mark("cut")
        for p in self.proxies:
            p.blackhole()
        missing = self.watch.wait_for(cut_ids, timeout=duration)
        time.sleep(max(0.0, t0 + duration - time.monotonic()))
        for p in self.proxies:
            p.heal()
        t1 = self.mark("healed")
        time.sleep(min(5.0, load.ttl / 2))  # reconnect; nothing else should change
        m1 = self.rig.metrics()
        stats = self._stats(cut, reset=False)
        fenced = {x["host"]: x["at"] for x in stats["lost"]}
        freed = {h: t for h, t in self.watch.deleted.items() if h in cut_ids}
        leads = sorted(round(freed[h] - fenced[h], 3) for h in cut_ids if h in freed and h in fenced)
        self.result["cut"] = {
            "hosts": len(cut_ids), "seconds": duration, "fenced": len(set(fenced) & cut_ids),
            "fenced_after_s": sorted(round(t - t0, 3) for h, t in fenced.items() if h in cut_ids),
            "freed_after_s": sorted(round(t - t0, 3) for t in freed.values()), "not_freed": sorted(missing),
            "fence_lead_s": leads, "freed_before_fence": sum(1 for x in leads if x <= 0),
            **self._window("cut", t0, t1, m0, m1),
        }
        c = self.result["cut"]
        progress(f"cut: {c['fenced']}/{len(cut_ids)} fenced, fence lead min {min(leads, default=float('nan')):.2f} s,"
                 f" {c['freed_before_fence']} freed before their fence")

    def _finish(self) -> None:
        alive = [w for w in self.workers if w.proc.poll() is None]
        churning = [w for w in alive if w.group == STEADY]
        each(churning, lambda w: w.call("churn", rate=0))
        final = self._stats(alive, reset=True)
        dead_or_cut = {self.load.host_id(i) for w in self.workers if w.group in (DIE, CUT) for i in w.hosts}
        lost_all = [x for x in final["lost"] if x["host"] not in dead_or_cut]
        self.result["false_fences"] = sorted({x["host"] for x in lost_all})
        if "die" in self.marks:
            self.result["after_failures"] = _churn_figures(final, time.monotonic() - self.marks["die"])
        self.result["load1_at_end"] = os.getloadavg()[0]
        assert self.rig is not None
        self.result["etcd_final"] = {n: {"db_bytes": int(m.get("etcd_mvcc_db_total_size_in_bytes", 0)),
                                         "keys": int(m.get("etcd_debugging_mvcc_keys_total", 0))}
                                     for n, m in self.rig.metrics().items()}
        self.result["marks"] = {k: round(v - self.marks["open"], 1) for k, v in self.marks.items()}
        self.result["etcd_stalls"] = etcd_stalls(self.workdir / "etcd")
        self.result["self_rusage_s"] = round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1)

    def _teardown(self) -> None:
        for w in self.workers:
            w.kill()
        for p in self.proxies:
            p.close()
        if self.watch is not None:
            self.watch.stop()
        if self.sampler is not None:
            self.sampler.stop()
        if self.rig is not None:
            self.rig.stop()
        for member in (self.workdir / "etcd").glob("m*"):
            if member.is_dir():  # the data; the members' logs stay
                shutil.rmtree(member, ignore_errors=True)


def _merge_buckets(parts: Any) -> list[tuple[float, float]]:
    total: dict[float, float] = {}
    for buckets in parts:
        for le, count in buckets:
            total[le] = total.get(le, 0.0) + count
    return sorted(total.items())


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _keepalive_figures(stats: dict[str, Any], seconds: float) -> dict[str, Any]:
    hist = stats["_hist"]
    rtt, head = hist.get("keepalive.rtt"), hist.get("keepalive.headroom")
    return {"keepalives_per_s": round(rtt.n / seconds, 1) if rtt else 0.0,
            "keepalive_rtt": rtt.summary_ms() if rtt else {"n": 0},
            "keepalive_gap": hist["keepalive.gap"].summary_ms() if "keepalive.gap" in hist else {"n": 0},
            "keepalive_headroom_min_s": round(head.min, 3) if head and head.n else None,
            "keepalives_failed": stats["counters"].get("keepalive.failed", 0),
            "keepalives_after_fence_deadline": stats["counters"].get("keepalive.after_fence_deadline", 0),
            "probe_late": hist["probe.late"].summary_ms() if "probe.late" in hist else {"n": 0}}


def _churn_figures(stats: dict[str, Any], seconds: float) -> dict[str, Any]:
    hist, counters = stats["_hist"], stats["counters"]
    grants = sum(h.n for k, h in hist.items() if k.startswith("grant."))
    refused = sum(h.n for k, h in hist.items() if k.startswith("refuse."))
    names = ("grant.", "refuse.", "release.", "migrate.", "agent.acquire", "churn.lag")
    return {"grants_per_s": round(grants / seconds, 2), "attempts_per_s": round((grants + refused) / seconds, 2),
            "grant": {k: v for k, v in stats["hist"].items() if k.startswith(names)},
            "counters": counters,
            "conflicts_granted": sum(v for k, v in counters.items() if k.startswith("conflict.granted")),
            "errors": {k: v for k, v in counters.items() if ".error." in k}}
