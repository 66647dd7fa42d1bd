"""The guard process on its own (docs/DESIGN.md section 9, "Guard"): the real guard script,
spawned as the agent and ``virtlease hold`` spawn it, guarding real processes.  The agent side
is simulated only by what it writes to the guard's stdin: an arming message, then either
silence (a frozen agent) or end of file (a dead agent).

The rules: a dead agent's guard signals its owners at the fence deadline; a frozen agent's
guard waits ``grace`` longer; a pid whose start time differs (reused) is never signalled, nor an
owner the agent stopped listing; SIGTERM, SIGINT and SIGHUP do not stop it; SIGUSR1 (a new
agent took over) ends it without signalling anyone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from virtlease_etcd.clock import SYSTEM
from virtlease_etcd.devtools.hostprocess import process_state
from virtlease_etcd.session.guard import Guard, start_time


class Owner:
    """A stand-in VM: a ``sleep`` whose exit time a thread records (monotonic)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["sleep", "60"])
        self.pid = self.proc.pid
        start = start_time(self.pid)
        assert start is not None
        self.start = start
        self.died_at: float | None = None
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        self.proc.wait()
        self.died_at = time.monotonic()

    def entry(self, sig: int = signal.SIGKILL, *, start: int | None = None) -> dict[str, object]:
        return {"pid": self.pid, "start": self.start if start is None else start, "sig": int(sig),
                "who": f"owner {self.pid}"}

    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture
def owners() -> Iterator[Callable[[], Owner]]:
    made: list[Owner] = []

    def make() -> Owner:
        o = Owner()
        made.append(o)
        return o

    yield make
    for o in made:
        if o.alive():
            o.proc.kill()
            o.proc.wait()


@pytest.fixture
def guards() -> Iterator[Callable[[], Guard]]:
    made: list[Guard] = []

    def make() -> Guard:
        g = Guard.spawn(SYSTEM.clock_id)
        made.append(g)
        return g

    yield make
    for g in made:
        if g.proc.poll() is None:
            g.proc.kill()
        g.proc.wait()


def wait_dead(owner: Owner, limit: float) -> float:
    until = time.monotonic() + limit
    while owner.died_at is None:
        assert time.monotonic() < until, f"owner {owner.pid} still runs"
        time.sleep(0.01)
    return owner.died_at


def test_a_dead_agents_guard_fires_at_the_fence_deadline(guards: Callable[[], Guard],
                                                          owners: Callable[[], Owner]) -> None:
    """Agent gone (stdin closed): the deadline is ``fence_at`` itself, not ``fence_at + grace``
    (the grace is for a frozen agent whose own fence thread might still run)."""
    guard, vm = guards(), owners()
    fence_at, grace = time.monotonic() + 1.0, 3.0
    guard.send(fence_at, grace, [vm.entry()])
    guard.abandon()
    died = wait_dead(vm, 1.0 + grace + 3)
    assert died >= fence_at - 0.05, "signalled before the fence deadline"
    assert died < fence_at + grace / 2, f"signalled {died - fence_at:.2f}s after the fence deadline"
    assert vm.proc.returncode == -signal.SIGKILL
    assert guard.proc.wait(5) == 0


def test_a_frozen_agents_guard_waits_the_grace_then_fires(guards: Callable[[], Guard],
                                                         owners: Callable[[], Owner]) -> None:
    """Agent alive but silent: the guard waits ``grace`` more (still before the lease can expire)."""
    guard, vm = guards(), owners()
    fence_at, grace = time.monotonic() + 0.5, 1.0
    guard.send(fence_at, grace, [vm.entry()])
    died = wait_dead(vm, 0.5 + grace + 3)
    assert died >= fence_at + grace - 0.05, "a live agent's guard fired before the grace ran out"
    assert vm.proc.returncode == -signal.SIGKILL


def test_the_guard_signals_only_the_owners_it_was_last_given_by_pid_and_start_time(
        guards: Callable[[], Guard], owners: Callable[[], Owner]) -> None:
    """A pid whose start time differs is another process (reused pid): never signalled.  An owner
    the agent stopped listing (it released everything) is not signalled either; a paused owner's
    signal is SIGSTOP."""
    guard = guards()
    killed, paused, dropped, reused = owners(), owners(), owners(), owners()
    fence_at = time.monotonic() + 1.0
    guard.send(fence_at, 0.5, [killed.entry(), paused.entry(signal.SIGSTOP), dropped.entry(),
                               reused.entry(start=reused.start + 1)])
    guard.send(fence_at, 0.5, [killed.entry(), paused.entry(signal.SIGSTOP), reused.entry(start=reused.start + 1)])
    guard.abandon()
    wait_dead(killed, 5)
    assert guard.proc.wait(5) == 0  # it exits right after firing
    assert process_state(paused.pid) == "T"
    assert dropped.alive() and process_state(dropped.pid) != "T", "an owner no longer listed was signalled"
    assert reused.alive() and process_state(reused.pid) != "T", "a pid with another start time was signalled"


def test_sigterm_sigint_and_sighup_do_not_stop_the_guard_but_sigusr1_does(
        guards: Callable[[], Guard], owners: Callable[[], Owner]) -> None:
    firing, standing_down = guards(), guards()
    a, b = owners(), owners()
    fence_at = time.monotonic() + 1.5
    firing.send(fence_at, 0.0, [a.entry()])
    standing_down.send(fence_at, 0.0, [b.entry()])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        os.kill(firing.pid, sig)
    os.kill(standing_down.pid, signal.SIGUSR1)
    assert standing_down.proc.wait(5) == 0
    time.sleep(0.3)
    assert firing.proc.poll() is None, "a stop signal ended the guard while its owners run"
    wait_dead(a, 5)
    assert a.died_at is not None and a.died_at >= fence_at - 0.05
    assert b.alive(), "a guard told to stand down signalled its owner"
