"""How this host names its storage, for ``check`` and ``hold``: what the identity resolver reports,
said plainly.

A disk on storage the resolver cannot name cluster-wide (tmpfs, overlay, a local file system
without a UUID) is locked under ``path://<real path>``: this host's path only, so a host that
reaches the same file by another path is not excluded.  ``check`` lists the storage roots this
host sees (its mount points, and the ``identity_map`` prefixes) with the name a disk there gets;
``hold`` warns for each such disk it holds.  Nothing here changes how a disk is named
(``identity``, ``ops/disks.py``): it only asks the resolver.

See docs/DESIGN.md §8 (Resource identity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from virtlease_etcd.config import EtcdConfig
from virtlease_etcd.identity import DiskIdentity, IdentityError, Resolver
from virtlease_etcd.identity.mountinfo import parse_mountinfo
from virtlease_etcd.ops.disks import identity_config

PSEUDO_FS = frozenset({
    "proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "debugfs", "tracefs", "securityfs", "pstore",
    "bpf", "hugetlbfs", "configfs", "fusectl", "binfmt_misc", "autofs", "rpc_pipefs", "nsfs", "efivarfs",
    "devtmpfs", "selinuxfs", "fuse.gvfsd-fuse", "fuse.portal"})
"""File systems that hold no VM disks (kernel interfaces)."""
SYSTEM_DIRS = ("/proc", "/sys", "/dev", "/run")


@dataclass(frozen=True)
class Root:
    """One storage root this host sees, and how a disk under it is named."""

    path: str
    fstype: str
    source: str
    naming: str
    """The identity a disk there gets, as the resolver reports it (or why it has none)."""
    cluster_wide: bool


def host_only_disks(cfg: EtcdConfig, paths: Sequence[str]) -> list[DiskIdentity]:
    """The disks of ``paths`` the resolver names by this host's path only."""
    try:
        with Resolver(identity_config(cfg)) as resolver:
            return [found for found in resolver.resolve_many(list(paths)) if found.fallback]
    except IdentityError:
        return []  # strict_identity: such a disk was refused, not locked


def describe(found: DiskIdentity) -> str:
    """How a disk named ``found`` is named, in words."""
    if found.fallback:
        return f"path://<real path>: {found.path} and below, this host only"
    if found.kind == "filesystem":
        return f"file-system UUID + inode ({found.readable.split(':', 1)[0]}): cluster-wide"
    if found.kind in ("network", "mapped"):
        return f"{found.key}/...: cluster-wide" + (" (identity_map)" if found.kind == "mapped" else "")
    return f"{found.kind} {found.key}: cluster-wide"


def storage_roots(cfg: EtcdConfig, mountinfo: str = "/proc/self/mountinfo") -> list[Root]:
    """Every mount point that may hold disks (not kernel interfaces, not under /proc, /sys, /dev,
    /run) and every ``identity_map`` prefix, each with the name the resolver gives it."""
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as fh:
        mounts = [m for m in parse_mountinfo(fh.read()) if m.fstype not in PSEUDO_FS
                  and not any(m.mount_point == d or m.mount_point.startswith(d + "/") for d in SYSTEM_DIRS)]
    roots: list[tuple[str, str, str]] = [(m.mount_point, m.fstype, m.source) for m in mounts]
    roots += [(prefix, "identity_map", target) for prefix, target in sorted(cfg.identity_map.items())]
    out: list[Root] = []
    with Resolver(identity_config(cfg)) as resolver:
        for path, fstype, source in dict.fromkeys(roots):
            try:
                found = resolver.resolve(path)  # the root itself: it exists, and nothing is written
            except IdentityError as exc:
                out.append(Root(path, fstype, source, f"refused (strict_identity): {exc}", False))
                continue
            out.append(Root(path, fstype, source, describe(found), not found.fallback))
    return out
