"""The agent under socket activation, as the package's ``virtlockd.service`` drop-in runs it:
the listening socket comes from the service manager (``LISTEN_FDS``), over real etcd.

``systemd-socket-activate`` (Debian's systemd package) passes the sockets as systemd does;
``SocketUnit`` adds what it cannot do (restart the service, reload it) to test a handover.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import virtlease as v
from agent.etcd_agent import StandinQemu, load, take
from agent.socket_unit import SocketUnit
from conftest import EtcdServer
from virtlease_etcd.agent.lockdclient import ConnectionClosed, LockdClient, make_owner
from virtlease_etcd.agent.runfile import load as load_state
from virtlease_etcd.agent.runfile import state_path
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.ops.status import read_status

TTL = 4
SSA = shutil.which("systemd-socket-activate")

pytestmark = pytest.mark.skipif(SSA is None, reason="systemd-socket-activate missing (apt-get install systemd)")


def agent_args(etcd: EtcdServer, prefix: str, sock: Path, state: Path) -> list[str]:
    return [sys.executable, "-m", "virtlease_etcd.agent.main", "--endpoints", etcd.endpoints, "--prefix", prefix,
            "--host-id", "hv-a", "--ttl", str(TTL), "--socket", str(sock), "--state-dir", str(state),
            "--reserve-grace", "0.3"]


def wait_log(log: Path, text: str, timeout: float = 20.0, count: int = 1) -> str:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        content = log.read_text(errors="replace")
        if content.count(text) >= count:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} (x{count}) not in {log} after {timeout} s:\n{log.read_text(errors='replace')}")


@pytest.fixture
def disk(tmp_path: Path) -> str:
    p = tmp_path / "web1.img"
    p.write_bytes(b"")
    return str(p)


@pytest.fixture
def other_host(etcd_process: EtcdServer, prefix: str) -> Iterator[v.Plugin]:
    plugin = load(etcd_process.endpoints, prefix, "hv-b")
    yield plugin
    plugin.driver.release_all()
    plugin.unload()


def holders(plugin: v.Plugin, prefix: str) -> set[tuple[str, str, int, int]]:
    """(host, domain, lease, token) of every record under ``prefix``, from etcd."""
    status = read_status(plugin.driver.session.client, ks.Keys(prefix), timeout=5)
    return {(h.host, h.domain_name, h.lease, h.token) for h in status.resources}


def test_under_systemd_socket_activate(etcd_process: EtcdServer, prefix: str, sock_dir: Path, tmp_path: Path,
                                       disk: str, other_host: v.Plugin) -> None:
    """Started by the first connection with the lockd socket and virtlockd's admin socket passed,
    as virtlockd.socket + virtlockd-admin.socket do: the agent serves the one bound to --socket,
    closes connections to the other at once, and leaves the socket file to its owner."""
    sock, admin = sock_dir / "virtlockd-sock", sock_dir / "virtlockd-admin-sock"
    log = tmp_path / "agent.log"
    assert SSA is not None
    with open(log, "wb") as out:
        ssa = subprocess.Popen([SSA, "-l", str(sock), "-l", str(admin),
                                "--fdname=virtlockd.socket:virtlockd-admin.socket",
                                *agent_args(etcd_process, prefix, sock, tmp_path / "state")],
                               stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        until = time.monotonic() + 10
        while not (sock.exists() and admin.exists()):
            assert time.monotonic() < until and ssa.poll() is None, log.read_text()
            time.sleep(0.02)
        qemu = subprocess.Popen(["sleep", "600"])  # the owner's pid: never this test's own
        try:
            with LockdClient(sock, timeout=30) as c:  # this connection starts the agent
                c.register(make_owner("web1", pid=qemu.pid))
                c.acquire(disk)
                assert {h[:2] for h in holders(other_host, prefix)} == {("hv-a", "web1")}
                c.release(disk)
        finally:
            qemu.kill()
            qemu.wait()
        text = wait_log(log, "virtlease agent serving")
        assert "passed by the service manager (virtlockd.socket)" in text
        with LockdClient(admin, timeout=5) as a:
            assert a.is_closed_by_server(5), "a connection to the admin socket was left hanging"
        time.sleep(0.5)  # the reservation ends 0.3 s after its QEMU exited
        ssa.send_signal(signal.SIGTERM)  # nothing held: the agent exits at once
        assert ssa.wait(20) == 0, log.read_text()
        assert sock.exists(), "the agent removed the socket the service manager owns"
    finally:
        if ssa.poll() is None:
            ssa.kill()
            ssa.wait(10)


def test_socket_not_among_the_passed_ones(etcd_process: EtcdServer, prefix: str, sock_dir: Path,
                                          tmp_path: Path) -> None:
    """Sockets passed, none bound to --socket: a one-line error naming what was passed, exit 2,
    and no etcd session opened."""
    passed, wanted = sock_dir / "other-sock", sock_dir / "virtlockd-sock"
    log = tmp_path / "agent.log"
    assert SSA is not None
    with open(log, "wb") as out:
        ssa = subprocess.Popen([SSA, "-l", str(passed), *agent_args(etcd_process, prefix, wanted, tmp_path / "state")],
                               stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        until = time.monotonic() + 10
        while not passed.exists():
            assert time.monotonic() < until, log.read_text()
            time.sleep(0.02)
        with LockdClient(passed, timeout=30) as c, pytest.raises(ConnectionClosed):
            c.register(make_owner("web1", pid=1))
        assert ssa.wait(20) == 2
        text = log.read_text()
        assert f"none listens on {wanted}" in text and str(passed) in text, text
        assert "cannot serve" in text and "serving" not in text.replace("cannot serve", "")
    finally:
        if ssa.poll() is None:
            ssa.kill()
            ssa.wait(10)


def test_reload_hands_over_on_the_same_socket(etcd_process: EtcdServer, prefix: str, sock_dir: Path,
                                              tmp_path: Path, disk: str, other_host: v.Plugin) -> None:
    """``systemctl reload`` (SIGUSR2) with a VM holding its disk: the service manager starts the
    new agent on the same listening socket; the record in etcd (holder, lease, token) never
    changes, the other host stays refused, and a lockd call made during the handover waits in
    the socket's queue and is answered by the new agent (none is refused)."""
    sock = sock_dir / "virtlockd-sock"
    log_path = tmp_path / "agent.log"
    unit = SocketUnit(sock, agent_args(etcd_process, prefix, sock, tmp_path / "state"), log_path)
    qemus: list[StandinQemu] = []
    try:
        wait_log(log_path, "virtlease agent serving")
        q = StandinQemu(sock, "web1")
        qemus.append(q)
        with LockdClient(sock) as c:
            c.register(q.owner())
            c.acquire(disk)
        before = holders(other_host, prefix)
        assert {h[:2] for h in before} == {("hv-a", "web1")}
        samples: list[set[tuple[str, str, int, int]]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(holders(other_host, prefix))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        old_pid = unit.main_pid
        t0 = time.monotonic()
        unit.reload()
        unit.wait_started(2, 10)
        answered: list[float] = []
        with LockdClient(sock, timeout=30) as c:  # connects while the new agent starts
            c.register(make_owner("db1", owner_id=2, pid=q.pid, owner_uuid=uuidlib.uuid4()))
            answered.append(time.monotonic() - t0)
        wait_log(log_path, "virtlease agent serving", count=2)
        done.set()
        sampler.join(10)
        assert unit.exits[0][1] == 75 and unit.main_pid != old_pid
        assert "re-adopted running domain web1" in log_path.read_text()
        assert samples and all(s == before for s in samples), "the record changed during the handover"
        assert not take(other_host, disk)
        assert q.alive()
        print(f"\nhandover under socket activation: SIGUSR2 -> a queued REGISTER answered after {answered[0]:.2f} s; "
              f"{len(samples)} etcd samples, all the same record")
    finally:
        unit.stop()
        for q in qemus:
            q.kill()
        state = load_state(state_path(tmp_path / "state", "hv-a"))
        if state and state.guard:  # nothing of the test outlives it
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.guard["pid"], signal.SIGKILL)
