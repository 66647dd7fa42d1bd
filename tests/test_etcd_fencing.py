"""Self-fencing: a holder cut off from etcd runs its failure action before
another host can be granted its disks (docs/DESIGN.md section 5, point 2)."""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

import etcd3
import pytest

import virtlease as v
from virtlease_etcd.devtools.hostprocess import HostProcess, process_state
from virtlease_lab.drivers import new_uuid, shut
from virtlease_lab.etcdserver import EtcdServer
from virtlease_lab.relay import Relay

D = v.ResourceType.DISK


def wait_until_granted(plugin: v.Plugin, disk: str, started: float, limit: float) -> float:
    obj = plugin.new_object(uuid=new_uuid(), name="taker")
    obj.add_resource(D, disk)
    while True:
        try:
            obj.acquire()
            return time.monotonic()
        except v.ResourceBusyError:
            assert time.monotonic() - started < limit, f"{disk} still held {limit}s after the cut"
            time.sleep(0.05)


@pytest.mark.parametrize("how", ["cut", "blackhole"])
def test_cut_off_holder_kills_its_vm_before_anyone_else_is_granted(
        etcd: EtcdServer, prefix: str, how: str) -> None:
    ttl = 3
    guest = subprocess.Popen(["sleep", "300"])  # the "VM" whose disks are held
    died_at: list[float] = []

    def watch() -> None:
        guest.wait()
        died_at.append(time.monotonic())

    threading.Thread(target=watch, daemon=True).start()
    try:
        with Relay.tcp(etcd.endpoints.split(",")[0]) as proxy, \
                HostProcess(proxy.endpoint, prefix, "isolated", ttl=ttl, request_timeout=0.5) as holder:
            holder.ok("new", obj="vm", uuid=new_uuid(), name="guest", disks=["/srv/fence.img"], pid=guest.pid)
            holder.ok("acquire", obj="vm", action="POWEROFF")
            cut_at = time.monotonic()
            getattr(proxy, how)()
            other = v.load_driver("etcd", config={"endpoints": etcd.endpoints, "prefix": prefix,
                                                  "host_id": "rescuer", "ttl": ttl})
            try:
                granted_at = wait_until_granted(other, "/srv/fence.img", cut_at, ttl + 2)
                for obj in other.objects:
                    obj.free()
            finally:
                shut(other)
            assert died_at, "the holder never killed its VM"
            assert died_at[0] < granted_at, "another host was granted the disk while the VM still ran"
            assert guest.returncode == -9
            lost = holder.ok("lost")["lost"]
            assert lost and "keepalive" in lost
            reply = holder.call("release", obj="vm")
            assert reply["error"] == "LeaseLostError"
    finally:
        if guest.poll() is None:
            guest.kill()


def test_pause_action_stops_the_vm(etcd: EtcdServer, prefix: str) -> None:
    guest = subprocess.Popen(["sleep", "300"])
    try:
        with Relay.tcp(etcd.endpoints.split(",")[0]) as proxy, \
                HostProcess(proxy.endpoint, prefix, "pauser", ttl=2, request_timeout=0.5) as holder:
            holder.ok("new", obj="vm", uuid=new_uuid(), name="guest", disks=["/srv/pause.img"], pid=guest.pid)
            holder.ok("acquire", obj="vm", action="PAUSE")
            proxy.cut()
            deadline = time.monotonic() + 4
            while process_state(guest.pid) != "T":
                assert time.monotonic() < deadline, "the VM was not stopped"
                time.sleep(0.05)
            assert guest.poll() is None  # stopped, not killed
    finally:
        guest.kill()
        guest.wait()


def test_lease_lost_callback_and_later_calls_refused(etcd: EtcdServer, prefix: str) -> None:
    reasons: list[str] = []
    with Relay.tcp(etcd.endpoints.split(",")[0]) as proxy:
        plugin = v.load_driver("etcd", config={
            "endpoints": proxy.endpoint, "prefix": prefix, "host_id": "cb", "ttl": 2, "request_timeout": 0.5,
            "default_action": "ignore", "on_lease_lost": reasons.append})
        obj = plugin.new_object(uuid=new_uuid(), name="ignored")
        obj.add_resource(D, "/srv/cb.img")
        obj.acquire()
        proxy.cut()
        deadline = time.monotonic() + 3
        while not reasons:
            assert time.monotonic() < deadline, "on_lease_lost was not called"
            time.sleep(0.05)
        assert len(reasons) == 1
        with pytest.raises(v.LeaseLostError, match="lost"):
            obj.release()
        with pytest.raises(v.LeaseLostError):
            plugin.new_object(uuid=new_uuid(), name="late")
        proxy.heal()
        obj.free()
        shut(plugin)


