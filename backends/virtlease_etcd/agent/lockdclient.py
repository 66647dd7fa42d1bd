"""A small blocking lockd client (what libvirt's ``lockd`` plugin sends), for tests and benchmarks.

Each call sends one CALL frame with the next serial (from 0, like libvirt) and waits for the
reply.  A caller may rely on: an OK reply returns None; an ERROR reply raises
:class:`RemoteCallError` carrying the decoded ``virNetMessageError``; the server closing the
connection raises :class:`ConnectionClosed`; a malformed reply, or one to another serial or
procedure, raises ``ProtocolError``.
"""

from __future__ import annotations

import os
import socket
import uuid
from types import TracebackType

from .protocol import (
    MAX_REPLY_FRAME,
    AcquireResourceFlags,
    CallArgs,
    CreateLockSpaceArgs,
    Header,
    LockdOwner,
    Procedure,
    ProtocolError,
    RegisterArgs,
    RemoteError,
    ResourceArgs,
    RestrictArgs,
    decode_reply,
    encode_call,
    frame_length,
)


class ConnectionClosed(EOFError):
    """The server closed the connection before (or while) sending a reply."""


class RemoteCallError(Exception):
    """The server answered with an ERROR reply."""

    def __init__(self, header: Header, error: RemoteError) -> None:
        super().__init__(f"code {error.code} domain {error.domain}: {error.message}")
        self.header = header
        self.error = error


def make_owner(
    name: str = "vm", *, owner_id: int = 1, pid: int | None = None, owner_uuid: uuid.UUID | None = None
) -> LockdOwner:
    """A LockdOwner as libvirt sends it (pid defaults to this process, uuid to a random one)."""
    return LockdOwner(uuid=owner_uuid or uuid.uuid4(), name=name, id=owner_id, pid=os.getpid() if pid is None else pid)


class LockdClient:
    """One connection to a lockd socket.  Use as a context manager or call close()."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float | None = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(os.fspath(path))
        except BaseException:
            self.sock.close()
            raise
        self.serial = 0

    def __enter__(self) -> LockdClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the server sees EOF)."""
        self.sock.close()

    # ------------------------------------------------------------------- raw I/O

    def send_raw(self, data: bytes) -> None:
        """Send arbitrary bytes (for malformed-input tests)."""
        self.sock.sendall(data)

    def _recv_exactly(self, n: int) -> bytes:
        chunks: list[bytes] = []
        while n:
            try:
                chunk = self.sock.recv(n)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise ConnectionClosed("connection closed by the server")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def read_frame(self) -> bytes:
        """The next whole frame from the server, length word included."""
        prefix = self._recv_exactly(4)
        length = frame_length(prefix, MAX_REPLY_FRAME)
        return prefix + self._recv_exactly(length - 4)

    def read_reply(self) -> tuple[Header, RemoteError | None]:
        """The next reply: (header, None) if OK, (header, error) if ERROR."""
        return decode_reply(self.read_frame())

    def is_closed_by_server(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection within ``timeout`` without sending more."""
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(old)
        return data == b""

    # --------------------------------------------------------------------- calls

    def call(self, proc: Procedure, args: CallArgs) -> None:
        """Send one call and wait for its reply; raises RemoteCallError on an ERROR reply."""
        serial = self.serial
        self.serial += 1
        self.sock.sendall(encode_call(proc, serial, args))
        header, error = self.read_reply()
        if header.serial != serial or header.proc != proc:
            raise ProtocolError(
                "serial", f"reply serial {header.serial} proc {header.proc} to call serial {serial} proc {int(proc)}", header
            )
        if error is not None:
            raise RemoteCallError(header, error)

    def register(self, owner: LockdOwner, flags: int = 0) -> None:
        """REGISTER ``owner``."""
        self.call(Procedure.REGISTER, RegisterArgs(owner=owner, flags=flags))

    def restrict(self, flags: int = 0) -> None:
        """RESTRICT this connection."""
        self.call(Procedure.RESTRICT, RestrictArgs(flags=flags))

    def acquire(self, name: str, lockspace: str = "", flags: int = 0) -> None:
        """ACQUIRE_RESOURCE ``name`` in ``lockspace`` ("" = direct mode)."""
        self.call(Procedure.ACQUIRE_RESOURCE, ResourceArgs(path=lockspace, name=name, flags=flags))

    def acquire_indirect(self, name: str, lockspace: str) -> None:
        """ACQUIRE_RESOURCE with AUTOCREATE, as libvirt does with file_lockspace_dir."""
        self.acquire(name, lockspace, AcquireResourceFlags.AUTOCREATE)

    def release(self, name: str, lockspace: str = "", flags: int = 0) -> None:
        """RELEASE_RESOURCE ``name`` in ``lockspace``."""
        self.call(Procedure.RELEASE_RESOURCE, ResourceArgs(path=lockspace, name=name, flags=flags))

    def create_lockspace(self, path: str) -> None:
        """CREATE_LOCKSPACE ``path``."""
        self.call(Procedure.CREATE_LOCKSPACE, CreateLockSpaceArgs(path=path))
