r"""Naming disks: the driver's one identity resolver and the keys of a disk.

A driver instance keeps one :class:`DiskNames` (one
:class:`~virtlease_etcd.identity.Resolver`, so the mount table is parsed
once per change of mounts and each mount's facts are found once, not per
disk or per call).  :func:`for_config` hands every ``Domain`` of one
configuration object the same instance (the agent builds its own Domains);
the driver's unload :func:`forget`\ s it.  The resolver is not
thread-safe: every call goes through one lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from virtlease.abi import ResourceSpec, ResourceType
from virtlease.errors import ValidationError
from virtlease_etcd.config import EtcdConfig
from virtlease_etcd.identity import IdentityConfig, IdentityError, Resolver
from virtlease_etcd.model import keyspace as ks

log = logging.getLogger(__name__)


def identity_config(cfg: EtcdConfig) -> IdentityConfig:
    """The resolver's configuration from the driver's."""
    return IdentityConfig(aliases=dict(cfg.server_aliases), mappings=dict(cfg.identity_map),
                          strict=cfg.strict_identity)


class DiskNames:
    """Resource specs to etcd keys for one driver instance."""

    def __init__(self, cfg: EtcdConfig, resolver: Resolver | None = None) -> None:
        self.legacy = cfg.legacy_path_keys
        self.resolver = resolver or Resolver(identity_config(cfg))
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def close(self) -> None:
        with self._lock:
            self.resolver.close()

    def ids(self, spec: ResourceSpec) -> list[ks.ResourceId]:
        """The keys that lock ``spec``: for a disk its identity key, then its
        legacy path key (when ``legacy_path_keys`` and they differ)."""
        return self.ids_many([spec])[0]

    def ids_many(self, specs: Sequence[ResourceSpec]) -> list[list[ks.ResourceId]]:
        """:meth:`ids` of each spec, resolved together (the mount table and
        each directory looked at once: one lock operation's disks)."""
        disks = [s for s in specs if s.type is ResourceType.DISK]
        with self._lock:
            try:
                found = iter(self.resolver.resolve_many([s.name for s in disks]))
            except IdentityError as exc:
                raise ValidationError(
                    "resource", f"{exc}. strict_identity is on: set identity_map "
                    "(path prefix -> identity prefix) for it, or turn strict_identity off") from None
        out = []
        for spec in specs:
            if spec.type is not ResourceType.DISK:
                out.append([ks.ResourceId.of(spec)])
                continue
            f = next(found)
            if f.fallback and f.path not in self._warned:
                self._warned.add(f.path)
                log.warning("disk %s has no cluster-wide identity: it is locked as path://%s, this host's path "
                            "only; a host that reaches the same file by another path is not excluded (set "
                            "identity_map for its storage, or strict_identity to refuse such disks)", spec.name,
                            f.path)
            out.append(ks.disk_ids(spec, f.key, f.readable, f.path, f.fallback, legacy=self.legacy))
        return out

    def primary(self, spec: ResourceSpec) -> ks.ResourceId:
        """The identity key of ``spec`` (what owners index held resources by)."""
        return self.ids(spec)[0]


_BY_CONFIG: dict[int, tuple[EtcdConfig, DiskNames]] = {}
_BY_CONFIG_LOCK = threading.Lock()


def for_config(cfg: EtcdConfig) -> DiskNames:
    """The one :class:`DiskNames` of the configuration object ``cfg``."""
    with _BY_CONFIG_LOCK:
        found = _BY_CONFIG.get(id(cfg))
        if found is None:  # the entry keeps cfg alive: its id is not reused while it is listed
            found = _BY_CONFIG[id(cfg)] = (cfg, DiskNames(cfg))
        return found[1]


def forget(cfg: EtcdConfig) -> None:
    """Close and drop the :class:`DiskNames` of ``cfg`` (the driver unloads)."""
    with _BY_CONFIG_LOCK:
        found = _BY_CONFIG.pop(id(cfg), None)
    if found is not None:
        found[1].close()
