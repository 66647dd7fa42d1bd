"""The wire protocol of libvirt's ``lockd`` lock plugin (virtlockd's RPC program).

Pure functions over bytes: no I/O, no state.  A frame is::

    u32 total length (these 4 bytes included)
    u32 prog = 0x0EA7BEEF | u32 vers = 1 | u32 proc | i32 type | u32 serial | i32 status
    payload (XDR, big-endian, every item padded to 4 bytes)

A successful reply has an empty payload; an error reply (status ERROR) carries a
``virNetMessageError``.  Callers may rely on:

* ``encode_*`` producing exactly the bytes libvirt 9.0 produces (checked against a capture);
* every ``decode_*`` either returning a fully validated value or raising :class:`ProtocolError`
  (never another exception), with ``ProtocolError.header`` set whenever the 24-byte header
  could be read, so that a server can still answer with an error reply;
* strings being ``str`` decoded as UTF-8 with ``surrogateescape``, so any byte string libvirt
  sends round-trips unchanged (paths are bytes in C).

Strictness, compared with libvirt's own decoder: lengths, program, version, type, status,
procedure and string limits are checked as libvirt checks them; in addition trailing bytes
after the arguments and NUL bytes inside strings are rejected (libvirt ignores the former and
would silently truncate at the latter).  Non-zero XDR padding is accepted, as glibc's XDR
accepts it; encoding always pads with zeros.
"""

from __future__ import annotations

import enum
import struct
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


class AcquireFlags(enum.IntFlag):
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
class Owner:
    """virLockSpaceProtocolOwner: the VM (QEMU process) a connection acts for."""

    uuid: uuid.UUID
    name: str
    id: int
    pid: int


@dataclass(frozen=True, slots=True)
class RegisterArgs:
    """REGISTER."""

    owner: Owner
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


