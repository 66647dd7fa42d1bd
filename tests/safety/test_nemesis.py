"""The short, seeded nemesis run for CI: ``pytest -m safety tests/safety``.

Two runs of about a minute each (fresh three-member etcd per run), three host
processes, faults every ~2 s, a misbehaving caller in every host
(``virtlease_lab.nemesis.misuse``: replayed, edited, forged and cross-handed
states; any success that gives a disk two holders is a safety violation).  One
worker per host runs VMs through the agent's per-disk path
(``virtlease_lab.nemesis.agent_vm``: start, detach, attach, pivot, pause and
resume or exit), and the same UUID is started on the other hosts during each of
those operations (``misuse.Twin``).  The long run is ``make safety-long`` (see
README.md).  Safety violations fail the test; liveness
violations (orphaned locks) warn, or fail with ``VIRTLEASE_NEMESIS_STRICT=1``.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import pytest

from virtlease_lab.nemesis.harness import Settings, run_suite

SEED = int(os.environ.get("VIRTLEASE_NEMESIS_SEED", "20261125"))
DURATION = float(os.environ.get("VIRTLEASE_NEMESIS_DURATION", "120"))


@pytest.mark.safety
@pytest.mark.timeout(900)
def test_no_disk_ever_has_two_writers() -> None:
    settings = Settings(seed=SEED, run_length=DURATION / 2, fault_every=2.0, quiet=True)
    summary = run_suite(settings, DURATION)
    report = summary.render()
    print(report)
    assert sum(sum(r.faults.values()) for r in summary.results) >= 10, "too few faults injected"
    assert sum(r.ops["writes accepted"] for r in summary.results) > 100, "the hosts made no progress"
    ops: Counter[str] = Counter()
    for r in summary.results:
        ops.update(r.ops)
    twin = Counter(m["variant"] for r in summary.results for m in r.misuse if m["kind"] == "twin")
    for op in ("detach", "attach", "pivot", "pause"):
        assert any(k.startswith(f"agent {op}:") for k in ops), f"no agent VM tried a {op}\n{report}"
        assert twin[op] > 0, f"the twin never tried the same UUID during a {op}\n{report}"
    assert not summary.violations, report
    assert not summary.errors, report
    if summary.liveness:
        # liveness (a lock held by nobody for a while) is not a safety violation;
        # fixed in the driver (README.md "Findings"), enforced with VIRTLEASE_NEMESIS_STRICT=1
        if os.environ.get("VIRTLEASE_NEMESIS_STRICT") == "1":
            raise AssertionError(report)
        warnings.warn("liveness violations: " + "; ".join(summary.liveness), stacklevel=1)
