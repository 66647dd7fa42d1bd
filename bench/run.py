"""virtlease benchmarks, side by side with one etcd transaction (the
ceiling) and python-etcd3's Lock recipe, in one run against one etcd.

    python bench/run.py [--quick] [--out DIR] [--endpoints HOST:PORT]
    python bench/run.py --render bench/results/latest.json --out DIR   # redraw only

Prints the markdown report, writes ``latest.md``, ``latest.json`` and PNG
plots to ``--out`` (default ``build/bench``, untracked; ``bench/results`` holds
the published run).  Progress lines go to stderr.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import agent
import failover
import handoff
import identity
import keepalive
import latency
import machine
import plots
import report
import scale
import throughput
from cluster import Cluster
from measure import progress
from plan import Plan

Section = Callable[[Cluster, Plan], Any]

SECTIONS: list[tuple[str, Section]] = [
    ("ceiling", latency.ceiling_latency),
    ("latency", latency.vm_latency),
    ("handoff", handoff.handoff),
    ("identity", identity.driver_section),
    ("throughput", throughput.throughput),
    ("keepalive", keepalive.keepalive_cost),
    ("scale", scale.scale),
    ("failover", failover.failover),
    ("agent", agent.agent_section),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="everything at small sizes (< 2 minutes)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "build" / "bench",
                        help="directory for latest.md, latest.json and the PNGs (default: build/bench; "
                             "bench/results publishes them)")
    parser.add_argument("--endpoints", help="use this etcd (host:port) instead of starting an embedded one")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only redraw the report and plots from a results JSON (no benchmark)")
    args = parser.parse_args(argv)
    if args.render:
        saved: dict[str, Any] = json.loads(args.render.read_text())
        saved["plots"] = plots.draw(saved, args.out)
        report.write(saved, args.out)
        print(report.markdown(saved))
        return 0
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plan = Plan.make(args.quick)
    started = time.monotonic()
    progress(f"virtlease bench ({'quick' if plan.quick else 'full'}): starting etcd")
    cluster = Cluster.start(args.endpoints)
    results: dict[str, Any] = {"started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
                               "plan": plan.as_dict()}
    try:
        results["machine"] = machine.describe(cluster)
        progress(f"etcd {results['machine']['etcd']} at {cluster.endpoint}; run id {cluster.run_id}")
        for name, section in SECTIONS:
            progress(f"== {name}")
            t0 = time.monotonic()
            results[name] = section(cluster, plan)
            progress(f"== {name} done in {time.monotonic() - t0:.1f} s")
    finally:
        cluster.stop()
    results["machine"]["load_at_end"] = machine.load_average()
    results["wall_s"] = round(time.monotonic() - started, 1)
    results["plots"] = plots.draw(results, args.out)
    md, js = report.write(results, args.out)
    print(report.markdown(results))
    progress(f"wrote {md}, {js} and {', '.join(results['plots'])} in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
