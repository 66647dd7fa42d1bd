"""A VM of a nemesis host: a real ``sleep`` child, whose pid is the one the driver
fences (``FailureAction.POWEROFF`` kills it), and a thread that records its death
(the event ``vm_dead``, with the time it was observed: never early).

Both kinds of VM the hosts run build on it: ``host_worker.Holding`` (a lock object
of the ABI) and ``agent_vm.AgentVM`` (the agent's per-disk lockd path).
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable

from virtlease_etcd.clock import SYSTEM

mono = SYSTEM.now


def spawn() -> subprocess.Popen[bytes]:
    """The "QEMU": a child that runs until it is killed."""
    return subprocess.Popen(["sleep", "100000"], stdin=subprocess.DEVNULL)


class VmProcess:
    """A VM process of domain ``uuid`` and its observed death (``dead``, ``dead_at``)."""

    def __init__(self, uuid: str, vm: subprocess.Popen[bytes], ev: Callable[..., None]) -> None:
        self.uuid = uuid
        self.vm = vm
        self.dead = threading.Event()
        self.dead_at = 0.0
        self._record = ev
        threading.Thread(target=self._wait_vm, daemon=True).start()

    def _wait_vm(self) -> None:
        self.vm.wait()
        self.dead_at = mono()
        self.dead.set()
        self._record("vm_dead", obj=self.uuid, pid=self.vm.pid, t=self.dead_at)

    def ended(self, reason: str, t: float | None = None) -> tuple[float, str]:
        """When and why a write interval of this VM ends: at ``t`` (default now) for
        ``reason``, or at its death if it died before (a dead VM writes nothing)."""
        t = t or mono()
        if self.dead.is_set() and self.dead_at < t:
            return self.dead_at, f"vm_dead (then {reason})"
        return t, reason

    def kill_vm(self) -> None:
        """Kill the VM (if it still runs) and wait until its death is recorded."""
        if self.vm.poll() is None:
            try:
                self.vm.kill()
            except ProcessLookupError:
                pass
        self.dead.wait(5)
