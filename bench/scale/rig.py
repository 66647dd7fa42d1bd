"""The coordinator's instruments: a three-member etcd, its metrics, /proc sampling, and a watch
on the host keys.

* :class:`EtcdRig` runs ``EmbeddedEtcd(size=3)`` (separate processes, each with its own data
  directory under the run's directory) and reads each member's Prometheus ``/metrics`` (leader,
  DB size, keys, proposals, WAL fsync and backend commit latency, leader changes...).
* :class:`Sampler` reads ``/proc`` once a second: CPU time and RSS of each etcd member and each
  worker process, the machine's busy CPU and load average, so a reader can tell whether etcd,
  the harness or the machine's other tenants used the cores.
* :class:`HostKeyWatch` timestamps every deletion of a host key.  A host key sits on its
  session's lease, and etcd deletes every key of a lease in the one revision that revokes or
  expires it: the moment a host key goes is the moment every disk of that host became free.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from etcd3 import etcdrpc

from virtlease_etcd.devtools.embedded import EmbeddedEtcd, Member

CLK_TCK = os.sysconf("SC_CLK_TCK")
_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9eE.+-]+|NaN|\+Inf)$")

SCALARS = (
    "etcd_server_is_leader", "etcd_server_leader_changes_seen_total", "etcd_server_proposals_committed_total",
    "etcd_server_proposals_failed_total", "etcd_server_proposals_pending", "etcd_server_slow_apply_total",
    "etcd_server_slow_read_indexes_total", "etcd_server_heartbeat_send_failures_total",
    "etcd_mvcc_db_total_size_in_bytes", "etcd_mvcc_db_total_size_in_use_in_bytes", "etcd_debugging_mvcc_keys_total",
    "etcd_debugging_mvcc_watcher_total", "etcd_debugging_mvcc_watch_stream_total",
    "etcd_debugging_mvcc_slow_watcher_total", "etcd_debugging_lease_granted_total",
    "etcd_debugging_lease_renewed_total", "etcd_debugging_lease_revoked_total",
    "etcd_debugging_server_lease_expired_total", "etcd_mvcc_txn_total", "etcd_mvcc_range_total",
    "etcd_mvcc_put_total", "etcd_mvcc_delete_total", "etcd_debugging_mvcc_current_revision",
    "etcd_network_client_grpc_received_bytes_total", "etcd_network_client_grpc_sent_bytes_total",
    "process_resident_memory_bytes", "process_cpu_seconds_total", "go_goroutines",
)
HISTOGRAMS = ("etcd_disk_wal_fsync_duration_seconds", "etcd_disk_backend_commit_duration_seconds",
              "etcd_server_apply_duration_seconds")
HANDLING = "grpc_server_handling_seconds"
"""Per gRPC method, with ``--metrics=extensive``: how long etcd took to answer (``Txn``, ``Range``...),
the server's part of a request's round trip."""
HANDLED_METHODS = ("Txn", "Range", "LeaseGrant", "LeaseRevoke")


def scrape(endpoint: str, timeout: float = 5.0) -> dict[str, Any]:
    """One member's metrics: the SCALARS (summed over labels) and each HISTOGRAM's cumulative
    buckets ``{le: count}``."""
    text = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=timeout).read().decode()
    out: dict[str, Any] = {}
    hist: dict[str, dict[float, float]] = {h: {} for h in HISTOGRAMS}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m is None:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name in SCALARS:
            out[name] = out.get(name, 0.0) + value
        elif name.endswith("_bucket"):
            base = name[:-7]
            if base == HANDLING:
                method = re.search(r'grpc_method="([^"]+)"', labels)
                if method is None or method.group(1) not in HANDLED_METHODS:
                    continue
                base = f"{HANDLING}:{method.group(1)}"
                hist.setdefault(base, {})
            elif base not in hist:
                continue
            le = re.search(r'le="([^"]+)"', labels)
            if le:
                bound = float("inf") if le.group(1) == "+Inf" else float(le.group(1))
                hist[base][bound] = hist[base].get(bound, 0.0) + value
    out["histograms"] = {k: sorted(v.items()) for k, v in hist.items()}
    return out


def histogram_quantile(before: list[tuple[float, float]], after: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile (seconds, a bucket's upper bound) of what a cumulative Prometheus
    histogram counted between two scrapes; None when it counted nothing."""
    b = dict(before)
    diffs = [(le, c - b.get(le, 0.0)) for le, c in after]
    total = diffs[-1][1] if diffs else 0.0
    if total <= 0:
        return None
    for le, c in diffs:
        if c >= q * total:
            return le
    return None


class EtcdRig:
    """The run's etcd: three members on loopback, each a process with its own data dir."""

    def __init__(self, workdir: Path, extra_args: tuple[str, ...] = ()) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.etcd = EmbeddedEtcd(size=3, extra_args=["--metrics=extensive", *extra_args], workdir=str(workdir))

    def start(self) -> EtcdRig:
        self.etcd.start()
        return self

    def stop(self) -> None:
        self.etcd.stop()

    @property
    def members(self) -> list[Member]:
        return self.etcd.members

    @property
    def endpoints(self) -> str:
        return self.etcd.endpoints

    def pids(self) -> dict[str, int]:
        return {m.name: m.proc.pid for m in self.members if m.proc is not None}

    def metrics(self) -> dict[str, dict[str, Any]]:
        """Every member's scrape, by member name (a member that does not answer is left out)."""
        out = {}
        for m in self.members:
            try:
                out[m.name] = scrape(m.endpoint)
            except OSError:
                continue
        return out

    def leader(self) -> str | None:
        for name, met in self.metrics().items():
            if met.get("etcd_server_is_leader") == 1.0:
                return name
        return None


