"""gRPC's own logging: silent unless debugging was asked for.

gRPC's C core writes its log lines (a failed TLS handshake, "Invalid private key", reconnect
noise) straight to file descriptor 2, in its own format and from its own threads, dozens of
lines per failure.  They would reach a user's terminal and the agent's log around the one line
virtlease prints about the same failure.  The core reads ``GRPC_VERBOSITY`` once, when ``grpc``
is first imported, so this module runs before that: ``virtlease_etcd/__init__`` imports it
first, and every module of the package is imported through the package.

What a caller may rely on:

* ``GRPC_VERBOSITY`` or ``GRPC_TRACE`` set by the operator: left as they are (asked for);
* ``VIRTLEASE_DEBUG=1`` (``virtlease --debug`` sets it): gRPC's default logging;
* otherwise ``GRPC_VERBOSITY=NONE`` is put in the process environment, so the processes this
  one starts (the demo's hosts, the agent's guard) are quiet too.

A program that imported ``grpc`` before virtlease keeps the logging it had (``TOO_LATE``).
See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

DEBUG_ENV = "VIRTLEASE_DEBUG"
"""``1`` (or ``true``/``yes``/``on``): debugging asked for; ``virtlease --debug`` sets it."""


def debug_requested(environ: MutableMapping[str, str] | None = None) -> bool:
    """True when ``VIRTLEASE_DEBUG`` asks for debugging."""
    env = os.environ if environ is None else environ
    return env.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


_MARK = "VIRTLEASE_GRPC_QUIETED"
"""Set next to ``GRPC_VERBOSITY`` when virtlease (here or in a parent process) chose it, so a
child asked to debug can tell it from the operator's own choice."""


def quiet_grpc(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set ``GRPC_VERBOSITY=NONE`` unless the operator chose gRPC's logging or asked for
    debugging; True if it was set."""
    env = os.environ if environ is None else environ
    ours = _MARK in env and env.get("GRPC_VERBOSITY") == env[_MARK]
    if debug_requested(env):
        if ours:  # a quiet parent started this debugging child: gRPC's default again
            del env["GRPC_VERBOSITY"], env[_MARK]
        return False
    if ("GRPC_VERBOSITY" in env and not ours) or "GRPC_TRACE" in env:
        return False
    env["GRPC_VERBOSITY"] = env[_MARK] = "NONE"
    return True


TOO_LATE = "grpc" in sys.modules
"""gRPC was imported before this module: its logging is whatever it was then."""
quiet_grpc()
