"""Early revocation of a fenced lease (docs/DESIGN.md section 5, rule 2), one etcd member.

A host cut off from etcd fences at its deadline.  When etcd answers again before the lease
expires, the host revokes the lease so the disks are free at once -- but never before the lease
could have expired by its own clock, never while a killed VM still exists (a VM in storage I/O
dies only when the I/O completes), and never for a VM that was paused or left running (it
could still write).

Normally etcd expires the lease about when the host would revoke it, so a revocation cannot be
told from an expiry.  Here the test keeps the lease alive from outside (as a leader change
extends every lease): then the lease vanishes only if the host revokes it.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import etcd3
import pytest

import virtlease as v
from virtlease_etcd.session.fencing import RevocationGate, pid_alive
from virtlease_lab import freezer
from virtlease_lab.drivers import new_uuid
from virtlease_lab.etcdserver import EtcdServer
from virtlease_lab.relay import Relay

TTL, MARGIN = 3, 1.2


def lease_left(kv: etcd3.Etcd3Client, lease_id: int) -> int:
    """Seconds etcd still gives the lease; -1 once it is gone."""
    return int(kv.get_lease_info(lease_id).TTL)


@pytest.fixture
def kept_alive(kv_process: etcd3.Etcd3Client) -> Iterator[Any]:
    """``kept_alive(lease_id)``: refresh the lease from outside until the test ends."""
    stop = threading.Event()

    def start(lease_id: int) -> None:
        def loop() -> None:
            while not stop.is_set():
                try:
                    for _ in kv_process.refresh_lease(lease_id):
                        pass
                except Exception:  # the lease was revoked: nothing left to keep
                    return
                stop.wait(0.3)

        threading.Thread(target=loop, daemon=True).start()

    yield start
    stop.set()


def wait_gone(kv: etcd3.Etcd3Client, lease_id: int, limit: float) -> float:
    until = time.monotonic() + limit
    while lease_left(kv, lease_id) >= 0:
        assert time.monotonic() < until, f"lease {lease_id:x} still in etcd {limit:.1f}s later"
        time.sleep(0.02)
    return time.monotonic()


class Fenced:
    """A host (in this process, reaching etcd through a proxy) holding one disk for a VM with
    ``action``, then cut off until it fenced, then reconnected."""

    def __init__(self, etcd: EtcdServer, prefix: str, action: v.FailureAction, kept_alive: Any,
                 before_cut: Any = None) -> None:
        self.guest = subprocess.Popen(["sleep", "300"])
        self.restarted: list[Any] = []
        self.proxy = Relay.tcp(etcd.endpoints.split(",")[0])
        self.plugin = v.load_driver("etcd", config={
            "endpoints": self.proxy.endpoint, "prefix": prefix, "host_id": f"fenced-{action.name.lower()}",
            "ttl": TTL, "fence_margin": MARGIN, "request_timeout": 0.5, "restart_callback": self.restarted.append})
        session = self.plugin.driver.session
        self.lease = session.lease_id
        obj = self.plugin.new_object(uuid=new_uuid(), name="guest", pid=self.guest.pid)
        obj.add_resource(v.ResourceType.DISK, "/srv/revoke.img")
        obj.acquire(action=action)
        obj.free()
        if before_cut is not None:
            before_cut(self.guest.pid)
        kept_alive(self.lease)
        self.proxy.cut()
        until = time.monotonic() + TTL + 2
        while session.lost is None:
            assert time.monotonic() < until, "the host never fenced"
            time.sleep(0.01)
        self.proxy.heal()
        self.valid_until = session.fence_at + MARGIN
        """When the lease would have expired by the host's own clock."""
        until = time.monotonic() + 2 * TTL
        while True:  # the host reaches etcd again (its client skips a failed member for a while)
            try:
                session.client.lease_ttl(self.lease, timeout=0.5)
                break
            except Exception:
                assert time.monotonic() < until, "the host never reached etcd again"
                time.sleep(0.05)
        self.reconnected = time.monotonic()
        """From now on a revocation by the host would reach etcd."""

    def close(self) -> None:
        if self.guest.poll() is None:
            self.guest.kill()
        self.guest.wait()
        self.plugin.unload()
        self.proxy.close()


