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
from conftest import shut
from virtlease_etcd import clock
from virtlease_etcd.etcd.client import TransientError


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
            deadline = clock.now() + 10
            while session.lost is None and clock.now() < deadline:
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

