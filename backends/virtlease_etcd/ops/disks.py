"""Naming disks: a driver instance's one identity resolver and the keys of a disk.

A driver instance makes one :class:`DiskNames` when it loads and closes it
when it unloads; every lock operation of that instance (its lock objects,
the agent's lock contexts, ``release_all``) is handed that one explicitly
(``Domain(..., names)``).  It keeps one
:class:`~virtlease_etcd.identity.Resolver`, so the mount table is parsed
once per change of mounts and each mount's, device's and directory's facts
are found once, not per disk or per call.  The resolver is not
thread-safe: every call goes through one lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from virtlease.abi import ResourceSpec, ResourceType
from virtlease.errors import ValidationError
from virtlease_etcd.config import EtcdConfig
from virtlease_etcd.identity import DiskIdentity, IdentityConfig, IdentityError, Resolver
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
        self.strict = cfg.strict_identity
        self.resolver = resolver or Resolver(identity_config(cfg))
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def close(self) -> None:
        with self._lock:
            self.resolver.close()

    def ids(self, spec: ResourceSpec) -> list[ks.ResourceId]:
        """The keys that lock ``spec``: for a disk its identity key, then its other
        keys (its name, its legacy path key: :func:`~virtlease_etcd.model.keyspace.disk_ids`)."""
        return self.ids_many([spec])[0]

    def ids_many(self, specs: Sequence[ResourceSpec]) -> list[list[ks.ResourceId]]:
        """:meth:`ids` of each spec, resolved together (the mount table and
        each directory looked at once: one lock operation's disks)."""
        return [ids for _found, ids in self.resolve_many(specs)]

    def resolve_many(self, specs: Sequence[ResourceSpec]) -> list[tuple[DiskIdentity | None, list[ks.ResourceId]]]:
        """Each spec's identity (``None`` for a lease) and keys; raises
        ``ValidationError`` naming a disk that has no cluster-wide identity."""
        disks = [s for s in specs if s.type is ResourceType.DISK]
        with self._lock:
            try:
                found = iter(self.resolver.resolve_many([s.name for s in disks]))
            except IdentityError as exc:
                raise ValidationError("resource", str(exc)) from None
        out: list[tuple[DiskIdentity | None, list[ks.ResourceId]]] = []
        for spec in specs:
            if spec.type is not ResourceType.DISK:
                out.append((None, [ks.ResourceId.of(spec)]))
                continue
            f = next(found)
            if f.fallback and f.path not in self._warned:
                self._warned.add(f.path)
                log.warning("disk %s has no cluster-wide identity: it is locked as path://%s, this host's path "
                            "only; a host that reaches the same file by another path is not excluded (%s)",
                            spec.name, f.path, "it does not exist: nothing can have it open" if self.strict
                            else "strict_identity is off: turn it on to refuse such disks, or set identity_map "
                            "for its storage")
            out.append((f, ks.disk_ids(spec, f.key, f.readable, name=f.name, real_path=f.path, legacy=self.legacy)))
        return out

    def primary(self, spec: ResourceSpec) -> ks.ResourceId:
        """The identity key of ``spec`` (what owners index held resources by)."""
        return self.ids(spec)[0]
