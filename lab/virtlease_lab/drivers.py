"""Loading etcd drivers in tests and taking them down: a driver per host, a driver-level
``Domain``, the agent's etcd backend over a driver, and the teardown that releases and unloads."""

from __future__ import annotations

import uuid
from typing import Any

import virtlease as v
from virtlease.abi import ObjectSpec, ObjectType, ResourceSpec, ResourceType
from virtlease.errors import ResourceBusyError
from virtlease_etcd.agent.backend import EtcdLockBackend
from virtlease_etcd.ops.domain import Domain

STEADY_TTL = 30
"""The session TTL of tests that must never be fenced: a loaded machine (load 25 on 2 cores)
delays keepalives by seconds, and a 3 s TTL (fenced 2.4 s after the last keepalive) turned that
into 'session lost' failures of tests about something else.  Tests of expiry, failover and
fencing set a short TTL themselves, with bounds that allow for such delays."""
FAST_TTL = 3
"""The TTL of a host a test kills or cuts off, to see its lease run out in a few seconds."""
EXPIRY_SLACK = 5.0
"""How late after its TTL a dead host's lease may still be in etcd before a test calls it a failure:
etcd expires leases in a background pass that a loaded machine delays (a liveness bound; the
safety bound, never before the lease could expire, is asserted without slack)."""


def new_uuid() -> str:
    """A fresh domain UUID."""
    return str(uuid.uuid4())


def load(endpoints: str, prefix: str, host: str, **config: Any) -> v.Plugin:
    """An etcd driver for ``host`` under ``prefix`` (TTL ``STEADY_TTL`` unless ``config`` says
    otherwise)."""
    cfg = {"endpoints": endpoints, "prefix": prefix, "host_id": host, "ttl": STEADY_TTL, **config}
    return v.load_driver("etcd", config=cfg, capabilities=v.Capability.RESOURCES)


def domain(plugin: v.Plugin, uuid: str, name: str, pid: int | None = None) -> Domain:
    """A driver-level Domain of ``plugin``'s host."""
    drv = plugin.driver
    return Domain(drv.session, drv.cfg, drv.policy, ObjectSpec(ObjectType.DOMAIN, uuid, name, pid=pid), drv.names)


def backend(plugin: v.Plugin, **kwargs: Any) -> EtcdLockBackend:
    """The agent's etcd backend over ``plugin``."""
    return EtcdLockBackend(plugin.driver, **kwargs)


def take(plugin: v.Plugin, disk: str) -> bool:
    """Another host's try for ``disk`` (no pid: nothing of ours is ever fenced): True if granted."""
    obj = plugin.driver.new_object(ObjectSpec(ObjectType.DOMAIN, new_uuid(), "intruder"))
    try:
        obj.acquire_resource(ResourceSpec(ResourceType.DISK, disk))
        return True
    except ResourceBusyError:
        return False


def shut(plugin: v.Plugin) -> None:
    """Test teardown: free the handles, release what the domains still hold
    (free never releases; unload refuses while domains hold leases), unload."""
    for obj in plugin.objects:
        try:
            obj.free()
        except v.VirtleaseError:
            pass
    release_all = getattr(plugin.driver, "release_all", None)
    if release_all is not None:
        try:
            release_all()
        except v.VirtleaseError:
            pass
    plugin.unload()
