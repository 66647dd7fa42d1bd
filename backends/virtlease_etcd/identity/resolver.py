"""The resolver: one cluster-wide identity for every way of reaching a disk.

A caller may rely on:

* :meth:`Resolver.resolve` returning a :class:`DiskIdentity` whose ``key``
  is the same on every host that reaches the same storage object, whatever
  the mount point, protocol, server name, bind mount or symlink used to
  reach it, and whose ``readable`` says what this host calls it in words
  (for logs and holders' values);
* the ``key`` forms:

  - ``dir://<directory id>/<file name>`` for a file (or any non-block
    path) that exists: the id its directory carries
    (:mod:`virtlease_etcd.identity.dirid`), the same through every view
    (the name case-folded in a directory the storage looks up without
    regard to case);
  - for a block device node, the storage's own name: ``wwid://…``,
    ``lvm://<vg>/<lv>``, ``luks://…``, ``dm-uuid://…``,
    ``serial://<by-id name>``, with ``-part<N>`` for a partition; a loop
    device gets its backing file's identity (``?loop-offset=<n>`` added
    when the offset is not 0);
  - the disk's *name* (below) for a path that does not exist (nothing can
    have it open), and, when the directory can carry no id, for a mapped
    path, or for anything when not strict;

* ``name``: what this host calls the disk, the identity key of the previous
  release (kept so both releases' hosts exclude each other, and so hard
  links are one disk): ``<configured prefix>/<rest>`` (``mapped``: the
  longest configured path prefix wins), ``nfs|smb|ceph|glusterfs|sshfs://
  <server>/<path>`` (``network``), ``fs-uuid://<uuid>/inode/<n>``
  (``filesystem``; btrfs adds ``/subvol/<id>``) on ext2/3/4, xfs, btrfs,
  ocfs2, gfs2, f2fs or jfs, a block device's key (``block``), else
  ``path://<real path>`` (``path``);
* strictness (:attr:`IdentityConfig.strict`, the default): a disk that
  exists and has no cluster-wide key (a file whose directory can carry no
  id and that no mapping names, a block device without a stable name)
  raises :class:`IdentityError` naming it, why and what to configure;
  when not strict it is locked under its name and a warning is logged;
* a file on a file system whose UUID another mounted, writable file system
  of this host shares (a clone) raising :class:`IdentityError` naming both,
  strict or not: neither its name nor its directory id can be trusted;
* the mount table being read once and re-read only after it changed (the
  kernel marks ``/proc/self/mountinfo`` with ``POLLPRI``; another file, such
  as a test sample, is re-read when its inode, size or mtime changes), and
  facts per mount, device and directory being kept until then (a directory
  id is re-checked with one ``lstat`` per call);
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
from .dirid import MARKER, DirIdError, Stamp, folds_case, read_or_create, stamp
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
    """What this host calls it, for people (plus ``, dir <id>`` when ``key`` is a directory key)."""
    kind: str
    """The kind of ``name``: ``mapped``, ``network``, ``filesystem``, ``block`` or ``path``."""
    path: str
    """The real path this host resolved."""
    fallback: bool
    """True when ``key`` is only this host's real path (not cluster-wide)."""
    name: str = ""
    """What this host calls the disk (the previous release's key; ``key`` itself when no
    directory key); a ``path://`` name is this host's real path."""


@dataclass(frozen=True)
class _Named:
    """A disk's name, before its directory id."""

    key: str
    readable: str
    kind: str
    why: str = ""
    """For a ``path`` name: why nothing better was found."""

    @property
    def fallback(self) -> bool:
        return self.kind == "path"

    def identity(self, real: str) -> DiskIdentity:
        """The identity when the name is all there is."""
        return DiskIdentity(self.key, self.readable, self.kind, real, self.fallback, self.key)


