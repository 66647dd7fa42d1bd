"""The lockd protocol's constants, enums and message types (see ``protocol`` for the wire format).

Values are libvirt 9.0's (``lock_protocol.x``, ``virnetprotocol.x``, ``virerror.h``).
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from typing import Final

PROGRAM: Final = 0x0EA7BEEF
"""VIR_LOCK_SPACE_PROTOCOL_PROGRAM."""
VERSION: Final = 1
"""VIR_LOCK_SPACE_PROTOCOL_PROGRAM_VERSION."""

LEN_SIZE: Final = 4
"""VIR_NET_MESSAGE_LEN_MAX: the length word."""
HEADER_SIZE: Final = 24
"""Six 32-bit header words after the length word."""
MIN_FRAME: Final = LEN_SIZE + HEADER_SIZE
"""Smallest valid frame (an empty payload): 28 bytes."""

NET_MESSAGE_MAX: Final = 33554432
"""VIR_NET_MESSAGE_MAX (libvirt >= 5.x): largest header + payload libvirt accepts (32 MiB)."""
NET_STRING_MAX: Final = 4194304
"""VIR_NET_MESSAGE_STRING_MAX: longest string in a ``virNetMessageError``."""
LOCK_STRING_MAX: Final = 65536
"""VIR_LOCK_SPACE_PROTOCOL_STRING_MAX: longest string in a lock-protocol argument."""
UUID_LEN: Final = 16
"""VIR_UUID_BUFLEN."""

MAX_CALL_FRAME: Final = MIN_FRAME + 2 * (4 + LOCK_STRING_MAX) + 4
"""The largest frame a well-formed lock-protocol call can have (two maximal strings and a
u32: ACQUIRE/RELEASE/CREATE/DELETE_RESOURCE), 131112 bytes.  A server may refuse anything longer
without reading it."""
MAX_REPLY_FRAME: Final = LEN_SIZE + NET_MESSAGE_MAX
"""The largest frame libvirt itself accepts; the limit for reading replies."""


class Procedure(enum.IntEnum):
    """virLockSpaceProtocolProcedure."""

    REGISTER = 1
    RESTRICT = 2
    NEW = 3
    CREATE_RESOURCE = 4
    DELETE_RESOURCE = 5
    ACQUIRE_RESOURCE = 6
    RELEASE_RESOURCE = 7
    CREATE_LOCKSPACE = 8


class MessageType(enum.IntEnum):
    """virNetMessageType (only CALL and REPLY are used by this program)."""

    CALL = 0
    REPLY = 1
    MESSAGE = 2
    STREAM = 3
    CALL_WITH_FDS = 4
    REPLY_WITH_FDS = 5


class Status(enum.IntEnum):
    """virNetMessageStatus."""

    OK = 0
    ERROR = 1
    CONTINUE = 2


class AcquireResourceFlags(enum.IntFlag):
    """virLockSpaceProtocolAcquireResourceFlags: the only flags any procedure accepts."""

    SHARED = 1
    AUTOCREATE = 2


class ErrorCode(enum.IntEnum):
    """The virErrorNumber values this agent sends (include/libvirt/virterror.h)."""

    INTERNAL_ERROR = 1
    NO_SUPPORT = 3
    INVALID_ARG = 8
    OPERATION_DENIED = 29
    RPC = 39
    OPERATION_INVALID = 55
    OPERATION_UNSUPPORTED = 84
    RESOURCE_BUSY = 87


class ErrorDomain(enum.IntEnum):
    """The virErrorDomain values this agent sends."""

    RPC = 7
    LOCKING = 42
    LOCKSPACE = 51


ERROR_LEVEL_ERROR: Final = 2
"""VIR_ERR_ERROR, the level of every error virtlockd sends."""

_ERROR_FORMAT: Final[dict[int, str]] = {
    ErrorCode.INTERNAL_ERROR: "internal error: %s",
    ErrorCode.NO_SUPPORT: "this function is not supported by the connection driver: %s",
    ErrorCode.INVALID_ARG: "invalid argument: %s",
    ErrorCode.OPERATION_DENIED: "operation forbidden: %s",
    ErrorCode.RPC: "%s",
    ErrorCode.OPERATION_INVALID: "Requested operation is not valid: %s",
    ErrorCode.OPERATION_UNSUPPORTED: "Operation not supported: %s",
    ErrorCode.RESOURCE_BUSY: "resource busy: %s",
}
"""libvirt's virErrorMsg() format per code (src/util/virerror.c): str1 = format,
message = format with the detail; VIR_ERR_RPC has no prefix."""


class ProtocolError(Exception):
    """Input that is not a valid lockd message.

    ``reason`` is a short stable token (``length``, ``program``, ``version``, ``type``,
    ``status``, ``procedure``, ``truncated``, ``string-too-long``, ``nul-in-string``,
    ``trailing``, ``bad-pointer``); ``header`` is the decoded header when it was readable
    (then a server can send an error reply), else None (then it should close the connection).
    """

    def __init__(self, reason: str, detail: str, header: Header | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.header = header


@dataclass(frozen=True, slots=True)
class Header:
    """The six header words.  ``proc``/``type``/``status`` stay plain ints so that invalid
    values can be represented (and echoed in an error reply)."""

    proc: int
    type: int
    serial: int
    status: int
    prog: int = PROGRAM
    vers: int = VERSION


@dataclass(frozen=True, slots=True)
class LockdOwner:
    """virLockSpaceProtocolOwner: the VM (QEMU process) a connection acts for."""

    uuid: uuid.UUID
    name: str
    id: int
    pid: int


@dataclass(frozen=True, slots=True)
class RegisterArgs:
    """REGISTER."""

    owner: LockdOwner
    flags: int = 0


@dataclass(frozen=True, slots=True)
class RestrictArgs:
    """RESTRICT."""

    flags: int = 0


@dataclass(frozen=True, slots=True)
class NewArgs:
    """NEW (a lockspace; unused by libvirt's QEMU driver)."""

    path: str
    flags: int = 0


@dataclass(frozen=True, slots=True)
class ResourceArgs:
    """CREATE_RESOURCE, DELETE_RESOURCE, ACQUIRE_RESOURCE and RELEASE_RESOURCE all carry this.

    ``path`` is the lockspace ("" = the default lockspace, direct mode), ``name`` the resource
    (a disk path in direct mode, a sha256 hex in indirect mode)."""

    path: str
    name: str
    flags: int = 0


@dataclass(frozen=True, slots=True)
class CreateLockSpaceArgs:
    """CREATE_LOCKSPACE."""

    path: str


CallArgs = RegisterArgs | RestrictArgs | NewArgs | ResourceArgs | CreateLockSpaceArgs


@dataclass(frozen=True, slots=True)
class RemoteDomain:
    """virNetMessageNonnullDomain (present in errors from other programs; never sent here)."""

    name: str
    uuid: bytes
    id: int


@dataclass(frozen=True, slots=True)
class RemoteNetwork:
    """virNetMessageNonnullNetwork (likewise never sent here)."""

    name: str
    uuid: bytes


@dataclass(frozen=True, slots=True)
class RemoteError:
    """virNetMessageError, the payload of every ERROR reply."""

    code: int
    domain: int
    message: str | None
    level: int = ERROR_LEVEL_ERROR
    dom: RemoteDomain | None = None
    str1: str | None = None
    str2: str | None = None
    str3: str | None = None
    int1: int = -1
    int2: int = -1
    net: RemoteNetwork | None = None


def make_error(code: int, domain: int, detail: str) -> RemoteError:
    """The error libvirt's virReportError(code, "%s", detail) would send from ``domain``.

    ``str1`` is libvirt's format for ``code`` (e.g. "resource busy: %s"), ``str2`` the detail
    and ``message`` the two combined, as in the captured RESOURCE_BUSY replies; codes this
    module does not list get the format "%s"."""
    fmt = _ERROR_FORMAT.get(code, "%s")
    return RemoteError(code=code, domain=domain, message=fmt.replace("%s", detail, 1), str1=fmt, str2=detail)