@pytest.fixture
def fenced(etcd_process: EtcdServer, prefix: str, kept_alive: Any) -> Iterator[Any]:
    made: list[Fenced] = []

    def make(action: v.FailureAction, before_cut: Any = None) -> Fenced:
        f = Fenced(etcd_process, prefix, action, kept_alive, before_cut)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


@pytest.mark.parametrize("action", [v.FailureAction.POWEROFF, v.FailureAction.RESTART])
def test_a_killed_vms_lease_is_revoked_once_it_exited_and_not_before_our_own_expiry(
        fenced: Any, kv_process: etcd3.Etcd3Client, action: v.FailureAction) -> None:
    host = fenced(action)
    assert host.guest.wait(timeout=2) == -9
    gone_at = wait_gone(kv_process, host.lease, max(host.valid_until, host.reconnected) + 3.0 - time.monotonic())
    assert gone_at >= host.valid_until - 0.05, (
        f"revoked {host.valid_until - gone_at:.2f}s before the lease could have expired by our own clock")
    if action is v.FailureAction.RESTART:
        assert [spec.pid for spec in host.restarted] == [host.guest.pid], "the restart callback ran once"


@pytest.mark.parametrize("action", [v.FailureAction.PAUSE, v.FailureAction.IGNORE])
def test_a_paused_or_running_vms_lease_is_never_revoked_early_not_even_at_unload(
        fenced: Any, kv_process: etcd3.Etcd3Client, action: v.FailureAction) -> None:
    host = fenced(action)
    assert freezer.state(host.guest.pid) == ("T" if action is v.FailureAction.PAUSE else "S")
    host.plugin.unload()  # the caller gives up on the lost session: still no revocation
    time.sleep(max(0.0, max(host.valid_until, host.reconnected) + 1.0 - time.monotonic()))
    assert lease_left(kv_process, host.lease) >= 0, "revoked while the VM could still write"
    assert host.guest.poll() is None


@pytest.mark.system
def test_a_killed_vm_stuck_in_io_blocks_the_revocation_until_it_exits(
        fenced: Any, kv_process: etcd3.Etcd3Client, frozen: freezer.Freezer) -> None:
    """The VM is stuck as in storage I/O (state D: the SIGKILL stays pending) when it is fenced."""
    host = fenced(v.FailureAction.POWEROFF, before_cut=frozen.freeze)
    time.sleep(max(0.0, max(host.valid_until, host.reconnected) + 1.0 - time.monotonic()))
    assert freezer.state(host.guest.pid) == "D" and host.guest.poll() is None
    assert lease_left(kv_process, host.lease) >= 0, "revoked while the killed VM's I/O was still in flight"
    frozen.thaw()  # the I/O completes: the pending SIGKILL takes effect
    assert host.guest.wait(timeout=2) == -9
    wait_gone(kv_process, host.lease, 3.0)  # and only now the lease is revoked


@pytest.mark.system
def test_a_process_in_state_d_counts_as_running(frozen: freezer.Freezer) -> None:
    guest = subprocess.Popen(["sleep", "300"])
    try:
        frozen.freeze(guest.pid)
        guest.kill()
        time.sleep(0.2)
        assert freezer.state(guest.pid) == "D"
        gate = RevocationGate()
        gate.hold(guest.pid)
        assert pid_alive(guest.pid) and gate.blocked() is True
        frozen.thaw()
        guest.wait(timeout=2)
        assert not pid_alive(guest.pid) and gate.blocked() is False
    finally:
        frozen.thaw()
        guest.kill()
        guest.wait()


def test_a_process_whose_stat_cannot_be_read_counts_as_running() -> None:
    """Out of file descriptors (EMFILE), /proc/<pid>/stat cannot be opened: the process is not
    known to be gone, so it still blocks early revocation."""
    code = (
        "import os, resource, sys\n"
        "from virtlease_etcd.session.fencing import pid_alive\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "held = []\n"
        "try:\n"
        "    while True:\n"
        "        held.append(os.open('/dev/null', os.O_RDONLY))\n"
        "except OSError:\n"
        "    pass\n"
        "print(pid_alive(os.getppid()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True"], out
