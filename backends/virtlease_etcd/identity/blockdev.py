"""Stable names of block devices and of the file systems on them.

Everything is read below a configurable sysfs root, ``/dev`` root and udev
root (``/sys``, ``/dev`` and ``/run/udev`` on a real host) so tests can feed
samples.  A caller may rely on:

* :func:`device_key` naming a block device ``major:minor`` by what the
  storage itself says, in this order: device-mapper uuid (multipath
  ``mpath-<wwid>``, LVM ``LVM-<vg uuid><lv uuid>``, LUKS), the SCSI or NVMe
  WWID in sysfs, a ``/dev/disk/by-id/wwn-*`` link, another by-id link (the
  serial), a virtio-blk serial in sysfs (named as udev's by-id link would
  be, ``virtio-<serial>``); a loop device is named by its backing file (the caller resolves
  it).  SCSI designators are spelled one way whatever the source (``naa.``,
  ``eui.``, ``t10.``; multipath's ``3…``/``2…``/``1…`` prefixes are mapped to
  them) so a LUN seen through multipath on one host and as a plain SCSI disk
  on another gets one key.  A partition adds ``-part<N>``.  ``None`` when
  nothing stable is known.
* :func:`fs_uuid` giving a file system's UUID (lower-case, dashed) from, in
  order, the ``FS_IOC_GETFSUUID`` ioctl on an open file (Linux 6.5+, no
  privilege), btrfs' ``FS_INFO`` ioctl, ``/dev/disk/by-uuid`` links, the
  udev database and, as root only, the super block on the device (ext2/3/4,
  xfs, btrfs); ``None`` when none of them answers.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
import struct
import uuid
from dataclasses import dataclass

log = logging.getLogger(__name__)

# _IOR(0x15, 0, struct fsuuid2 { __u8 len; __u8 uuid[16]; })
FS_IOC_GETFSUUID = 0x80111500
# _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args), 1024 bytes; fsid at offset 16.
BTRFS_IOC_FS_INFO = 0x8400941F
# _IOWR(0x94, 18, struct btrfs_ioctl_ino_lookup_args), 4096 bytes.
BTRFS_IOC_INO_LOOKUP = 0xD0009412
BTRFS_FIRST_FREE_OBJECTID = 256

SUPERBLOCK_BYTES = 0x10040 + 8


@dataclass(frozen=True)
class Roots:
    """Where the host's device facts are read."""

    sysfs: str = "/sys"
    dev: str = "/dev"
    udev: str = "/run/udev"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            return handle.read().strip()
    except OSError:
        return None


def _format_uuid(raw: bytes) -> str | None:
    if len(raw) != 16 or not any(raw):
        return None
    return str(uuid.UUID(bytes=raw))


def normalise_wwid(wwid: str) -> str:
    """One spelling of a device WWID: ``naa.``/``eui.``/``t10.`` prefixes, lower-case hex."""
    wwid = " ".join(wwid.split())
    if re.fullmatch(r"[123][0-9a-fA-F]+", wwid):
        prefix = {"3": "naa", "2": "eui", "1": "t10"}[wwid[0]]
        return f"{prefix}.{wwid[1:].lower()}"
    if re.fullmatch(r"wwn-0x[0-9a-fA-F]+", wwid):
        return f"naa.{wwid[6:].lower()}"
    head, dot, tail = wwid.partition(".")
    if dot and head.lower() in ("naa", "eui", "nvme", "uuid") and re.fullmatch(r"[0-9a-fA-F-]+", tail):
        return f"{head.lower()}.{tail.lower()}"
    return wwid


def _dm_key(dm_uuid: str) -> str | None:
    part = re.match(r"part(\d+)-(.+)", dm_uuid)
    if part:
        inner = _dm_key(part.group(2))
        return f"{inner}-part{part.group(1)}" if inner else None
    if dm_uuid.startswith("mpath-"):
        return f"wwid://{normalise_wwid(dm_uuid[6:])}"
    if dm_uuid.startswith("LVM-"):
        ids = dm_uuid[4:]
        vg, lv, suffix = ids[:32], ids[32:64], ids[64:]
        if len(lv) != 32:
            return None
        return f"lvm://{vg}/{lv}{suffix}"
    crypt = re.match(r"CRYPT-[A-Z0-9]+-([0-9a-f]{32})-", dm_uuid)
    if crypt:
        return f"luks://{uuid.UUID(crypt.group(1))}"
    return f"dm-uuid://{dm_uuid}" if dm_uuid else None


