"""The ``virtlease`` command as the tests run it: a real subprocess, a clean environment,
and the one-line error rule every failure must follow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from virtlease_lab.etcdserver import EtcdServer

_SCRIPT = shutil.which("virtlease", path=os.path.dirname(sys.executable))
VIRTLEASE: list[str] = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "virtlease.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any virtlease settings of the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTLEASE_", "GRPC_"))}
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
        cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VIRTLEASE, *args], capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else clean_env(), cwd=cwd)


def opts(etcd: EtcdServer, prefix: str, host: str = "host-t", ttl: int | None = None) -> list[str]:
    """The command-line options of a ``virtlease`` command for ``host`` on ``etcd`` under ``prefix``."""
    out = ["--endpoints", etcd.endpoints, "--prefix", prefix, "--host-id", host]
    if ttl is not None:
        out += ["--ttl", str(ttl)]
    return out


def assert_one_line_error(stderr: str, *needles: str) -> None:
    """An error is one line (plus an optional hint line) and never a traceback; warnings printed
    before it (a disk held by this host's path only) are lines of their own."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("virtlease: warning: ")]
    assert "Traceback" not in stderr, stderr
    assert lines and lines[0].startswith("virtlease: error: "), stderr
    assert len(lines) <= 2, stderr
    if len(lines) == 2:
        assert lines[1].startswith("hint: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, stderr)
