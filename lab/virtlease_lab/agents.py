"""The agent's etcd backend in this process on a real etcd, for the agent tests: an agent behind
a relay the test can blackhole, a stand-in QEMU holding a disk through it, empty disk images."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import virtlease as v
from virtlease_etcd.agent.lockdclient import LockdClient
from virtlease_lab.drivers import backend, load
from virtlease_lab.etcdserver import EtcdServer
from virtlease_lab.lockdharness import ServerThread
from virtlease_lab.relay import Relay
from virtlease_lab.standin import StandinQemu


def images(tmp_path: Path, *names: str) -> list[str]:
    """Empty files under ``tmp_path`` to lock as disks; their paths."""
    out = []
    for n in names:
        (tmp_path / n).write_bytes(b"")
        out.append(str(tmp_path / n))
    return out


@contextlib.contextmanager
def agent_behind_relay(etcd_process: EtcdServer, prefix: str, tmp_path: Path, host: str,
                       **config: Any) -> Iterator[tuple[Relay, v.Plugin, ServerThread]]:
    """An agent of ``host`` reaching etcd through a relay the test can blackhole: (relay, driver,
    server); torn down (released, unloaded) after the block."""
    ep_host, port = etcd_process.endpoints.split(",")[0].rsplit(":", 1)
    with Relay.tcp(f"{ep_host}:{port}") as relay:
        plugin = load(relay.endpoint, prefix, host, request_timeout=0.5, **config)
        run = tmp_path / host
        run.mkdir(mode=0o700)
        server = ServerThread(run / "virtlockd-sock", backend(plugin))
        try:
            yield relay, plugin, server
        finally:
            server.stop()
            relay.heal()
            plugin.driver.release_all()
            plugin.unload()


def hold_then_cut(relay: Relay, plugin: v.Plugin, server: ServerThread, disk: str) -> tuple[StandinQemu, int]:
    """A stand-in QEMU holding ``disk``, then etcd blackholed: the owner and the session's lease."""
    old = StandinQemu(server.path, "web1")
    with LockdClient(server.path) as c:
        c.register(old.owner())
        c.acquire(disk)
    lease = plugin.driver.session.lease_id
    relay.blackhole()
    return old, lease
