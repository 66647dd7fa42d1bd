"""The scale harness: a thousand hypervisors on one etcd, measured.

Real host sessions (the product's ``HostSession``: lease, keepalive, fence clock, host-key
watch), the driver's grant path and the agent's lockd path, many hosts per worker process,
against a real three-member etcd on this machine.  ``runner.Run`` is one run at one size;
``run_scale.py`` runs several sizes and fits ``model`` to them.  Entry points: ``bench/run_scale.py``
(``make bench-scale``) and the ``scale`` section of ``bench/run.py`` (one small run).
See bench/README.md, section "Scale".
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from .runner import Run
from .workload import Workload


def workload(plan: Any) -> Workload:
    """The ``make bench`` run's workload from its plan (``plan.Plan``'s ``scale_*`` fields)."""
    return Workload(hosts=plan.scale_hosts, ttl=plan.scale_ttl, steady_s=plan.scale_steady_s,
                    cut_extra_s=plan.scale_cut_extra_s, status_runs=plan.scale_status_runs)


def scale(cluster: Any, plan: Any) -> dict[str, Any]:
    """The ``scale`` section of ``bench/run.py``: one run at ``plan.scale_hosts`` hosts on a
    three-member etcd of its own (``cluster``, the other sections' single member, is not used)."""
    workdir = Path(tempfile.mkdtemp(prefix="virtlease-scale-"))
    try:
        return Run(workload(plan), workdir, idle_s=plan.scale_idle_s).run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
