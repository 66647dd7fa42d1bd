"""The etcd lock driver: the LOCK_DRIVER class and its lock objects.

A driver instance holds its own policy (failure action, restart callback,
lease-lost callback) and uses its host's session (shared with the other
instances of the same host in this process: one lease per host).  A lock
object is a handle on its domain's *owner* in that session: the work is done
by ``grants`` (grant, resume, release, hotplug) and ``handoff`` (migration),
see docs/DESIGN.md.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping
from typing import Any

from virtlease import validation
from virtlease.abi import (
    ABI_VERSION,
    AcquireFlags,
    Capability,
    FailureAction,
    HeldResource,
    ObjectSpec,
    ObjectType,
    ResourceSpec,
    format_version,
    version_major,
)
from virtlease.errors import LeaseLostError, PluginBusyError, PluginVersionError
from virtlease_etcd.ops import grants, handoff
from virtlease_etcd.ops.disks import DiskNames
from virtlease_etcd.ops.domain import Domain
from virtlease_etcd.ops.lockd import LockdDomain
from virtlease_etcd.ops.status import ClusterStatus, read_status
from virtlease_etcd.session.hostrecord import HostKeyTaken
from virtlease_etcd.session.hostsession import HostSession
from virtlease_etcd.session.owners import Policy
from virtlease_etcd.session.registry import close_session, open_session
from virtlease_etcd.session.watchdog import LeaseWatchdog, close_watchdog, open_watchdog

from .config import EtcdConfig, load_config

log = logging.getLogger(__name__)


class EtcdDriver:
    """LOCK_DRIVER of the etcd plugin."""

    name = "etcd"
    version = ABI_VERSION
    capabilities = Capability.RESOURCES | Capability.MIGRATE | Capability.HOTPLUG | Capability.USES_STATE

    def __init__(self) -> None:
        self.cfg: EtcdConfig | None = None
        self.policy = Policy(FailureAction.POWEROFF)
        self._session: HostSession | None = None
        self._lock = threading.Lock()
        self._names: DiskNames | None = None
        self.watchdog: LeaseWatchdog | None = None
        """The watchdog armed by this host's lease (``watchdog_device``), following the session."""

    # -- plugin hooks ------------------------------------------------------------

    def load(self, version: int, capabilities: Capability, config: Mapping[str, Any]) -> None:
        if version_major(version) != version_major(self.version) or version > self.version:
            raise PluginVersionError(
                f"etcd driver: requested ABI {format_version(version)}, offers {format_version(self.version)}")
        missing = Capability(capabilities) & ~self.capabilities
        if missing:
            raise PluginVersionError(f"etcd driver: requested capabilities {missing!r} not offered "
                                     f"(offers {self.capabilities!r})")
        cfg = load_config(config)
        self.policy = Policy(cfg.default_action, cfg.restart_callback)
        self.watchdog = open_watchdog(cfg)
        try:
            self._session = open_session(cfg)  # continues cfg.adopted_session if given
        except BaseException:
            if self.watchdog is not None:
                close_watchdog(self.watchdog)
                self.watchdog = None
            raise
        if self.watchdog is not None:
            self.watchdog.follow(self._session)
        self.cfg = dataclasses.replace(cfg, adopted_session=None)  # a renewal opens a new one
        self._names = DiskNames(self.cfg)
        self._session.add_listener(self._on_lost)

    def unload(self) -> None:
        session = self._session
        if session is None:
            return
        if session.lost is None:
            busy = [o for o in session.owners.all() if o.policy is self.policy and o.protects_a_vm]
            if busy:
                names = "; ".join(f"domain {o.name} ({o.uuid}): "
                                  + (", ".join(h.rid.readable for h in o.held.values() if h.rid.legacy_of is None)
                                     or "registered")
                                  for o in busy)
                raise PluginBusyError(
                    f"etcd driver of host {session.cfg.host_id}: {len(busy)} domain(s) still hold leases "
                    f"({names}); unloading would drop their protection while they may run. Release them "
                    "first (a fresh object of the domain with its disks added, then release())")
        session.remove_listener(self._on_lost)
        close_session(session)
        self._session = None
        if self._names is not None:
            self._names.close()
        self._names = None
        if self.watchdog is not None:
            close_watchdog(self.watchdog)
            self.watchdog = None

    def renew_session(self) -> str | None:
        """Replace a lost session by a new one (a new lease) for the grants that follow; return
        why the old one was lost, or None when the session is valid (nothing done).

        For a long-lived caller that fenced and goes on (the agent): every owner of the lost
        session was already fenced, none of its holds carries over, and every later grant is
        checked against etcd as always.  The lost session stays in place (nothing changed) if
        etcd does not answer (BackendUnavailableError) or still has its lease (LeaseLostError:
        a new session would be refused as a second live one of this host)."""
        with self._lock:
            old = self._session
            if old is None or old.lost is None:
                return None
            assert self.cfg is not None
            try:
                new = open_session(self.cfg)
            except HostKeyTaken as exc:
                if exc.lease != old.lease_id:
                    raise
                raise LeaseLostError(  # its host key still names it: this would be a second live session
                    f"host {self.cfg.host_id}: the lost session's lease {old.lease_id:x} is still in etcd "
                    f"(it expires within {old.ttl} s, or is revoked earlier once its fenced domains have "
                    f"exited); a new session starts at the first acquire after that; nothing changed "
                    f"({old.lost})") from None
            old.remove_listener(self._on_lost)
            close_session(old)
            new.add_listener(self._on_lost)
            if self.watchdog is not None:
                self.watchdog.follow(new)
            self._session = new
            return old.lost

    def release_all(self) -> int:
        """Release every domain this driver instance granted or registered
        (records, registrations, handoff markers), e.g. to shut a host down
        cleanly once its VMs are stopped.  Returns how many domains."""
        session = self._session
        if session is None or session.lost is not None:
            return 0
        assert self.cfg is not None
        mine = [o for o in session.owners.all() if o.policy is self.policy and o.active]
        for owner in mine:
            spec = ObjectSpec(type=ObjectType.DOMAIN, uuid=owner.uuid, name=owner.name, pid=owner.pid)
            grants.release_owner(Domain(session, self.cfg, self.policy, spec, self.names), owner)
        return len(mine)

    @property
    def session(self) -> HostSession:
        if self._session is None:
            raise LeaseLostError("etcd driver: not loaded (or already unloaded)")
        return self._session

    @property
    def names(self) -> DiskNames:
        """This instance's disk namer: one identity resolver (under a lock) for every lock
        operation of this instance, handed to each explicitly."""
        if self._names is None:
            raise LeaseLostError("etcd driver: not loaded (or already unloaded)")
        return self._names

    @property
    def host_id(self) -> str:
        return self.session.cfg.host_id

    def new_object(self, spec: ObjectSpec) -> EtcdObject:
        self.session.check()
        return EtcdObject(self, spec)

    def lockd(self, uuid: str, name: str, pid: int | None) -> LockdDomain:
        """lockd's calls for one domain on this host (the agent's way in, ``ops/lockd.py``):
        ``uuid``, ``name`` and ``pid`` are checked by the core's validation, as a lock
        object's are."""
        assert self.cfg is not None
        spec = ObjectSpec(type=ObjectType.DOMAIN, uuid=validation.check_uuid(uuid), name=validation.check_name(name),
                          pid=validation.check_optional_int(pid, "pid", minimum=1))
        return LockdDomain(Domain(self.session, self.cfg, self.policy, spec, self.names))

    def status(self) -> ClusterStatus:
        """Hosts, held resources and handoffs under this driver's prefix."""
        session = self.session
        return read_status(session.client, session.keys, timeout=session.cfg.request_timeout * 2)

    def _on_lost(self, reason: str) -> None:
        """The session already fenced every owner; tell this instance's caller."""
        callback = self.cfg.on_lease_lost if self.cfg is not None else None
        if callback is not None:
            try:
                callback(reason)
            except Exception:
                log.exception("on_lease_lost callback failed")