@dataclass(frozen=True)
class IdentityConfig:
    """What the operator can tell the resolver."""

    aliases: Mapping[str, str] = field(default_factory=dict)
    """Server name or address (any case) -> the one name to use, e.g. ``{"10.0.0.5": "filer1"}``."""
    mappings: Mapping[str, str] = field(default_factory=dict)
    """Absolute path prefix -> identity prefix, e.g. ``{"/mnt/pool": "san://pool1"}``."""
    strict: bool = True
    """Raise :class:`IdentityError` for a disk that exists and has no cluster-wide key, instead
    of locking it under its name (see the module doc)."""
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
        self._dir_ids: dict[str, tuple[Stamp | None, str, bool]] = {}
        self._dev_uuids: dict[str, str | None] = {}
        self._clones: dict[str, list[MountEntry]] = {}
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
            seen = (st.st_ino, st.st_size, st.st_mtime_ns)
            if self._text is not None and seen == self._stamp:
                return
            self._stamp = seen
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
        self._dir_ids.clear()
        self._dev_uuids.clear()
        self._clones.clear()

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
        return self._resolve(os.path.realpath(path), 0, set())

    def name(self, path: str) -> DiskIdentity:
        """What this host calls ``path`` (the ``name`` :meth:`resolve` gives it), as its only key:
        no directory id is read or made (``virtlease check`` describes storage roots with it; a
        loop device is still named by its backing file's identity).  Never strict: raises
        :class:`IdentityError` for a cloned file system only."""
        self._refresh()
        real = os.path.realpath(path)
        try:
            st: os.stat_result | None = os.stat(real)
        except OSError:
            st = None
        named = self._name(real, st, self.mount_of(real), 0, set())
        return named if isinstance(named, DiskIdentity) else named.identity(real)

    def resolve_many(self, paths: Sequence[str]) -> list[DiskIdentity]:
        """:meth:`resolve` of each path, for one lock operation's disks: the
        mount table is checked once, each directory's real path found once
        (a symlink in a path's last component is still followed) and each
        directory id checked once.  An
        :class:`IdentityError` names the path as given."""
        self._refresh()
        dirs: dict[str, str] = {}
        checked: set[str] = set()
        out = []
        for path in paths:
            try:
                out.append(self._resolve(self._realpath(path, dirs), 0, checked))
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

    def _resolve(self, real: str, depth: int, checked: set[str]) -> DiskIdentity:
        mount = self.mount_of(real)
        try:
            st: os.stat_result | None = os.stat(real)
        except OSError as err:
            st, missing = None, err
        named = self._name(real, st, mount, depth, checked)
        if isinstance(named, DiskIdentity):  # a loop device: its backing file's identity
            return named
        if st is None:
            # Nothing can have a missing file open: it is locked under its name.
            log.debug("%s does not exist (%s): locked under its name %s", real, missing, named.key)
            return named.identity(real)
        if stat.S_ISBLK(st.st_mode):  # its name is what the storage says (WWID, LVM uuid, ...)
            if named.fallback:
                self._refuse_or_warn(real, named.why)
            return named.identity(real)
        place = self._dir_of(real, mount)
        try:
            if place is None:
                raise DirIdError(f"{real} is a mount point of its own (a bind mount of one file): its "
                                 "directory on the storage is not reachable here; use the file's own path")
            directory, file_name = place
            dir_id, folded = self._dir_id(directory, checked)
        except DirIdError as err:
            if named.kind == "mapped":  # the operator named the storage: the mapping's word stands
                log.debug("%s: no directory id (%s); locked under its mapped name", real, err)
            else:
                self._refuse_or_warn(real, f"no directory id: {err}")
            return named.identity(real)
        key = f"dir://{dir_id}/{file_name.casefold() if folded else file_name}"
        return DiskIdentity(key, f"{named.readable}, dir {dir_id[:8]}", named.kind, real, False, named.key)

    def _name(self, real: str, st: os.stat_result | None, mount: MountEntry | None, depth: int,
              checked: set[str]) -> _Named | DiskIdentity:
        """What this host calls the disk (the previous release's identity key)."""
        mapped = self._mapped(real)
        if mapped:
            return mapped
        if mount is not None:
            network = self._network_location(mount)
            if network is not None:
                key = network.key_for(self._below(real, mount))
                return _Named(key, key, "network")
        where = f"{mount.fstype} mount {mount.source} on {mount.mount_point}" if mount else "no mount"
        if st is None:
            return self._path_name(real, "missing", f"{where}; it does not exist")
        if stat.S_ISBLK(st.st_mode):
            found = self._block(real, st, depth, checked)
            if found:
                return found
            return self._path_name(real, "block device", "it has no WWID, dm uuid, by-id link or serial")
        if mount is None:
            return self._path_name(real, "unknown", "no mount table entry holds it")
        if mount.fstype in BLOCK_FS_TYPES:
            named = self._filesystem(real, st, mount, self._below(real, mount))
            if named:
                return named
        return self._path_name(real, mount.fstype, where)

    @staticmethod
    def _path_name(real: str, fstype: str, where: str) -> _Named:
        key = f"path://{real}"
        return _Named(key, real, "path", f"{fstype}; {where}")

    def _refuse_or_warn(self, real: str, why: str) -> None:
        """A disk that exists and has no cluster-wide identity: refused when strict."""
        if self.config.strict:
            raise IdentityError(
                f"no cluster-wide identity for {real} ({why}); nothing was locked. Name the storage with "
                "identity_map (path prefix -> 'scheme://name', the same name on every host), or set "
                "strict_identity = false to lock it under this host's name for it only (two hosts "
                "reaching it by different views would then both be granted it)")
        log.warning("%s has no cluster-wide identity (%s): locked under this host's name for it only "
                    "(strict_identity is off)", real, why)

    def _dir_of(self, real: str, mount: MountEntry | None) -> tuple[str, str] | None:
        """The directory that holds ``real`` on its storage, as this host reaches it, and the
        file's name in it; ``None`` when ``real`` is a mount point itself (a bind mount of one
        file) and no other mount of its file system shows that directory."""
        if mount is None or mount.mount_point != real:
            return posixpath.dirname(real), posixpath.basename(real)
        if self._network_location(mount) is not None:
            return None  # network mounts do not tell their root within the export
        inside, name = posixpath.split(posixpath.normpath(mount.root))
        for other in self._table.by_dev(mount.dev):
            root = posixpath.normpath(other.root)
            if other is mount or not (inside == root or inside.startswith(root.rstrip("/") + "/")):
                continue
            candidate = posixpath.normpath(posixpath.join(other.mount_point, posixpath.relpath(inside, root)))
            if self._table.find(candidate) is other:  # not hidden by another mount
                return candidate, name
        return None

    def _dir_id(self, directory: str, checked: set[str]) -> tuple[str, bool]:
        """The id of ``directory`` and whether it folds case: read once, then checked with one
        ``lstat`` per lock operation."""
        cached = self._dir_ids.get(directory)
        if cached is not None and (directory in checked or stamp(directory) == cached[0]):
            checked.add(directory)
            return cached[1], cached[2]
        found = read_or_create(directory)
        self._dir_ids[directory] = (stamp(directory), found, folds_case(directory))
        checked.add(directory)
        if cached is not None and cached[1] != found:
            log.warning("the directory id of %s changed from %s to %s (its %s was replaced): disks held "
                        "under the old id are not excluded by it", directory, cached[1], found, MARKER)
        return found, self._dir_ids[directory][2]

    @staticmethod
    def _below(real: str, mount: MountEntry) -> str:
        """``real`` relative to ``mount``'s mount point (``""`` for the mount point)."""
        return real[len(mount.mount_point) :].lstrip("/") if mount.mount_point != "/" else real.lstrip("/")

    def _mapped(self, real: str) -> _Named | None:
        best = ""
        for prefix in self.config.mappings:
            if (real == prefix or real.startswith(prefix.rstrip("/") + "/")) and len(prefix) > len(best):
                best = prefix
        if not best:
            return None
        rest = posixpath.relpath(real, best)
        target = self.config.mappings[best]
        key = target if rest == "." else f"{target}/{rest}"
        return _Named(key, key, "mapped")

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

    def _filesystem(self, real: str, st: os.stat_result, mount: MountEntry, below: str) -> _Named | None:
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
            self._refuse_clone(real, mount, fs_id)
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
        return _Named(key, f"{mount.fstype} {fs_id}:{inside}", "filesystem")

    # -- cloned file systems -------------------------------------------------
    def _mount_uuid(self, entry: MountEntry) -> str | None:
        """The UUID of the file system of ``entry`` (cached per device): through an open
        mount point where it is not hidden, else udev's links and database, else the super
        block (root)."""
        if entry.dev not in self._dev_uuids:
            fd: int | None = None
            try:
                fd = os.open(entry.mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK)
                if entry.fstype != "btrfs" and os.fstat(fd).st_dev != os.makedev(entry.major, entry.minor):
                    os.close(fd)  # another mount hides it
                    fd = None
            except OSError as err:
                log.debug("open %s: %s", entry.mount_point, err)
            try:
                found = fs_uuid(self.roots, entry.fstype, entry.major, entry.minor, fd, entry.source)
            finally:
                if fd is not None:
                    os.close(fd)
            self._dev_uuids[entry.dev] = found[0] if found else None
        return self._dev_uuids[entry.dev]

    def _refuse_clone(self, real: str, mount: MountEntry, fs_id: str) -> None:
        """Raise if another device of this host carries a writable file system with ``fs_id``."""
        if mount.dev not in self._clones:
            self._dev_uuids[mount.dev] = fs_id
            others: dict[str, list[MountEntry]] = {}
            for entry in self._table.entries:
                if entry.fstype in BLOCK_FS_TYPES and entry.dev != mount.dev:
                    others.setdefault(entry.dev, []).append(entry)
            clones: list[MountEntry] = []
            for entries in others.values():
                if self._mount_uuid(entries[0]) == fs_id and not all(_read_only(e) for e in entries):
                    clones.extend(e for e in entries if not _read_only(e))
            self._clones[mount.dev] = clones
        found = self._clones[mount.dev]
        if found and not (_read_only(mount) and all(_read_only(e) for e in self._table.by_dev(mount.dev))):
            other = found[0]
            raise IdentityError(
                f"{real}: two devices of this host carry file system {fs_id}: {mount.source} ({mount.dev}) "
                f"mounted on {mount.mount_point} and {other.source} ({other.dev}) on {other.mount_point}, a "
                "clone (a dd copy, a snapshot, a host cloned from one image), so files on one cannot be "
                "told from the other's or from copies on other hosts; give the copy a new UUID while it "
                "is unmounted (ext2/3/4: tune2fs -U random DEV; xfs: xfs_admin -U generate DEV; btrfs: "
                "btrfstune -u DEV), or mount it read-only")

    def _block(self, real: str, st: os.stat_result, depth: int, checked: set[str]) -> _Named | DiskIdentity | None:
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        if (major, minor) not in self._blocks:
            self._blocks[(major, minor)] = device_key(self.roots, major, minor)
        found = self._blocks[(major, minor)]
        if found.key:
            return _Named(found.key, found.readable, "block")
        if found.backing_file and found.backing_file.endswith(" (deleted)"):
            log.warning("%s: the loop device's backing file was deleted", real)
        elif found.backing_file and depth < _MAX_LOOP_DEPTH:
            inner = self._resolve(os.path.realpath(found.backing_file), depth + 1, checked)
            if inner.fallback:
                return None
            offset = found.readable.rsplit(" ", 1)[-1]
            suffix = "" if offset == "0" else f"?loop-offset={offset}"
            return DiskIdentity(inner.key + suffix, f"{found.readable}: {inner.readable}", inner.kind, real, False,
                                inner.name + suffix)
        return None


def _read_only(entry: MountEntry) -> bool:
    return "ro" in entry.options or "ro" in entry.super_options
