"""A stand-in QEMU: a child that opens its lock connection, REGISTERs (its own pid) + RESTRICTs,
then execs ``sleep`` with the connection inherited -- as libvirt's forked child does before it
execs QEMU.  Its connection is the owner's lifeline, its pid the owner pid.

The parent side is :class:`StandinQemu`; the child is this module run as
``python -m virtlease_lab.standin SOCKET UUID NAME [close|stubborn]``: it prints "ready" once
restricted, then becomes ``sleep`` (the fd stays open for the process's life); with ``close`` it
becomes a shell that closes the connection, then sleeps (a QEMU that lost its lock connection
while it runs); with ``stubborn`` it stays this Python process, ignores SIGTERM and closes the
connection when sent SIGUSR1 (a QEMU that loses it later and does not stop when asked).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from virtlease_etcd.agent.lockdclient import LockdClient, make_owner
from virtlease_etcd.agent.protocol import LockdOwner


class StandinQemu:
    """A running stand-in QEMU registered on ``socket`` as domain ``name``."""

    def __init__(self, socket: Path, name: str, owner_uuid: str | None = None, *, close: bool = False,
                 stubborn: bool = False) -> None:
        """``close``: it closes the lifeline right after starting; ``stubborn``: it ignores SIGTERM
        and closes the lifeline when sent SIGUSR1."""
        self.uuid = owner_uuid or str(uuid.uuid4())
        self.name = name
        mode = ["close"] if close else ["stubborn"] if stubborn else []
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", __name__, str(socket), self.uuid, name, *mode],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"stand-in QEMU failed to register: {line!r}")
        self.pid = self.proc.pid

    def owner(self, owner_id: int = 1) -> LockdOwner:
        """The LockdOwner it registered as."""
        return make_owner(self.name, owner_id=owner_id, pid=self.pid, owner_uuid=uuid.UUID(self.uuid))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc.poll() is None


def main(argv: list[str]) -> None:
    """The child: register, restrict, exec."""
    path, owner_uuid, name = argv[1:4]
    client = LockdClient(path)
    client.register(make_owner(name, pid=os.getpid(), owner_uuid=uuid.UUID(owner_uuid)))
    client.restrict()
    if argv[4:5] == ["stubborn"]:  # no exec: this process ignores SIGTERM, drops the lifeline on SIGUSR1
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
    if argv[4:5] == ["close"]:
        os.execvp("sh", ["sh", "-c", "exec 3>&-; exec sleep 600"])
    os.execvp("sleep", ["sleep", "600"])


if __name__ == "__main__":
    main(sys.argv)