# ---------------------------------------------------------------------------- XDR primitives


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u32(self, value: int) -> None:
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"u32 out of range: {value}")
        self.parts.append(struct.pack(">I", value))

    def i32(self, value: int) -> None:
        if not -0x80000000 <= value <= 0x7FFFFFFF:
            raise ValueError(f"i32 out of range: {value}")
        self.parts.append(struct.pack(">i", value))

    def opaque_fixed(self, data: bytes, size: int) -> None:
        if len(data) != size:
            raise ValueError(f"fixed opaque needs {size} bytes, got {len(data)}")
        self.parts.append(data + b"\0" * (-size % 4))

    def string(self, value: str, limit: int) -> None:
        data = value.encode("utf-8", "surrogateescape")
        if len(data) > limit:
            raise ValueError(f"string of {len(data)} bytes exceeds the limit {limit}")
        if b"\0" in data:
            raise ValueError("string contains a NUL byte")
        self.u32(len(data))
        self.parts.append(data + b"\0" * (-len(data) % 4))

    def optional_string(self, value: str | None, limit: int) -> None:
        if value is None:
            self.u32(0)
        else:
            self.u32(1)
            self.string(value, limit)

    def data(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    def __init__(self, data: bytes, header: Header | None) -> None:
        self.data = data
        self.pos = 0
        self.header = header

    def _take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError(
                "truncated", f"{what}: need {n} bytes at offset {self.pos}, have {len(self.data) - self.pos}", self.header
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u32(self, what: str) -> int:
        return int(struct.unpack(">I", self._take(4, what))[0])

    def i32(self, what: str) -> int:
        return int(struct.unpack(">i", self._take(4, what))[0])

    def opaque_fixed(self, size: int, what: str) -> bytes:
        data = self._take(size, what)
        self._take(-size % 4, what + " padding")
        return data

    def string(self, limit: int, what: str) -> str:
        n = self.u32(what + " length")
        if n > limit:
            raise ProtocolError("string-too-long", f"{what}: {n} bytes exceeds the limit {limit}", self.header)
        data = self._take(n, what)
        self._take(-n % 4, what + " padding")
        if b"\0" in data:
            raise ProtocolError("nul-in-string", f"{what} contains a NUL byte", self.header)
        return data.decode("utf-8", "surrogateescape")

    def pointer(self, what: str) -> bool:
        flag = self.u32(what + " pointer")
        if flag > 1:
            raise ProtocolError("bad-pointer", f"{what}: optional-data flag {flag} is neither 0 nor 1", self.header)
        return flag == 1

    def optional_string(self, limit: int, what: str) -> str | None:
        return self.string(limit, what) if self.pointer(what) else None

    def finish(self, what: str) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("trailing", f"{len(self.data) - self.pos} bytes after the {what}", self.header)


# ------------------------------------------------------------------------------------- framing


def frame_length(prefix: bytes, max_frame: int = MAX_REPLY_FRAME) -> int:
    """The total frame length announced by the first 4 bytes of ``prefix``.

    Raises ProtocolError("length", header=None) when it is below 28 (no room for a header) or
    above ``max_frame``; a reader then cannot resynchronise and must drop the connection."""
    if len(prefix) < LEN_SIZE:
        raise ProtocolError("truncated", f"length word needs 4 bytes, have {len(prefix)}")
    (length,) = struct.unpack(">I", prefix[:LEN_SIZE])
    if length < MIN_FRAME:
        raise ProtocolError("length", f"frame length {length} is below the minimum {MIN_FRAME}")
    if length > max_frame:
        raise ProtocolError("length", f"frame length {length} exceeds the maximum {max_frame}")
    return int(length)


def encode_frame(header: Header, payload: bytes = b"") -> bytes:
    """A whole frame (length word included) for ``header`` and an already-encoded payload."""
    w = _Writer()
    w.u32(LEN_SIZE + HEADER_SIZE + len(payload))
    w.u32(header.prog)
    w.u32(header.vers)
    w.i32(header.proc)
    w.i32(header.type)
    w.u32(header.serial)
    w.i32(header.status)
    return w.data() + payload


def decode_frame(frame: bytes, max_frame: int = MAX_REPLY_FRAME) -> tuple[Header, bytes]:
    """Split a whole frame into its header and payload, checking only the framing itself.

    The length word must equal ``len(frame)``; program, version, type and status are *not*
    checked here (see :func:`check_call_header`), so that replies and bad calls can be
    inspected."""
    length = frame_length(frame, max_frame)
    if length != len(frame):
        raise ProtocolError("length", f"frame length word says {length}, frame has {len(frame)} bytes")
    r = _Reader(frame[LEN_SIZE:MIN_FRAME], None)
    prog = r.u32("prog")
    vers = r.u32("vers")
    proc = r.i32("proc")
    mtype = r.i32("type")
    serial = r.u32("serial")
    status = r.i32("status")
    header = Header(proc=proc, type=mtype, serial=serial, status=status, prog=prog, vers=vers)
    return header, frame[MIN_FRAME:]


def check_call_header(header: Header) -> Procedure:
    """Validate a CALL header as virtlockd would; returns its procedure.

    Raises ProtocolError (with ``header`` set) for a wrong program or version, a type other
    than CALL, a status other than OK or an unknown procedure."""
    if header.prog != PROGRAM:
        raise ProtocolError("program", f"Cannot find program {header.prog} version {header.vers}", header)
    if header.vers != VERSION:
        raise ProtocolError("version", f"Cannot find program {header.prog} version {header.vers}", header)
    if header.type != MessageType.CALL:
        raise ProtocolError("type", f"Unexpected message type {header.type}", header)
    if header.status != Status.OK:
        raise ProtocolError("status", f"Unexpected message status {header.status}", header)
    try:
        return Procedure(header.proc)
    except ValueError:
        raise ProtocolError("procedure", f"unknown procedure: {header.proc}", header) from None


# ------------------------------------------------------------------------------ call arguments


def encode_args(args: CallArgs) -> bytes:
    """The XDR payload of a call's arguments.  Raises ValueError for unencodable values."""
    w = _Writer()
    match args:
        case RegisterArgs(owner=owner, flags=flags):
            w.opaque_fixed(owner.uuid.bytes, UUID_LEN)
            w.string(owner.name, LOCK_STRING_MAX)
            w.u32(owner.id)
            w.u32(owner.pid)
            w.u32(flags)
        case RestrictArgs(flags=flags):
            w.u32(flags)
        case NewArgs(path=path, flags=flags):
            w.string(path, LOCK_STRING_MAX)
            w.u32(flags)
        case ResourceArgs(path=path, name=name, flags=flags):
            w.string(path, LOCK_STRING_MAX)
            w.string(name, LOCK_STRING_MAX)
            w.u32(flags)
        case CreateLockSpaceArgs(path=path):
            w.string(path, LOCK_STRING_MAX)
    return w.data()


_ARGS_TYPE: Final[dict[Procedure, type]] = {
    Procedure.REGISTER: RegisterArgs,
    Procedure.RESTRICT: RestrictArgs,
    Procedure.NEW: NewArgs,
    Procedure.CREATE_RESOURCE: ResourceArgs,
    Procedure.DELETE_RESOURCE: ResourceArgs,
    Procedure.ACQUIRE_RESOURCE: ResourceArgs,
    Procedure.RELEASE_RESOURCE: ResourceArgs,
    Procedure.CREATE_LOCKSPACE: CreateLockSpaceArgs,
}


def decode_args(proc: Procedure, payload: bytes, header: Header | None = None) -> CallArgs:
    """Decode and fully validate a call's argument payload (no trailing bytes allowed).

    ``header`` is only attached to a raised ProtocolError."""
    r = _Reader(payload, header)
    result: CallArgs
    if proc == Procedure.REGISTER:
        raw_uuid = r.opaque_fixed(UUID_LEN, "owner uuid")
        name = r.string(LOCK_STRING_MAX, "owner name")
        owner = Owner(uuid=uuid.UUID(bytes=raw_uuid), name=name, id=r.u32("owner id"), pid=r.u32("owner pid"))
        result = RegisterArgs(owner=owner, flags=r.u32("flags"))
    elif proc == Procedure.RESTRICT:
        result = RestrictArgs(flags=r.u32("flags"))
    elif proc == Procedure.NEW:
        result = NewArgs(path=r.string(LOCK_STRING_MAX, "path"), flags=r.u32("flags"))
    elif proc == Procedure.CREATE_LOCKSPACE:
        result = CreateLockSpaceArgs(path=r.string(LOCK_STRING_MAX, "path"))
    else:
        path = r.string(LOCK_STRING_MAX, "path")
        name = r.string(LOCK_STRING_MAX, "name")
        result = ResourceArgs(path=path, name=name, flags=r.u32("flags"))
    r.finish(f"{proc.name} arguments")
    return result


def encode_call(proc: Procedure, serial: int, args: CallArgs) -> bytes:
    """A whole CALL frame."""
    if not isinstance(args, _ARGS_TYPE[proc]):
        raise TypeError(f"{proc.name} takes {_ARGS_TYPE[proc].__name__}, not {type(args).__name__}")
    header = Header(proc=proc, type=MessageType.CALL, serial=serial, status=Status.OK)
    return encode_frame(header, encode_args(args))


def decode_call(frame: bytes, max_frame: int = MAX_CALL_FRAME) -> tuple[Header, Procedure, CallArgs]:
    """Decode and validate a whole CALL frame: framing, header and arguments."""
    header, payload = decode_frame(frame, max_frame)
    proc = check_call_header(header)
    return header, proc, decode_args(proc, payload, header)


# ------------------------------------------------------------------------------------- replies


def _reply_header(call: Header, status: Status) -> Header:
    return Header(proc=call.proc, type=MessageType.REPLY, serial=call.serial, status=status, prog=call.prog, vers=call.vers)


def encode_ok_reply(call: Header) -> bytes:
    """The successful reply to ``call``: same prog/vers/proc/serial, type REPLY, empty payload."""
    return encode_frame(_reply_header(call, Status.OK))


def encode_error(err: RemoteError) -> bytes:
    """The XDR of a virNetMessageError."""
    w = _Writer()
    w.i32(err.code)
    w.i32(err.domain)
    w.optional_string(err.message, NET_STRING_MAX)
    w.i32(err.level)
    if err.dom is None:
        w.u32(0)
    else:
        w.u32(1)
        w.string(err.dom.name, NET_STRING_MAX)
        w.opaque_fixed(err.dom.uuid, UUID_LEN)
        w.i32(err.dom.id)
    w.optional_string(err.str1, NET_STRING_MAX)
    w.optional_string(err.str2, NET_STRING_MAX)
    w.optional_string(err.str3, NET_STRING_MAX)
    w.i32(err.int1)
    w.i32(err.int2)
    if err.net is None:
        w.u32(0)
    else:
        w.u32(1)
        w.string(err.net.name, NET_STRING_MAX)
        w.opaque_fixed(err.net.uuid, UUID_LEN)
    return w.data()


def decode_error(payload: bytes, header: Header | None = None) -> RemoteError:
    """Decode and validate a virNetMessageError payload (no trailing bytes allowed)."""
    r = _Reader(payload, header)
    code = r.i32("code")
    domain = r.i32("domain")
    message = r.optional_string(NET_STRING_MAX, "message")
    level = r.i32("level")
    dom = None
    if r.pointer("dom"):
        dom = RemoteDomain(
            name=r.string(NET_STRING_MAX, "dom name"), uuid=r.opaque_fixed(UUID_LEN, "dom uuid"), id=r.i32("dom id")
        )
    str1 = r.optional_string(NET_STRING_MAX, "str1")
    str2 = r.optional_string(NET_STRING_MAX, "str2")
    str3 = r.optional_string(NET_STRING_MAX, "str3")
    int1 = r.i32("int1")
    int2 = r.i32("int2")
    net = None
    if r.pointer("net"):
        net = RemoteNetwork(name=r.string(NET_STRING_MAX, "net name"), uuid=r.opaque_fixed(UUID_LEN, "net uuid"))
    r.finish("error")
    return RemoteError(code, domain, message, level, dom, str1, str2, str3, int1, int2, net)


def encode_error_reply(call: Header, err: RemoteError) -> bytes:
    """The ERROR reply to ``call`` (whatever its header held) carrying ``err``."""
    return encode_frame(_reply_header(call, Status.ERROR), encode_error(err))


def decode_reply(frame: bytes, max_frame: int = MAX_REPLY_FRAME) -> tuple[Header, RemoteError | None]:
    """Decode a whole REPLY frame: (header, None) for OK with an empty payload, (header, error)
    for ERROR.  Raises ProtocolError for anything else (type, status, payload).  Program and
    version are not checked: the error reply to a call for an unknown program echoes it."""
    header, payload = decode_frame(frame, max_frame)
    if header.type != MessageType.REPLY:
        raise ProtocolError("type", f"expected a REPLY, got message type {header.type}", header)
    if header.status == Status.OK:
        if payload:
            raise ProtocolError("trailing", f"{len(payload)} payload bytes in an OK reply", header)
        return header, None
    if header.status == Status.ERROR:
        return header, decode_error(payload, header)
    raise ProtocolError("status", f"unexpected reply status {header.status}", header)
