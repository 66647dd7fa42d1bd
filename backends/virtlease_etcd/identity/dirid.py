"""Directory ids: an identity that a disk's directory carries itself.

A host names a disk from what it sees: its mount table, its devices, its
configuration.  Two hosts that reach one file through different views (the
NFS server's local file system and its clients' mounts, two volfile servers
of one GlusterFS volume, an ``identity_map`` on one host only) name it
differently.  So every directory that holds a locked disk carries an id of
its own: a random 128-bit id in a small file, :data:`MARKER`, created by the
first host that locks a disk there and read back by every other host
through whatever mount, path or protocol it reaches the directory by.  A
disk's directory key is ``dir://<id>/<file name>`` (see
:mod:`virtlease_etcd.identity.resolver`).

Why a file and not an extended attribute: every file system and protocol
that can hold a disk image can create a file atomically (``O_CREAT |
O_EXCL``: local file systems, NFSv3 exclusive create, NFSv4, SMB, SFTP's
``EXCL`` under sshfs, CephFS, GlusterFS), while extended attributes do not
cross NFS before 4.2 nor sshfs.  An id that some hosts can read and others
cannot would split hosts into two namings again.

A caller may rely on:

* :func:`read_or_create` returning the directory's id (32 lower-case hex
  digits), creating the marker if there is none; of two hosts creating it
  at once exactly one wins and both return its id (a lost race reported as
  another error than ``EEXIST``, as SFTP does, is recognised by the marker
  being there);
* never a guess: when the id can be neither read nor created (no write
  permission, a read-only view, root squashed on NFS, a marker that is not
  one) it raises :class:`DirIdError` with one line naming the file, what
  failed and what to do;
* a marker being written once and never changed; :func:`stamp` telling a
  caller cheaply (one ``lstat``) whether the marker it read is still the
  same file; :func:`folds_case` telling whether the directory is
  case-insensitive (then file names in it are compared case-folded).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import socket
import stat
import time

from virtlease_etcd.clock import SYSTEM

log = logging.getLogger(__name__)

MARKER = ".virtlease-id"
"""The file, in a disk's directory, that holds the directory's id."""

FORMAT = "virtlease-dir-id 1 "
_LINE = re.compile(r"virtlease-dir-id 1 ([0-9a-f]{32})\n")
_NOTE = (
    "# virtlease: the id of this directory, the same on every host that reaches it. Disks here\n"
    "# are locked under it. Do not delete, edit or copy this file while any disk here may be in\n"
    "# use on any host: a new id would let two hosts lock one disk under two names.\n"
)
INCOMPLETE_WAIT = 2.0
"""Seconds a reader waits for a marker another host is writing right now."""

Stamp = tuple[int, int, int, int]
"""What :func:`stamp` compares: device, inode, size and mtime of the marker."""


class DirIdError(Exception):
    """The directory's id can be neither read nor created; the message says why and what to do."""


def marker_path(directory: str) -> str:
    return os.path.join(directory, MARKER)


def stamp(directory: str) -> Stamp | None:
    """The marker's device, inode, size and mtime, or ``None`` if there is none (one ``lstat``)."""
    try:
        st = os.lstat(marker_path(directory))
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def folds_case(directory: str) -> bool:
    """Whether the storage looks names up in ``directory`` without regard to case (SMB, a
    case-insensitive share over sshfs or NFS, casefolded ext4): its marker is found under an
    upper-case name too.  Every view of the directory gets the same answer from the storage."""
    try:
        return stat.S_ISREG(os.lstat(os.path.join(directory, MARKER.upper())).st_mode)
    except OSError:
        return False


def _parse(raw: bytes) -> str | None:
    """The id on the first line, or ``None`` if the first line is not complete (yet)."""
    found = _LINE.match(raw.decode("ascii", "replace"))
    return found.group(1) if found else None


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _what_to_do(directory: str) -> str:
    return (f"create it once where {directory} is writable (for a root-squashed NFS export: on the "
            f"server) with `virtlease identity {directory}`, or let the first lock of a disk there "
            "create it from such a host")


def _create(path: str, directory: str) -> str | None:
    """Create the marker with a new id; ``None`` if another host created it first."""
    new = secrets.token_hex(16)
    data = (f"{FORMAT}{new}\n{_NOTE}# created by {socket.gethostname()} at "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(SYSTEM.wall()))}\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return None
    except OSError as err:
        raise DirIdError(f"{directory} has no directory id ({MARKER}) and this host cannot "
                         f"create one: {os.strerror(err.errno or 0)}; {_what_to_do(directory)}") from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        try:
            os.fsync(fd)
        except OSError as err:  # some fuse file systems do not implement fsync
            if err.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
        try:
            os.fchmod(fd, 0o444)  # a reminder that it must not change
        except OSError as err:
            log.debug("chmod %s: %s", path, err)
    except OSError as err:
        os.close(fd)
        fd = -1
        try:  # nobody can have read a complete id from it: the first line was not written
            os.unlink(path)
        except OSError:
            pass
        raise DirIdError(f"writing {path} failed: {os.strerror(err.errno or 0)}; nothing "
                         "was locked") from None
    finally:
        if fd >= 0:
            os.close(fd)
    log.info("created the directory id %s of %s", new, directory)
    return new


def read_or_create(directory: str, *, wait: float = INCOMPLETE_WAIT) -> str:
    """The id of ``directory`` (see the module doc).  ``wait``: how long a marker
    that another host is writing at this moment (empty, first line not complete)
    is re-read before it is refused."""
    path = marker_path(directory)
    deadline = SYSTEM.now() + wait
    while True:
        try:
            raw = _read(path)
        except FileNotFoundError:
            try:
                created = _create(path, directory)
            except DirIdError:
                # A lost race may come back as another error than EEXIST (SFTP v3 has no "exists":
                # sshfs says EPERM): if the marker is there now, another host made it.
                if os.path.lexists(path) and SYSTEM.now() < deadline:
                    continue
                raise
            if created is not None:
                return created
            if SYSTEM.now() >= deadline:  # it exists, yet this host's lookups miss it
                raise DirIdError(f"{path} exists (another host created it) but cannot be read here "
                                 f"for {wait:g} s (a stale cache of the directory?); try again") from None
            continue  # another host was first: read its id
        except OSError as err:
            hint = ("it must be a regular file, not a symlink" if err.errno == errno.ELOOP
                    else _what_to_do(directory))
            raise DirIdError(f"cannot read the directory id {path}: "
                             f"{os.strerror(err.errno or 0)}; {hint}") from None
        found = _parse(raw)
        if found is not None:
            return found
        if SYSTEM.now() >= deadline:
            raise DirIdError(
                f"{path} is not a virtlease directory id (its first line must be '{FORMAT}<32 hex "
                f"digits>', it is {raw[:60]!r}); if no disk in {directory} is in use on any host, "
                "delete it and the next lock creates a new one")
        SYSTEM.sleep(0.02)  # another host is writing it right now