class EtcdObject:
    """A handle on one domain's owner on this host (libvirt makes a fresh one
    for every operation; what is held belongs to the domain, not to it)."""

    def __init__(self, driver: EtcdDriver, spec: ObjectSpec) -> None:
        self.driver = driver
        self.spec = spec

    def _domain(self) -> Domain:
        driver = self.driver
        assert driver.cfg is not None
        return Domain(driver.session, driver.cfg, driver.policy, self.spec, driver.names)

    def acquire(self, resources: list[ResourceSpec], state: str | None, flags: AcquireFlags,
                action: FailureAction) -> None:
        grants.acquire(self._domain(), resources, state, flags, action)

    def release(self, resources: list[ResourceSpec]) -> str:
        return grants.release(self._domain(), resources)

    def inquire(self, resources: list[ResourceSpec]) -> str:
        return grants.inquire(self._domain(), resources)

    def held(self, resources: list[ResourceSpec]) -> list[HeldResource]:
        if self.driver._session is None:
            return []
        return grants.held(self._domain(), resources)

    def acquire_resource(self, resource: ResourceSpec) -> None:
        grants.acquire_resource(self._domain(), resource)

    def release_resource(self, resource: ResourceSpec) -> None:
        grants.release_resource(self._domain(), resource)

    def prepare_migrate(self, dest_host: str) -> str:
        return handoff.prepare(self._domain(), dest_host)

    def complete_migrate_out(self, cancel: bool) -> None:
        handoff.complete_out(self._domain(), cancel)

    def complete_migrate_in(self, cancel: bool) -> str | None:
        return handoff.complete_in(self._domain(), cancel)

    def free(self) -> None:
        """Forget the handle.  The domain keeps what it holds (libvirt frees the
        lock object right after the start's acquire while the VM runs)."""
