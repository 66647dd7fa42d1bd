"""What a lock backend sees of the server: connections, peers, and how it refuses a call.

``server`` dispatches lockd calls to a :class:`LockBackend`; this module is the contract
between the two (``server`` re-exports every name).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from .protocol import (
    AcquireResourceFlags,
    ErrorCode,
    ErrorDomain,
    LockdOwner,
    Procedure,
    RemoteError,
    make_error,
)


class CallRefused(Exception):
    """Raised by a backend to refuse a call; becomes the error reply libvirt reports.

    ``message`` is the detail libvirt shows after the code's prefix (e.g. "resource busy: ")."""

    def __init__(
        self, message: str, *, code: int = ErrorCode.INTERNAL_ERROR, domain: int = ErrorDomain.LOCKING
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.domain = domain

    def to_remote(self) -> RemoteError:
        """The virNetMessageError this refusal is sent as."""
        return make_error(self.code, self.domain, self.message)


class ResourceBusy(CallRefused):
    """The resource is held elsewhere (or, on release, not held): VIR_ERR_RESOURCE_BUSY from
    VIR_FROM_LOCKSPACE, exactly as virtlockd reports it.  Name holder host and domain in the
    message: libvirt shows it to the user as "resource busy: <message>"."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=ErrorCode.RESOURCE_BUSY, domain=ErrorDomain.LOCKSPACE)


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """SO_PEERCRED of a connection: the connecting process as the kernel saw it at connect()."""

    pid: int
    uid: int
    gid: int


@dataclass(eq=False, slots=True)
class Connection:
    """One client connection.  The server owns and updates it; a backend may read it and keep
    it as a key (identity equality) but must not modify it.

    ``owner`` is set once REGISTER succeeded, ``restricted`` once RESTRICT succeeded (libvirt
    restricts the connection QEMU inherits, whose peer pid is the QEMU pid: its close is the
    only signal of a destroyed or crashed VM)."""

    id: int
    peer: PeerCredentials
    owner: LockdOwner | None = None
    restricted: bool = False


class LockBackend(Protocol):
    """What the server dispatches to.  Each method may be a plain function (run in the
    server's thread pool) or a coroutine function (awaited on the loop; it must not block).
    Refuse a call by raising :class:`CallRefused` (:class:`ResourceBusy` for a held disk)."""

    def register(self, conn: Connection, owner: LockdOwner) -> Awaitable[None] | None:
        """``conn`` now acts for ``owner`` (first REGISTER on the connection)."""

    def restrict(self, conn: Connection) -> Awaitable[None] | None:
        """``conn`` (registered) is restricted: no further calls will come on it."""

    def create_lockspace(self, conn: Connection, path: str) -> Awaitable[None] | None:
        """CREATE_LOCKSPACE ``path`` (idempotent in virtlockd; may come unregistered)."""

    def acquire(
        self, conn: Connection, owner: LockdOwner, lockspace: str, name: str, flags: AcquireResourceFlags
    ) -> Awaitable[None] | None:
        """Acquire resource ``name`` in ``lockspace`` ("" = default/direct) for ``owner``."""

    def release(self, conn: Connection, owner: LockdOwner, lockspace: str, name: str) -> Awaitable[None] | None:
        """Release resource ``name`` in ``lockspace`` held by ``owner``."""

    def connection_closed(self, conn: Connection) -> Awaitable[None] | None:
        """``conn`` is gone (EOF, error or shutdown); called once, after its last call.
        Exceptions are logged and otherwise ignored."""


# The server's own refusals (virtlockd's messages), before a backend sees the call.

def flag_error(flags: int, supported: int, proc: Procedure) -> RemoteError | None:
    extra = int(flags) & ~int(supported)
    if not extra:
        return None
    fn = "virLockSpaceProtocolDispatch" + "".join(part.capitalize() for part in proc.name.split("_"))
    return make_error(ErrorCode.INVALID_ARG, ErrorDomain.RPC, f"unsupported flags ({extra:#x}) in function {fn}")


DENIED = make_error(ErrorCode.OPERATION_DENIED, ErrorDomain.RPC, "lock manager connection has been restricted")
UNREGISTERED = make_error(
    ErrorCode.OPERATION_INVALID, ErrorDomain.RPC, "lock owner details have not been registered"
)
REREGISTERED = make_error(
    ErrorCode.OPERATION_INVALID, ErrorDomain.RPC, "lock owner details have already been registered"
)
BACKEND_FAILED = make_error(
    ErrorCode.INTERNAL_ERROR, ErrorDomain.LOCKING, "the virtlease agent failed; see its log"
)