def test_keepalive_survives_a_short_outage(etcd: EtcdServer, prefix: str) -> None:
    with Relay.tcp(etcd.endpoints.split(",")[0]) as proxy:
        plugin = v.load_driver("etcd", config={"endpoints": proxy.endpoint, "prefix": prefix,
                                               "host_id": "blip", "ttl": 4, "request_timeout": 0.5})
        try:
            obj = plugin.new_object(uuid=new_uuid(), name="steady")
            obj.add_resource(D, "/srv/blip.img")
            obj.acquire()
            proxy.cut()
            time.sleep(1.0)  # shorter than TTL - margin: the session must ride it out
            proxy.heal()
            time.sleep(2.0)
            assert plugin.driver.session.lost is None
            obj.release()
            obj.free()
        finally:
            shut(plugin)


# -- who is fenced, and when (the lease revoked from outside: the session is lost at once) -----


def _host(etcd: EtcdServer, prefix: str, host_id: str, **config: Any) -> v.Plugin:
    return v.load_driver("etcd", config={"endpoints": etcd.endpoints, "prefix": prefix, "host_id": host_id,
                                         "ttl": 10, **config})


def test_failure_actions_run_before_the_lease_lost_callback(etcd: EtcdServer, prefix: str,
                                                             kv: etcd3.Etcd3Client) -> None:
    """A slow lease-lost callback must not delay the kill: by the time it runs, the VM was
    sent its SIGKILL."""
    guest = subprocess.Popen(["sleep", "300"])
    seen: list[object] = []

    def on_lost(_reason: str) -> None:
        try:
            seen.append(guest.wait(timeout=3))
        except subprocess.TimeoutExpired:
            seen.append("still running when the callback ran")

    plugin = _host(etcd, prefix, "cb-order", on_lease_lost=on_lost)
    try:
        obj = plugin.new_object(uuid=new_uuid(), name="guest", pid=guest.pid)
        obj.add_resource(D, "/srv/cb-order.img")
        obj.acquire()
        kv.revoke_lease(plugin.driver.session.lease_id)
        until = time.monotonic() + 10
        while not seen:
            assert time.monotonic() < until, "the lease-lost callback never ran"
            time.sleep(0.02)
        assert seen == [-9]
        obj.free()
    finally:
        if guest.poll() is None:
            guest.kill()
        guest.wait()
        shut(plugin)


def test_fencing_stops_every_domain_with_anything_on_the_lease_and_no_other(
        etcd: EtcdServer, prefix: str, kv: etcd3.Etcd3Client) -> None:
    """A registered domain (REGISTER_ONLY, before its disks) is on the lease and is fenced; a
    domain whose acquire was refused holds nothing here and its VM is left alone."""
    registered, refused = subprocess.Popen(["sleep", "300"]), subprocess.Popen(["sleep", "300"])
    lost: list[str] = []
    other = _host(etcd, prefix, "holder")
    plugin = _host(etcd, prefix, "fenced", on_lease_lost=lost.append)
    try:
        held = other.new_object(uuid=new_uuid(), name="holder")
        held.add_resource(D, "/srv/taken.img")
        held.acquire()
        reg = plugin.new_object(uuid=new_uuid(), name="registered", pid=registered.pid)
        reg.add_resource(D, "/srv/reg.img")
        reg.acquire(flags=v.AcquireFlags.REGISTER_ONLY)
        busy = plugin.new_object(uuid=new_uuid(), name="refused", pid=refused.pid)
        busy.add_resource(D, "/srv/taken.img")
        with pytest.raises(v.ResourceBusyError):
            busy.acquire()
        kv.revoke_lease(plugin.driver.session.lease_id)
        until = time.monotonic() + 10
        while not lost:  # the failure actions run before the callback
            assert time.monotonic() < until, "the session was never lost"
            time.sleep(0.02)
        assert registered.wait(timeout=3) == -9
        time.sleep(0.2)
        assert refused.poll() is None, "a domain that holds nothing on the lease was fenced"
        for obj in (reg, busy, held):
            obj.free()
    finally:
        for p in (registered, refused):
            if p.poll() is None:
                p.kill()
            p.wait()
        shut(plugin)
        shut(other)
