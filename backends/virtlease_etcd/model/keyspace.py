"""Where virtlease keeps things in etcd, and how values are encoded.

Layout under the configured prefix ``P`` (format version 1)::

    P/v1/hosts/<host_id>             host record            on the host's lease
    P/v1/res/<rid>/x                 exclusive holder       on the holder's lease
    P/v1/res/<rid>/s/<domain uuid>   one shared holder      on the holder's lease
    P/v1/gen/<rid>/x                 last exclusive grant   no lease (persists)
    P/v1/gen/<rid>/s                 last shared grant      no lease (persists)
    P/v1/handoff/<uuid>/<from host>  migration in flight    on the giver's lease
    P/v1/dom/<host_id>/<uuid>        registered domain      on the host's lease

``rid`` is the SHA-256 of the resource's identity, so every host maps the
same disk to the same key: a disk's cluster-wide identity key
(``sha256("disk\0" + key)``, the key of :mod:`virtlease_etcd.identity`, e.g.
``nfs://filer1/export/vm/a.qcow2``), or a lease's lockspace and key.  A disk
whose identity falls back to its path uses the previous release's key,
``sha256("disk\0" + real path)``: the two schemes agree for it.

Legacy path keys (``legacy_path_keys``, default on): the previous release
keyed every disk by ``sha256("disk\0" + real path)``.  So that a host still
running it and a new host never both get one disk, a new host locks each
disk's identity key *and* its legacy path key in the same transaction (one
key when they coincide).  The legacy key's record carries ``"legacy"`` (the
identity rid it belongs to).  Holder records carry the readable form
``<caller's path> (<identity>)`` in ``res`` and, since this release, the
identity key in ``identity`` and the caller's path in ``path`` (added
fields: format 1 readers ignore them).

A grant's fencing token is the etcd revision of the transaction that made
it, which is the holder key's ``mod_revision``: holder keys are only ever
written by grants, so tokens of one resource only grow.  The ``gen`` keys
remember the last grant of each mode after the holder is gone (released or
expired), which is how ``acquire(state)`` knows nobody held the resource in
between (sanlock's lease-version check).

Every value is compact JSON with ``"v": 1``.  A holder value of another
format version, or not JSON, is reported as a busy holder (under the disk it
blocks) and never overwritten.  ``gen`` records are bookkeeping without an
owner: only their revision matters, so a grant replaces an unreadable one;
doing so bumps the revision, which makes every older resume state fail.
They persist (one small key per resource ever locked) so that a resume can
tell that someone held the resource even after that holder's lease expired.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from virtlease.abi import ResourceSpec, ResourceType

FORMAT_VERSION = 1
EXCLUSIVE = "exclusive"
SHARED = "shared"


def range_end(prefix: str) -> str:
    """The etcd range end covering every key that starts with ``prefix``."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


def canonical_disk_path(path: str) -> str:
    """The path every host agrees on: symlinks and ``..`` resolved."""
    return os.path.realpath(path)


def legacy_disk_rid(real_path: str) -> str:
    """The previous release's key of a disk: SHA-256 of its real path."""
    return hashlib.sha256(b"disk\0" + real_path.encode()).hexdigest()


HOST_ONLY = "path://, this host only"
"""Said next to a disk locked under ``path://<real path>``: no cluster-wide identity (tmpfs,
overlay, a local file system without a UUID, ``strict_identity`` off), so a host that reaches
the same file by another path is not excluded."""


def host_only(identity: str) -> bool:
    """Whether a record's identity key is this host's path only."""
    return identity.startswith("path://")


def identity_disk_rid(key: str, *, fallback: bool, real_path: str) -> str:
    """The key of a disk with cluster-wide identity ``key`` (see the module
    doc); a ``path://`` fallback keeps the legacy key."""
    if fallback:
        return legacy_disk_rid(real_path)
    return hashlib.sha256(b"disk\0" + key.encode()).hexdigest()


