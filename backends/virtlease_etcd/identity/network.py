"""Cluster-wide names for files on network file systems, from the mount source.

A network mount's source names the server and the exported path, so the
identity of a file is ``<scheme>://<server>/<export>/<root>/<below mount
point>`` whatever the local mount point is.  A caller may rely on:

* one scheme per protocol family: ``nfs`` (nfs, nfs4), ``smb`` (cifs,
  smb3), ``ceph``, ``glusterfs`` and ``sshfs``; another fuse type listed in
  the configuration gets ``<type>`` when its source is ``host:/path``;
* the server lower-cased, without a trailing dot, IPv6 brackets or port, and
  mapped through the configured aliases (so every address and name of a
  filer can be made one name); SMB share names lower-cased too;
* the path normalised (``//``, ``.``, ``..`` and a trailing ``/`` removed);
  the mount root is not added a second time when the source already ends
  with it (a CIFS prefix path): an over-merge gives a false conflict, never
  two identities for one file;
* :func:`network_location` returning ``None`` for a type it does not know
  and raising :class:`ValueError` for a source it cannot read.

NFS prints ``/`` as every mount's root and puts the mount's real path in the
source, so bind mounts of NFS sub-directories are covered by the source.
Ceph's old syntax names monitors, not the cluster: a file gets the sorted
monitor list unless the aliases map the monitors to one cluster name; the
new syntax (``user@fsid.fs=/path``) gives ``ceph://<fsid>.<fs>/path``.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from .mountinfo import MountEntry

NFS_TYPES = frozenset({"nfs", "nfs4"})
SMB_TYPES = frozenset({"cifs", "smb3"})
DEFAULT_NETWORK_FUSE = frozenset({"sshfs", "glusterfs"})

_CEPH_NEW = re.compile(r"^(?:[^@/]+@)?(?P<fsid>[0-9a-fA-F-]{36})?\.(?P<fs>[^=]+)=(?P<path>/.*)?$")


@dataclass(frozen=True)
class NetworkLocation:
    """Where a mount's root lives on the network."""

    scheme: str
    server: str
    export: str
    """Absolute path on the server of the mount's root."""

    def key_for(self, below: str) -> str:
        """The identity of ``below`` (relative to the mount point)."""
        path = _normpath(posixpath.join(self.export, below))
        return f"{self.scheme}://{self.server}{path}"


def _normpath(path: str) -> str:
    path = posixpath.normpath("/" + path.replace("\\", "/"))
    return "/" + path.lstrip("/") if path != "/" else "/"


def normalise_server(server: str, aliases: Mapping[str, str]) -> str:
    """Lower-case, no port or brackets, then mapped through ``aliases`` (keys lower-case)."""
    host = server.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    host = host.rstrip(".")
    return aliases.get(host, host)


def _split_host_path(source: str) -> tuple[str, str]:
    """``host:/path``, ``[v6]:/path`` or ``user@host:path`` into host and path."""
    if source.startswith("["):
        host, sep, rest = source.partition("]")
        host += "]"
        if not rest.startswith(":"):
            raise ValueError(f"no ':' after the address in {source!r}")
        return host, rest[1:]
    host, sep, path = source.partition(":")
    if not sep or not host:
        raise ValueError(f"not host:path: {source!r}")
    return host, path


def _with_root(export: str, root: str) -> str:
    """``export`` joined with the mount root unless it already ends with it."""
    export, root = _normpath(export), _normpath(root)
    if root == "/" or export.endswith(root):
        return export
    return _normpath(export + root)


def _nfs(entry: MountEntry, aliases: Mapping[str, str]) -> NetworkLocation:
    host, path = _split_host_path(entry.source)
    return NetworkLocation("nfs", normalise_server(host, aliases), _with_root(path, entry.root))


def _smb(entry: MountEntry, aliases: Mapping[str, str]) -> NetworkLocation:
    unc = entry.source.replace("\\", "/")
    if not unc.startswith("//"):
        raise ValueError(f"not //server/share: {entry.source!r}")
    server, _, rest = unc[2:].partition("/")
    share, _, prefix = rest.partition("/")
    if not server or not share:
        raise ValueError(f"not //server/share: {entry.source!r}")
    export = _with_root(f"/{share.lower()}/{prefix}", entry.root)
    return NetworkLocation("smb", normalise_server(server, aliases), export)


def _ceph(entry: MountEntry, aliases: Mapping[str, str]) -> NetworkLocation:
    new = _CEPH_NEW.match(entry.source)
    if new and "=" in entry.source:
        fsid = (new.group("fsid") or entry.super_option("fsid") or "").lower()
        if not fsid:
            raise ValueError(f"ceph source without an fsid: {entry.source!r}")
        cluster = aliases.get(fsid, fsid)
        return NetworkLocation("ceph", f"{cluster}.{new.group('fs')}", _with_root(new.group("path") or "/", entry.root))
    mons, sep, path = entry.source.rpartition(":/")
    if not sep:
        raise ValueError(f"not mon[,mon...]:/path: {entry.source!r}")
    names = sorted({normalise_server(mon, aliases) for mon in mons.split(",") if mon})
    fs = entry.super_option("fs") or entry.super_option("mds_namespace")
    server = ",".join(names) + (f".{fs}" if fs else "")
    return NetworkLocation("ceph", server, _with_root("/" + path, entry.root))


def _gluster(entry: MountEntry, aliases: Mapping[str, str]) -> NetworkLocation:
    host, volume = _split_host_path(entry.source)
    return NetworkLocation("glusterfs", normalise_server(host, aliases), _with_root(volume, entry.root))


def _host_path(scheme: str, entry: MountEntry, aliases: Mapping[str, str]) -> NetworkLocation:
    source = entry.source.removeprefix(f"{scheme}#")
    host, path = _split_host_path(source)
    user, at, host = host.rpartition("@")
    if not path.startswith("/"):
        # Relative to the login's home directory: keep whose home it is.
        path = f"/~{user}/{path}" if at else f"/~/{path}"
    return NetworkLocation(scheme, normalise_server(host, aliases), _with_root(path, entry.root))


def network_location(
    entry: MountEntry, aliases: Mapping[str, str], network_fuse: Collection[str] = DEFAULT_NETWORK_FUSE
) -> NetworkLocation | None:
    """The network location of ``entry``'s root, ``None`` if it is not a network mount."""
    fstype = entry.fstype
    if fstype in NFS_TYPES:
        return _nfs(entry, aliases)
    if fstype in SMB_TYPES:
        return _smb(entry, aliases)
    if fstype == "ceph":
        return _ceph(entry, aliases)
    if fstype in ("glusterfs", "fuse.glusterfs"):
        return _gluster(entry, aliases)
    if fstype.startswith("fuse.") and fstype[5:] in network_fuse:
        return _host_path(fstype[5:], entry, aliases)
    return None
