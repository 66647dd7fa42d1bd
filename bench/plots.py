"""PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter

from scale import report as scale_report

COLORS = {"virtlease": "tab:blue", "recipe": "tab:orange", "ceiling": "tab:gray"}


def _plain_ticks(ax: Axes) -> None:
    """Numbers like 2000 instead of 2x10^3 on log axes."""
    fmt = FuncFormatter(lambda v, _pos: f"{v:,.10g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))


def latency_plot(res: dict[str, Any], path: Path) -> None:
    rows = res["latency"]
    disks = [r["disks"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for who, label in (("virtlease", "virtlease (one txn each way)"), ("recipe", "python-etcd3 Lock per disk")):
        ax.plot(disks, [r[who]["p50_ms"] for r in rows], "o-", color=COLORS[who], label=f"{label}, p50")
        ax.plot(disks, [r[who]["p99_ms"] for r in rows], "o--", color=COLORS[who], alpha=0.5, label=f"{label}, p99")
    c = res["ceiling"]
    ax.axhline(c["p50_ms"], color=COLORS["ceiling"], label=f"ceiling: one etcd txn, p50 {c['p50_ms']:.2f} ms")
    ax.axhline(2 * c["p50_ms"], color=COLORS["ceiling"], ls=":", label="2 x ceiling (acquire + release txn)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(disks, [str(d) for d in disks])
    ax.set_xlabel("disks per VM")
    ax.set_ylabel("acquire + release latency (ms, log)")
    _plain_ticks(ax)
    ax.set_title("Latency vs disks per VM")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def throughput_plot(res: dict[str, Any], path: Path) -> None:
    rows = res["throughput"]
    callers = [r["callers"] for r in rows]
    disks = res["plan"]["throughput_disks"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"ceiling": "ceiling (etcd txn/s)", "virtlease": f"virtlease (VMs/s, {disks} disks)",
              "recipe": f"python-etcd3 Lock recipe (VMs/s, {disks} disks)"}
    for who in ("ceiling", "virtlease", "recipe"):
        ax.plot(callers, [r[who]["per_second"] for r in rows], "o-", color=COLORS[who], label=labels[who])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(callers, [str(c) for c in callers])
    ax.set_xlabel("concurrent callers (threads, one client each)")
    ax.set_ylabel("operations per second (log)")
    _plain_ticks(ax)
    ax.set_title("Throughput vs concurrent callers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def keepalive_plot(res: dict[str, Any], path: Path) -> None:
    ka = res["keepalive"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [v["disks"] for v in ka["virtlease"]]
    ax.plot(xs, [v["requests_per_min"] for v in ka["virtlease"]], "o-", color=COLORS["virtlease"],
            label="virtlease (one session lease)")
    measured = [r for r in ka["recipe"] if not r["extrapolated"]]
    extra = [r for r in ka["recipe"] if r["extrapolated"]]
    ax.plot([r["locks"] for r in measured], [r["requests_per_min"] for r in measured], "o-",
            color=COLORS["recipe"], label="recipe (one lease per lock), measured")
    if extra:
        line = [measured[-1], *extra]
        ax.plot([r["locks"] for r in line], [r["requests_per_min"] for r in line], "o:", color=COLORS["recipe"],
                alpha=0.6, label="recipe, extrapolated")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.set_xlabel("disks held by one host")
    ax.set_ylabel(f"etcd requests per minute (TTL {ka['ttl']} s, log)")
    _plain_ticks(ax)
    ax.set_title("Keepalive cost")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw(res: dict[str, Any], out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for name, fn in (("latency.png", latency_plot), ("throughput.png", throughput_plot),
                     ("keepalive.png", keepalive_plot)):
        fn(res, out / name)
        made.append(name)
    if res.get("scale"):
        made += scale_report.plots({"runs": [res["scale"]]}, out)
    return made
