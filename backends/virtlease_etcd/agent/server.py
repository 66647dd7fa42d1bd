"""A UNIX-socket server speaking virtlockd's protocol, dispatching to a :class:`LockBackend`.

One asyncio loop serves every connection; nothing on it blocks: synchronous backend methods
run in the server's thread pool, coroutine methods are awaited on the loop.  What a caller may
rely on:

* Calls on one connection are handled strictly one after another, in arrival order (libvirt
  waits for each reply anyway); calls on different connections run concurrently, so a
  synchronous backend must be thread-safe.
* Call-order rules are those of virtlockd (libvirt 9.0 ``lock_daemon_dispatch.c``), checked in
  its order before the backend sees anything: unsupported flags -> VIR_ERR_INVALID_ARG; any call
  after RESTRICT -> VIR_ERR_OPERATION_DENIED; anything but REGISTER and CREATE_LOCKSPACE before
  REGISTER -> VIR_ERR_OPERATION_INVALID.  One deliberate difference: virtlockd lets a second
  REGISTER overwrite the owner; here the same owner again is a no-op (answered OK, backend not
  called) and another owner is VIR_ERR_OPERATION_INVALID.
* NEW, CREATE_RESOURCE and DELETE_RESOURCE (never sent by libvirt's QEMU driver) are answered
  VIR_ERR_OPERATION_UNSUPPORTED without reaching the backend.
* A backend's :class:`LockError` becomes the error reply it describes (its message is what
  ``virsh`` prints); any other exception is logged and answered VIR_ERR_INTERNAL_ERROR.
* A frame whose header could be read but is otherwise bad (program, version, type, status,
  procedure, arguments) is answered with a VIR_ERR_RPC error and the connection stays open; a
  bad length word or a frame cut short closes that one connection.  Nobody else is affected.
* ``connection_closed`` is called exactly once for every connection the backend could have
  seen (every accepted root peer), after its last call finished, also at server shutdown.
* Peers whose SO_PEERCRED uid is not 0 are refused (logged, closed, backend never called).
* The socket is created with mode 0700 before it listens, only in a directory owned by root and
  not writable by group or others; :class:`AgentSetupError` otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from .protocol import (
    MAX_CALL_FRAME,
    AcquireFlags,
    CallArgs,
    CreateLockSpaceArgs,
    ErrorCode,
    ErrorDomain,
    Owner,
    Procedure,
    ProtocolError,
    RegisterArgs,
    RemoteError,
    ResourceArgs,
    decode_call,
    encode_error_reply,
    encode_ok_reply,
    frame_length,
    make_error,
)

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")


class AgentSetupError(RuntimeError):
    """The server cannot start safely (socket directory, stale or live socket); the message
    says what to fix."""


class LockError(Exception):
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


class ResourceBusy(LockError):
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
    owner: Owner | None = None
    restricted: bool = False


class LockBackend(Protocol):
    """What the server dispatches to.  Each method may be a plain function (run in the
    server's thread pool) or a coroutine function (awaited on the loop; it must not block).
    Refuse a call by raising :class:`LockError` (:class:`ResourceBusy` for a held disk)."""

    def register(self, conn: Connection, owner: Owner) -> Awaitable[None] | None:
        """``conn`` now acts for ``owner`` (first REGISTER on the connection)."""

    def restrict(self, conn: Connection) -> Awaitable[None] | None:
        """``conn`` (registered) is restricted: no further calls will come on it."""

    def create_lockspace(self, conn: Connection, path: str) -> Awaitable[None] | None:
        """CREATE_LOCKSPACE ``path`` (idempotent in virtlockd; may come unregistered)."""

    def acquire(
        self, conn: Connection, owner: Owner, lockspace: str, name: str, flags: AcquireFlags
    ) -> Awaitable[None] | None:
        """Acquire resource ``name`` in ``lockspace`` ("" = default/direct) for ``owner``."""

    def release(self, conn: Connection, owner: Owner, lockspace: str, name: str) -> Awaitable[None] | None:
        """Release resource ``name`` in ``lockspace`` held by ``owner``."""

    def connection_closed(self, conn: Connection) -> Awaitable[None] | None:
        """``conn`` is gone (EOF, error or shutdown); called once, after its last call.
        Exceptions are logged and otherwise ignored."""


def _flag_error(flags: int, supported: int, proc: Procedure) -> RemoteError | None:
    extra = int(flags) & ~int(supported)
    if not extra:
        return None
    fn = "virLockSpaceProtocolDispatch" + "".join(part.capitalize() for part in proc.name.split("_"))
    return make_error(ErrorCode.INVALID_ARG, ErrorDomain.RPC, f"unsupported flags ({extra:#x}) in function {fn}")


_DENIED = make_error(ErrorCode.OPERATION_DENIED, ErrorDomain.RPC, "lock manager connection has been restricted")
_UNREGISTERED = make_error(
    ErrorCode.OPERATION_INVALID, ErrorDomain.RPC, "lock owner details have not been registered"
)
_REREGISTERED = make_error(
    ErrorCode.OPERATION_INVALID, ErrorDomain.RPC, "lock owner details have already been registered"
)
_BACKEND_FAILED = make_error(
    ErrorCode.INTERNAL_ERROR, ErrorDomain.LOCKING, "the virtlease agent failed; see its log"
)


def check_socket_dir(directory: Path) -> None:
    """Raise AgentSetupError unless ``directory`` is a directory owned by root and not
    writable by group or others (so nobody else can replace the socket)."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise AgentSetupError(f"socket directory {directory} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise AgentSetupError(f"socket directory {directory} is not a directory")
    if st.st_uid != 0:
        raise AgentSetupError(f"socket directory {directory} is owned by uid {st.st_uid}, not root")
    if st.st_mode & 0o022:
        raise AgentSetupError(
            f"socket directory {directory} has mode {stat.S_IMODE(st.st_mode):04o}: "
            "it must not be writable by group or others"
        )


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """SO_PEERCRED of a connected AF_UNIX socket."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


class LockdServer:
    """The server.  Use ``async with LockdServer(path, backend):`` or start()/close().

    ``max_frame`` bounds a call frame before it is read (default: the largest well-formed
    lockd call, 131112 bytes); ``max_connections`` bounds concurrent connections (virtlockd's
    default max_clients is 1024); ``workers`` sizes the thread pool for sync backend calls."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        backend: LockBackend,
        *,
        max_frame: int = MAX_CALL_FRAME,
        max_connections: int = 1024,
        workers: int = 16,
        shutdown_timeout: float = 5.0,
    ) -> None:
        self.path = Path(path)
        self.backend = backend
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.shutdown_timeout = shutdown_timeout
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ids = itertools.count(1)
        self._conns: dict[Connection, asyncio.StreamWriter] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._inode: int | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Check the directory, create the socket (0700) and start accepting."""
        check_socket_dir(self.path.parent)
        await self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o700)  # before listen(): nobody can connect in between
            self._inode = os.stat(self.path).st_ino
            sock.setblocking(False)
            self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="virtlease-agent")
            self._server = await asyncio.start_unix_server(self._handle, sock=sock)
        except BaseException:
            sock.close()
            self._unlink_own_socket()
            raise
        log.info("virtlease agent listening on %s", self.path)

    async def _remove_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise AgentSetupError(f"{self.path} exists and is not a socket; refusing to replace it")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.path)), 2.0)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale socket %s", self.path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        except (OSError, TimeoutError) as exc:
            raise AgentSetupError(f"cannot tell whether {self.path} is in use: {exc}") from exc
        writer.close()
        raise AgentSetupError(f"{self.path} is in use by a running daemon (virtlockd or another agent)")

    def _unlink_own_socket(self) -> None:
        with contextlib.suppress(OSError):
            if self._inode is not None and os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self._inode = None

    async def close(self) -> None:
        """Stop accepting, close every connection (each gets ``connection_closed``), wait up to
        ``shutdown_timeout`` for in-flight calls, remove the socket."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._conns.values()):
            writer.close()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.shutdown_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._unlink_own_socket()
        log.info("virtlease agent on %s stopped", self.path)

    async def __aenter__(self) -> LockdServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def connections(self) -> list[Connection]:
        """The live, accepted connections (a snapshot)."""
        return list(self._conns)

    # ---------------------------------------------------------------- connections

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        sock: socket.socket = writer.get_extra_info("socket")
        try:
            peer = peer_credentials(sock)
        except OSError as exc:
            log.warning("refusing a connection: cannot read its peer credentials: %s", exc)
            writer.close()
            return
        if peer.uid != 0:
            log.warning("refusing connection from pid %d uid %d gid %d: not root", peer.pid, peer.uid, peer.gid)
            writer.close()
            return
        if len(self._conns) >= self.max_connections:
            log.warning("refusing connection from pid %d: %d connections open", peer.pid, len(self._conns))
            writer.close()
            return
        conn = Connection(id=next(self._ids), peer=peer)
        self._conns[conn] = writer
        self._tasks.add(task)
        log.debug("connection %d from pid %d", conn.id, peer.pid)
        try:
            await self._serve_connection(conn, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("connection %d: %s", conn.id, exc)
        finally:
            writer.close()
            del self._conns[conn]
            try:
                await self._call(self.backend.connection_closed, conn)
            except Exception:
                log.exception("connection %d: connection_closed failed", conn.id)
            finally:
                self._tasks.discard(task)
            log.debug("connection %d closed", conn.id)

    async def _serve_connection(
        self, conn: Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                prefix = await reader.readexactly(4)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    log.warning("connection %d: closed inside a length word", conn.id)
                return
            try:
                length = frame_length(prefix, self.max_frame)
            except ProtocolError as exc:
                log.warning("connection %d (pid %d): %s; closing it", conn.id, conn.peer.pid, exc)
                return
            try:
                rest = await reader.readexactly(length - 4)
            except asyncio.IncompleteReadError as exc:
                log.warning("connection %d: closed after %d of %d frame bytes", conn.id, 4 + len(exc.partial), length)
                return
            reply = await self._process(conn, prefix + rest)
            writer.write(reply)
            await writer.drain()

    async def _process(self, conn: Connection, frame: bytes) -> bytes:
        try:
            header, proc, args = decode_call(frame, self.max_frame)
        except ProtocolError as exc:
            assert exc.header is not None  # frame_length() guaranteed a whole header
            log.warning("connection %d (pid %d): bad call: %s", conn.id, conn.peer.pid, exc)
            return encode_error_reply(exc.header, make_error(ErrorCode.RPC, ErrorDomain.RPC, exc.detail))
        error = await self._dispatch(conn, proc, args)
        if error is None:
            return encode_ok_reply(header)
        log.debug("connection %d: %s refused: %s", conn.id, proc.name, error.message)
        return encode_error_reply(header, error)

    # ------------------------------------------------------------------- dispatch

    async def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        if inspect.iscoroutinefunction(fn):
            await fn(*args)
            return
        assert self._executor is not None
        await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    async def _dispatch(self, conn: Connection, proc: Procedure, args: CallArgs) -> RemoteError | None:
        # plain ints: ~ of an IntFlag only complements its defined bits
        supported = int(AcquireFlags.SHARED | AcquireFlags.AUTOCREATE) if proc == Procedure.ACQUIRE_RESOURCE else 0
        flags = getattr(args, "flags", 0)
        if (err := _flag_error(flags, supported, proc)) is not None:
            return err
        if conn.restricted:
            return _DENIED
        if isinstance(args, RegisterArgs):
            return await self._register(conn, args.owner)
        if isinstance(args, CreateLockSpaceArgs):
            return await self._backend(self.backend.create_lockspace, conn, args.path)
        owner = conn.owner
        if owner is None:
            return _UNREGISTERED
        if proc == Procedure.RESTRICT:
            err = await self._backend(self.backend.restrict, conn)
            if err is None:
                conn.restricted = True
            return err
        if isinstance(args, ResourceArgs) and proc == Procedure.ACQUIRE_RESOURCE:
            return await self._backend(self.backend.acquire, conn, owner, args.path, args.name, AcquireFlags(flags))
        if isinstance(args, ResourceArgs) and proc == Procedure.RELEASE_RESOURCE:
            return await self._backend(self.backend.release, conn, owner, args.path, args.name)
        return make_error(
            ErrorCode.OPERATION_UNSUPPORTED, ErrorDomain.RPC, f"the virtlease agent does not implement {proc.name}"
        )

    async def _register(self, conn: Connection, owner: Owner) -> RemoteError | None:
        if not owner.id:
            return _UNREGISTERED  # virtlockd's (odd) message for an owner id of 0
        if conn.owner is not None:
            return None if conn.owner == owner else _REREGISTERED
        err = await self._backend(self.backend.register, conn, owner)
        if err is None:
            conn.owner = owner
            log.info(
                "connection %d (pid %d) registered %s %s id %d pid %d",
                conn.id, conn.peer.pid, owner.name, owner.uuid, owner.id, owner.pid,
            )  # fmt: skip
        return err

    async def _backend(self, fn: Callable[..., Any], *args: Any) -> RemoteError | None:
        try:
            await self._call(fn, *args)
        except LockError as exc:
            return exc.to_remote()
        except Exception:
            log.exception("lock backend %s failed", getattr(fn, "__name__", fn))
            return _BACKEND_FAILED
        return None
