"""The resolver: one cluster-wide identity for every way of reaching a disk.

A caller may rely on:

* :meth:`Resolver.resolve` returning a :class:`DiskIdentity` whose ``key``
  is the same on every host for the same storage object, whatever the mount
  point, bind mount, hard link or symlink used to reach it, and whose
  ``readable`` says the same in words (for logs and holders' values);
* the ``key`` forms (``kind`` in brackets):

  - ``<configured prefix>/<rest>`` (``mapped``): the longest configured path
    prefix of the real path wins, before anything automatic;
  - ``nfs|smb|ceph|glusterfs|sshfs://<server>/<path>`` (``network``);
  - ``fs-uuid://<uuid>/inode/<n>`` (``filesystem``; btrfs adds
    ``/subvol/<id>`` before ``/inode``) for a file on ext2/3/4, xfs, btrfs,
    ocfs2, gfs2, f2fs or jfs;
  - ``wwid://…``, ``lvm://<vg>/<lv>``, ``luks://…``, ``dm-uuid://…``,
    ``serial://<by-id name>`` (``block``) for a block device node, with
    ``-part<N>`` for a partition; a loop device gets its backing file's key
    with ``?loop-offset=<n>`` when the offset is not 0;
  - ``path://<real path>`` (``path``, ``fallback=True``) for anything else,
    or :class:`IdentityError` instead when the resolver is strict;

* the mount table being read once and re-read only after it changed (the
  kernel marks ``/proc/self/mountinfo`` with ``POLLPRI``; another file, such
  as a test sample, is re-read when its inode, size or mtime changes), and
  facts per mount and device being kept until then;
* nothing else: a ``Resolver`` is neither thread- nor fork-safe (its
  mountinfo descriptor is shared with a child): use one per thread and
  process, and :meth:`Resolver.close` it (or use it as a context manager).
"""

from __future__ import annotations

import logging
import os
import posixpath
import select
import stat
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from .blockdev import BlockKey, Roots, btrfs_subvolume, device_key, fs_uuid
from .mountinfo import MountEntry, MountTable, parse_mountinfo
from .network import DEFAULT_NETWORK_FUSE, NetworkLocation, network_location

log = logging.getLogger(__name__)

BLOCK_FS_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "ocfs2", "gfs2", "f2fs", "jfs"})
_MAX_LOOP_DEPTH = 8


class IdentityError(ValueError):
    """A disk has no identity that every host would agree on (strict mode)."""


@dataclass(frozen=True)
class DiskIdentity:
    """A disk's cluster-wide identity."""

    key: str
    """What the lock key is derived from; equal on every host for one object."""
    readable: str
    """The same, for people: host-independent where possible."""
    kind: str
    """``mapped``, ``network``, ``filesystem``, ``block`` or ``path``."""
    path: str
    """The real path this host resolved."""
    fallback: bool
    """True when ``key`` is only this host's real path (not cluster-wide)."""


@dataclass(frozen=True)
class IdentityConfig:
    """What the operator can tell the resolver."""

    aliases: Mapping[str, str] = field(default_factory=dict)
    """Server name or address (any case) -> the one name to use, e.g. ``{"10.0.0.5": "filer1"}``."""
    mappings: Mapping[str, str] = field(default_factory=dict)
    """Absolute path prefix -> identity prefix, e.g. ``{"/mnt/pool": "san://pool1"}``."""
    strict: bool = False
    """Raise :class:`IdentityError` instead of falling back to ``path://``."""
    network_fuse: Collection[str] = DEFAULT_NETWORK_FUSE
    """Fuse subtypes (``fuse.<name>``) whose source is ``[user@]host:path``."""

    def __post_init__(self) -> None:
        aliases = {str(k).strip().lower().rstrip("."): str(v) for k, v in self.aliases.items()}
        mappings = {}
        for prefix, target in self.mappings.items():
            if not prefix.startswith("/") or not target:
                raise ValueError(f"identity mapping needs an absolute path and a target: {prefix!r}")
            mappings[posixpath.normpath(prefix)] = target.rstrip("/")
        object.__setattr__(self, "aliases", aliases)
        object.__setattr__(self, "mappings", mappings)


