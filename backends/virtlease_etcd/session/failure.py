"""Failure actions: what happens to a VM's process when its locks are lost.

libvirt's ``<on_lockfailure>``: poweroff kills the process (SIGKILL), pause
stops it (SIGSTOP), restart kills it and asks the caller's callback to start
it again, ignore only logs.  They run from the session's fence thread, before
etcd can expire the lease.

See docs/DESIGN.md §5 (The safety model).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from virtlease.abi import FailureAction, ObjectSpec

log = logging.getLogger(__name__)


GUARD_SIGNALS = {FailureAction.POWEROFF: signal.SIGKILL, FailureAction.RESTART: signal.SIGKILL,
                 FailureAction.PAUSE: signal.SIGSTOP}
"""What the guard (``guard``) sends an owner, by its failure action (IGNORE: not guarded)."""


def resolve(action: FailureAction, default: FailureAction) -> FailureAction:
    return default if action is FailureAction.DEFAULT else action


def run_failure_action(action: FailureAction, spec: ObjectSpec, *, reason: str,
                       restart: Callable[[Any], None] | None = None) -> None:
    """Carry out ``action`` (already resolved from DEFAULT) on ``spec.pid``."""
    who = f"domain {spec.name} ({spec.uuid}) pid {spec.pid}"
    if action is FailureAction.IGNORE:
        log.error("locks lost (%s); on_lockfailure=ignore: %s keeps running", reason, who)
        return
    if spec.pid is None:
        log.error("locks lost (%s); %s has no pid to %s", reason, who, action.name.lower())
        return
    sig = signal.SIGSTOP if action is FailureAction.PAUSE else signal.SIGKILL
    try:
        os.kill(spec.pid, sig)
        log.error("locks lost (%s); sent %s to %s", reason, sig.name, who)
    except ProcessLookupError:
        log.warning("locks lost (%s); %s already gone", reason, who)
    except PermissionError:
        log.error("locks lost (%s); not permitted to signal %s", reason, who)
    if action is FailureAction.RESTART and restart is not None:
        try:
            restart(spec)
        except Exception:
            log.exception("restart callback failed for %s", who)
