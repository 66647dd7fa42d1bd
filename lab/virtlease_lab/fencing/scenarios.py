"""Guest side: the storage-fencing scenarios, run inside the lab guest by ``LabGuest.call``.

Two "hosts" in one guest kernel: each is a driver in its own process
(``virtlease_etcd.devtools.hostprocess``) talking to the etcd on the lab machine over QEMU user
networking, and writes to the shared LUN through its own SCSI nexuses -- host A through a
dm-multipath map over two paths, host B through one plain path -- so the storage's persistent
reservations tell them apart exactly as an array tells two servers apart.  Each VM is a
stand-in QEMU (``writer``) whose pid is the owner pid the driver fences.

The guest server is one long-lived process: :func:`start_hosts` keeps the hosts in this
module's ``PAIRS`` for the later calls (:func:`freeze`, :func:`migrate`, :func:`grant_cost`)
and :func:`stop_hosts` ends them.  Every result is plain JSON for the test on the lab machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtlease_etcd.devtools.hostprocess import HostCallError, HostProcess
from virtlease_etcd.fence import scsi_pr

from . import scsilab
from .writer import tags_in

log = logging.getLogger(__name__)

REGION = (64, 32)
"""The blocks the writers use: first block, count (4 KiB each)."""


def now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class WriterProc:
    """A running ``writer`` (stand-in QEMU) and its command pipe."""

    def __init__(self, device: str, tag: str) -> None:
        self.tag = tag
        self.proc = subprocess.Popen([sys.executable, "-m", "virtlease_lab.fencing.writer", device, tag,
                                      str(REGION[0]), str(REGION[1])], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.pid = self.proc.pid
        self._ready = False

    def wait_ready(self) -> WriterProc:
        if not self._ready:
            assert self.proc.stdout is not None
            hello = json.loads(self.proc.stdout.readline() or "{}")
            if not hello.get("ready"):
                raise RuntimeError(f"writer {self.tag} did not start (exit {self.proc.poll()})")
            self._ready = True
        return self

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        self.wait_ready()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self.proc.stdout.readline() or '{"ok": false, "error": "exited"}')
        if not reply.get("ok"):
            raise RuntimeError(f"writer {self.tag}: {op}: {reply.get('error')}")
        return reply

    def gone(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()


@dataclass
class Host:
    name: str
    proc: HostProcess
    device: str
    writer: WriterProc | None = None
    obj: str | None = None
    leases: list[int] = field(default_factory=list)

    @property
    def lease(self) -> int:
        return self.leases[-1]


@dataclass
class Pair:
    hosts: dict[str, Host]
    wwid: str
    fenced: bool
    ttl: int
    spares: dict[str, WriterProc] = field(default_factory=dict)
    """A VM started ahead for each host's next turn as the taker (Python starts slowly here)."""
    started_with: dict[str, Any] = field(default_factory=dict)
    """``start_hosts``' arguments (a spoiled migration starts the pair again)."""


PAIRS: dict[str, Pair] = {}
def start_hosts(pair: str, lun: str, fenced: bool, endpoints: str, prefix: str, ttl: int = 4,
                margin: float | None = None) -> dict[str, Any]:
    """Hosts A and B for ``lun`` (``fenced``: with ``scsi_pr_luns``), as pair ``pair``."""
    luns = scsilab.standard()
    wwid = luns["wwid"][lun]
    config: dict[str, Any] = {"fence_margin": margin, "request_timeout": 1.5, "acquire_timeout": 20.0}
    if fenced:
        config.update(scsi_pr_luns=[wwid], scsi_pr_preempt_abort=False)  # tcm_loop hangs on PREEMPT AND ABORT
    hosts = {}
    env = {**os.environ, "VIRTLEASE_HOSTPROC_LOG": "INFO"}
    starting = {name: HostProcess(endpoints, prefix, f"{pair}-{name}", ttl=ttl, wait=False, env=env,
                                  log_path=_log(f"{pair}-{name}"), **config) for name in ("A", "B")}
    for name, proc in starting.items():
        proc.wait_ready()
        hosts[name] = Host(name, proc, luns["devices"][lun][name], leases=[proc.lease])
    PAIRS[pair] = Pair(hosts, wwid, fenced, ttl, started_with={
        "lun": lun, "fenced": fenced, "endpoints": endpoints, "prefix": prefix, "ttl": ttl, "margin": margin})
    return {"wwid": wwid, "devices": {n: h.device for n, h in hosts.items()},
            "leases": {n: h.lease for n, h in hosts.items()}}


def _log(name: str) -> Path:
    """Where a guest process logs: the lab's share (kept on the lab machine), else /tmp."""
    return Path(os.environ.get("VL_SHARE") or "/tmp") / f"{name}.log"


