"""Helpers for the agent tests over real etcd: an etcd driver per host, the etcd backend on an
in-process server, and a stand-in QEMU that opens its lock connection then execs ``sleep``
(as libvirt's forked child does before exec'ing QEMU)."""

from __future__ import annotations

import subprocess
import sys
import uuid as uuidlib
from pathlib import Path
from typing import Any

import virtlease as v
from conftest import STEADY_TTL
from virtlease.abi import ObjectSpec, ObjectType, ResourceSpec, ResourceType
from virtlease.errors import ResourceBusyError
from virtlease_etcd.agent.backend import EtcdLockBackend
from virtlease_etcd.ops.domain import Domain

STANDIN = Path(__file__).with_name("standin_qemu.py")


def load(endpoints: str, prefix: str, host: str, **config: Any) -> v.Plugin:
    """An etcd driver for ``host`` (TTL ``STEADY_TTL`` unless ``config`` says otherwise)."""
    cfg = {"endpoints": endpoints, "prefix": prefix, "host_id": host, "ttl": STEADY_TTL, **config}
    return v.load_driver("etcd", config=cfg, capabilities=v.Capability.RESOURCES)


def domain(plugin: v.Plugin, uuid: str, name: str, pid: int | None = None) -> Domain:
    """A driver-level Domain of ``plugin``'s host."""
    drv = plugin.driver
    return Domain(drv.session, drv.cfg, drv.policy, ObjectSpec(ObjectType.DOMAIN, uuid, name, pid=pid))


def backend(plugin: v.Plugin, **kwargs: Any) -> EtcdLockBackend:
    """The etcd backend over ``plugin``."""
    return EtcdLockBackend(plugin.driver, **kwargs)


def take(plugin: v.Plugin, disk: str) -> bool:
    """The second host tries to take ``disk`` (no pid: nothing of ours is ever fenced)."""
    obj = plugin.driver.new_object(ObjectSpec(ObjectType.DOMAIN, str(uuidlib.uuid4()), "intruder"))
    try:
        obj.acquire_resource(ResourceSpec(ResourceType.DISK, disk))
        return True
    except ResourceBusyError:
        return False


class StandinQemu:
    """A child that REGISTERs + RESTRICTs on ``socket`` with its own pid, then execs sleep:
    its connection is the owner's lifeline, its pid the owner pid."""

    def __init__(self, socket: Path, name: str, owner_uuid: str | None = None, *, close: bool = False) -> None:
        self.uuid = owner_uuid or str(uuidlib.uuid4())
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-P", str(STANDIN), str(socket), self.uuid, name, *(["close"] if close else [])],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"stand-in QEMU failed to register: {line!r}")
        self.pid = self.proc.pid

    def owner(self, owner_id: int = 1) -> Any:
        from virtlease_etcd.agent.lockdclient import make_owner
        return make_owner(self.name, owner_id=owner_id, pid=self.pid, owner_uuid=uuidlib.UUID(self.uuid))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc.poll() is None
