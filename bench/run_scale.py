"""The scale harness (``make bench-scale``): hosts x VMs x disks on a three-member etcd.

    python bench/run_scale.py                       # 100, 300, 1,000 hosts, 10 min of churn each
    python bench/run_scale.py --hosts 50 --steady 30 --idle 10   # one short run
    python bench/run_scale.py --render DIR/scale.json            # redraw the report only

Writes ``scale.json`` (every figure, raw), ``scale.md`` (the tables, the targets, the model's
prediction and its assumptions) and ``scale-*.png`` to ``--out``; progress on stderr.  See
bench/README.md, section "Scale", for what is measured and how to read it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import machine
from scale import model, report
from scale.etcdload import GeneratedRun
from scale.runner import Run, progress
from scale.workload import Workload
from virtlease_etcd.devtools.embedded import find_etcd_binary

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "scale"


def etcd_version() -> str:
    try:
        out = subprocess.run([find_etcd_binary(), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("etcd Version")),
                "unknown")


def wait_quiet(load: float, limit: float = 1800.0) -> None:
    """Wait until the 1-minute load average is below ``load`` (other work on a shared machine),
    at most ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while os.getloadavg()[0] >= load and time.monotonic() < deadline:
        progress(f"waiting for the load average ({os.getloadavg()[0]:.1f}) to fall below {load}")
        time.sleep(30)


def render(res: dict[str, Any], out: Path) -> None:
    """Fit the model, draw the plots, write scale.md and scale.json."""
    done = [r for r in res["runs"] if not r.get("aborted")]
    if len({r["load"]["hosts"] for r in done}) > 1:
        res["model"] = model.fit(done, predict_at=res.get("predict_at", 5000))
    res["plots"] = report.plots(res, out)
    (out / "scale.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "scale.md").write_text(report.sweep_markdown(res))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", default="100,300,1000", help="comma-separated host counts, one run each")
    parser.add_argument("--generated", default="1000,5000", metavar="HOSTS",
                        help="host counts measured on etcd's side only, with the asyncio load generator "
                             "(scale/etcdload.py) instead of real sessions ('' for none)")
    parser.add_argument("--steady", type=float, default=600.0, help="seconds of churn per run (false-fence window)")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of keepalives only per run")
    parser.add_argument("--rate", type=float, default=20.0, help="grant attempts per second, cluster-wide")
    parser.add_argument("--ttl", type=int, default=10)
    parser.add_argument("--vms", type=int, default=10, help="VMs per host")
    parser.add_argument("--disks", type=int, default=4, help="disks per VM")
    parser.add_argument("--hosts-per-worker", type=int, default=150, help="host sessions per steady process")
    parser.add_argument("--status-runs", type=int, default=3, help="virtlease status runs during the churn")
    parser.add_argument("--etcd-arg", action="append", default=[], metavar="ARG",
                        help="extra etcd flag for every member (repeat: --etcd-arg=--quota-backend-bytes=...)")
    parser.add_argument("--retries", type=int, default=1,
                        help="runs of a size again after one stopped early (sessions lost while starting)")
    parser.add_argument("--quiet-load", type=float, default=None, metavar="LOAD",
                        help="before each run wait (up to 30 min) until the 1-minute load average is below LOAD")
    parser.add_argument("--predict", type=int, default=5000, help="host count the model predicts")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only redraw the report from a scale.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        saved: dict[str, Any] = json.loads(args.render.read_text())
        render(saved, args.out)
        print(report.sweep_markdown(saved))
        return 0
    res: dict[str, Any] = {"started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
                           "machine": {**machine.host(tempfile.gettempdir()), "etcd": etcd_version()},
                           "predict_at": args.predict, "runs": []}
    sizes = [(int(h), False) for h in args.hosts.split(",") if h] + \
        [(int(h), True) for h in args.generated.split(",") if h]
    for hosts, generated in sizes:
        load = Workload(hosts=hosts, steady_s=args.steady, churn_rate=args.rate, ttl=args.ttl,
                        vms_per_host=args.vms, disks_per_vm=args.disks, hosts_per_worker=args.hosts_per_worker,
                        status_runs=args.status_runs, etcd_args=tuple(args.etcd_arg))
        for attempt in range(1 + args.retries):
            if args.quiet_load is not None:
                wait_quiet(args.quiet_load)
            workdir = Path(tempfile.mkdtemp(prefix=f"virtlease-scale-{hosts}-"))
            kind = GeneratedRun if generated else Run
            try:
                run = kind(load.with_(run_id=f"{load.run_id}{attempt or ''}"), workdir, idle_s=args.idle).run()
            finally:
                keep = args.out / f"logs-{hosts}{'-generated' if generated else ''}"
                shutil.rmtree(keep, ignore_errors=True)
                shutil.copytree(workdir, keep)  # worker and member logs
                shutil.rmtree(workdir, ignore_errors=True)
            res["runs"].append(run)
            render(res, args.out)  # after every run: a long sweep cut short keeps what it measured
            if not run.get("aborted"):
                break
    print(report.sweep_markdown(res))
    progress(f"wrote {args.out / 'scale.md'}, scale.json and {', '.join(res['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