def stop_hosts(pair: str) -> None:
    found = PAIRS.pop(pair, None)
    if found is None:
        return
    for spare in found.spares.values():
        spare.kill()
    for host in found.hosts.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(host.proc.pid, signal.SIGCONT)
        if host.writer is not None:
            host.writer.kill()
        host.proc.close()


def lun_keys(pair: str) -> dict[str, Any]:
    """The keys and the reservation on the pair's LUN (read through host B's path)."""
    p = PAIRS[pair]
    with scsi_pr.Path(p.hosts["B"].device) as path:
        keys = path.read_keys().keys
        held = path.read_reservation()
    return {"keys": sorted(set(keys)), "registrations": len(keys), "reservation": held.key, "type": held.type}


def _hold(host: Host, name: str, vm_uuid: str | None = None) -> float:
    """``host`` starts VM ``name``: a writer, then the grant (retried while busy); returns the
    time the grant returned."""
    writer = host.writer = WriterProc(host.device, name).wait_ready()
    host.obj = name
    reply = host.proc.call("new", obj=name, uuid=vm_uuid or str(uuid.uuid4()), name=name, pid=writer.pid,
                           disks=[host.device])
    if not reply.get("ok"):
        raise Spoiled(f"host {host.name}: new {name}: {reply.get('error')}: {reply.get('message')}")
    return _acquire(host, name, timeout=60)


def _acquire(host: Host, obj: str, timeout: float, **kw: Any) -> float:
    until = now() + timeout
    while True:
        reply = host.proc.call("acquire", obj=obj, **kw)
        if reply.get("ok"):
            return now()
        if reply.get("error") == "LeaseLostError":
            raise Spoiled(f"host {host.name} lost its session while acquiring: {reply.get('message')}")
        if reply.get("error") != "ResourceBusyError" or now() > until:
            raise RuntimeError(f"host {host.name}: acquire {obj}: {reply.get('error')}: {reply.get('message')}")
        time.sleep(0.05)


def _renew(host: Host, timeout: float) -> None:
    """After its fence: a new session (the lost one's lease must be gone from etcd first)."""
    until = now() + timeout
    while True:
        reply = host.proc.call("renew")
        if reply.get("ok"):
            if reply["renewed"] is not None:
                host.leases.append(int(reply["lease"]))
            return
        if now() > until:
            raise RuntimeError(f"host {host.name}: renew: {reply.get('error')}: {reply.get('message')}")
        time.sleep(0.1)


class Spoiled(Exception):
    """The load on the lab machine starved a *healthy* host past its fence deadline mid-cycle
    (a false fence): the cycle proves nothing either way, and is run again."""


def _valid(host: Host) -> bool:
    reply = host.proc.call("session")
    return bool(reply.get("ok")) and reply.get("lost") is None


def _writing(host: Host, name: str, ttl: int) -> WriterProc:
    """``host`` runs a VM that writes: the one it has, or a new one (after a renewal if its
    session was lost)."""
    if host.writer is not None and host.writer.proc.poll() is None and _valid(host):
        return host.writer
    if host.writer is not None:
        host.writer.kill()
        host.writer = None
    _renew(host, ttl * 3 + 10)
    _hold(host, name)
    writer: WriterProc | None = host.writer  # _hold started it
    assert writer is not None
    writer.call("go")
    return writer


def _recover(p: Pair) -> None:
    """After a spoiled cycle: every process running again, no VM, both sessions valid."""
    for host in p.hosts.values():
        for proc in (host.proc.proc, host.writer.proc if host.writer else None):
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
    for host in p.hosts.values():
        if host.writer is not None:
            host.writer.kill()
            host.writer = None
        _renew(host, p.ttl * 3 + 10)


def freeze(pair: str, cycles: int) -> dict[str, Any]:
    """``cycles`` times: the holder (its host process and its writer) is SIGSTOPped past its TTL,
    the other host takes the disk and overwrites the whole region, the holder's writer is
    continued first (its late writes: do they land?), then its host process (which fences it,
    and renews its session).  The hosts swap roles every cycle.  A cycle spoiled by a false
    fence of a healthy host (``Spoiled``) is counted and run again."""
    p = PAIRS[pair]
    holder, taker = p.hosts["A"], p.hosts["B"]
    results: list[dict[str, Any]] = []
    spoiled: list[str] = []
    k = 0
    while len(results) < cycles:
        if len(spoiled) > cycles // 2 + 5:
            raise RuntimeError(f"{len(spoiled)} cycles spoiled by false fences (is the machine overloaded?): "
                               f"{spoiled[-3:]}")
        k += 1
        try:
            results.append(_cycle(p, holder, taker, k))
        except Spoiled as exc:
            log.warning("cycle %d spoiled: %s", k, exc)
            spoiled.append(str(exc))
            _recover(p)
            continue
        log.info("cycle %d: %s", k, results[-1])
        holder, taker = taker, holder
    return {"cycles": results, "spoiled": spoiled}