class Resolver:
    """Resolves disk paths to :class:`DiskIdentity`, caching mount and device facts."""

    def __init__(
        self,
        config: IdentityConfig | None = None,
        *,
        mountinfo: str = "/proc/self/mountinfo",
        sysfs_root: str = "/sys",
        dev_root: str = "/dev",
        udev_root: str = "/run/udev",
    ) -> None:
        self.config = config or IdentityConfig()
        self.roots = Roots(sysfs_root, dev_root, udev_root)
        self._mountinfo_path = mountinfo
        self._poll: select.poll | None = None
        self._fd: int | None = None
        self._text: str | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._table = MountTable(())
        self._mount_of_dir: dict[str, MountEntry | None] = {}
        self._network: dict[int, NetworkLocation | None] = {}
        self._uuids: dict[tuple[str, int], tuple[str, str] | None] = {}
        self._blocks: dict[tuple[int, int], BlockKey] = {}
        self.parses = 0
        """How many times the mount table was parsed (for tests and the benchmark)."""

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Resolver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the mount table ---------------------------------------------------
    def _read_mountinfo(self) -> str:
        if self._fd is None:
            return open(self._mountinfo_path, encoding="utf-8", errors="surrogateescape").read()
        chunks = []
        os.lseek(self._fd, 0, os.SEEK_SET)
        while chunk := os.read(self._fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "surrogateescape")

    def _refresh(self) -> None:
        """Re-read the mount table if it changed; drop what depended on it."""
        if self._text is not None and self._poll is not None:
            if not self._poll.poll(0):
                return
        elif self._poll is None and not self._mountinfo_path.startswith("/proc/"):
            st = os.stat(self._mountinfo_path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if self._text is not None and stamp == self._stamp:
                return
            self._stamp = stamp
        elif self._text is None:
            self._fd = os.open(self._mountinfo_path, os.O_RDONLY | os.O_CLOEXEC)
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLPRI | select.POLLERR)
        text = self._read_mountinfo()
        if text == self._text:
            return
        self._text = text
        self._table = MountTable(parse_mountinfo(text))
        self.parses += 1
        self._mount_of_dir.clear()
        self._network.clear()
        self._uuids.clear()
        self._blocks.clear()

    def mount_of(self, real: str) -> MountEntry | None:
        """The mount holding real path ``real`` (cached per directory)."""
        if real in self._table.mount_points:
            return self._table.find(real)
        directory = posixpath.dirname(real)
        if directory not in self._mount_of_dir:
            self._mount_of_dir[directory] = self._table.find(directory)
        return self._mount_of_dir[directory]

    # -- resolving ---------------------------------------------------------
    def resolve(self, path: str) -> DiskIdentity:
        """The identity of the disk at ``path`` (see the module doc)."""
        self._refresh()
        return self._resolve(os.path.realpath(path), 0)

    def resolve_many(self, paths: Sequence[str]) -> list[DiskIdentity]:
        """:meth:`resolve` of each path, for one lock operation's disks: the
        mount table is checked once and each directory's real path found
        once (a symlink in a path's last component is still followed).  An
        :class:`IdentityError` names the path as given."""
        self._refresh()
        dirs: dict[str, str] = {}
        out = []
        for path in paths:
            try:
                out.append(self._resolve(self._realpath(path, dirs), 0))
            except IdentityError as exc:
                raise IdentityError(f"disk {path!r}: {exc}") from None
        return out

    @staticmethod
    def _realpath(path: str, dirs: dict[str, str]) -> str:
        """``os.path.realpath(path)``, the real path of its directory taken from ``dirs``."""
        head, tail = posixpath.split(path)
        if not path.startswith("/") or posixpath.normpath(path) != path or tail in ("", ".", ".."):
            return os.path.realpath(path)
        real_dir = dirs.get(head)
        if real_dir is None:
            real_dir = dirs[head] = os.path.realpath(head)
        joined = posixpath.join(real_dir, tail)
        try:
            if stat.S_ISLNK(os.lstat(joined).st_mode):
                return os.path.realpath(joined)
        except OSError:
            pass  # as realpath: a missing name is kept as it is
        return joined

    def _resolve(self, real: str, depth: int) -> DiskIdentity:
        mapped = self._mapped(real)
        if mapped:
            return mapped
        mount = self.mount_of(real)
        if mount is not None:
            network = self._network_location(mount)
            if network is not None:  # no stat: the name is in the mount source
                key = network.key_for(self._below(real, mount))
                return DiskIdentity(key, key, "network", real, False)
        try:
            st = os.stat(real)
        except OSError as err:
            where = f"{mount.fstype} mount {mount.source} on {mount.mount_point}" if mount else "no mount"
            return self._fallback(real, mount.fstype if mount else "unknown", f"{where}; stat failed: {err}")
        if stat.S_ISBLK(st.st_mode):
            found = self._block(real, st, depth)
            if found:
                return found
            return self._fallback(real, "block device", "it has no WWID, dm uuid, by-id link or serial")
        if mount is None:
            return self._fallback(real, "unknown", "no mount table entry holds it")
        if mount.fstype in BLOCK_FS_TYPES:
            found = self._filesystem(real, st, mount, self._below(real, mount))
            if found:
                return found
        where = f"{mount.fstype} mount {mount.source} on {mount.mount_point}"
        return self._fallback(real, mount.fstype, where)

    @staticmethod
    def _below(real: str, mount: MountEntry) -> str:
        """``real`` relative to ``mount``'s mount point (``""`` for the mount point)."""
        return real[len(mount.mount_point) :].lstrip("/") if mount.mount_point != "/" else real.lstrip("/")

    def _mapped(self, real: str) -> DiskIdentity | None:
        best = ""
        for prefix in self.config.mappings:
            if (real == prefix or real.startswith(prefix.rstrip("/") + "/")) and len(prefix) > len(best):
                best = prefix
        if not best:
            return None
        rest = posixpath.relpath(real, best)
        target = self.config.mappings[best]
        key = target if rest == "." else f"{target}/{rest}"
        return DiskIdentity(key, key, "mapped", real, False)

    def _network_location(self, mount: MountEntry) -> NetworkLocation | None:
        if mount.mount_id not in self._network:
            try:
                self._network[mount.mount_id] = network_location(
                    mount, self.config.aliases, self.config.network_fuse
                )
            except ValueError as err:
                log.warning("mount %s (%s): unreadable source: %s", mount.mount_point, mount.fstype, err)
                self._network[mount.mount_id] = None
        return self._network[mount.mount_id]

    def _filesystem(self, real: str, st: os.stat_result, mount: MountEntry, below: str) -> DiskIdentity | None:
        same_fs = os.makedev(mount.major, mount.minor) == st.st_dev or mount.fstype == "btrfs"
        fd: int | None = None
        try:
            cache_key = (mount.dev, st.st_dev)
            if same_fs and (cache_key not in self._uuids or mount.fstype == "btrfs"):
                try:
                    fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
                except OSError as err:
                    log.debug("open %s: %s", real, err)
            if cache_key not in self._uuids:
                self._uuids[cache_key] = fs_uuid(self.roots, mount.fstype, mount.major, mount.minor, fd, mount.source)
                log.debug("fs uuid of %s (%s): %s", mount.dev, mount.fstype, self._uuids[cache_key])
            found = self._uuids[cache_key]
            if found is None:
                return None
            fs_id, _source = found
            subvol = ""
            if mount.fstype == "btrfs":
                tree = btrfs_subvolume(fd) if fd is not None else None
                if tree is None:
                    log.warning("%s: btrfs subvolume unknown, inode numbers are not unique", real)
                    return None
                subvol = f"/subvol/{tree}"
        finally:
            if fd is not None:
                os.close(fd)
        inside = posixpath.normpath(posixpath.join(mount.root, below))
        key = f"fs-uuid://{fs_id}{subvol}/inode/{st.st_ino}"
        return DiskIdentity(key, f"{mount.fstype} {fs_id}:{inside}", "filesystem", real, False)

    def _block(self, real: str, st: os.stat_result, depth: int) -> DiskIdentity | None:
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        if (major, minor) not in self._blocks:
            self._blocks[(major, minor)] = device_key(self.roots, major, minor)
        found = self._blocks[(major, minor)]
        if found.key:
            return DiskIdentity(found.key, found.readable, "block", real, False)
        if found.backing_file and found.backing_file.endswith(" (deleted)"):
            log.warning("%s: the loop device's backing file was deleted", real)
        elif found.backing_file and depth < _MAX_LOOP_DEPTH:
            inner = self._resolve(os.path.realpath(found.backing_file), depth + 1)
            if inner.fallback:
                return None
            offset = found.readable.rsplit(" ", 1)[-1]
            key = inner.key if offset == "0" else f"{inner.key}?loop-offset={offset}"
            return DiskIdentity(key, f"{found.readable}: {inner.readable}", inner.kind, real, False)
        return None

    def _fallback(self, real: str, fstype: str, where: str) -> DiskIdentity:
        if self.config.strict:
            raise IdentityError(
                f"no cluster-wide identity for {real} ({fstype}; {where}): configure an identity "
                f"mapping for a prefix of it (mappings: {{'/path/prefix': 'scheme://name'}})"
            )
        log.debug("identity of %s falls back to its path (%s; %s)", real, fstype, where)
        key = f"path://{real}"
        return DiskIdentity(key, key, "path", real, True)