def _links_to(directory: str, major: int, minor: int) -> list[str]:
    """Sorted names in ``directory`` (a udev link folder) that lead to block device ``major:minor``."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for name in names:
        try:
            st = os.stat(os.path.join(directory, name))
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (major, minor):
            found.append(name)
    return found


_LOCAL_BY_ID = ("dm-name-", "dm-uuid-", "lvm-pv-uuid-", "md-name-", "md-uuid-", "wwn-")


@dataclass(frozen=True)
class BlockKey:
    """What :func:`device_key` found."""

    key: str | None
    """The identity, or ``None`` (then maybe ``backing_file``)."""
    readable: str
    source: str
    backing_file: str | None = None
    """For a loop device: the file behind it, to be resolved by the caller."""


def device_key(roots: Roots, major: int, minor: int) -> BlockKey:
    """The stable identity of block device ``major:minor`` (see the module doc)."""
    node = os.path.realpath(os.path.join(roots.sysfs, "dev", "block", f"{major}:{minor}"))
    name = os.path.basename(node)
    suffix = ""
    disk = node
    partition = _read(os.path.join(node, "partition"))
    if partition is not None:
        disk = os.path.dirname(node)
        suffix = f"-part{partition}"
    disk_name = os.path.basename(disk)
    dm_uuid = _read(os.path.join(node, "dm", "uuid"))
    if dm_uuid:
        key = _dm_key(dm_uuid)
        if key:
            readable = _read(os.path.join(node, "dm", "name")) or name
            return BlockKey(key, f"dm {readable}", "dm-uuid")
    backing = _read(os.path.join(disk, "loop", "backing_file"))
    if backing and not suffix:
        offset = _read(os.path.join(disk, "loop", "offset")) or "0"
        return BlockKey(None, f"{name} on {backing} offset {offset}", "loop", backing_file=backing)
    for wwid_file in (os.path.join(disk, "device", "wwid"), os.path.join(disk, "wwid")):
        wwid = _read(wwid_file)
        if wwid:
            return BlockKey(f"wwid://{normalise_wwid(wwid)}{suffix}", f"{name} wwid {wwid}", "sysfs-wwid")
    links = _links_to(os.path.join(roots.dev, "disk", "by-id"), major, minor)
    # udev names a partition's links <disk link>-part<N>: say -part<N> once.
    bases = []
    for link in links:
        tail = re.search(r"-part\d+$", link)
        base = link[: tail.start()] if tail else link
        bases.append((link, base, suffix or (tail.group(0) if tail else "")))
    for link, base, part in bases:
        if base.startswith("wwn-"):
            return BlockKey(f"wwid://{normalise_wwid(base)}{part}", f"{name} {link}", "by-id-wwn")
    for link, base, part in bases:
        if not base.startswith(_LOCAL_BY_ID):
            return BlockKey(f"serial://{base}{part}", f"{name} {link}", "by-id")
    serial = _read(os.path.join(disk, "serial"))
    if serial:
        # virtio-blk: udev would name it by-id/virtio-<serial>; say the same.
        return BlockKey(f"serial://virtio-{serial}{suffix}", f"{name} serial {serial}", "sysfs-serial")
    log.debug("block device %s (%s:%s, disk %s): no stable identity", name, major, minor, disk_name)
    return BlockKey(None, name, "none")


def _ioctl_uuid(fd: int, fstype: str) -> str | None:
    try:
        buf = bytearray(17)
        fcntl.ioctl(fd, FS_IOC_GETFSUUID, buf)
        if buf[0] == 16:
            return _format_uuid(bytes(buf[1:17]))
    except OSError as err:
        if err.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            log.debug("FS_IOC_GETFSUUID: %s", err)
    if fstype == "btrfs":
        try:
            buf = bytearray(1024)
            fcntl.ioctl(fd, BTRFS_IOC_FS_INFO, buf)
            return _format_uuid(bytes(buf[16:32]))
        except OSError as err:
            log.debug("BTRFS_IOC_FS_INFO: %s", err)
    return None


def btrfs_subvolume(fd: int) -> int | None:
    """The btrfs subvolume (tree) id holding open file ``fd`` (unprivileged lookup)."""
    buf = bytearray(4096)
    struct.pack_into("<QQ", buf, 0, 0, BTRFS_FIRST_FREE_OBJECTID)
    try:
        fcntl.ioctl(fd, BTRFS_IOC_INO_LOOKUP, buf)
    except OSError as err:
        log.debug("BTRFS_IOC_INO_LOOKUP: %s", err)
        return None
    return int(struct.unpack_from("<Q", buf, 0)[0])


def _by_uuid(roots: Roots, major: int, minor: int) -> str | None:
    found = _links_to(os.path.join(roots.dev, "disk", "by-uuid"), major, minor)
    return found[0].lower() if found else None


def _udev_uuid(roots: Roots, major: int, minor: int) -> str | None:
    data = _read(os.path.join(roots.udev, "data", f"b{major}:{minor}"))
    for line in (data or "").splitlines():
        if line.startswith("E:ID_FS_UUID="):
            return line.partition("=")[2].strip().lower() or None
    return None


def parse_superblock(raw: bytes) -> tuple[str, str] | None:
    """``(fstype, uuid)`` from the first 64 KiB + 72 bytes of a device, if recognised."""
    if len(raw) >= 1024 + 0x78 and raw[1024 + 0x38 : 1024 + 0x3A] == b"\x53\xef":
        found = _format_uuid(raw[1024 + 0x68 : 1024 + 0x78])
        return ("ext", found) if found else None
    if raw[:4] == b"XFSB" and len(raw) >= 48:
        found = _format_uuid(raw[32:48])
        return ("xfs", found) if found else None
    if len(raw) >= 0x10048 and raw[0x10040:0x10048] == b"_BHRfS_M":
        found = _format_uuid(raw[0x10020:0x10030])
        return ("btrfs", found) if found else None
    return None


def device_node(roots: Roots, major: int, minor: int, hint: str | None = None) -> str | None:
    """A device node for ``major:minor``: sysfs' DEVNAME under the /dev root, else ``hint``."""
    candidates = []
    uevent = _read(os.path.join(roots.sysfs, "dev", "block", f"{major}:{minor}", "uevent")) or ""
    for line in uevent.splitlines():
        if line.startswith("DEVNAME="):
            candidates.append(os.path.join(roots.dev, line.partition("=")[2]))
    if hint:
        candidates.append(hint)
    for candidate in candidates:
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (major, minor):
            return candidate
    return None


def _superblock_uuid(roots: Roots, major: int, minor: int, hint: str | None) -> str | None:
    node = device_node(roots, major, minor, hint)
    if node is None:
        return None
    try:
        with open(node, "rb") as handle:
            found = parse_superblock(handle.read(SUPERBLOCK_BYTES))
    except OSError as err:
        log.debug("reading the super block of %s: %s (needs root)", node, err)
        return None
    return found[1] if found else None


def fs_uuid(
    roots: Roots, fstype: str, major: int, minor: int, fd: int | None, source: str | None = None
) -> tuple[str, str] | None:
    """``(uuid, where it came from)`` of the file system on ``major:minor``.

    ``fd`` is an open file on that very file system (the caller checked), or
    ``None`` to skip the ioctls; ``source`` is the mount source, tried as the
    device node when sysfs does not name one.
    """
    if fd is not None:
        found = _ioctl_uuid(fd, fstype)
        if found:
            return found, "ioctl"
    for where, lookup in (("by-uuid", _by_uuid), ("udev", _udev_uuid)):
        found = lookup(roots, major, minor)
        if found:
            return found, where
    found = _superblock_uuid(roots, major, minor, source)
    return (found, "superblock") if found else None
