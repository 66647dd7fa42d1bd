"""Self-fencing: a holder cut off from etcd runs its failure action before
another host can be granted its disks (docs/DESIGN.md section 5, point 2)."""

from __future__ import annotations

import subprocess
import threading
import time

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