STALL_MESSAGES = ("slow fdatasync", "leader failed to send out heartbeat on time",
                  "apply request took too long", "waiting for ReadIndex response took too long")
"""etcd's own warnings that it could not keep up (disk, CPU)."""


def etcd_stalls(log_dir: Path, since: float = 0.0) -> dict[str, Any]:
    """The STALL_MESSAGES in the members' logs (``m*.log`` under ``log_dir``) from wall time
    ``since`` on: how many, and the longest ``took`` of each (seconds)."""
    out: dict[str, Any] = {}
    for path in sorted(log_dir.glob("m*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            msg = next((m for m in STALL_MESSAGES if str(rec.get("msg", "")).startswith(m)), None)
            if msg is None or _epoch(rec.get("ts", "")) < since:
                continue
            entry = out.setdefault(msg, {"count": 0, "longest_s": 0.0})
            entry["count"] += 1
            took = _duration(rec.get("took") or rec.get("exceeded-duration") or "")
            entry["longest_s"] = round(max(entry["longest_s"], took), 3)
    return out


def _epoch(ts: str) -> float:
    try:
        return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return 0.0


def _duration(text: str) -> float:
    """A Go duration (``2.37989826s``, ``133.6ms``, ``70µs``) in seconds; 0 when unreadable."""
    m = re.fullmatch(r"([0-9.]+)(h|m|s|ms|µs|us|ns)", text)
    if m is None:
        return 0.0
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}[m.group(2)]
    return float(m.group(1)) * scale


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (its threads included), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def proc_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def machine_jiffies() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    with open("/proc/stat") as fh:
        parts = [int(x) for x in fh.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def loadavg() -> float:
    with open("/proc/loadavg") as fh:
        return float(fh.read().split()[0])


@dataclass
class Sample:
    t: float
    cpu: dict[str, float | None]
    rss: dict[str, int | None]
    busy: float
    total: float
    load1: float


@dataclass
class Sampler:
    """Samples /proc every ``period`` seconds for the named processes (members, workers)."""

    pids: Callable[[], dict[str, int]]
    period: float = 0.5
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="scale-sampler")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def sample(self) -> Sample:
        pids = self.pids()
        busy, total = machine_jiffies()
        s = Sample(t=time.monotonic(), cpu={n: proc_cpu_s(p) for n, p in pids.items()},
                   rss={n: proc_rss_kib(p) for n, p in pids.items()}, busy=busy, total=total, load1=loadavg())
        self.samples.append(s)
        return s

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """CPU (cores: CPU seconds per second) of each process and of the machine between
        monotonic ``t0`` and ``t1``, peak RSS, mean load average."""
        inside = [s for s in self.samples if t0 <= s.t <= t1]
        if len(inside) < 2:
            return {}
        a, b = inside[0], inside[-1]
        span = b.t - a.t
        cpu = {}
        for name, end in b.cpu.items():
            start = a.cpu.get(name)
            if end is not None and start is not None:
                cpu[name] = round((end - start) / span, 4)
        rss: dict[str, int] = {}
        for s in inside:
            for name, kib in s.rss.items():
                if kib is not None:
                    rss[name] = max(rss.get(name, 0), kib)
        return {"seconds": round(span, 1), "cpu_cores": cpu, "rss_peak_kib": rss,
                "machine_busy_cores": round((b.busy - a.busy) / span, 3),
                "machine_cores": round((b.total - a.total) / span, 2),
                "load1_mean": round(sum(s.load1 for s in inside) / len(inside), 2),
                "load1_max": max(s.load1 for s in inside)}


class HostKeyWatch:
    """Timestamps (monotonic) of host-key deletions under ``prefix``, by host id."""

    def __init__(self, endpoint: str, prefix: str) -> None:
        self.root = f"{prefix}/v1/hosts/"
        self.deleted: dict[str, float] = {}
        self._cond = threading.Condition()
        self._channel = grpc.insecure_channel(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="scale-hostkey-watch")
        self._call: Any = None
        self.ready = threading.Event()

    def start(self) -> HostKeyWatch:
        self._thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("host-key watch not created within 10 s")
        return self

    def _requests(self) -> Iterator[Any]:
        end = self.root[:-1] + "0"  # '0' follows '/'
        yield etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=self.root.encode(), range_end=end.encode()))
        self._stop.wait()

    def _loop(self) -> None:
        stub = etcdrpc.WatchStub(self._channel)
        self._call = stub.Watch(self._requests())
        try:
            for resp in self._call:
                if resp.created:
                    self.ready.set()
                now = time.monotonic()
                with self._cond:
                    for ev in resp.events:
                        if ev.type == ev.DELETE:
                            self.deleted.setdefault(ev.kv.key.decode()[len(self.root):], now)
                    self._cond.notify_all()
        except grpc.RpcError:
            return

    def wait_for(self, hosts: set[str], timeout: float) -> set[str]:
        """Wait until every host in ``hosts`` lost its key, or ``timeout``; the hosts still there."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                missing = hosts - set(self.deleted)
                left = deadline - time.monotonic()
                if not missing or left <= 0:
                    return missing
                self._cond.wait(left)

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._channel.close()
