"""Loading etcd drivers in tests and taking them down: a driver per host, a driver-level
``Domain``, the agent's etcd backend over a driver, and the teardown that releases and unloads."""

from __future__ import annotations

import uuid
from typing import Any

import virtlease as v
from virtlease.abi import ObjectSpec, ObjectType
from virtlease_etcd.agent.backend import EtcdLockBackend
from virtlease_etcd.ops.domain import Domain


def new_uuid() -> str:
    """A fresh domain UUID."""
    return str(uuid.uuid4())


def load(endpoints: str, prefix: str, host: str, **config: Any) -> v.Plugin:
    """An etcd driver for ``host`` under ``prefix`` (TTL 4 s unless ``config`` says otherwise)."""
    cfg = {"endpoints": endpoints, "prefix": prefix, "host_id": host, "ttl": 4, **config}
    return v.load_driver("etcd", config=cfg, capabilities=v.Capability.RESOURCES)


def domain(plugin: v.Plugin, uuid: str, name: str, pid: int | None = None) -> Domain:
    """A driver-level Domain of ``plugin``'s host."""
    drv = plugin.driver
    return Domain(drv.session, drv.cfg, drv.policy, ObjectSpec(ObjectType.DOMAIN, uuid, name, pid=pid))


def backend(plugin: v.Plugin, **kwargs: Any) -> EtcdLockBackend:
    """The agent's etcd backend over ``plugin``."""
    return EtcdLockBackend(plugin.driver, **kwargs)


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
