"""Protocol conformance: the capture's bytes, round trips, and strict decoding."""

from __future__ import annotations

import struct
import uuid

import pytest

from virtlease_etcd.agent import protocol as p
from virtlease_lab.lockdharness import MALFORMED, RESTRICT_OK, Vector, frame, xstr

OWNER1 = p.LockdOwner(uuid=uuid.UUID("7e025c56-9f2c-4b9d-833d-983a659b4ab2"), name="lockt1", id=1, pid=13311)
DISK = "/tmp/research-libvirt-run/images/shared.img"
FILES = "/var/lib/libvirt/lockd/files"
SHA = "18d85e6e8bebadfb12cecc6812a9a9db861851792b2063340eef14cea2462335"


def pairs(vectors: list[Vector]) -> list[tuple[Vector, Vector]]:
    """(call, reply) pairs in capture order."""
    out = []
    for call, reply in zip(vectors[::2], vectors[1::2], strict=True):
        assert (call.direction, reply.direction, call.conn) == ("C2S", "S2C", reply.conn)
        out.append((call, reply))
    return out


def test_capture_has_27_connections_and_every_procedure_libvirt_uses(vectors: list[Vector]) -> None:
    assert len({v.conn for v in vectors}) == 27
    procs = {p.decode_call(c.frame)[1] for c, _ in pairs(vectors)}
    assert procs == {
        p.Procedure.REGISTER, p.Procedure.RESTRICT, p.Procedure.ACQUIRE_RESOURCE,
        p.Procedure.RELEASE_RESOURCE, p.Procedure.CREATE_LOCKSPACE,
    }  # fmt: skip


def test_every_captured_call_decodes_and_reencodes_byte_exact(vectors: list[Vector]) -> None:
    for call, _ in pairs(vectors):
        header, proc, args = p.decode_call(call.frame)
        assert header.type == p.MessageType.CALL and header.status == p.Status.OK
        assert p.encode_call(proc, header.serial, args) == call.frame


def test_every_captured_reply_is_reproduced_byte_exact(vectors: list[Vector]) -> None:
    errors = 0
    for call, reply in pairs(vectors):
        call_header, _, _ = p.decode_call(call.frame)
        _, err = p.decode_reply(reply.frame)
        if err is None:
            assert p.encode_ok_reply(call_header) == reply.frame
        else:
            errors += 1
            assert (err.code, err.domain, err.level) == (87, 51, 2)  # VIR_ERR_RESOURCE_BUSY, VIR_FROM_LOCKSPACE
            assert err.str2 is not None
            rebuilt = p.make_error(p.ErrorCode.RESOURCE_BUSY, p.ErrorDomain.LOCKSPACE, err.str2)
            assert rebuilt == err
            assert p.encode_error_reply(call_header, rebuilt) == reply.frame
    assert errors == 4


def test_captured_fields(vectors: list[Vector]) -> None:
    by_conn: dict[int, list[Vector]] = {}
    for v in vectors:
        by_conn.setdefault(v.conn, []).append(v)
    _, proc, args = p.decode_call(by_conn[1][0].frame)
    assert proc == p.Procedure.REGISTER and args == p.RegisterArgs(owner=OWNER1, flags=0)
    assert p.decode_call(by_conn[1][2].frame)[2] == p.RestrictArgs(flags=0)
    assert p.decode_call(by_conn[2][2].frame)[1:] == (p.Procedure.ACQUIRE_RESOURCE, p.ResourceArgs("", DISK, 0))
    assert p.decode_call(by_conn[18][0].frame)[1:] == (p.Procedure.CREATE_LOCKSPACE, p.CreateLockSpaceArgs(FILES))
    header, proc, args = p.decode_call(by_conn[20][2].frame)
    assert (header.serial, proc) == (1, p.Procedure.ACQUIRE_RESOURCE)
    assert args == p.ResourceArgs(FILES, SHA, p.AcquireResourceFlags.AUTOCREATE)
    _, err = p.decode_reply(by_conn[14][3].frame)
    assert err is not None and err.message == f"resource busy: Lockspace resource '{DISK}' is not locked"
    assert (err.dom, err.str3, err.int1, err.int2, err.net) == (None, None, -1, -1, None)


