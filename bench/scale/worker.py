"""A worker process: many simulated hosts, each with its own real host session.

Started by the coordinator as ``python -m scale.worker`` (``bench/`` on ``PYTHONPATH``); it
reads its configuration as the first stdin line and then one command per line
(``virtlease_etcd.devtools.jsonwire``), answering each:

``open``      load the driver for each of its hosts (one session each)
``populate``  start each host's initial VMs (``vms_per_host`` x ``disks_per_vm``)
``churn``     start (``rate`` > 0) or stop (``rate`` 0) the churn: starts, conflicting starts,
              stops and live migrations at a steady rate, on both lock paths
``take``      take over the VMs of dead hosts, each as soon as a probe acquire succeeds
``stats``     histograms, counters, lost sessions, threads, RSS (``reset`` starts a new phase)

Every keepalive of every session is timed by wrapping ``EtcdClient.lease_keepalive`` (the
product's own call, which the session's keepalive thread makes): its round trip, the gap
between two successful keepalives of one lease, and the *headroom*, how long before the fence
deadline the reply came (``sent_before + ttl - fence_margin - now``): the closer to 0, the
closer that host came to a false fence.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import resource
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from virtlease.errors import ResourceBusyError, VirtleaseError
from virtlease_etcd.devtools.jsonwire import Replier
from virtlease_etcd.etcd import endpoints as etcd_endpoints
from virtlease_etcd.etcd.client import EtcdClient

from .hosts import Counters, SimHost, migrate
from .stats import Histograms
from .workload import DRIVER, STEADY, Workload, disk_paths, first_churn_vm, initial_vm

log = logging.getLogger("scale.worker")


def probe_scheduling(hist: Histograms, period: float = 0.1) -> None:
    """A thread that sleeps ``period`` and records how much later than asked it ran again: how
    long a thread of this process (a keepalive thread, say) waits for a core and the GIL."""
    def loop() -> None:
        while True:
            t0 = time.monotonic()
            time.sleep(period)
            hist.add("probe.late", max(0.0, time.monotonic() - t0 - period))

    threading.Thread(target=loop, daemon=True, name="scheduling-probe").start()


def instrument_keepalives(hist: Histograms, counters: Counters, ttl: int, margin: float) -> None:
    """Time every ``lease_keepalive`` of this process (see the module docstring)."""
    original = EtcdClient.lease_keepalive
    last_ok: dict[int, float] = {}

    def timed(self: EtcdClient, lease_id: int, *, timeout: float) -> int:
        sent = time.monotonic()
        try:
            granted = original(self, lease_id, timeout=timeout)
        except Exception:
            counters.inc("keepalive.failed")
            raise
        done = time.monotonic()
        hist.add("keepalive.rtt", done - sent)
        prev = last_ok.get(lease_id)
        if prev is not None:
            hist.add("keepalive.gap", sent - prev)
            headroom = prev + ttl - margin - done
            hist.add("keepalive.headroom", max(headroom, 0.0))
            if headroom < 0:
                counters.inc("keepalive.after_fence_deadline")
        if granted > 0:
            last_ok[lease_id] = sent
        return granted

    EtcdClient.lease_keepalive = timed  # type: ignore[method-assign]


class Worker:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.load = Workload(**{**cfg["load"], "etcd_args": tuple(cfg["load"]["etcd_args"])})
        self.group: str = cfg["group"]
        self.number: int = cfg["worker"]
        self.endpoints: str = cfg["endpoints"]
        self.steady_hosts: list[int] = cfg["steady_hosts"]
        """Every steady host of the run (conflicting starts aim at their pinned VMs)."""
        self.rng = random.Random(self.load.seed * 1000 + self.number)
        self.hist = Histograms()
        self.counters = Counters()
        self.lost: list[dict[str, Any]] = []
        self._lost_lock = threading.Lock()
        self.hosts = [SimHost(self.load, i, self.endpoints, self.hist, self._on_lost) for i in cfg["hosts"]]
        self.by_index = {h.index: h for h in self.hosts}
        self._vm_lock = threading.Lock()
        self.churnable: dict[int, SimHost] = {}
        """Running VMs churn may stop or migrate (not pinned), by VM index."""
        self.in_flight: set[int] = set()
        self.stopped: list[int] = []
        """VMs churn stopped: the next starts take these again (their disks, like a real VM's,
        persist: a disk's ``gen`` record is written once, not once per start)."""
        self.next_vm = first_churn_vm(self.load, self.number)
        self._churn: Churn | None = None

    def _on_lost(self, host: SimHost, reason: str) -> None:
        with self._lost_lock:
            self.lost.append({"host": host.host_id, "index": host.index, "at": time.monotonic(),
                              "reason": reason})

    # -- commands -----------------------------------------------------------------

    def _share(self, rate: float) -> float:
        """This worker's part of a cluster-wide rate."""
        return rate * len(self.hosts) / self.load.hosts

    def open(self) -> dict[str, Any]:
        t0 = time.monotonic()
        interval = 1 / self._share(self.load.open_rate)
        failed: dict[str, str] = {}
        for i, host in enumerate(self.hosts):
            time.sleep(max(0.0, t0 + i * interval - time.monotonic()))
            try:
                host.open()
            except VirtleaseError as exc:  # that host takes no part; the run says so
                failed[host.host_id] = f"{type(exc).__name__}: {exc}"
                host.lost, host.lost_at = failed[host.host_id], time.monotonic()
        return {"seconds": round(time.monotonic() - t0, 3), "failed": failed,
                "leases": {h.host_id: h.lease_id for h in self.hosts if h.plugin is not None}}

    def populate(self) -> dict[str, Any]:
        t0 = time.monotonic()
        jobs = [(host, slot) for slot in range(self.load.vms_per_host) for host in self.hosts]

        def start(job: tuple[SimHost, int]) -> None:
            host, slot = job
            if host.plugin is None:
                return
            vm = initial_vm(self.load, host.index, slot)
            try:
                took = host.start(vm)
            except VirtleaseError as exc:
                self.counters.inc(f"populate.error.{type(exc).__name__}")
                return
            self.hist.add(f"populate.{host.kind}", took)
            if self.group == STEADY and slot >= self.load.pinned_vms:
                with self._vm_lock:
                    self.churnable[vm] = host

        interval = 1 / self._share(self.load.populate_rate)
        with ThreadPoolExecutor(self.load.churn_threads) as pool:
            futures = []
            for i, job in enumerate(jobs):
                time.sleep(max(0.0, t0 + i * interval - time.monotonic()))
                futures.append(pool.submit(start, job))
            for f in futures:
                f.result()
        return {"seconds": round(time.monotonic() - t0, 3), "vms": len(jobs)}

    def churn(self, rate: float) -> dict[str, Any]:
        if self._churn is not None:
            self._churn.stop()
            self._churn = None
        if rate > 0:
            self._churn = Churn(self, rate)
        return {"rate": rate}

    def take(self, dead: list[int], killed_at: float, probe_from: float, poll: float) -> dict[str, Any]:
        """Take over every VM of the ``dead`` hosts (indexes) on this worker's driver hosts:
        per dead host, a probe acquire of its first VM every ``poll`` seconds from monotonic
        ``probe_from`` on; once it is granted, every other VM of that host.  Returns per dead
        host the seconds from ``killed_at`` to the first grant and to the last."""
        takers = [h for h in self.hosts if h.kind == DRIVER and h.lost is None] or \
            [h for h in self.hosts if h.lost is None]
        results: dict[str, Any] = {}
        lock = threading.Lock()

        def take_host(i: int, dead_host: int) -> None:
            taker = takers[i % len(takers)]
            vms = [initial_vm(self.load, dead_host, s) for s in range(self.load.vms_per_host)]
            attempts = 0
            delay = probe_from - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            while True:
                attempts += 1
                try:
                    t0 = time.perf_counter()
                    taker.start(vms[0])
                    self.hist.add("take.grant", time.perf_counter() - t0)
                    break
                except ResourceBusyError:
                    self.hist.add("take.refused", time.perf_counter() - t0)
                except VirtleaseError as exc:
                    self.counters.inc(f"take.error.{type(exc).__name__}")
                if time.monotonic() - killed_at > 4 * self.load.ttl + 30:
                    with lock:
                        results[str(dead_host)] = {"first_s": None, "all_s": None, "attempts": attempts}
                    return
                time.sleep(poll)
            first = time.monotonic() - killed_at
            failed = 0
            for vm in vms[1:]:
                try:
                    taker.start(vm)
                except VirtleaseError as exc:
                    failed += 1
                    self.counters.inc(f"take.error.{type(exc).__name__}")
            with lock:
                results[str(dead_host)] = {"first_s": round(first, 3), "all_s": round(time.monotonic() - killed_at, 3),
                                           "attempts": attempts, "failed": failed, "taker": taker.host_id}

        threads = [threading.Thread(target=take_host, args=(i, d), daemon=True) for i, d in enumerate(dead)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"hosts": results}

    def stats(self, reset: bool) -> dict[str, Any]:
        with self._lost_lock:
            lost = list(self.lost)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        churn = self._churn.snapshot() if self._churn is not None else {}
        return {"hist": self.hist.to_json(reset=reset), "counters": self.counters.snapshot(reset=reset),
                "lost": lost, "threads": threading.active_count(), "rss_kib": _status_kib("VmRSS"),
                "hwm_kib": _status_kib("VmHWM"), "cpu_s": usage.ru_utime + usage.ru_stime,
                "running_vms": sum(len(h.vms) for h in self.hosts), "churn": churn}

    # -- churn helpers ---------------------------------------------------------------

    def pick_migration(self) -> tuple[int, SimHost, SimHost] | None:
        with self._vm_lock:
            candidates = [vm for vm in self.churnable if vm not in self.in_flight]
            if not candidates:
                return None
            vm = self.rng.choice(candidates)
            src = self.churnable[vm]
            peers = [h for h in self.hosts if h.kind == src.kind and h is not src and h.lost is None]
            if not peers:
                return None
            self.in_flight.add(vm)
            return vm, src, self.rng.choice(peers)

    def pick_stop(self) -> tuple[int, SimHost] | None:
        with self._vm_lock:
            candidates = [vm for vm in self.churnable if vm not in self.in_flight]
            if not candidates:
                return None
            vm = self.rng.choice(candidates)
            self.in_flight.add(vm)
            return vm, self.churnable[vm]

    def new_vm(self) -> tuple[int, SimHost]:
        """A stopped VM to start (a new one when none is stopped) and a live host for it."""
        with self._vm_lock:
            if self.stopped:
                vm = self.stopped.pop(self.rng.randrange(len(self.stopped)))
            else:
                vm = self.next_vm
                self.next_vm += 1
            self.in_flight.add(vm)
            return vm, self.rng.choice([h for h in self.hosts if h.lost is None])

    def done(self, vm: int, host: SimHost | None) -> None:
        """``vm`` runs on ``host`` now, or is stopped (None)."""
        with self._vm_lock:
            self.in_flight.discard(vm)
            if host is None:
                self.churnable.pop(vm, None)
                self.stopped.append(vm)
            else:
                self.churnable[vm] = host

    def forget(self, vm: int) -> None:
        """Where ``vm`` ended up is unknown (a call failed midway): churn leaves it alone."""
        with self._vm_lock:
            self.in_flight.discard(vm)
            self.churnable.pop(vm, None)


class Churn:
    """Grant attempts at ``rate`` per second (this worker's share of the run's), each a start
    (a share of them conflicting) or a live migration; every successful start is followed by
    the stop of a random running VM, so the population stays level.  A scheduler thread
    queues them on time; ``churn_threads`` threads run them.  ``churn.lag`` is how late an
    operation began (a backlog means the worker, not etcd, is the limit)."""

    def __init__(self, worker: Worker, rate: float) -> None:
        self.w = worker
        self.rate = rate
        self._stop = threading.Event()
        self._queue: queue.Queue[tuple[float, Callable[[], None]] | None] = queue.Queue()
        self.scheduled = 0
        self._threads = [threading.Thread(target=self._run_ops, daemon=True, name=f"churn-{i}")
                         for i in range(worker.load.churn_threads)]
        self._threads.append(threading.Thread(target=self._schedule, daemon=True, name="churn-scheduler"))
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for _ in range(self.w.load.churn_threads):
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=60)

    def snapshot(self) -> dict[str, Any]:
        return {"scheduled": self.scheduled, "backlog": self._queue.qsize()}

    def _schedule(self) -> None:
        interval = 1.0 / self.rate
        rng = self.w.rng
        next_at = time.monotonic() + rng.uniform(0, interval)
        load = self.w.load
        while not self._stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            r = rng.random()
            if r < load.migrate_share:
                op: Callable[[], None] = self._migrate
            elif r < load.migrate_share + (1 - load.migrate_share) * load.conflict_share:
                op = self._conflict
            else:
                op = self._start
            self._queue.put((next_at, op))
            self.scheduled += 1
            next_at += interval

    def _run_ops(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            due, op = item
            self.w.hist.add("churn.lag", max(0.0, time.monotonic() - due))
            try:
                op()
            except Exception as exc:  # counted; the run goes on
                self.w.counters.inc(f"churn.error.{type(exc).__name__}")
                log.warning("churn: %s: %s", type(exc).__name__, exc)

    def _start(self) -> None:
        w = self.w
        vm, host = w.new_vm()
        try:
            took = host.start(vm)
        except BaseException:
            w.forget(vm)  # what it holds now is unknown: never started again
            raise
        w.hist.add(f"grant.{host.kind}.start", took)
        w.counters.inc(f"start.{host.kind}")
        w.done(vm, host)
        picked = w.pick_stop()
        if picked is not None:
            old, old_host = picked
            try:
                w.hist.add(f"release.{old_host.kind}", old_host.stop(old))
                w.counters.inc(f"stop.{old_host.kind}")
                w.done(old, None)
            except BaseException:
                w.forget(old)
                raise

    def _conflict(self) -> None:
        """A start whose last disk is a pinned VM's disk on another steady host: must be refused."""
        w = self.w
        load = w.load
        vm, host = w.new_vm()
        victim = w.rng.choice([i for i in w.steady_hosts if i != host.index])
        busy = disk_paths(load.run_id, initial_vm(load, victim, w.rng.randrange(load.pinned_vms)),
                          load.disks_per_vm)[0]
        paths = [*disk_paths(load.run_id, vm, load.disks_per_vm)[:-1], busy]
        t0 = time.perf_counter()
        try:
            host.start(vm, paths)
        except ResourceBusyError:
            w.hist.add(f"refuse.{host.kind}", time.perf_counter() - t0)
            w.counters.inc(f"conflict.refused.{host.kind}")
            w.done(vm, None)
            return
        except BaseException:
            w.forget(vm)
            raise
        # granted: the pinned holder's session must have been lost; count it and give it back
        w.counters.inc(f"conflict.granted.{host.kind}")
        log.error("conflicting start of vm %d on %s was granted %s (held by %s's pinned VM)",
                  vm, host.host_id, busy, load.host_id(victim))
        try:
            host.stop(vm, paths)
        finally:
            w.forget(vm)

    def _migrate(self) -> None:
        w = self.w
        picked = w.pick_migration()
        if picked is None:
            w.counters.inc("migrate.skipped")
            return
        vm, src, dst = picked
        try:
            claim, total = migrate(src, dst, vm)
        except BaseException:
            w.forget(vm)
            raise
        w.hist.add(f"grant.{src.kind}.claim", claim)
        w.hist.add(f"migrate.{src.kind}", total)
        w.counters.inc(f"migrate.{src.kind}")
        w.done(vm, dst)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def main() -> None:
    wire = Replier()
    cfg = wire.config()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    load = Workload(**{**cfg["load"], "etcd_args": tuple(cfg["load"]["etcd_args"])})
    if load.connection_per_host:  # each channel its own subchannels: its own TCP connections
        etcd_endpoints._CHANNEL_OPTIONS.append(("grpc.use_local_subchannel_pool", 1))
    worker = Worker(cfg)
    margin = max(0.5, load.ttl / 5)
    instrument_keepalives(worker.hist, worker.counters, load.ttl, margin)
    probe_scheduling(worker.hist)
    wire.send({"ready": True, "pid": os.getpid(), "hosts": len(worker.hosts)})
    handlers: dict[str, Callable[..., dict[str, Any]]] = {
        "open": worker.open, "populate": worker.populate, "churn": worker.churn, "take": worker.take,
        "stats": worker.stats,
    }

    def handle(cmd: dict[str, Any]) -> None:
        op, seq = cmd.pop("op"), cmd.pop("seq")
        try:
            reply = {"ok": True, **handlers[op](**cmd)}
        except Exception as exc:
            log.exception("command %s failed", op)
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        wire.send(reply, seq)

    for cmd in wire.commands():  # each in its own thread: ``stats`` is answered during ``take``
        threading.Thread(target=handle, args=(cmd,), daemon=True, name=f"cmd-{cmd.get('op')}").start()
    os._exit(0)  # sessions are not closed: the coordinator tears etcd down


if __name__ == "__main__":
    main()
