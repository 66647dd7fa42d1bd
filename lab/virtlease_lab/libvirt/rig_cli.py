"""Drive the two-host libvirt rig by hand.

    python -m virtlease_lab.libvirt.rig_cli [--workdir DIR] [--lock-daemon CMD] up
    python -m virtlease_lab.libvirt.rig_cli [--workdir DIR] status
    python -m virtlease_lab.libvirt.rig_cli [--workdir DIR] virsh A|B ARGS...
    python -m virtlease_lab.libvirt.rig_cli [--workdir DIR] down

``--lock-daemon`` is ``virtlockd`` (default) or a command line (one string,
split like a shell would) with ``{host}``, ``{socket}``, ``{ip}``... placeholders.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from virtlease_lab.libvirt.rig import Rig, RigError

DEFAULT_WORKDIR = Path("/tmp/virtlease-libvirt-rig")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one rig command; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--lock-daemon", default="virtlockd")
    ap.add_argument("command", choices=["up", "down", "status", "virsh"])
    ap.add_argument("args", nargs=argparse.REMAINDER)
    ns = ap.parse_args(argv)
    lock = ns.lock_daemon if ns.lock_daemon == "virtlockd" else shlex.split(ns.lock_daemon)
    r = Rig(ns.workdir, lock_daemon=lock)
    try:
        if ns.command == "up":
            print(f"both hosts up in {r.up():.2f} s (workdir {r.workdir})")
        elif ns.command == "down":
            r.down()
            print("down: nothing left behind, /etc/libvirt unchanged")
        elif ns.command == "status":
            print(json.dumps(r.status(), indent=1))
        else:
            if not ns.args or ns.args[0] not in r.hosts:
                ap.error("virsh needs a host (A or B) and virsh arguments")
            cp = r.virsh(ns.args[0], *ns.args[1:], check=False)
            sys.stdout.write(cp.stdout)
            sys.stderr.write(cp.stderr)
            return cp.returncode
    except RigError as e:
        print(f"rig: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
