"""Deterministic replays of interleavings the nemesis can only hit by luck.

An acquire whose reply arrives while the session is being fenced: the fence
thread's listener runs before the object has recorded its grants, so it finds
nothing to fence; if acquire then returns success the VM runs on locks that
etcd is about to expire (another host gets the disk one margin later) and
nothing ever kills it.  Acquire (a fresh grant, a hotplug grant, a migration
claim) must raise LeaseLostError or run the failure action.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import virtlease as v
from virtlease.abi import AcquireFlags, FailureAction, ObjectSpec, ObjectType, ResourceSpec, ResourceType
from virtlease_etcd.clock import SYSTEM
from virtlease_etcd.config import load_config
from virtlease_etcd.etcd.client import TransientError
from virtlease_etcd.ops import grants
from virtlease_etcd.ops.disks import DiskNames
from virtlease_etcd.ops.domain import Domain
from virtlease_etcd.session.hostsession import HostSession
from virtlease_etcd.session.owners import Policy
from virtlease_lab.drivers import shut
from virtlease_lab.fakeclock import FakeClock


def _vm() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "600"])


def _stall_keepalives(plugin: v.Plugin) -> None:
    client = plugin.driver.session.client

    def dead_keepalive(lease_id: int, *, timeout: float) -> int:
        time.sleep(min(timeout, 0.2))
        raise TransientError("keepalive dropped by the test", ambiguous=False)

    client.lease_keepalive = dead_keepalive


def _delay_reply_until_fenced(plugin: v.Plugin, disk_ops: int) -> threading.Event:
    """The next transaction with ``disk_ops`` puts commits at once, but its
    reply is handed back only after the session was fenced."""
    session = plugin.driver.session
    client = session.client
    real: Callable[..., Any] = client.txn
    delayed = threading.Event()

    def txn(compare: Any, success: Any, failure: Any = (), *, timeout: float) -> Any:
        resp = real(compare, success, failure, timeout=timeout)
        if len(success) == disk_ops and not delayed.is_set():
            delayed.set()
            deadline = SYSTEM.now() + 10
            while session.lost is None and SYSTEM.now() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)  # let the fence listeners finish before the reply is used
        return resp

    client.txn = txn
    return delayed


@pytest.mark.parametrize("how", ["acquire", "hotplug", "claim"])
def test_grant_whose_reply_arrives_after_the_fence_is_fenced(etcd: Any, prefix: str, how: str) -> None:
    caps = v.Capability.RESOURCES | v.Capability.HOTPLUG | v.Capability.MIGRATE
    config = {"endpoints": etcd.endpoints, "prefix": prefix, "host_id": f"host-race-{how}", "ttl": 3}
    plugin = v.load_driver("etcd", config=config, capabilities=caps)
    plugins = [plugin]
    try:
        vm = _vm()
        obj = plugin.new_object(uuid="6f1c2a36-4c83-4b7c-9a51-3d5e0f3b2a11", name="racy", pid=vm.pid)
        state = None
        if how == "hotplug":
            obj.add_resource(v.ResourceType.DISK, "/vm/race/base.img")
            obj.acquire(action=v.FailureAction.POWEROFF)
        elif how == "claim":  # obj is the destination of a migration from `source`
            src_cfg = {**config, "host_id": "host-race-source"}
            source = v.load_driver("etcd", config=src_cfg, capabilities=v.Capability.RESOURCES
                                   | v.Capability.MIGRATE)
            plugins.append(source)
            src_obj = source.new_object(uuid=obj.uuid, name="racy")
            src_obj.add_resource(v.ResourceType.DISK, "/vm/race/disk.img")
            src_obj.acquire()
            state = src_obj.prepare_migrate(config["host_id"])
            obj.free()
            obj = plugin.new_object(uuid=obj.uuid, name="racy", pid=vm.pid, flags=v.NewFlags.MIGRATE)
            obj.add_resource(v.ResourceType.DISK, "/vm/race/disk.img")
        else:
            obj.add_resource(v.ResourceType.DISK, "/vm/race/disk.img")
        # a grant puts a holder and a gen key; a claim also deletes the marker
        delayed = _delay_reply_until_fenced(plugin, disk_ops=3 if how == "claim" else 2)
        _stall_keepalives(plugin)
        failed: BaseException | None = None
        try:
            if how == "hotplug":
                obj.acquire_resource(v.ResourceType.DISK, "/vm/race/extra.img")
            else:
                obj.acquire(state, action=v.FailureAction.POWEROFF)
        except v.LeaseLostError as exc:
            failed = exc
        assert delayed.is_set(), "the race was not set up"
        assert plugin.driver.session.lost is not None
        try:
            vm.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        vm_alive = vm.poll() is None
        if vm_alive:
            vm.kill()
            vm.wait()
        assert not (failed is None and vm_alive), (
            f"{how} returned success after the session was fenced and the VM still runs: "
            "its locks expire in etcd one margin later and another host can take the disk")
    finally:
        for p in plugins:
            for o in p.objects:
                try:
                    o.free()
                except v.VirtleaseError:
                    pass
            try:
                shut(p)
            except v.VirtleaseError:
                pass



def test_an_owner_is_fenced_once_when_a_hotplug_reply_comes_after_the_fence(etcd: Any, prefix: str) -> None:
    """The owner already holds a disk, so the fence thread fences it; the hotplug grant's late
    reply then finds the session lost and fences again: the failure action runs once (a restart
    callback twice would start the VM twice)."""
    restarts: list[Any] = []
    config = {"endpoints": etcd.endpoints, "prefix": prefix, "host_id": "host-race-once", "ttl": 3,
              "restart_callback": restarts.append}
    plugin = v.load_driver("etcd", config=config, capabilities=v.Capability.RESOURCES | v.Capability.HOTPLUG)
    vm = _vm()
    try:
        obj = plugin.new_object(uuid="0b9f4c1e-2f4e-4a8e-8f3d-6f2b7c1d9e01", name="racy", pid=vm.pid)
        obj.add_resource(v.ResourceType.DISK, "/vm/race/once-base.img")
        obj.acquire(action=v.FailureAction.RESTART)
        delayed = _delay_reply_until_fenced(plugin, disk_ops=2)
        _stall_keepalives(plugin)
        with pytest.raises(v.LeaseLostError):
            obj.acquire_resource(v.ResourceType.DISK, "/vm/race/once-extra.img")
        assert delayed.is_set(), "the race was not set up"
        assert vm.wait(timeout=2) == -9
        assert [spec.pid for spec in restarts] == [vm.pid]
        obj.free()
    finally:
        if vm.poll() is None:
            vm.kill()
        vm.wait()
        shut(plugin)


def test_a_grant_whose_reply_comes_past_the_fence_deadline_fails_before_the_fence_thread_wakes(
        etcd: Any, prefix: str) -> None:
    """The reply arrives after the fence deadline, but the fence thread has not run yet (it is
    asleep until then, or slow): the grant itself sees the deadline passed, fences the owner
    and fails.  The session's clock is the test's: it jumps past the deadline during the reply."""
    clock = FakeClock(SYSTEM.now())
    cfg = load_config({"endpoints": etcd.endpoints, "prefix": prefix, "host_id": "host-race-clock", "ttl": 10})
    session = HostSession(cfg, clock=clock).start()
    vm = _vm()
    try:
        real: Callable[..., Any] = session.client.txn

        def txn(*args: Any, **kw: Any) -> Any:
            resp = real(*args, **kw)
            clock.at = session.fence_at + 0.01  # the reply comes just past the fence deadline
            return resp

        session.client.txn = txn  # type: ignore[method-assign]
        d = Domain(session, cfg, Policy(FailureAction.POWEROFF),
                   ObjectSpec(ObjectType.DOMAIN, "5d2b1c0e-7a51-4e8e-9c44-1f0a9b3c7d22", "racy", pid=vm.pid),
                   DiskNames(cfg))
        with pytest.raises(v.LeaseLostError):
            grants.acquire(d, [ResourceSpec(ResourceType.DISK, "/vm/race/clock.img")], None, AcquireFlags(0),
                           FailureAction.POWEROFF)
        assert vm.wait(timeout=2) == -9
    finally:
        if vm.poll() is None:
            vm.kill()
        vm.wait()
        session.client.lease_revoke(session.lease_id, timeout=2)
        session.close()
