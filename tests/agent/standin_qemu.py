"""A stand-in QEMU: open the lock connection, REGISTER (own pid) + RESTRICT, exec sleep.

Usage: standin_qemu.py SOCKET UUID NAME [close|stubborn].  Prints "ready" once restricted, then
becomes ``sleep`` with the connection inherited (the fd stays open for the process's life); with
``close`` it becomes a shell that closes the connection, then sleeps (a QEMU that lost its
lock connection while it runs); with ``stubborn`` it ignores SIGTERM and closes the
connection when sent SIGUSR1 (a QEMU that loses it later and does not stop when asked); it
stays this Python process."""

from __future__ import annotations

import os
import signal
import sys
import uuid

from virtlease_etcd.agent.lockdclient import LockdClient, make_owner


def main() -> None:
    """Register, restrict, exec."""
    path, owner_uuid, name = sys.argv[1:4]
    client = LockdClient(path)
    client.register(make_owner(name, pid=os.getpid(), owner_uuid=uuid.UUID(owner_uuid)))
    client.restrict()
    if sys.argv[4:5] == ["stubborn"]:  # no exec: this process ignores SIGTERM, drops the lifeline on SIGUSR1
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, lambda _sig, _frame: client.sock.close())
        print("ready", flush=True)
        while True:
            signal.pause()
    if client.sock.fileno() == 3:
        os.set_inheritable(3, True)
    else:
        os.dup2(client.sock.fileno(), 3)  # inheritable
    print("ready", flush=True)
    if sys.argv[4:5] == ["close"]:
        os.execvp("sh", ["sh", "-c", "exec 3>&-; exec sleep 600"])
    os.execvp("sleep", ["sleep", "600"])


if __name__ == "__main__":
    main()
