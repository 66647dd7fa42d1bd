"""Which domains hold leases through an agent on this host, read from the agents' state files.

``python -m virtlease_etcd.agent.holding [--state-dir DIR]`` prints one line per domain whose
QEMU still runs and that an agent's state file (``runfile``) lists as an owner, and exits 1 when
there is any, 0 when there is none (2 when the directory cannot be read).  The package's prerm
runs it to refuse a removal that would leave running VMs without their agent, and
``switch-from-virtlockd --back`` to refuse switching such a host back.  With ``--agents`` it
prints the pid of each running agent the state files name instead (the maintainer scripts
signal them when no systemd runs).

A caller may rely on: only local files are read (it answers with etcd unreachable and with no
agent running: a crashed agent's guard still protects the domains its file lists); an owner
counts only while a process with its pid *and* its start time runs (a reused pid is not a VM);
an unreadable state file counts as holding (refuse rather than guess).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from virtlease_etcd.session.guard import start_time

from .runfile import DEFAULT_STATE_DIR, load

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Holding:
    """One domain still running with leases through an agent (``state_file`` names which)."""

    name: str
    uuid: str
    pid: int
    host: str
    state_file: Path

    def __str__(self) -> str:
        return f"domain {self.name} ({self.uuid}) pid {self.pid} on host {self.host}"


class UnreadableState(RuntimeError):
    """A state file exists but cannot be read: what it protects is unknown."""


def holding(state_dir: str | Path = DEFAULT_STATE_DIR) -> list[Holding]:
    """The running domains every state file in ``state_dir`` lists; UnreadableState if a file
    cannot be read (a missing directory is no agent: an empty list)."""
    directory = Path(state_dir)
    if not directory.exists():
        return []
    found: list[Holding] = []
    for path in sorted(directory.glob("agent-*.json")):
        state = load(path)
        if state is None:
            raise UnreadableState(f"cannot read the agent state file {path}; see the agent's log")
        found += [Holding(o.name, o.uuid, o.pid, state.host, path)
                  for o in state.owners if start_time(o.pid) == o.start]
    return found


def agents(state_dir: str | Path = DEFAULT_STATE_DIR) -> list[int]:
    """The pids of the running agents the state files in ``state_dir`` name (a pid counts only
    while its command line is virtlease's); unreadable files are skipped."""
    pids = []
    for path in sorted(Path(state_dir).glob("agent-*.json")):
        state = load(path)
        if state is None:
            continue
        try:
            cmdline = Path(f"/proc/{state.agent_pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"virtlease" in cmdline:
            pids.append(state.agent_pid)
    return pids


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtlease_etcd.agent.holding",
                                     description="List the domains holding leases through an agent here.")
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    parser.add_argument("--agents", action="store_true", help="print the running agents' pids instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.agents:
        print(*agents(args.state_dir))
        return 0
    try:
        found = holding(args.state_dir)
    except (UnreadableState, OSError) as exc:
        print(f"virtlease: {exc}", file=sys.stderr)
        return 2
    for h in found:
        print(h)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
