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
  not writable by group or others; :class:`AgentSetupError` otherwise.  A listening socket given
  as ``sock`` (socket activation: the service manager's) is served as it is and never removed.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from .lockapi import (
    BACKEND_FAILED,
    DENIED,
    REREGISTERED,
    UNREGISTERED,
    Connection,
    LockBackend,
    LockError,
    PeerCredentials,
    ResourceBusy,
    flag_error,
)
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
from .sockets import AgentSetupError, check_socket_dir, peer_credentials, remove_stale_socket

log = logging.getLogger(__name__)

__all__ = ["AgentSetupError", "Connection", "LockBackend", "LockError", "LockdServer", "PeerCredentials",
           "ResourceBusy", "check_socket_dir", "peer_credentials"]

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
        sock: socket.socket | None = None,
    ) -> None:
        self.path = Path(path)
        self._given = sock
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
        """Check the directory, create the socket (0700) and start accepting (or accept on the
        socket given as ``sock``)."""
        if self._given is not None:
            self._given.setblocking(False)
            self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="virtlease-agent")
            self._server = await asyncio.start_unix_server(self._handle, sock=self._given)
            log.info("virtlease agent listening on %s (socket from the service manager)", self.path)
            return
        check_socket_dir(self.path.parent)
        await remove_stale_socket(self.path)
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
        if (err := flag_error(flags, supported, proc)) is not None:
            return err
        if conn.restricted:
            return DENIED
        if isinstance(args, RegisterArgs):
            return await self._register(conn, args.owner)
        if isinstance(args, CreateLockSpaceArgs):
            return await self._backend(self.backend.create_lockspace, conn, args.path)
        owner = conn.owner
        if owner is None:
            return UNREGISTERED
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
            return UNREGISTERED  # virtlockd's (odd) message for an owner id of 0
        if conn.owner is not None:
            return None if conn.owner == owner else REREGISTERED
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
            return BACKEND_FAILED
        return None
