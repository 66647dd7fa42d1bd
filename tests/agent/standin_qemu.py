"""A stand-in QEMU: open the lock connection, REGISTER (own pid) + RESTRICT, exec sleep.

Usage: standin_qemu.py SOCKET UUID NAME.  Prints "ready" once restricted, then becomes
``sleep`` with the connection inherited (the fd stays open for the process's life)."""

from __future__ import annotations

import os
import sys
import uuid

from virtlease_etcd.agent.client import LockdClient, make_owner


def main() -> None:
    """Register, restrict, exec."""
    path, owner_uuid, name = sys.argv[1:4]
    client = LockdClient(path)
    client.register(make_owner(name, pid=os.getpid(), owner_uuid=uuid.UUID(owner_uuid)))
    client.restrict()
    os.set_inheritable(client.sock.fileno(), True)
    print("ready", flush=True)
    os.execvp("sleep", ["sleep", "600"])


if __name__ == "__main__":
    main()
