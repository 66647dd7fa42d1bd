"""Fencing: stop an owner's VM when the host's lease can no longer be trusted.

A fence must happen before anyone else can be granted the owner's disks
(docs/DESIGN.md §5, rule 2): the session calls ``fence`` for every owner the moment
it declares itself lost, before listeners run.  The ``RevocationGate``
records what fencing left behind, so that the session revokes its lease early
(freeing the disks before the TTL) only once every killed VM has exited, and
never when a fenced VM was paused or ignored and could still write.
"""

from __future__ import annotations

import threading

from virtlease.abi import FailureAction, ObjectSpec, ObjectType

from .failure import run_failure_action
from .owners import Owner
from .storagefence import remember_fenced


class RevocationGate:
    """When a fenced session may revoke its lease ahead of the expiry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pids: set[int] = set()
        self._never = False

    def hold(self, pid: int | None) -> None:
        """The lease may be revoked early only once ``pid`` has exited;
        ``None`` means never revoke early (a paused or ignored VM still runs,
        and its writes could still land)."""
        with self._lock:
            if pid is None:
                self._never = True
            else:
                self._pids.add(pid)

    def blocked(self) -> bool | None:
        """``None``: never revoke early; ``True``: a killed VM still runs;
        ``False``: every killed VM has exited."""
        with self._lock:
            if self._never:
                return None
            pids = set(self._pids)
        return any(pid_alive(pid) for pid in pids)


def fence(owner: Owner, reason: str, gate: RevocationGate) -> None:
    """Run the owner's failure action if it has anything on our lease.
    Never waits for the owner's lock: a call in flight may hold it."""
    if not owner.active or owner.fenced is not None:
        return
    owner.fenced = reason
    action = owner.action
    killed = action in (FailureAction.POWEROFF, FailureAction.RESTART) and owner.pid is not None
    gate.hold(owner.pid if killed else None)
    remember_fenced(owner.pid, f"domain {owner.name} ({owner.uuid})")  # no new key while it runs
    spec = ObjectSpec(type=ObjectType.DOMAIN, uuid=owner.uuid, name=owner.name, pid=owner.pid)
    restart = owner.policy.restart_callback if owner.policy is not None else None
    run_failure_action(action, spec, reason=reason, restart=restart)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie has finished
    all its I/O)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:
        return True
