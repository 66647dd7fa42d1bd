"""The agent's listening socket: a safe directory, stale sockets, peer credentials."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from pathlib import Path

from .lockapi import PeerCredentials

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")


class AgentSetupError(RuntimeError):
    """The server cannot start safely (socket directory, stale or live socket); the message
    says what to fix."""


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


async def remove_stale_socket(path: Path) -> None:
    """Remove a socket file nobody listens on; AgentSetupError if it is live or not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AgentSetupError(f"{path} exists and is not a socket; refusing to replace it")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2.0)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except (OSError, TimeoutError) as exc:
        raise AgentSetupError(f"cannot tell whether {path} is in use: {exc}") from exc
    writer.close()
    raise AgentSetupError(f"{path} is in use by a running daemon (virtlockd or another agent)")
