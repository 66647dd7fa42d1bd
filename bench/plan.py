"""How big each benchmark is, in the full run and in ``--quick`` mode."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Plan:
    quick: bool
    latency_disks: tuple[int, ...] = (1, 8, 32, 64)
    latency_max_n: int = 1000
    """Most samples per latency cell (fewer if the time budget runs out)."""
    latency_budget: float = 6.0
    """Seconds per latency cell (at least 10 samples are always taken)."""
    ceiling_n: int = 2000
    callers: tuple[int, ...] = (1, 4, 16, 64)
    throughput_disks: int = 4
    throughput_seconds: float = 4.0
    lock_ttl: int = 10
    """TTL of virtlease's session lease and of the recipe's per-lock leases."""
    keepalive_disks: tuple[int, ...] = (1, 100, 1_000, 10_000)
    keepalive_recipe_measured: tuple[int, ...] = (1, 100, 1_000)
    """Recipe lock counts refreshed for real; larger ones are extrapolated."""
    keepalive_window: float = 60.0
    """Seconds of counting; a multiple of TTL/3 so the count is not cut mid-interval."""
    scale_hosts: int = 100
    """Host sessions of the scale section (10 VMs x 4 disks each, three-member etcd of its own)."""
    scale_ttl: int = 10
    scale_idle_s: float = 20.0
    scale_steady_s: float = 60.0
    scale_cut_extra_s: float = 5.0
    scale_status_runs: int = 2
    failover_ttls: tuple[int, ...] = (2, 5, 10)
    failover_trials: int = 2
    handoff_disks: tuple[int, ...] = (1, 8, 63)  # a claim also deletes the marker: 63 disks fit 128 ops
    handoff_max_n: int = 200
    handoff_budget: float = 6.0

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if not quick:
            return cls(quick=False)
        return cls(quick=True, latency_max_n=200, latency_budget=0.8, ceiling_n=300, throughput_seconds=0.6,
                   keepalive_recipe_measured=(1, 100), keepalive_window=10.0, scale_hosts=12,
                   scale_ttl=3, scale_idle_s=2.0, scale_steady_s=3.0, scale_cut_extra_s=1.0, scale_status_runs=1,
                   failover_ttls=(2, 5), failover_trials=1, handoff_max_n=30, handoff_budget=0.8)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
