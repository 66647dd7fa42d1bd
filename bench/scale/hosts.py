"""One simulated hypervisor inside a worker process: a real host session and real grants.

A :class:`SimHost` loads the etcd driver with its own ``host_id`` (so its own
``HostSession``: lease, keepalive thread, fence clock, host-key watch) and runs its VMs'
lock calls on one of the two ways into the driver:

* ``driver`` hosts: the lock-object API (``new_object`` + ``add_resource`` + ``acquire``):
  every disk of a VM in one transaction; a live migration is ``prepare_migrate`` on the
  source and ``acquire(state)`` of a ``NewFlags.MIGRATE`` object on the destination;
* ``agent`` hosts: the agent's lockd path (``EtcdDriver.lockd`` -> ``ops/lockd.py``), as
  libvirt's lockd plugin drives it through the socket: one ACQUIRE per disk at a start; a
  migration's source RELEASEs each disk (reserved for the domain), the destination's first
  ACQUIRE claims the reservation, and the source's QEMU exit drops what is left.

VMs have no process: every object has no pid, so a fence (expected only for the hosts the
run cuts off) only logs.  Nothing here is a model of the product: each call below is what
the libvirt driver or the agent would call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import virtlease
from virtlease import Capability, FailureAction, NewFlags, Plugin, ResourceType
from virtlease_etcd.ops.lockd import lockd_resource

from .stats import Histograms
from .workload import AGENT, Workload, disk_paths, vm_name, vm_uuid

log = logging.getLogger(__name__)

CAPS = Capability.RESOURCES | Capability.MIGRATE


@dataclass
class Counters:
    """Outcome counts of one worker, by name; thread-safe."""

    by_name: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.by_name[name] = self.by_name.get(name, 0) + n

    def snapshot(self, reset: bool = False) -> dict[str, int]:
        with self._lock:
            out = dict(self.by_name)
            if reset:
                self.by_name = {}
            return out


class SimHost:
    """One host: its driver instance (its own session) and the VMs it runs."""

    def __init__(self, load: Workload, index: int, endpoints: str, hist: Histograms,
                 on_lost: Callable[[SimHost, str], None]) -> None:
        self.load = load
        self.index = index
        self.host_id = load.host_id(index)
        self.kind = load.kind(index)
        self.endpoints = endpoints
        self.hist = hist
        self._on_lost = on_lost
        self.plugin: Plugin | None = None
        self.vms: set[int] = set()
        """VM indexes this host runs (holds the disks of)."""
        self.lost: str | None = None
        self.lost_at: float | None = None

    # -- session ---------------------------------------------------------------

    def open(self) -> None:
        """Load the driver: a new host session (lease grant, host record, threads)."""
        config: dict[str, Any] = {"endpoints": self.endpoints, "prefix": self.load.prefix,
                                  "host_id": self.host_id, "ttl": self.load.ttl,
                                  "on_lease_lost": self._lost}
        self.plugin = virtlease.load_driver("etcd", config=config, capabilities=CAPS)

    def _lost(self, reason: str) -> None:
        self.lost_at = time.monotonic()
        self.lost = reason
        self._on_lost(self, reason)

    @property
    def driver(self) -> Any:
        assert self.plugin is not None
        return self.plugin.driver

    @property
    def lease_id(self) -> int:
        return int(self.driver.session.lease_id)

    # -- one VM's calls ------------------------------------------------------------

    def _paths(self, vm: int, override: list[str] | None = None) -> list[str]:
        return override if override is not None else disk_paths(self.load.run_id, vm, self.load.disks_per_vm)

    def start(self, vm: int, paths: list[str] | None = None) -> float:
        """Start VM ``vm`` here: take its disks (ResourceBusyError when one is held).  Returns
        the grant's seconds (the one ``acquire`` for a driver host, the sum of the per-disk
        ACQUIREs for an agent host, each of which is also recorded on its own)."""
        paths = self._paths(vm, paths)
        if self.kind == AGENT:
            lockd = self.driver.lockd(vm_uuid(self.load.run_id, vm), vm_name(vm), None)
            total = 0.0
            try:
                for path in paths:
                    t0 = time.perf_counter()
                    lockd.acquire(lockd_resource("", path), FailureAction.DEFAULT)
                    took = time.perf_counter() - t0
                    self.hist.add("agent.acquire", took)
                    total += took
            except BaseException:
                lockd.release_all()  # libvirt's start failed: the QEMU exits, its lifeline closes
                raise
        else:
            assert self.plugin is not None
            obj = self.plugin.new_object(uuid=vm_uuid(self.load.run_id, vm), name=vm_name(vm))
            try:
                for path in paths:
                    obj.add_resource(ResourceType.DISK, path)
                t0 = time.perf_counter()
                obj.acquire()
                total = time.perf_counter() - t0
            finally:
                obj.free()
        self.vms.add(vm)
        return total

    def stop(self, vm: int, paths: list[str] | None = None) -> float:
        """The VM's QEMU exited: drop its disks.  Returns the release's seconds."""
        t0 = time.perf_counter()
        if self.kind == AGENT:
            self.driver.lockd(vm_uuid(self.load.run_id, vm), vm_name(vm), None).release_all()
        else:
            assert self.plugin is not None
            obj = self.plugin.new_object(uuid=vm_uuid(self.load.run_id, vm), name=vm_name(vm))
            try:
                for path in self._paths(vm, paths):
                    obj.add_resource(ResourceType.DISK, path)
                obj.release()
            finally:
                obj.free()
        self.vms.discard(vm)
        return time.perf_counter() - t0


def migrate(src: SimHost, dst: SimHost, vm: int) -> tuple[float, float]:
    """Live-migrate ``vm`` from ``src`` to ``dst`` (hosts of one kind), as libvirt drives the
    lock manager.  Returns (the destination's claim, the whole handover) in seconds."""
    assert src.kind == dst.kind
    load = src.load
    uuid, name, paths = vm_uuid(load.run_id, vm), vm_name(vm), disk_paths(load.run_id, vm, load.disks_per_vm)
    t_start = time.perf_counter()
    if src.kind == AGENT:
        source = src.driver.lockd(uuid, name, None)
        for path in paths:  # the source pauses: lockd RELEASEs every disk (reserved for the domain)
            source.release(lockd_resource("", path))
        dest = dst.driver.lockd(uuid, name, None)
        t0 = time.perf_counter()
        outcome = dest.acquire(lockd_resource("", paths[0]), FailureAction.DEFAULT)
        claim = time.perf_counter() - t0
        if outcome != "claimed":
            raise RuntimeError(f"migration of {name} to {dst.host_id}: first ACQUIRE {outcome}, not claimed")
        for path in paths[1:]:
            dest.acquire(lockd_resource("", path), FailureAction.DEFAULT)
        source.release_all()  # the source QEMU exits
    else:
        assert src.plugin is not None and dst.plugin is not None
        out = src.plugin.new_object(uuid=uuid, name=name)
        inc = dst.plugin.new_object(uuid=uuid, name=name, flags=NewFlags.MIGRATE)
        try:
            for path in paths:
                out.add_resource(ResourceType.DISK, path)
                inc.add_resource(ResourceType.DISK, path)
            state = out.prepare_migrate(dst.host_id)
            t0 = time.perf_counter()
            inc.acquire(state)
            claim = time.perf_counter() - t0
            inc.complete_migrate_in()
            out.complete_migrate_out()
        finally:
            inc.free()
            out.free()
    src.vms.discard(vm)
    dst.vms.add(vm)
    return claim, time.perf_counter() - t_start