def _cycle(p: Pair, holder: Host, taker: Host, k: int) -> dict[str, Any]:
    pair = next(name for name, found in PAIRS.items() if found is p)
    old = _writing(holder, f"{pair}-{holder.name}-{k}h", p.ttl)
    name = f"{pair}-{taker.name}-{k}"
    spare = p.spares.pop(taker.name, None) or WriterProc(taker.device, name)
    spare.wait_ready()  # the taker's next VM was started during the previous cycle
    if not _valid(taker):
        _renew(taker, p.ttl * 3 + 10)
    time.sleep(0.3)  # the holder writes meanwhile
    if old.proc.poll() is not None or not _valid(holder):
        spare.kill()
        raise Spoiled(f"host {holder.name} was fenced before the freeze")
    frozen_at = now()
    os.kill(holder.proc.pid, signal.SIGSTOP)
    os.kill(old.pid, signal.SIGSTOP)
    taker.writer, taker.obj = spare, name
    reply = taker.proc.call("new", obj=name, uuid=str(uuid.uuid4()), name=name, pid=spare.pid, disks=[taker.device])
    if not reply.get("ok"):
        raise Spoiled(f"host {taker.name}: new: {reply.get('message')}")
    asked = now()
    granted = _acquire(taker, name, timeout=p.ttl * 3 + 10)
    keys_at_grant = lun_keys(pair) if p.fenced else None
    try:
        overwrite = spare.call("pass")  # every block is the taker's now
    except RuntimeError as exc:
        raise Spoiled(f"host {taker.name}'s VM died (fenced?) before it wrote: {exc}") from None
    os.kill(old.pid, signal.SIGCONT)  # the host wakes up: its QEMU first
    until = now() + 5
    while old.call("report", since=overwrite["t1"])["attempts"] < 3 and now() < until:
        time.sleep(0.05)
    late = old.call("report", since=overwrite["t1"])
    os.kill(holder.proc.pid, signal.SIGCONT)
    fenced_in = old.gone(p.ttl + 10)
    landed = tags_in(taker.device, *REGION).get(old.tag, 0)  # before the taker writes again
    if spare.proc.poll() is not None or not _valid(taker):
        raise Spoiled(f"host {taker.name} was fenced during the check")
    spare.call("go")
    old.kill()
    holder.writer = None
    frozen_lease = holder.lease
    p.spares[holder.name] = WriterProc(holder.device, f"{pair}-{holder.name}-{k + 1}")  # starts meanwhile
    _renew(holder, p.ttl * 3 + 10)
    return {"cycle": k, "frozen": holder.name, "taker": taker.name, "frozen_lease": frozen_lease,
            "taker_lease": taker.lease, "takeover_s": round(granted - frozen_at, 3),
            "grant_wait_s": round(granted - asked, 3), "overwrite_ok": overwrite["written"],
            "overwrite_failed": overwrite["failed"], "late_attempts": late["attempts"], "late_ok": late["written"],
            "late_errors": late["errors"], "late_landed": landed, "holder_fenced": fenced_in,
            "keys_at_grant": keys_at_grant, "renewed_lease": holder.lease}


def _idle(p: Pair) -> None:
    """No VM runs on either host (released, its writer stopped)."""
    for host in p.hosts.values():
        if host.writer is not None:
            host.proc.call("release", obj=host.obj)
            host.writer.kill()
            host.writer = None


def migrate(pair: str, rounds: int) -> dict[str, Any]:
    """``rounds`` live migrations of one VM between the two (registered, live) hosts, back and
    forth: source and destination write throughout; every claim must leave both keys
    registered (nothing preempted) and no write may fail.  A round in which the machine's load
    starved a host past its fence deadline (``Spoiled``) is counted and run again."""
    p = PAIRS[pair]
    src, dst = p.hosts["A"], p.hosts["B"]
    results: list[dict[str, Any]] = []
    spoiled: list[str] = []
    vm = ""
    while len(results) < rounds:
        if len(spoiled) > rounds:
            raise RuntimeError(f"{len(spoiled)} migration rounds spoiled by false fences: {spoiled[-2:]}")
        try:
            if src.writer is None:  # the first round, or after a spoiled one: the VM starts on src
                _idle(p)
                vm = str(uuid.uuid4())
                _hold(src, f"{pair}-m0-{len(spoiled)}", vm_uuid=vm)
                started: WriterProc | None = src.writer  # _hold started it
                assert started is not None
                started.call("go")
            results.append(_migrate_once(p, src, dst, vm, len(results) + 1))
        except (Spoiled, RuntimeError) as exc:  # a host process's call failed: was it a false fence?
            if all(_valid(h) for h in p.hosts.values()) and not isinstance(exc, Spoiled):
                raise
            log.warning("migration round spoiled: %s", exc)
            spoiled.append(str(exc))
            stop_hosts(pair)  # whatever either host still holds of the interrupted migration goes
            start_hosts(pair, **p.started_with)
            p = PAIRS[pair]
            src, dst = p.hosts["A"], p.hosts["B"]
            continue
        log.info("migration %d: %s", len(results), results[-1])
        src, dst = dst, src
    return {"rounds": results, "spoiled": spoiled}


