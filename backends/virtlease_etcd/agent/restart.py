"""Crash and restart safety: the agent never leaves a QEMU running without a lease.

Three pieces, in the order the agent uses them:

1. ``prepare`` (before the driver loads): if a previous agent of this host left a state file,
   continue its etcd session (``reattach.adopt_session``: lease still > fence margin, host key
   ours, one keepalive); the agent loads the driver with it (``adopted_session``), so the driver
   runs *on that lease*.  If it cannot be continued, wait until the old lease is gone (its guard stopped the
   owners before that) and stop any owner still running, then start fresh.
2. ``Continuity.start`` (on the loop, before serving): spawn this agent's guard, re-adopt the
   owners from the records on the lease (``reattach.readopt_owners``) and their QEMUs by pid and
   start time (pidfd from then on; no lifeline, since the old connections died with the old agent),
   arm the guard, write the state file, and only then tell the previous guard to stand down.
3. ``Continuity.run``: re-arm the guard whenever the fence deadline moves (every keepalive) and
   on every owner change (before the ACQUIRE reply, so the guard knows a QEMU before it can
   start); rewrite the state file when the owners change.

``handover`` (SIGUSR2: upgrade) leaves the lease unrevoked and the guard armed, so the next agent
can take over before the fence deadline; ``leave`` (the agent exits) does the same while owners
hold anything, and otherwise disarms the guard and removes the state file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from virtlease.abi import FailureAction
from virtlease_etcd.config import EtcdConfig
from virtlease_etcd.driver import EtcdDriver
from virtlease_etcd.etcd.client import EtcdClient
from virtlease_etcd.session import reattach
from virtlease_etcd.session.failure import GUARD_SIGNALS
from virtlease_etcd.session.guard import Guard, stand_down, start_time
from virtlease_etcd.session.hostsession import HostSession
from virtlease_etcd.session.storagefence import remember_fenced

from . import runfile as sf
from .backend import EtcdLockBackend

log = logging.getLogger(__name__)


@dataclass
class Prior:
    """What a previous agent left, and its session if it was continued."""

    state: sf.AgentState
    session: HostSession | None
    """The previous agent's session, continued: load the driver with it (``adopted_session``)."""

    @property
    def adopted(self) -> bool:
        return self.session is not None


def prepare(cfg: EtcdConfig, state_dir: str) -> Prior | None:
    """Step 1 (see the module docstring).  Returns None when there was no previous agent."""
    sf.ensure_dir(state_dir)
    path = sf.state_path(state_dir, cfg.host_id)
    prior = sf.load(path)
    if prior is None:
        return None
    if prior.host != cfg.host_id or prior.prefix != cfg.prefix:
        log.warning("state file %s is for host %s prefix %s, not %s %s: ignored", path, prior.host,
                    prior.prefix, cfg.host_id, cfg.prefix)
        return None
    try:
        adopted = reattach.adopt_session(cfg, prior.lease, prior.session)
    except reattach.CannotReattach as exc:
        fates = wait_out(cfg, prior)
        log.error("cannot continue the previous agent's session (lease %x, agent pid %d): %s; %s; starting a "
                  "new session", prior.lease, prior.agent_pid, exc,
                  ("its domains: " + "; ".join(fates)) if fates else "it held no domain")
        return Prior(prior, session=None)
    return Prior(prior, session=adopted.session)


def wait_out(cfg: EtcdConfig, prior: sf.AgentState) -> list[str]:
    """The previous session cannot be continued: wait (at most a TTL) until its lease is gone,
    then stop every owner of it still running -- it runs without a lease.  Returns what became
    of each owner, one phrase each (for the log line)."""
    client = EtcdClient(cfg)
    try:
        until = client.clock.now() + cfg.ttl + 1
        while client.clock.now() < until:
            try:
                if client.lease_ttl(prior.lease, timeout=cfg.request_timeout) < 0:
                    break
            except Exception as exc:
                log.warning("cannot read the previous lease %x (%s); waiting out its TTL", prior.lease, exc)
            client.clock.sleep(0.2)
    finally:
        client.close()
    fates = []
    for o in prior.owners:
        who = f"domain {o.name} ({o.uuid}) QEMU pid {o.pid}"
        if start_time(o.pid) == o.start:  # no new reservation key of this host while it runs
            remember_fenced(o.pid, f"domain {o.name} ({o.uuid}) of the previous agent")
        sig = GUARD_SIGNALS.get(FailureAction[o.action.upper()])
        if start_time(o.pid) != o.start:
            fates.append(f"{who} has exited (fenced by the previous agent's guard at the fence deadline, "
                         "or stopped before)")
        elif sig is None:
            fates.append(f"{who} still runs, without a lease (failure action {o.action}: left running)")
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(o.pid, sig)
            fates.append(f"{who} still ran after its lease ended: sent {sig.name} (failure action {o.action})")
    return fates


