"""Which SCSI LUNs, through which paths, a disk's storage lives on (sysfs only, no I/O).

:func:`storage_of` follows a disk down its block-device stack: a file to its file system's
device, a partition to its disk, a device-mapper device (LVM LV, dm-multipath map, dm-crypt)
to its ``slaves``, until the leaves.  Leaves that are SCSI disks are grouped by their WWID
into :class:`Lun`\\ s, each with every path (``/dev/sdX``) this host has to it -- a multipath
map's leaves are its paths.  Leaves that are not SCSI disks (NVMe, virtio, loop, ...) are
listed as ``uncovered``: persistent reservations cannot protect them.  A file on a network
or virtual file system (NFS, tmpfs, overlay: no block device) has no local storage: ``None``.

Everything is read below a configurable sysfs root and ``/dev`` (tests feed samples).
WWIDs are returned as sysfs spells them (``naa.6001405...``); comparing them with configured
names is the caller's job.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .sysfs import read as _read


@dataclass(frozen=True)
class Lun:
    """One SCSI logical unit and this host's paths to it."""

    wwid: str
    paths: tuple[str, ...]
    """Device nodes, one per I_T nexus (``/dev/sdb``, ``/dev/sdc``, ...), sorted."""


@dataclass(frozen=True)
class Storage:
    """The LUNs under one disk, and the leaves that are no SCSI disk."""

    luns: tuple[Lun, ...]
    uncovered: tuple[str, ...]
    """Leaf block devices that are not SCSI disks (``nvme0n1``, ``vda``, ``loop0``)."""
    stack: str
    """How the disk reaches its leaves, for messages (``dm-2 <- dm-0 <- sdb, sdc``)."""


def _device_of(path: str) -> tuple[int, int] | None:
    """``(major, minor)`` of the block device a disk path is, or lives on; None if none."""
    st = os.stat(path)
    rdev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
    if not stat.S_ISBLK(st.st_mode) and os.major(rdev) == 0:
        return None  # NFS, tmpfs, overlay, FUSE, btrfs subvolumes: an anonymous device
    return os.major(rdev), os.minor(rdev)


def _disk_dir(sysfs: str, major: int, minor: int) -> str:
    node = os.path.realpath(os.path.join(sysfs, "dev", "block", f"{major}:{minor}"))
    if os.path.exists(os.path.join(node, "partition")):
        node = os.path.dirname(node)  # a partition: its disk is the parent directory
    return node


def _leaves(node: str, seen: set[str]) -> tuple[list[str], list[str]]:
    """(leaf disk dirs, the stack's names from the top) below a sysfs block directory."""
    name = os.path.basename(node)
    if node in seen:
        return [], []
    seen.add(node)
    slaves_dir = os.path.join(node, "slaves")
    try:
        slaves = sorted(os.listdir(slaves_dir))
    except OSError:
        slaves = []
    if not slaves:
        return [node], [name]
    leaves: list[str] = []
    below: list[str] = []
    for slave in slaves:
        child = os.path.realpath(os.path.join(slaves_dir, slave))
        if os.path.exists(os.path.join(child, "partition")):
            child = os.path.dirname(child)
        found, names = _leaves(child, seen)
        leaves += found
        below += names
    return leaves, [name, *below]


def _scsi_wwid(disk: str) -> str | None:
    """The WWID of a SCSI disk's sysfs directory, None if it is no SCSI disk."""
    if not os.path.isdir(os.path.join(disk, "device", "scsi_disk")):
        return None
    wwid = _read(os.path.join(disk, "device", "wwid"))
    return " ".join(wwid.split()) if wwid else None


def _node(dev_root: str, disk: str) -> str:
    uevent = _read(os.path.join(disk, "uevent")) or ""
    for line in uevent.splitlines():
        if line.startswith("DEVNAME="):
            return os.path.join(dev_root, line.partition("=")[2])
    return os.path.join(dev_root, os.path.basename(disk))


def storage_of(path: str, *, sysfs: str = "/sys", dev_root: str = "/dev") -> Storage | None:
    """The LUNs under ``path`` (a block device node or a file); None when the path lives on no
    local block device (a network or virtual file system).  OSError if ``path`` is missing."""
    found = _device_of(path)
    if found is None:
        return None
    return storage_of_device(*found, sysfs=sysfs, dev_root=dev_root)


def storage_of_device(major: int, minor: int, *, sysfs: str = "/sys", dev_root: str = "/dev") -> Storage:
    """:func:`storage_of` for the block device ``major:minor``."""
    leaves, names = _leaves(_disk_dir(sysfs, major, minor), set())
    by_wwid: dict[str, list[str]] = {}
    uncovered: list[str] = []
    for leaf in leaves:
        wwid = _scsi_wwid(leaf)
        if wwid is None:
            uncovered.append(os.path.basename(leaf))
        else:
            by_wwid.setdefault(wwid, []).append(_node(dev_root, leaf))
    luns = tuple(Lun(w, tuple(sorted(p))) for w, p in sorted(by_wwid.items()))
    stack = names[0] if len(names) == 1 else f"{names[0]} <- {', '.join(names[1:])}"
    return Storage(luns, tuple(uncovered), stack)


def luns_by_wwid(*, sysfs: str = "/sys", dev_root: str = "/dev") -> dict[str, Lun]:
    """Every SCSI disk of this host, grouped into LUNs by WWID (``virtlease status``)."""
    by_wwid: dict[str, list[str]] = {}
    block = os.path.join(sysfs, "block")
    try:
        names = sorted(os.listdir(block))
    except OSError:
        return {}
    for name in names:
        disk = os.path.realpath(os.path.join(block, name))
        wwid = _scsi_wwid(disk)
        if wwid is not None:
            by_wwid.setdefault(wwid, []).append(_node(dev_root, disk))
    return {w: Lun(w, tuple(sorted(p))) for w, p in by_wwid.items()}