def _migrate_once(p: Pair, src: Host, dst: Host, vm: str, k: int) -> dict[str, Any]:
    pair = next(name for name, found in PAIRS.items() if found is p)
    obj = f"m{k}"
    writer = WriterProc(dst.device, f"{pair}-m{k}-{now():.0f}").wait_ready()
    try:
        started = now()
        state = src.proc.ok("prepare_migrate", obj=src.obj, dest=f"{pair}-{dst.name}")["state"]
        dst.proc.ok("new", obj=obj, uuid=vm, name="migrant", pid=writer.pid, disks=[dst.device], migrate=True)
        t0 = now()
        dst.proc.ok("acquire", obj=obj, state=state)
        claim_s = now() - t0
        dst.writer, dst.obj = writer, obj
        writer.call("go")  # the destination runs while the source has not finished
        keys = lun_keys(pair)
        time.sleep(0.2)
        dst.proc.ok("complete_migrate_in", obj=obj)
        assert src.writer is not None
        src.writer.call("stop")
        source_writes = src.writer.call("report", since=started)
        src.proc.ok("complete_migrate_out", obj=src.obj)
    except HostCallError as exc:
        if dst.writer is not writer:
            writer.kill()
        raise RuntimeError(str(exc)) from None
    src.writer.kill()
    dest_writes = writer.call("report", since=started)
    src.writer, src.obj = None, None
    return {"round": k, "from": src.name, "to": dst.name, "claim_ms": round(claim_s * 1000, 1),
            "keys_after_claim": keys["keys"], "leases": {src.name: src.lease, dst.name: dst.lease},
            "source_writes": source_writes, "dest_writes": dest_writes}


def grant_cost(pair: str, n: int) -> dict[str, Any]:
    """Acquire + release of a fresh VM ``n`` times on host B of a fenced pair, on the fenced LUN
    and on the control LUN (not in its ``scsi_pr_luns``): the same process and path kind, with
    and without the persistent-reservation work on the grant path."""
    _idle(PAIRS[pair])
    host = PAIRS[pair].hosts["B"]
    devices = scsilab.standard()["devices"]
    times: dict[str, list[float]] = {"fenced": [], "unfenced": []}
    before = len(host.proc.ok("session")["storage_s"])
    for i in range(n):  # in turns, so that a change of load hits both alike
        for label, device in (("fenced", devices["fenced"]["B"]), ("unfenced", devices["control"]["B"])):
            obj = f"cost-{label}-{i}"
            host.proc.ok("new", obj=obj, uuid=str(uuid.uuid4()), name=obj, disks=[device])
            t0 = now()
            host.proc.ok("acquire", obj=obj)
            times[label].append(now() - t0)
            host.proc.ok("release", obj=obj)
            host.proc.ok("free", obj=obj)
    secure = host.proc.ok("session")["storage_s"][before:]
    out: dict[str, Any] = {label: {"median_ms": round(statistics.median(t) * 1000, 2), "n": n}
                           for label, t in times.items()}
    out["secure_ms"] = {"median": round(statistics.median(secure) * 1000, 2), "max": round(max(secure) * 1000, 2),
                        "n": len(secure)}
    return out


def cleanup() -> None:
    for pair in list(PAIRS):
        stop_hosts(pair)
    for lun in ("fenced", "control"):
        scsilab.remove_multipath(f"mp-{lun}")


def cli(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the ``virtlease`` command in the guest (its JSON output parsed when there is any)."""
    proc = subprocess.run([sys.executable, "-m", "virtlease.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=300)
    out: dict[str, Any] = {"rc": proc.returncode, "stderr": proc.stderr[-3000:]}
    try:
        out["json"] = json.loads(proc.stdout)
    except ValueError:
        out["stdout"] = proc.stdout[-3000:]
    return out
