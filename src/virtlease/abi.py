"""The lock manager plugin ABI: types, flags and the driver contract.

This file is the whole contract between a caller and a lock driver, after
libvirt's ``src/locking/lock_driver.h`` (2010 RFC "The lock manager plugin
driver API").  It holds nothing else: loading lives in ``loader``, input
validation and the object life cycle in ``objects``.

A driver is a Python module (an entry point in the ``virtlease.drivers``
group, or ``NAME.py`` / ``NAME/`` in a plugin directory) exposing a module
attribute ``LOCK_DRIVER``: a class implementing :class:`LockDriver`.  The
loader instantiates it once per ``load_driver()`` call.

Callers never talk to a driver directly: ``virtlease.load_driver()`` returns a
``Plugin`` whose ``new_object()`` returns a validated ``LockObject``.  Every
input below reaches the driver already checked by the core.

See docs/DESIGN.md §3 (The ABI).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


def encode_version(major: int, minor: int, micro: int) -> int:
    """Encode ``major.minor.micro`` as libvirt does: 1.2.3 -> 1002003."""
    return major * 1_000_000 + minor * 1_000 + micro


def version_major(version: int) -> int:
    """The major part of an encoded version."""
    return version // 1_000_000


def format_version(version: int) -> str:
    """Render an encoded version as ``major.minor.micro``."""
    return f"{version // 1_000_000}.{version // 1_000 % 1_000}.{version % 1_000}"


#: The newest ABI this core implements (2.0.0).  2.0 made holds belong to
#: the domain's owner on the host, not to the lock object: ``release`` and
#: ``inquire`` take the object's resources, ``free`` never releases.
ABI_VERSION: int = encode_version(2, 0, 0)

#: Entry point group under which drivers register.
ENTRY_POINT_GROUP = "virtlease.drivers"


class Capability(enum.IntFlag):
    """What a driver can do.  Every flag is a distinct single bit (the 2010
    RFC gave RESOURCES and MIGRATE the same value)."""

    RESOURCES = 1 << 0
    """The driver locks resources (disks, leases), not only the object."""
    MIGRATE = 1 << 1
    """The driver supports handing an object's locks to another host."""
    HOTPLUG = 1 << 2
    """Resources can be added/removed while the object holds its locks."""
    USES_STATE = 1 << 3
    """release()/inquire() return a meaningful state for acquire(state=)."""


class ObjectType(enum.IntEnum):
    """The kind of thing a lock object stands for."""

    DOMAIN = 0
    """A virtual machine.  Parameters: uuid, name (required), id, pid, uri."""


class ResourceType(enum.IntEnum):
    """The kind of resource added to an object."""

    DISK = 0
    """A disk image or block device; the name is its absolute path."""
    LEASE = 1
    """A named lease; params: ``lockspace`` (required), ``path``, ``offset``."""


class ResourceFlags(enum.IntFlag):
    """How a resource is held.  No flag means exclusive read-write."""

    READONLY = 1 << 0
    """Read-only access: not locked by default (as libvirt's lockd, sanlock)."""
    SHARED = 1 << 1
    """Shared read-write: any number of shared holders, no exclusive one."""


class NewFlags(enum.IntFlag):
    """Flags of ``new_object``."""

    MIGRATE = 1 << 0
    """The object is the incoming side of a migration: its first acquire
    takes a state from ``prepare_migrate`` and claims the handoff."""


class AcquireFlags(enum.IntFlag):
    """Flags of ``acquire``."""

    REGISTER_ONLY = 1 << 0
    """Register the domain (its pid is fenced with the host; visible in
    status) without taking resources.  Takes no state."""
    RESTRICT = 1 << 1
    """After this acquire, further acquire/release calls on the object fail
    (libvirt uses it before handing the process to the guest)."""


class FailureAction(enum.IntEnum):
    """What to do with the object's process when its locks are lost
    (libvirt's ``<on_lockfailure>``)."""

    DEFAULT = 0
    """The driver's default; for the etcd driver that is POWEROFF."""
    POWEROFF = 1
    """Kill the process (SIGKILL)."""
    RESTART = 2
    """Kill the process and ask the caller to restart it: needs a callback."""
    PAUSE = 3
    """Stop the process (SIGSTOP) so it can be resumed once locks are back."""
    IGNORE = 4
    """Log and do nothing."""


@dataclass(frozen=True)
class ObjectSpec:
    """An object's identity as the driver sees it (validated by the core)."""

    type: ObjectType
    uuid: str
    """Canonical lower-case hyphenated UUID."""
    name: str
    id: int | None = None
    pid: int | None = None
    uri: str | None = None
    flags: NewFlags = NewFlags(0)  # noqa: RUF009 - an immutable flag value