@pytest.mark.parametrize(
    ("proc", "args"),
    [
        (p.Procedure.REGISTER, p.RegisterArgs(OWNER1, 0)),
        (p.Procedure.REGISTER, p.RegisterArgs(p.LockdOwner(uuid.uuid4(), "vm-\u00e9\udcff", 0xFFFFFFFF, 7), 0)),
        (p.Procedure.RESTRICT, p.RestrictArgs(0)),
        (p.Procedure.NEW, p.NewArgs("/a", 0)),
        (p.Procedure.CREATE_RESOURCE, p.ResourceArgs("/ls", "r", 0)),
        (p.Procedure.DELETE_RESOURCE, p.ResourceArgs("/ls", "r", 0)),
        (p.Procedure.ACQUIRE_RESOURCE, p.ResourceArgs("", "x" * p.LOCK_STRING_MAX, 3)),
        (p.Procedure.RELEASE_RESOURCE, p.ResourceArgs("y" * p.LOCK_STRING_MAX, "abc", 0)),
        (p.Procedure.CREATE_LOCKSPACE, p.CreateLockSpaceArgs("")),
    ],
)
def test_call_round_trip(proc: p.Procedure, args: p.CallArgs) -> None:
    frame = p.encode_call(proc, 42, args)
    assert len(frame) % 4 == 0 and len(frame) <= p.MAX_CALL_FRAME
    header, dproc, dargs = p.decode_call(frame)
    assert (header.serial, dproc, dargs) == (42, proc, args)


def test_error_round_trip_with_every_optional_field() -> None:
    err = p.RemoteError(
        code=1, domain=42, message=None, level=1,
        dom=p.RemoteDomain("d", bytes(range(16)), 3), str1="a", str2=None, str3="ccc", int1=5, int2=-7,
        net=p.RemoteNetwork("n", bytes(16)),
    )  # fmt: skip
    call = p.Header(proc=6, type=p.MessageType.CALL, serial=9, status=p.Status.OK)
    header, decoded = p.decode_reply(p.encode_error_reply(call, err))
    assert decoded == err
    assert (header.type, header.status, header.serial, header.proc) == (p.MessageType.REPLY, p.Status.ERROR, 9, 6)


def test_encoder_refuses_what_libvirt_could_not_decode() -> None:
    with pytest.raises(ValueError):
        p.encode_args(p.ResourceArgs("", "x" * (p.LOCK_STRING_MAX + 1), 0))
    with pytest.raises(ValueError):
        p.encode_args(p.CreateLockSpaceArgs("a\0b"))
    with pytest.raises(ValueError):
        p.encode_args(p.RestrictArgs(-1))
    with pytest.raises(TypeError):
        p.encode_call(p.Procedure.RESTRICT, 0, p.CreateLockSpaceArgs("x"))


@pytest.mark.parametrize(("data", "reason", "readable"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_calls_raise_typed_errors(data: bytes, reason: str, readable: bool) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.decode_call(data)
    assert info.value.reason == reason
    assert (info.value.header is not None) == readable


def test_length_word_must_match_the_frame() -> None:
    data = frame(2, RESTRICT_OK)
    with pytest.raises(p.ProtocolError, match="length"):
        p.decode_call(data + b"\0\0\0\0")
    with pytest.raises(p.ProtocolError, match="length"):
        p.decode_call(data[:-1])


def test_nonzero_padding_is_accepted_like_glibc_xdr() -> None:
    _, _, args = p.decode_call(frame(8, xstr(b"/a", pad=b"\xff\xff")))
    assert args == p.CreateLockSpaceArgs("/a")


def test_reply_decoder_is_strict() -> None:
    ok = p.encode_ok_reply(p.Header(proc=1, type=0, serial=0, status=0))
    with pytest.raises(p.ProtocolError, match="trailing"):
        p.decode_reply(ok[:3] + bytes([ok[3] + 4]) + ok[4:] + bytes(4))
    bad_ptr = p.encode_error(p.make_error(1, 7, "x"))
    bad_ptr = bad_ptr[:8] + struct.pack(">I", 2) + bad_ptr[12:]
    with pytest.raises(p.ProtocolError, match="bad-pointer"):
        p.decode_error(bad_ptr)
    with pytest.raises(p.ProtocolError, match="type"):
        p.decode_reply(frame(1, b""))
