"""The agent's listening socket: a safe directory, stale sockets, peer credentials, and the
sockets a service manager passes (socket activation).

Socket activation (``sd_listen_fds(3)``): systemd's ``virtlockd.socket`` owns
``/run/libvirt/virtlockd-sock`` and starts ``virtlockd.service`` -- the agent, through the
package's drop-in -- with the listening socket as file descriptor 3 (``LISTEN_FDS``,
``LISTEN_PID``, ``LISTEN_FDNAMES``).  Debian's unit also passes ``virtlockd-admin.socket``.
:func:`take_activation` picks the one bound to the agent's ``--socket`` path; the agent then
neither creates nor removes the socket, and connections made while one agent hands over to the
next wait in its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

from .lockapi import PeerCredentials

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")
SD_LISTEN_FDS_START = 3
"""The first file descriptor a service manager passes (``sd_listen_fds(3)``)."""


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


@dataclass
class Activation:
    """The sockets a service manager passed: ``lockd`` is the one to serve, ``others`` the rest
    (virtlockd's admin socket), each with the name it was passed under."""

    lockd: socket.socket
    others: list[tuple[str, socket.socket]] = field(default_factory=list)


def take_activation(path: str | os.PathLike[str], environ: MutableMapping[str, str] | None = None) -> Activation | None:
    """The listening sockets passed to this process, or None when none were.

    ``LISTEN_PID`` must name this process (otherwise the variables were meant for another one and
    are ignored).  The variables are removed from ``environ`` (default ``os.environ``) either way,
    so that no child process (the guard) takes them for its own.  Raises AgentSetupError when
    sockets were passed but none is a listening UNIX stream socket bound to ``path``."""
    env = os.environ if environ is None else environ
    pid, count, names = (env.pop(k, None) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
    if pid is None or count is None or not pid.isdigit() or int(pid) != os.getpid():
        return None
    if not count.isdigit() or int(count) < 1:
        raise AgentSetupError(f"the service manager passed LISTEN_FDS={count!r}: expected a count of sockets")
    labels = (names or "").split(":")
    passed: list[tuple[str, socket.socket]] = []
    for i in range(int(count)):
        fd = SD_LISTEN_FDS_START + i
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise AgentSetupError(f"the service manager's file descriptor {fd} is not a socket: {exc}") from None
        os.set_inheritable(fd, False)
        passed.append((labels[i] if i < len(labels) and labels[i] else f"fd {fd}", sock))
    want = os.fspath(path)
    for label, sock in passed:
        if _listening_unix_stream(sock) and sock.getsockname() == want:
            log.info("serving %s passed by the service manager (%s)", want, label)
            return Activation(sock, [(lb, s) for lb, s in passed if s is not sock])
    described = ", ".join(f"{label}: {_describe(sock)}" for label, sock in passed)
    for _, sock in passed:
        sock.close()
    raise AgentSetupError(f"the service manager passed {len(passed)} socket(s) and none listens on {want} "
                          f"({described}); make --socket name the socket unit's ListenStream=")


def _listening_unix_stream(sock: socket.socket) -> bool:
    return (sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1)


def _describe(sock: socket.socket) -> str:
    try:
        where = sock.getsockname()
    except OSError:
        where = "?"
    kind = "listening" if _listening_unix_stream(sock) else "not a listening UNIX stream socket"
    return f"{where or '(unnamed)'} {kind}"