@dataclass(frozen=True)
class ResourceSpec:
    """One resource as the driver sees it (validated by the core).

    For DISK the name is the absolute path as given; drivers that need a
    cluster-wide identity canonicalise it themselves.  For LEASE the name is
    the lease key and ``params["lockspace"]`` is set.
    """

    type: ResourceType
    name: str
    flags: ResourceFlags = ResourceFlags(0)  # noqa: RUF009 - an immutable flag value
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def shared(self) -> bool:
        return bool(self.flags & ResourceFlags.SHARED)

    @property
    def readonly(self) -> bool:
        return bool(self.flags & ResourceFlags.READONLY)


@dataclass(frozen=True)
class HeldResource:
    """One resource the object's owner holds, as the driver last knew it.

    The typed view of what an opaque state string describes: callers read
    fencing tokens here instead of decoding states (which stay opaque).
    """

    type: ResourceType
    name: str
    """The resource's name as this object added it (a disk's path)."""
    identity: str
    """The cluster-wide identity the driver locked (readable form)."""
    mode: str
    """``exclusive`` or ``shared``."""
    token: int
    """Fencing token of the grant: only grows for a resource."""


@runtime_checkable
class DriverObject(Protocol):
    """One lock object (one VM) inside a driver.

    **Holds belong to the owner**: the domain (UUID) on this host, not to
    the object.  libvirt creates a fresh lock object for every operation —
    start (new, add disks, acquire, free), pause (new, add, release, free),
    resume (new, add, acquire(state), free), inquire for the migration
    cookie, hotplug (new, add one disk, acquire) — so an object of the same
    domain on the same host must release and inquire what an earlier one
    took, and ``free`` must never release.

    The core calls these with validated arguments only: resources are added
    before an object's first acquire (or through ``acquire_resource`` with
    HOTPLUG), acquire is never called twice on one object without a
    release, nothing is called after free.  What the *owner* holds is the
    driver's to check (acquiring a disk the domain already holds, releasing
    one it does not hold: ``ObjectStateError``).
    """

    def acquire(self, resources: list[ResourceSpec], state: str | None,
                flags: AcquireFlags, action: FailureAction) -> None:
        """Take every resource atomically, or none.  ``state`` (from
        release/inquire/prepare_migrate) asks to resume or claim exactly what
        that state describes.  Raises ResourceBusyError naming the holders."""

    def release(self, resources: list[ResourceSpec]) -> str:
        """Drop what the owner holds of ``resources`` (the object's); return
        the state to resume with."""

    def inquire(self, resources: list[ResourceSpec]) -> str:
        """Return the state describing what the owner holds of ``resources``,
        without releasing."""

    def held(self, resources: list[ResourceSpec]) -> list[HeldResource]:
        """What the owner holds among ``resources``, with fencing tokens, as
        last known (no backend round trip)."""

    def free(self) -> None:
        """Forget the object (the handle).  Called once, last.  Never
        releases: the owner keeps what it holds."""


class HotplugObject(DriverObject, Protocol):
    """A DriverObject of a driver with Capability.HOTPLUG."""

    def acquire_resource(self, resource: ResourceSpec) -> None:
        """Take one more resource while the object holds its others."""

    def release_resource(self, resource: ResourceSpec) -> None:
        """Drop one resource while the object keeps its others."""


class MigrateObject(DriverObject, Protocol):
    """A DriverObject of a driver with Capability.MIGRATE."""

    def prepare_migrate(self, dest_host: str) -> str:
        """Source side: mark every held resource as handed to ``dest_host``;
        return the state the destination passes to ``acquire``."""

    def complete_migrate_out(self, cancel: bool) -> None:
        """Source side, after the migration: forget the object (success) or
        clear the marks and keep the locks (``cancel=True``)."""

    def complete_migrate_in(self, cancel: bool) -> str | None:
        """Destination side: finish (success), or hand the locks back to the
        source (``cancel=True``) and return the state the source reclaims
        them with."""


class LockDriver(Protocol):
    """What a plugin's ``LOCK_DRIVER`` class provides.

    Class attributes:
      ``name``          the driver's name (informational);
      ``version``       the newest ABI version it implements;
      ``capabilities``  the Capability bits it offers.

    Optional hooks (a driver may omit them):
      ``load(version, capabilities, config)``  called once per load with
        what the caller asked for; raise ``PluginVersionError`` to refuse
        them, ``ConfigError`` for bad configuration (any other exception
        becomes ``PluginInitError``).  Default: accept a
        version of the same major not newer than ``version``, and any subset
        of ``capabilities``.
      ``unload()``  called when the caller unloads; raise to refuse.
        Default: always allowed (the core already refuses while objects are
        alive).

    ``new_object(spec)`` returns a DriverObject for a validated ObjectSpec.
    """

    name: str
    version: int
    capabilities: Capability

    def new_object(self, spec: ObjectSpec) -> DriverObject: ...
