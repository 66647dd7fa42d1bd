"""Start ``virtlease-agent`` inside a rig host with relays to the test's etcd members.

Usage: ``agent_in_host.py PATH@PORT[,PATH@PORT...] AGENT_ARGS...``: relays each
``127.0.0.1:PORT`` (in this network namespace) to the UNIX socket ``PATH`` (served by the test
in the root namespace, see ``virtlease_lab.relay``), then runs the agent in this process with
``AGENT_ARGS``.
"""

from __future__ import annotations

import sys

from virtlease_etcd.agent.command import main
from virtlease_lab.relay import Relay

if __name__ == "__main__":
    for spec in sys.argv[1].split(","):
        path, _, port = spec.rpartition("@")
        Relay.tcp_to_unix(int(port), path)
    sys.exit(main(sys.argv[2:]))
