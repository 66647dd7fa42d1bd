"""A minimal per-host "init" for the libvirt rig.

Usage: ``python subreaper.py PIDFILE CMD [ARG...]``

It marks itself a child subreaper (``PR_SET_CHILD_SUBREAPER``), writes its pid
to PIDFILE, runs CMD (the host's start script, which daemonizes libvirtd and
friends) and then reaps every process that ends up orphaned below it the
moment it exits (blocking ``waitpid(-1)``).  Without it orphans (daemonized
QEMUs, daemons) would go to the machine's PID 1, which may reap them late, and
libvirtd/virtlockd wait for that in ``kill(pid, 0)`` polling loops.

It goes on reaping even when CMD fails (what CMD started before failing stays
in the host's namespaces for the rig to find and stop); it exits, with CMD's
status, when it has no child left, or on SIGTERM (default action).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str]) -> int:
    """Become a subreaper, run the start command, then reap until no child is left."""
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("subreaper: prctl(PR_SET_CHILD_SUBREAPER) failed", file=sys.stderr)
        return 1
    with open(argv[1], "w") as f:
        f.write(f"{os.getpid()}\n")
    rc = subprocess.call(argv[2:])
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
