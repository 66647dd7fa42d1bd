"""Real libvirt over the virtlease agent: the rig's hosts run ``virtlease-agent`` (in each
host's namespaces, reaching the test's etcd through a relay) in place of virtlockd.

``virsh start`` works; the same disk in a domain on the other host is refused and virsh's
error names the holder's host and domain; suspend keeps the disk reserved (still refused),
resume works; destroy frees the disk at once.  ``kill -9`` of host A's agent with a domain
running, then a new agent in its place (as systemd's Restart=always does): the new agent
continues the lease and re-adopts the QEMU, which keeps running past the TTL with its disk
still refused to host B; suspend/resume/destroy through the new agent work."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_relay import Relay
from rig import Rig, wait_for

from conftest import EtcdServer

pytestmark = pytest.mark.libvirt
HERE = Path(__file__).resolve().parent
PORT = 23790
TTL = 5


@pytest.fixture(scope="module")
def agent_rig(tmp_path_factory: pytest.TempPathFactory, etcd_process: EtcdServer) -> Iterator[Rig]:
    short = Path(tempfile.mkdtemp(prefix="vl-relay-", dir="/tmp"))  # a UNIX socket path must be short
    relay_path = str(short / "etcd.sock")
    host, port = etcd_process.endpoints.split(",")[0].rsplit(":", 1)
    relay = Relay.unix_to_tcp(relay_path, host, int(port))
    prefix = f"/vltest/{uuid.uuid4().hex[:12]}"
    command = [sys.executable, str(HERE / "agent_in_host.py"), relay_path, str(PORT),
               "--socket", "{socket}", "--endpoints", f"127.0.0.1:{PORT}", "--host-id", "host{host}",
               "--prefix", prefix, "--ttl", str(TTL), "--reserve-grace", "2"]
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


def _serving(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def test_agent_sigkill_and_restart_keeps_the_running_domain(agent_rig: Rig) -> None:
    r = agent_rig
    disk = r.image("agent-restart.img")
    r.define_domain("A", "web2", [disk])
    r.define_domain("B", "db2", [disk])
    r.start("A", "web2")
    qemu = r.qemu_pid("A", "web2")
    host = r.hosts["A"]
    old_agent, subreaper = host.pid("lockdaemon"), host.pid("subreaper")
    assert qemu and old_agent and subreaper
    os.kill(old_agent, signal.SIGKILL)
    wait_for(lambda: not _serving(host.lockd_socket), 5.0, what="the killed agent's socket to go dead")
    with open(host.root / "log" / "lockdaemon-restarted.log", "ab") as log:
        new = subprocess.Popen(["nsenter", "-t", str(subreaper), "-m", "-n", "-u", "--", *r._lock_command(host)],
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (host.run / "lockdaemon.pid").write_text(f"{new.pid}\n")
    wait_for(lambda: _serving(host.lockd_socket) or new.poll() is not None, 20.0, what="the new agent")
    assert new.poll() is None, (host.root / "log" / "lockdaemon-restarted.log").read_text()
    time.sleep(TTL + 1)  # past the old agent's fence deadline and its lease's TTL
    assert r.qemu_pid("A", "web2") == qemu and r.domstate("A", "web2") == "running"
    cp, _ = r.start("B", "db2", check=False)
    assert cp.returncode != 0 and "domain web2" in cp.stderr and "on host hostA" in cp.stderr, cp.stderr
    r.virsh("A", "suspend", "web2")  # new lock connections to the new agent, for the re-adopted owner
    r.virsh("A", "resume", "web2")
    assert r.domstate("A", "web2") == "running"
    r.virsh("A", "destroy", "web2")
    t0 = time.monotonic()
    while True:  # the new agent watches the re-adopted QEMU by pidfd (its lifeline died with the old agent)
        cp, _ = r.start("B", "db2", check=False)
        if cp.returncode == 0:
            break
        assert time.monotonic() - t0 < 5, cp.stderr
        time.sleep(0.1)
    r.virsh("B", "destroy", "db2")
    log_text = (host.root / "log" / "lockdaemon-restarted.log").read_text()
    assert "re-attached to lease" in log_text and "re-adopted running domain web2" in log_text, log_text
