"""What one scale run does: hosts, VMs, disks, TTL, churn, failures, and how hosts are grouped.

Everything here is configuration (``run_scale.py`` options map onto it) plus the naming every
process agrees on: a host's id, a VM's uuid and its disk paths are functions of the run id and
their indexes, so the coordinator, the workers and the takers name the same disk the same way
without talking.
"""

from __future__ import annotations

import math
import uuid as uuidlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

DRIVER = "driver"
"""A host whose VMs go through the lock-object API: every VM's disks in one transaction."""
AGENT = "agent"
"""A host whose VMs go through the agent's lockd path (``EtcdDriver.lockd``): one disk per call."""

STEADY = "steady"
"""Hosts that live through the whole run and carry the churn."""
DIE = "die"
"""Hosts that are all killed at once (their worker process gets SIGKILL)."""
CUT = "cut"
"""Hosts whose worker reaches etcd through proxies that drop every byte for longer than the TTL."""


@dataclass(frozen=True)
class Workload:
    """One run's knobs (defaults: the issue's target load at 1,000 hosts)."""

    hosts: int = 1000
    vms_per_host: int = 10
    disks_per_vm: int = 4
    ttl: int = 10
    agent_share: float = 0.5
    """Fraction of hosts on the agent's lockd path (the rest use the driver's one-transaction path)."""
    steady_s: float = 600.0
    """Seconds of steady load (keepalives + churn): the false-fence window."""
    churn_rate: float = 20.0
    """Grant attempts per second over the whole cluster (starts, conflicting starts, migration claims)."""
    migrate_share: float = 0.3
    """Fraction of grant attempts that are live migrations (the rest are starts)."""
    conflict_share: float = 0.1
    """Fraction of starts aimed at a disk another live host holds (must be refused)."""
    pinned_vms: int = 5
    """VMs per host that churn never stops or migrates (the targets of conflicting starts)."""
    die_share: float = 0.1
    """Fraction of hosts killed at once."""
    cut_share: float = 0.05
    """Fraction of hosts cut off from etcd for ``cut_extra_s`` past their TTL."""
    cut_extra_s: float = 5.0
    hosts_per_worker: int = 150
    """Host sessions per steady worker process (the die and cut groups get their own processes)."""
    open_rate: float = 25.0
    """Sessions opened per second, cluster-wide: opening one costs the harness 6-8 ms of CPU,
    and a burst starves the first sessions' keepalive threads while the others start."""
    populate_rate: float = 50.0
    """Initial VMs started per second, cluster-wide."""
    churn_threads: int = 4
    """Threads per worker running churn operations (the rate is set by a scheduler, not by them)."""
    status_runs: int = 3
    """``virtlease status`` runs timed at full population (table and --json alternately)."""
    connection_per_host: bool = True
    """Each host session its own TCP connections (as separate machines have), not gRPC's
    process-wide shared subchannels."""
    etcd_args: tuple[str, ...] = ()
    """Extra arguments for every etcd member."""
    seed: int = 25
    run_id: str = field(default_factory=lambda: uuidlib.uuid4().hex[:8])

    def with_(self, **changes: Any) -> Workload:
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["etcd_args"] = list(self.etcd_args)
        return d

    @property
    def disks(self) -> int:
        return self.hosts * self.vms_per_host * self.disks_per_vm

    @property
    def prefix(self) -> str:
        return f"/virtlease-scale/{self.run_id}"

    def host_id(self, index: int) -> str:
        return f"hv{index:05d}"

    def kind(self, index: int) -> str:
        """Agent hosts are spread evenly over the index range (every group gets both kinds)."""
        return AGENT if math.floor((index + 1) * self.agent_share) > math.floor(index * self.agent_share) else DRIVER

    def counts(self) -> dict[str, int]:
        die = round(self.hosts * self.die_share)
        cut = round(self.hosts * self.cut_share)
        return {DIE: die, CUT: cut, STEADY: self.hosts - die - cut}

    def group_of(self, index: int) -> str:
        """The first hosts die, the next are cut, the rest are steady."""
        c = self.counts()
        if index < c[DIE]:
            return DIE
        if index < c[DIE] + c[CUT]:
            return CUT
        return STEADY

    def workers(self) -> list[tuple[str, list[int]]]:
        """(group, host indexes) of each worker process: one per non-empty die/cut group, the
        steady hosts split into processes of about ``hosts_per_worker``."""
        c = self.counts()
        out: list[tuple[str, list[int]]] = []
        start = 0
        for group in (DIE, CUT):
            if c[group]:
                out.append((group, list(range(start, start + c[group]))))
            start += c[group]
        steady = list(range(start, self.hosts))
        n = max(1, math.ceil(len(steady) / self.hosts_per_worker)) if steady else 0
        for w in range(n):
            out.append((STEADY, steady[w::n]))
        return out


def vm_uuid(run_id: str, index: int) -> str:
    """The uuid of VM ``index`` (VMs are numbered cluster-wide; a migrated VM keeps it)."""
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"virtlease-scale/{run_id}/vm{index}"))


def vm_name(index: int) -> str:
    return f"vm{index:07d}"


def disk_paths(run_id: str, index: int, disks: int) -> list[str]:
    """The disks of VM ``index``: paths that do not exist, so each is identified by its path
    (``path://``; one key per disk)."""
    return [f"/srv/scale-{run_id}/vm{index:07d}/disk{d}.qcow2" for d in range(disks)]


def initial_vm(load: Workload, host: int, slot: int) -> int:
    """The VM index of ``slot`` (0..vms_per_host-1) of ``host`` at the start of the run."""
    return host * load.vms_per_host + slot


def first_churn_vm(load: Workload, worker: int) -> int:
    """Churn-started VMs of worker ``worker`` are numbered from here (disjoint per worker)."""
    return load.hosts * load.vms_per_host + worker * 10_000_000