@dataclass(frozen=True)
class ResourceId:
    """A resource's cluster-wide identity."""

    kind: str
    """``disk`` or ``lease``."""
    readable: str
    """The canonical disk path, or ``lockspace:key``."""
    rid: str
    """SHA-256 hex of the identity: the key component."""
    mode: str
    """``exclusive`` or ``shared``."""
    identity: str = ""
    """Disks: the cluster-wide identity key (``path://…`` for a fallback)."""
    path: str = ""
    """Disks: the path the caller gave."""
    legacy_of: str | None = None
    """Set on a disk's legacy path key: the rid of its identity key."""

    @property
    def primary(self) -> str:
        """The rid of the resource this key belongs to (itself, or the identity key)."""
        return self.legacy_of or self.rid

    @staticmethod
    def of(spec: ResourceSpec) -> ResourceId:
        """The previous release's identity (a disk by its real path).  The
        driver names disks with :func:`disk_ids`; this remains for leases
        and for computing legacy keys."""
        mode = SHARED if spec.shared else EXCLUSIVE
        if spec.type is ResourceType.DISK:
            path = canonical_disk_path(spec.name)
            return ResourceId("disk", path, legacy_disk_rid(path), mode, f"path://{path}", spec.name)
        lockspace = str(spec.params["lockspace"])
        digest = hashlib.sha256(b"lease\0" + lockspace.encode() + b"\0" + spec.name.encode()).hexdigest()
        return ResourceId("lease", f"{lockspace}:{spec.name}", digest, mode)


def disk_ids(spec: ResourceSpec, key: str, readable: str, real_path: str, fallback: bool, *,
             legacy: bool) -> list[ResourceId]:
    """A disk's keys: its identity key, then (``legacy``) its legacy path key
    unless that is the same key."""
    mode = SHARED if spec.shared else EXCLUSIVE
    if fallback:
        readable = real_path  # path://<real path> adds nothing for people
    shown = spec.name if readable == spec.name else f"{spec.name} ({readable})"
    rid = identity_disk_rid(key, fallback=fallback, real_path=real_path)
    out = [ResourceId("disk", shown, rid, mode, key, spec.name)]
    if legacy and not fallback:  # a fallback's identity key is its legacy key
        out.append(ResourceId("disk", shown, legacy_disk_rid(real_path), mode, key, spec.name, legacy_of=rid))
    return out


class Keys:
    """Key names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.root = f"{prefix}/v{FORMAT_VERSION}/"
        self.hosts = self.root + "hosts/"
        self.res = self.root + "res/"
        self.gen = self.root + "gen/"
        self.handoffs = self.root + "handoff/"
        self.doms = self.root + "dom/"

    def host(self, host_id: str) -> str:
        return self.hosts + host_id

    def resource(self, rid: str) -> str:
        """Prefix of every holder of ``rid``."""
        return f"{self.res}{rid}/"

    def holder(self, rid: str, mode: str, uuid: str) -> str:
        if mode == EXCLUSIVE:
            return f"{self.res}{rid}/x"
        return f"{self.res}{rid}/s/{uuid}"

    def exclusive(self, rid: str) -> str:
        return f"{self.res}{rid}/x"

    def gen_prefix(self, rid: str) -> str:
        return f"{self.gen}{rid}/"

    def gen_key(self, rid: str, mode: str) -> str:
        return f"{self.gen}{rid}/{'x' if mode == EXCLUSIVE else 's'}"

    def handoff(self, uuid: str, from_host: str) -> str:
        return f"{self.handoffs}{uuid}/{from_host}"

    def dom(self, host_id: str, uuid: str) -> str:
        return f"{self.doms}{host_id}/{uuid}"


def encode(record: dict[str, Any]) -> bytes:
    """Canonical bytes of a record (stable: compared byte for byte in txns)."""
    return json.dumps({"v": FORMAT_VERSION, **record}, sort_keys=True, separators=(",", ":")).encode()


class ForeignValue(ValueError):
    """A value under the prefix that virtlease did not write (or another format)."""


def decode(raw: bytes, key: str = "?") -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ForeignValue(f"{key}: not a virtlease record ({raw[:40]!r})") from None
    if not isinstance(value, dict) or value.get("v") != FORMAT_VERSION:
        version = value.get("v") if isinstance(value, dict) else None
        raise ForeignValue(f"{key}: record format {version!r}, this virtlease reads {FORMAT_VERSION}")
    return value


def holder_record(rid: ResourceId, *, host: str, lease: int, uuid: str, name: str,
                  pid: int | None, since: float, grant: str) -> dict[str, Any]:
    """The value of a holder key.  ``grant`` is a random id of this grant
    attempt, so a read-back after a lost reply recognises our own write."""
    record: dict[str, Any] = {
        "kind": rid.kind, "res": rid.readable, "mode": rid.mode, "host": host,
        "lease": lease, "uuid": uuid, "name": name, "pid": pid, "since": round(since, 3),
        "grant": grant,
    }
    if rid.kind == "disk" and rid.identity:
        record["identity"] = rid.identity
        record["path"] = rid.path
    if rid.legacy_of is not None:
        record["legacy"] = rid.legacy_of
    return record
