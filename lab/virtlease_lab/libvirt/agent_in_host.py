"""Start ``virtlease-agent`` inside a rig host, reaching the test's etcd members through relays or directly.

Usage: ``agent_in_host.py LINKS [--exec N PROGRAM ARG...] AGENT_ARGS...``.  ``LINKS`` is
``PATH@PORT[,PATH@PORT...]``: relay each ``127.0.0.1:PORT`` (in this network namespace) to the
UNIX socket ``PATH`` (served by the test in the root namespace, see ``virtlease_lab.relay``); or
``netns=FILE``: no relays, the agent joins the network namespace ``FILE`` (the test's) and dials
the members itself, as a real host's agent does.  Then it runs the agent with ``AGENT_ARGS``:
in this process (the agent of this checkout), or, with ``--exec``, by exec'ing the ``N`` words
``PROGRAM ARG...`` followed by ``AGENT_ARGS`` (another agent, e.g. an installed package's).
Either way the agent keeps this process's pid (the rig's ``lockdaemon.pid``) and the relays run
in a child that dies with it (``PR_SET_PDEATHSIG``), so that a restarted agent brings its own and
the agent's process runs nothing a real host's would (no relay threads taking its interpreter's
lock while it serves libvirt: the benchmarks time the agent, not the rig).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from virtlease_lab.relay import Relay

PR_SET_PDEATHSIG = 1
CLONE_NEWNET = 0x40000000


def join_netns(path: str) -> None:
    """Move this process into the network namespace ``path`` (setns(2); os.setns is 3.12+)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def start_relays(links: str) -> None:
    for spec in links.split(","):
        path, _, port = spec.rpartition("@")
        Relay.tcp_to_unix(int(port), path)


def fork_relays(links: str) -> None:
    """Fork the relays into a child bound to this process's life; return once they listen."""
    parent = os.getpid()
    ready_r, ready_w = os.pipe()
    if os.fork() == 0:
        os.close(ready_r)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the agent is already gone
            os._exit(0)
        start_relays(links)
        os.write(ready_w, b"1")
        os.close(ready_w)
        while True:
            signal.pause()
    os.close(ready_w)
    if os.read(ready_r, 1) != b"1":
        sys.exit("agent_in_host.py: the relays did not start")
    os.close(ready_r)


if __name__ == "__main__":
    links, rest = sys.argv[1], sys.argv[2:]
    if links.startswith("netns="):
        join_netns(links.removeprefix("netns="))
    else:
        fork_relays(links)
    if rest[:1] == ["--exec"]:
        count = int(rest[1])
        argv = rest[2:2 + count] + rest[2 + count:]
        os.execvp(argv[0], argv)
    from virtlease_etcd.agent.command import main  # not before --exec: a restart must be quick

    sys.exit(main(rest))
