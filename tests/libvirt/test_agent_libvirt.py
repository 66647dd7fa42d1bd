"""Real libvirt over the virtlease agent: the rig's hosts run ``virtlease-agent`` (in each
host's namespaces, reaching the test's etcd through a relay) in place of virtlockd.

``virsh start`` works; the same disk in a domain on the other host is refused and virsh's
error names the holder's host and domain; suspend keeps the disk reserved (still refused),
resume works; destroy frees the disk at once."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_relay import Relay
from rig import Rig

from conftest import EtcdServer

pytestmark = pytest.mark.libvirt
HERE = Path(__file__).resolve().parent
PORT = 23790


@pytest.fixture(scope="module")
def agent_rig(tmp_path_factory: pytest.TempPathFactory, etcd_process: EtcdServer) -> Iterator[Rig]:
    short = Path(tempfile.mkdtemp(prefix="vl-relay-", dir="/tmp"))  # a UNIX socket path must be short
    relay_path = str(short / "etcd.sock")
    host, port = etcd_process.endpoints.split(",")[0].rsplit(":", 1)
    relay = Relay.unix_to_tcp(relay_path, host, int(port))
    prefix = f"/vltest/{uuid.uuid4().hex[:12]}"
    command = [sys.executable, str(HERE / "agent_in_host.py"), relay_path, str(PORT),
               "--socket", "{socket}", "--endpoints", f"127.0.0.1:{PORT}", "--host-id", "host{host}",
               "--prefix", prefix, "--ttl", "5", "--reserve-grace", "2"]
    r = Rig(tmp_path_factory.mktemp("agent-rig"), lock_daemon=command)
    try:
        with r:
            yield r
    finally:
        relay.close()
        shutil.rmtree(short, ignore_errors=True)


def test_start_busy_suspend_resume_destroy(agent_rig: Rig, record_property: pytest.RecordProperty) -> None:
    r = agent_rig
    disk = r.image("agent-shared.img")
    r.define_domain("A", "web1", [disk])
    r.define_domain("B", "db1", [disk])
    _, seconds = r.start("A", "web1")
    record_property("virsh_start_s", round(seconds, 3))
    print(f"virsh start with the agent: {seconds:.3f} s")
    assert r.domstate("A", "web1") == "running"

    cp, _ = r.start("B", "db1", check=False)
    assert cp.returncode != 0 and r.domstate("B", "db1") == "shut off"
    err = cp.stderr
    assert "resource busy" in err and "domain web1" in err and "on host hostA" in err, err

    r.virsh("A", "suspend", "web1")
    assert r.domstate("A", "web1") == "paused"
    cp, _ = r.start("B", "db1", check=False)
    assert cp.returncode != 0 and "reserved for domain web1" in cp.stderr, cp.stderr
    r.virsh("A", "resume", "web1")
    assert r.domstate("A", "web1") == "running"

    r.virsh("A", "destroy", "web1")
    t0 = time.monotonic()
    while True:  # the lifeline's EOF releases as soon as QEMU has exited
        cp, _ = r.start("B", "db1", check=False)
        if cp.returncode == 0:
            break
        assert time.monotonic() - t0 < 5, cp.stderr
        time.sleep(0.1)
    assert r.domstate("B", "db1") == "running"
    r.virsh("B", "destroy", "db1")
