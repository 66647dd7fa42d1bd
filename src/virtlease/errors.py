"""Every error virtlease raises.  All derive from :class:`VirtleaseError`.

Messages name the resource, the holder and what to do next; the structured
fields carry the same facts for programs.

See docs/DESIGN.md §3 (The ABI).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class VirtleaseError(Exception):
    """Base of every virtlease error."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


# --- plugin loading: one type per level at which a load can fail ----------


class PluginError(VirtleaseError):
    """A driver could not be loaded or unloaded."""


class PluginNotFoundError(PluginError):
    """No driver of that name in any entry point or plugin directory."""

    def __init__(self, name: str, searched: Sequence[str]) -> None:
        self.name = name
        self.searched = list(searched)
        places = "\n  ".join(self.searched) or "(nowhere)"
        super().__init__(
            f"lock driver {name!r} not found; searched:\n  {places}",
            hint="install the driver's distribution, or set plugin_dir / "
            "VIRTLEASE_PLUGIN_DIR to the directory holding NAME.py",
        )


class PluginImportError(PluginError):
    """The driver's module raised while being imported (cause chained)."""


class PluginInvalidError(PluginError):
    """The module has no LOCK_DRIVER, or it does not implement the ABI."""


class PluginVersionError(PluginError):
    """ABI major mismatch, or the driver refused the requested version or
    capabilities."""


class PluginBusyError(PluginError):
    """Unload refused: lock objects are alive, or the driver said no."""


class PluginInitError(PluginError):
    """The driver accepted the version but failed to initialise (bad
    configuration, backend unreachable at start...)."""


# --- bad input, caught by the core before any driver sees it -------------


class ValidationError(VirtleaseError):
    """An argument is invalid.  ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"invalid {field}: {message}")


class ObjectStateError(VirtleaseError):
    """A call is not allowed in the object's current state (acquire twice,
    add after acquire, use after free, restricted object...)."""


class CapabilityError(VirtleaseError):
    """The call needs a capability the loaded driver does not have, or that
    the caller did not ask for at load time."""


class ConfigError(VirtleaseError):
    """The driver configuration is invalid; the message names the key."""


# --- lock outcomes --------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """Who holds a resource, as read from the backend."""

    resource: str
    """Readable identity: the disk path, or ``lockspace:key``."""
    host: str
    domain_name: str
    domain_uuid: str
    mode: str
    """``exclusive`` or ``shared``."""
    token: int
    since: float
    """Wall-clock time (epoch seconds) of the grant."""
    handoff_to: str | None = None
    """Destination host, if the holder is handing the resource over."""
    note: str | None = None
    """What the backend says about the resource's name, shown in brackets after it (the etcd
    backend: ``path://, this host only`` for a disk without a cluster-wide identity)."""

    @property
    def shown(self) -> str:
        """``resource``, with ``note`` in brackets: how messages name it."""
        return f"{self.resource} [{self.note}]" if self.note else self.resource

    def describe(self) -> str:
        text = (
            f"{self.shown} is held {self.mode} by domain "
            f"{self.domain_name} ({self.domain_uuid}) on host {self.host}, "
            f"token {self.token}"
        )
        if self.handoff_to:
            text += f", being migrated to host {self.handoff_to}"
        return text


class LockError(VirtleaseError):
    """A lock operation failed."""


class ResourceBusyError(LockError):
    """Some resources are held by someone else; nothing was taken."""

    def __init__(self, conflicts: Sequence[Holder], *, what: str = "acquire") -> None:
        self.conflicts = list(conflicts)
        lines = "\n  ".join(h.describe() for h in self.conflicts)
        super().__init__(
            f"cannot {what}: {len(self.conflicts)} resource(s) busy:\n  {lines}",
            hint="stop the domain on the holding host, or wait for that "
            "host's lease to expire if it is dead",
        )


class LeaseLostError(LockError):
    """The host's session lease is gone (expired, revoked or fenced); no
    call succeeds on it any more.  Create a new driver instance."""


class StaleStateError(LockError):
    """A state string no longer matches the backend: someone else held a
    resource in between, the handoff was already claimed or cancelled, or
    the state is for another host, cluster or format."""


class TransactionTooLargeError(LockError):
    """More operations than fit in one backend transaction; nothing done."""


class BackendUnavailableError(LockError):
    """The backend could not be reached before the deadline."""
