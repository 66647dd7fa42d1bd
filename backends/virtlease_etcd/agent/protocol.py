"""The wire protocol of libvirt's ``lockd`` lock plugin (virtlockd's RPC program).

Pure functions over bytes: no I/O, no state.  A frame is (constants and message types: ``messages``; XDR: ``xdr``)::

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

import struct
import uuid
from typing import Final

from .messages import (
    ERROR_LEVEL_ERROR,
    HEADER_SIZE,
    LEN_SIZE,
    LOCK_STRING_MAX,
    MAX_CALL_FRAME,
    MAX_REPLY_FRAME,
    MIN_FRAME,
    NET_MESSAGE_MAX,
    NET_STRING_MAX,
    PROGRAM,
    UUID_LEN,
    VERSION,
    AcquireResourceFlags,
    CallArgs,
    CreateLockSpaceArgs,
    ErrorCode,
    ErrorDomain,
    Header,
    LockdOwner,
    MessageType,
    NewArgs,
    Procedure,
    ProtocolError,
    RegisterArgs,
    RemoteDomain,
    RemoteError,
    RemoteNetwork,
    ResourceArgs,
    RestrictArgs,
    Status,
    make_error,
)
from .xdr import Reader, Writer

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
    w = Writer()
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
    r = Reader(frame[LEN_SIZE:MIN_FRAME], None)
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
    w = Writer()
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
    r = Reader(payload, header)
    result: CallArgs
    if proc == Procedure.REGISTER:
        raw_uuid = r.opaque_fixed(UUID_LEN, "owner uuid")
        name = r.string(LOCK_STRING_MAX, "owner name")
        owner = LockdOwner(uuid=uuid.UUID(bytes=raw_uuid), name=name, id=r.u32("owner id"), pid=r.u32("owner pid"))
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
    w = Writer()
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
    r = Reader(payload, header)
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

__all__ = [  # the public names (``messages`` ones re-exported)
    "ERROR_LEVEL_ERROR", "HEADER_SIZE", "LEN_SIZE", "LOCK_STRING_MAX", "MAX_CALL_FRAME",
    "MAX_REPLY_FRAME", "MIN_FRAME", "NET_MESSAGE_MAX", "NET_STRING_MAX", "PROGRAM", "UUID_LEN",
    "VERSION", "AcquireResourceFlags", "CallArgs", "CreateLockSpaceArgs", "ErrorCode", "ErrorDomain",
    "Header", "LockdOwner", "MessageType", "NewArgs", "Procedure", "ProtocolError", "RegisterArgs",
    "RemoteDomain", "RemoteError", "RemoteNetwork", "ResourceArgs", "RestrictArgs", "Status",
    "check_call_header", "decode_args", "decode_call", "decode_error", "decode_frame",
    "decode_reply", "encode_args", "encode_call", "encode_error", "encode_error_reply",
    "encode_frame", "encode_ok_reply", "frame_length", "make_error",
]
