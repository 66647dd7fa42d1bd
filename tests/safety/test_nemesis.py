"""The short, seeded nemesis run for CI: ``pytest -m safety tests/safety``.

Two runs of about a minute each (fresh three-member etcd per run), three host
processes, faults every ~2 s, a misbehaving caller in every host
(``virtlease_lab.nemesis.misuse``: replayed, edited, forged and cross-handed
states; any success that gives a disk two holders is a safety violation).  The
long run is ``make safety-long`` (see README.md).  Safety violations fail the test; liveness
violations (orphaned locks) warn, or fail with ``VIRTLEASE_NEMESIS_STRICT=1``.
"""

from __future__ import annotations

import os
import warnings

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
    assert not summary.violations, report
    assert not summary.errors, report
    if summary.liveness:
        # liveness (a lock held by nobody for a while) is not a safety violation;
        # fixed in the driver (README.md "Findings"), enforced with VIRTLEASE_NEMESIS_STRICT=1
        if os.environ.get("VIRTLEASE_NEMESIS_STRICT") == "1":
            raise AssertionError(report)
        warnings.warn("liveness violations: " + "; ".join(summary.liveness), stacklevel=1)