class Continuity:
    """Guard and state file of one running agent (steps 2 and 3)."""

    def __init__(self, backend: EtcdLockBackend, state_dir: str, *, poll: float = 0.1) -> None:
        self.backend = backend
        self.driver: EtcdDriver = backend.driver
        self.path = sf.state_path(state_dir, self.driver.host_id)
        self.poll = poll
        self.guard: Guard | None = None
        self._saved: tuple[int, str, list[sf.OwnerEntry]] | None = None
        """The lease, session and owners last written to the state file."""
        self._task: asyncio.Task[None] | None = None

    async def start(self, prior: Prior | None) -> None:
        self.guard = Guard.spawn(self.driver.session.clock.clock_id, log_lines=True)
        self.backend.on_change = self.push
        if prior is not None and prior.adopted:
            await self._readopt(prior.state)
        self.push()
        if prior is not None and prior.state.guard:
            stand_down(prior.state.guard.get("pid", 0), prior.state.guard.get("start", 0))
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def _readopt(self, prior: sf.AgentState) -> None:
        session = self.driver.session
        entries = {o.uuid: o for o in prior.owners}
        actions = {u: FailureAction[o.action.upper()] for u, o in entries.items()}
        owners = await asyncio.get_running_loop().run_in_executor(
            None, reattach.readopt_owners, session, self.driver.policy, actions)
        for owner in owners:
            e = entries.get(owner.uuid)
            pid, start = (e.pid, e.start) if e is not None else (owner.pid, None)
            if e is not None:
                owner.pid = e.pid
            await self.backend.adopt_running(owner.uuid, owner.name, pid, start)

    def snapshot(self) -> list[sf.OwnerEntry]:
        """Every tracked, running QEMU, with its failure action."""
        session = self.driver.session
        out = []
        for t in self.backend.owners():
            owner = session.owners.peek(t.uuid)
            action = owner.action if owner is not None else self.driver.policy.resolve(FailureAction.DEFAULT)
            out.append(sf.OwnerEntry(t.uuid, t.name, t.pid, t.start, action.name.lower()))
        return out

    def guarded(self, entries: list[sf.OwnerEntry]) -> list[dict[str, Any]]:
        """The owners the guard must stop: those holding anything on the live lease.  None once
        the session is lost: the agent's fence already acted on its owners, and a QEMU started
        since (before its ACQUIRE opens a new session) holds nothing a guard could protect."""
        session = self.driver.session
        if session.lost is not None:
            return []
        out = []
        for e in entries:
            owner = session.owners.peek(e.uuid)
            sig = GUARD_SIGNALS.get(FailureAction[e.action.upper()])
            if owner is not None and owner.active and sig is not None:
                out.append({"pid": e.pid, "start": e.start, "sig": int(sig), "who": f"domain {e.name} ({e.uuid})"})
        return out

    def push(self) -> None:
        """Re-arm the guard and, if the owners changed, rewrite the state file."""
        entries = self.snapshot()
        session = self.driver.session
        guarded = self.guarded(entries)
        fence_at = session.fence_at if guarded else None  # nothing to guard: no deadline to fire at
        if self.guard is not None:
            try:
                if self.guard.proc.poll() is not None:
                    raise OSError(f"exited with {self.guard.proc.returncode}")
                self.guard.send(fence_at, session.cfg.margin / 2, guarded)
            except (OSError, ValueError) as exc:
                log.error("the guard process (pid %d) is gone (%s); starting a new one", self.guard.pid, exc)
                self.guard = Guard.spawn(session.clock.clock_id, log_lines=True)
                self.guard.send(fence_at, session.cfg.margin / 2, guarded)
                self._saved = None
        saved = (session.lease_id, session.session_id, entries)
        if saved != self._saved:  # the owners changed, or a lost session was renewed
            guard = {"pid": self.guard.pid, "start": self.guard.start} if self.guard is not None else {}
            sf.save(self.path, sf.AgentState(self.driver.host_id, session.cfg.prefix, session.lease_id,
                                             session.session_id, os.getpid(), guard, entries))
            self._saved = saved

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            try:
                self.push()
            except Exception:
                log.exception("cannot update the guard / state file")

    def _stop_task(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def handover(self) -> None:
        """Leave for a successor: the lease renewed once more (so the successor has a whole
        ``ttl - margin`` to re-attach, not what is left of the keepalive's rhythm), the state
        file written, the guard armed with that deadline and on its own."""
        self._stop_task()
        self.driver.session.refresh()
        self.push()
        if self.guard is not None:
            self.guard.abandon()
        log.warning("handing over: lease %x stays, the guard stops %d owner(s) at the fence deadline "
                    "(%.1fs from now) unless a new agent takes over", self.driver.session.lease_id,
                    len(self._saved[2] if self._saved else []),
                    self.driver.session.fence_at - self.driver.session.clock.now())

    def leave(self, *, busy: bool) -> None:
        """The agent exits: with owners still holding, as a handover (guard armed); otherwise
        disarm the guard and remove the state file."""
        if busy:
            self.handover()
            return
        self._stop_task()
        if self.guard is not None:
            self.guard.disarm()
        sf.remove(self.path)
