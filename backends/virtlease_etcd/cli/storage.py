"""How this host names its storage, for ``check`` and ``hold``: what the identity resolver reports,
said plainly.

A file disk is locked under the id its directory carries (``.virtlease-id``), cluster-wide, and
under this host's name for it.  Where a directory can carry no id (a read-only view, root
squashed on NFS) such a disk is refused (``strict_identity``, the default), locked under its
mapped name (``identity_map``), or -- ``strict_identity`` off -- under this host's name only; a
path that does not exist is locked under ``path://<real path>``: this host's path only, so a
host that reaches the same file by another path is not excluded.  ``check`` lists the storage
roots this host sees (its mount points, and the ``identity_map`` prefixes) with what a disk
there gets, writing nothing; ``hold`` warns for each disk it holds by this host's path only.
Nothing here changes how a disk is named (``identity``, ``ops/disks.py``): it only asks the
resolver.

See docs/DESIGN.md §8 (Resource identity).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from virtlease_etcd.config import EtcdConfig
from virtlease_etcd.identity import DiskIdentity, IdentityError, Resolver
from virtlease_etcd.identity.dirid import stamp
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
    """What a disk there is locked under, as the resolver reports it (or why it is refused)."""
    cluster_wide: bool


def host_only_disks(cfg: EtcdConfig, paths: Sequence[str]) -> list[DiskIdentity]:
    """The disks of ``paths`` the resolver names by this host's path only."""
    try:
        with Resolver(identity_config(cfg)) as resolver:
            return [found for found in resolver.resolve_many(list(paths)) if found.fallback]
    except IdentityError:
        return []  # strict_identity: such a disk was refused, not locked


def describe(found: DiskIdentity) -> str:
    """What this host calls a disk named ``found``, in words."""
    if found.fallback:
        return f"path://<real path> ({found.path} and below: this host's path only)"
    if found.kind == "filesystem":
        return f"file-system UUID + inode ({found.readable.split(':', 1)[0]})"
    if found.kind in ("network", "mapped"):
        return f"{found.key}/..." + (" (identity_map)" if found.kind == "mapped" else "")
    return f"{found.kind} {found.key}"


def naming(found: DiskIdentity, path: str, strict: bool) -> tuple[str, bool]:
    """What a disk under root ``path`` (named ``found``) is locked under, and whether that is
    cluster-wide: a directory id where directories there can carry one (one is there, or this host
    may write), else the mapped name, else a refusal (strict) or this host's name only."""
    name = describe(found)
    if not os.path.isdir(path):  # an identity_map prefix not mounted here
        return (f"{name}: cluster-wide", True) if not found.fallback else (f"{name}: not here", False)
    if stamp(path) is not None or os.access(path, os.W_OK):
        return f"directory ids, cluster-wide (named {name} besides)", True
    cannot = "no directory id can be made here (read-only, or root squashed)"
    if found.kind == "mapped":
        return f"{name}: cluster-wide; {cannot}", True
    if strict:
        return (f"refused (strict_identity): {cannot}; run `virtlease identity DIR` where it is writable, or "
                f"set identity_map (named {name})"), False
    return f"{name}: this host's name only; {cannot}", False


def storage_roots(cfg: EtcdConfig, mountinfo: str = "/proc/self/mountinfo") -> list[Root]:
    """Every mount point that may hold disks (not kernel interfaces, not under /proc, /sys, /dev,
    /run) and every ``identity_map`` prefix, each with what a disk there is locked under.  Nothing
    is written (no directory id is made)."""
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as fh:
        mounts = [m for m in parse_mountinfo(fh.read()) if m.fstype not in PSEUDO_FS
                  and not any(m.mount_point == d or m.mount_point.startswith(d + "/") for d in SYSTEM_DIRS)]
    roots: list[tuple[str, str, str]] = [(m.mount_point, m.fstype, m.source) for m in mounts]
    roots += [(prefix, "identity_map", target) for prefix, target in sorted(cfg.identity_map.items())]
    out: list[Root] = []
    with Resolver(identity_config(cfg)) as resolver:
        for path, fstype, source in dict.fromkeys(roots):
            try:
                found = resolver.name(path)  # the root itself: it exists, and nothing is written
            except IdentityError as exc:
                out.append(Root(path, fstype, source, f"refused: {exc}", False))
                continue
            said, cluster_wide = naming(found, path, cfg.strict_identity)
            out.append(Root(path, fstype, source, said, cluster_wide))
    return out
