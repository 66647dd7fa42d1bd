"""Fixtures of the identity tests (the storage helpers are in virtlease_lab.storage): an sshd,
host processes in mount namespaces of their own."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from virtlease_etcd.devtools.hostprocess import HostProcess
from virtlease_lab.drivers import STEADY_TTL
from virtlease_lab.etcdserver import EtcdServer
from virtlease_lab.storage import need
from virtlease_lab.storage import sshd as sshd_server


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """An sshd on a free loopback port: (port, the user's key)."""
    with sshd_server(tmp_path) as found:
        yield found


@pytest.fixture
def namespaced(etcd: EtcdServer, prefix: str, tmp_path: Path) -> Iterator[Callable[..., HostProcess]]:
    """``start(host_id, setup, **driver settings)``: a host process in a mount namespace of its own,
    started after the shell commands ``setup`` (its mounts).  A process ``setup`` leaves running
    (``sshfs -f``) appends its pid to ``$KEEP``: it is stopped at the end."""
    need("unshare", "mount")
    started: list[HostProcess] = []
    keep = tmp_path / "kept-pids"

    def start(host_id: str, setup: str, **settings: Any) -> HostProcess:
        script = f"KEEP={shlex.quote(str(keep))}; {setup} && exec \"$@\""
        wrapper = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "host"]
        host = HostProcess(etcd.endpoints, prefix, host_id, wrapper=wrapper, **{"ttl": STEADY_TTL, **settings})
        started.append(host)
        return host

    yield start
    for host in started:
        host.close()
    for pid in keep.read_text().split() if keep.exists() else []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)


@pytest.fixture
def hosts(namespaced: Callable[..., HostProcess]) -> Callable[..., HostProcess]:
    """``hosts("host-a", [(device, mount_point)], **driver settings)``: a host process in its own
    mount namespace, after mounting each device at its mount point there."""
    need("losetup", "mkfs.ext4")

    def start(host_id: str, mounts: Sequence[tuple[str, Path]], **settings: Any) -> HostProcess:
        setup = " && ".join(f"mkdir -p {shlex.quote(str(at))} && mount {shlex.quote(dev)} {shlex.quote(str(at))}"
                            for dev, at in mounts) or "true"
        return namespaced(host_id, setup, **settings)

    return start
