"""The lockd agent's per-disk path in the nemesis: VMs run the way libvirt runs them
through ``virtlease-agent``, and what they do while they run.

libvirt speaks to the agent one disk at a time, and the agent acts for the domain's
*owner* on the host session (``virtlease_etcd.agent.backend``) through the driver's one
way in for it, ``EtcdDriver.lockd`` (``ops/lockd.py``).  An ``AgentVM`` makes the same
calls on its host's driver, in the order the agent makes them, with a real ``sleep``
child as its QEMU (the owner's pid: the fence kills it):

* ACQUIRE_RESOURCE is ``LockdDomain.acquire`` (a fresh grant, the resume of the owner's
  own reservation, or the claim of a reservation of the same UUID from another host);
* a RELEASE_RESOURCE while the QEMU runs is ``releasable`` (answered from what the host
  knows), then ``release`` (the disk is reserved for the domain UUID; the agent writes it
  in the background, before any later call of the owner), settled when the lock
  connection closes (``settle``: the released disks are freed when the owner still holds
  others, an unplug or a pivot; a pause keeps every disk reserved), retried like the agent
  until etcd answers;
* once the QEMU has exited, ``release_all`` drops everything, after a grace while a
  reservation is left (the agent's ``reserve_grace``).

A VM keeps one write interval *per disk* (a ``grant`` event naming one disk, ``end``
when the VM stops writing it), so the checker sees a disk detached while the others are
still written.  ``life`` runs one VM through its operations, in libvirt's order:

* **start**: ACQUIRE each disk (one refused: libvirt aborts; the QEMU never wrote), then
  the VM writes them all;
* **detach** (``virsh detach-disk``): the device leaves the QEMU first (it stops writing
  the disk), then RELEASE, then the connection closes (settle: the disk is freed);
* **attach** (``virsh attach-disk``): ACQUIRE of a disk it does not have, then the VM
  writes it (refused when busy);
* **pivot** (``blockcopy``/``blockcommit --pivot``): ACQUIRE of the new image, the mirror
  writes both, the QEMU switches to the new one (stops writing the old one), RELEASE and
  settle of the old one;
* **pause** (``virsh suspend``, a managed save): the VM stops writing, every disk is
  RELEASEd on one connection and settled (every disk stays reserved, and the same UUID
  may claim them elsewhere: that is how migration works); then **resume** (ACQUIRE each
  disk again: refused once the reservation was claimed, then the VM exits and never
  writes again) or **exit**;
* **exit**: the VM stops writing and is killed; once it is gone, ``release_all``.

Each operation is published to the run's gossip file (``Gossip.publish_op``, when it
begins and when it ends) so that the twin on the other hosts (``misuse.Twin``) tries
the same UUID while it is in flight.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid as uuidlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import virtlease as v
from virtlease.abi import FailureAction, ResourceSpec
from virtlease_etcd.clock import SYSTEM
from virtlease_etcd.ops.lockd import LockdDomain, lockd_resource

from .vm import VmProcess, spawn

if TYPE_CHECKING:
    from .host_worker import Host

mono = SYSTEM.now
OPS = {"detach": 3, "attach": 2, "pivot": 3, "pause": 2}
"""The operations on a running VM, drawn at random (these weights) between spells of writing."""


def disk_spec(path: str) -> ResourceSpec:
    """A disk as lockd names it in direct mode: its path."""
    return lockd_resource("", path)


class AgentVM(VmProcess):
    """A QEMU whose disks are locked one lockd call at a time for its domain's owner on the
    host session, with one write interval per disk (``writing``)."""

    def __init__(self, host: Host, plugin: v.Plugin, uuid: str, name: str, via: str) -> None:
        proc = spawn()
        drv = plugin.driver
        try:
            self.session = drv.session
            self.lockd: LockdDomain = drv.lockd(uuid, name, proc.pid)
        except v.VirtleaseError:  # the session went away (lost, being replaced)
            proc.kill()
            proc.wait()
            raise
        super().__init__(uuid, proc, host.ev)
        self.names = {os.path.realpath(x): x for x in host.disks + host.images}
        """A disk's readable name (what the driver reports) -> its path."""
        self.host = host
        self.name = name
        self.via = via
        """The grant events' ``via`` is ``<via><operation>``: ``agent:start``, ``misuse:twin/pause``."""
        self.writing: dict[str, tuple[str, int]] = {}
        """Disk -> (write interval id, token) of every disk the VM writes now."""

    def lost(self) -> bool:
        return self.session.lost is not None

    # -- lockd calls ---------------------------------------------------------------------

    def acquire(self, disk: str) -> str:
        """ACQUIRE_RESOURCE: the driver's outcome; a VirtleaseError when refused."""
        return self.lockd.acquire(disk_spec(disk), FailureAction.POWEROFF)

    def held(self) -> dict[str, int]:
        """Disk -> token of what the owner holds now (a reserved disk included)."""
        owner = self.session.owners.peek(self.uuid)
        held = list(owner.held.values()) if owner is not None else []
        return {self.names[h.rid.readable]: h.token for h in held
                if h.rid.legacy_of is None and h.rid.readable in self.names}

    def release(self, disks: list[str], op: str) -> list[str]:
        """RELEASE_RESOURCE of each disk on one lock connection (answered once ``releasable``;
        the reservation follows, before any later call of the owner); returns those reserved."""
        done: list[str] = []
        for disk in disks:
            try:
                if self.lockd.releasable(disk_spec(disk)):
                    self.lockd.release(disk_spec(disk))
            except v.VirtleaseError as exc:
                self.host.ev("agent_release_failed", obj=self.uuid, disk=disk, op=op, error=type(exc).__name__,
                             message=str(exc)[:200])
                continue
            done.append(disk)
        return done

    def settle(self, op: str) -> list[str] | None:
        """The lock connection that released closed: ``settle``, retried as the
        agent does until etcd answers, the session is lost or the QEMU is gone.  Returns the
        disks freed (None if it never settled)."""
        deadline = mono() + 4 * self.session.cfg.ttl
        while not self.lost() and not self.dead.is_set() and mono() < deadline:
            try:
                return [self.names.get(name, name) for name in self.lockd.settle()]
            except v.VirtleaseError as exc:
                self.host.ev("agent_settle_failed", obj=self.uuid, op=op, error=type(exc).__name__,
                             message=str(exc)[:200])
                time.sleep(0.5)
        return None

    # -- writing ---------------------------------------------------------------------------

    def start_writing(self, disk: str, op: str) -> str | None:
        """The VM starts writing ``disk``, whose lock its owner holds: open the disk's write
        interval and write once at once (the storage learns the token).  Returns the interval
        id; None when the session was already lost (then the fence must have killed the VM)
        or the disk is not held."""
        token = self.held().get(disk)
        if self.lost():
            self.host.ev("grant_after_loss", obj=self.uuid, via=f"{self.via}{op}", disk=disk,
                         message="the session was lost")
            if not self.dead.wait(1.0):
                self.host.ev("violation", kind="vm_survived_loss", obj=self.uuid, pid=self.vm.pid,
                             detail=f"{self.via}{op} of {disk} returned but the session was lost and the VM runs")
            return None
        if token is None:  # an ACQUIRE that succeeded holds the disk: a broken contract
            self.host.ev("unexpected_error", obj=self.uuid, error="NotHeld", where=f"{self.via}{op}",
                         message=f"ACQUIRE of {disk} succeeded but the owner does not hold it")
            return None
        iid = uuidlib.uuid4().hex[:12]
        self.writing[disk] = (iid, token)
        self.host.ev("grant", iid=iid, obj=self.uuid, disks={disk: token}, via=f"{self.via}{op}",
                     lease=self.session.lease_id, pid=self.vm.pid)
        self.write(disk)
        return iid

    def stop_writing(self, disk: str, reason: str, t: float | None = None) -> str | None:
        """The VM no longer writes ``disk``: close its interval; returns its id."""
        found = self.writing.pop(disk, None)
        if found is None:
            return None
        t, reason = self.ended(reason, t)
        self.host.ev("end", iid=found[0], obj=self.uuid, reason=reason, t=t)
        return found[0]

    def stop_all(self, reason: str, t: float | None = None) -> list[str]:
        return [iid for disk in sorted(self.writing) if (iid := self.stop_writing(disk, reason, t))]

    def write(self, disk: str) -> str:
        """One write to ``disk``: ok, dead (the VM is gone) or stale (the storage refused the
        token: the VM stops writing everything)."""
        t = mono()
        if self.dead.is_set():
            self.stop_all("vm_dead", t=self.dead_at)
            return "dead"
        iid, token = self.writing[disk]
        ok, why = self.host.store(disk, self.uuid, iid, token, t)
        if not ok:
            self.stop_all("stale")
            self.host.ev("rejected", obj=self.uuid, disk=disk, token=token, why=why)
            return "stale"
        return "ok"

    def hold(self, duration: float) -> str:
        """Write every disk it writes for ``duration``: done, dead, stale or stopping."""
        end_at = mono() + duration
        while mono() < end_at:
            if self.host.stopping.is_set():
                return "stopping"
            for disk in sorted(self.writing):
                if disk in self.writing and (res := self.write(disk)) != "ok":
                    return res
            time.sleep(self.host.rng.uniform(0.05, 0.12))
        return "done"

    # -- the end -----------------------------------------------------------------------------

    def exit(self, reason: str, grace: float = 0.0) -> None:
        """The QEMU ends: it stops writing and is killed; once it has exited, ``release_all``
        (after ``grace`` if a reservation is left), retried until etcd answers or the session
        is lost."""
        self.stop_all(reason)
        self.kill_vm()
        if grace > 0 and self.lockd.reserved():
            time.sleep(grace)
        deadline = mono() + 10 * self.session.cfg.ttl
        while True:
            owner = self.session.owners.peek(self.uuid)
            if owner is None or not owner.active or self.lost():
                return
            try:
                self.lockd.release_all()
            except v.VirtleaseError as exc:
                if mono() < deadline:
                    time.sleep(0.5)
                    continue
                self.host.ev("release_failed", obj=self.uuid, error=type(exc).__name__, message=str(exc)[:200],
                             where=f"{self.via}exit")
                return
            self.host.ev("released", obj=self.uuid, where=f"{self.via}exit")
            return


# --------------------------------------------------------------------------- one VM's life


@contextlib.contextmanager
def operation(a: AgentVM, op: str, disks: list[str]) -> Iterator[None]:
    """Tell the twins an operation of ``a`` on ``disks`` is in flight, for its duration."""
    a.host.publish_op(a, op, "begin", disks)
    try:
        yield
    finally:
        a.host.publish_op(a, op, "end", disks)


def outcome(a: AgentVM, op: str, result: str, **kw: object) -> None:
    a.host.ev("agent_op", obj=a.uuid, op=op, outcome=result, **kw)


def settled(a: AgentVM, disk: str, released: list[str], freed: list[str] | None, others: bool) -> str:
    """What became of ``disk``, unplugged (``others``: the VM keeps other disks) or pivoted away."""
    if not released:
        return "not released"
    if freed is None:
        return "unsettled"
    if freed == [disk] and others:
        return "freed"
    if not freed and disk not in a.held():
        return "claimed by the same UUID before the settle"
    if not freed and not others:
        return "kept reserved (its only disk)"
    return f"settled {len(freed)} disk(s), expected {int(others)}"


def acquire_all(a: AgentVM, op: str, disks: list[str]) -> bool:
    """ACQUIRE every disk, then the VM writes them all (start, resume).  One refused: libvirt
    gives up (the QEMU of a start never ran; a resume refused because the same UUID claimed the
    reservation elsewhere leaves a QEMU that must never write again): the VM exits."""
    for disk in disks:
        try:
            a.acquire(disk)
        except v.VirtleaseError as exc:
            outcome(a, op, f"refused ({type(exc).__name__})")
            a.exit(f"{op} refused")
            return False
    for disk in disks:
        if a.start_writing(disk, op) is None:
            outcome(a, op, "lost")
            return False
    outcome(a, op, "ok")
    return True


def start(a: AgentVM, disks: list[str]) -> bool:
    with operation(a, "start", disks):
        return acquire_all(a, "start", disks)


def plug(a: AgentVM, op: str, disk: str) -> str:
    """ACQUIRE of a disk the running VM does not have, then it writes it: ``ok``, ``refused``
    (busy: the VM goes on without it) or ``end`` (the session is lost: the VM is fenced)."""
    try:
        a.acquire(disk)
    except v.VirtleaseError as exc:
        outcome(a, op, f"refused ({type(exc).__name__})")
        return "end" if isinstance(exc, v.LeaseLostError) else "refused"
    if a.start_writing(disk, op) is None:
        outcome(a, op, "lost")
        return "end"
    return "ok"


def unplug(a: AgentVM, op: str, disk: str, others: bool) -> bool:
    """The VM stops writing ``disk`` (the device left the QEMU, or the pivot switched away from
    it), then RELEASE, then libvirt closes the lock connection (the settle).  ``others``: the VM
    keeps other disks.  False once the VM is gone."""
    iid = a.stop_writing(disk, f"release ({op})")
    released = a.release([disk], op)
    if released:
        a.host.ev("disk_done", obj=a.uuid, iids=[iid], op=op)
    time.sleep(a.host.rng.uniform(0.0, 0.3))
    freed = a.settle(op) if released else None
    outcome(a, op, settled(a, disk, released, freed, others))
    return not a.dead.is_set()


def detach(a: AgentVM, disk: str) -> bool:
    with operation(a, "detach", sorted(a.writing)):
        time.sleep(a.host.rng.uniform(0.05, 0.5))  # the guest lets the device go
        return unplug(a, "detach", disk, len(a.writing) > 1)


def attach(a: AgentVM, disk: str) -> bool:
    with operation(a, "attach", [*sorted(a.writing), disk]):
        result = plug(a, "attach", disk)
        if result == "ok":
            outcome(a, "attach", "ok")
        return result != "end"


def pivot(a: AgentVM, old: str, new: str) -> bool:
    with operation(a, "pivot", [*sorted(a.writing), new]):
        result = plug(a, "pivot", new)
        if result != "ok":
            return result != "end"
        if a.hold(a.host.rng.uniform(0.1, 0.8)) != "done":  # the block job: the mirror writes both
            outcome(a, "pivot", "interrupted")
            return False
        return unplug(a, "pivot", old, True)


def pause(a: AgentVM) -> bool:
    """Pause, then resume (True: it runs again) or exit (False)."""
    rng = a.host.rng
    disks = sorted(a.writing)
    with operation(a, "pause", disks):
        iids = {disk: a.writing[disk][0] for disk in disks}
        a.stop_all("release (pause)")
        released = a.release(disks, "pause")
        if released:
            a.host.ev("disk_done", obj=a.uuid, iids=[iids[x] for x in released], op="pause")
        time.sleep(rng.uniform(0.0, 0.1))
        freed = a.settle("pause") if released else None  # every disk released: nothing is freed
        outcome(a, "pause", "not released" if not released else "unsettled" if freed is None
                else f"freed {len(freed)} disk(s), expected none" if freed else "reserved" if released == disks
                else "partly reserved")
        time.sleep(rng.uniform(0.02, 0.6))  # paused: the same UUID may claim the reservation elsewhere
        if a.host.stopping.is_set() or a.dead.is_set() or rng.random() < 0.3:
            outcome(a, "exit_paused", "ok")
            a.exit("exit", grace=rng.uniform(0.2, 1.0))
            return False
        return acquire_all(a, "resume", disks)


def pick(host: Host, but: list[str]) -> str:
    """A disk not in ``but``: mostly an image of the agent VMs (a new overlay or copy is a file
    nobody else uses), sometimes one the ABI workers contend for."""
    images = [x for x in host.images if x not in but]
    shared = [x for x in host.disks if x not in but]
    return host.rng.choice(images if images and (not shared or host.rng.random() < 0.7) else shared)


def life(host: Host, plugin: v.Plugin, uuid: str, name: str) -> None:
    """One VM under the agent: start, two to six operations between spells of writing, exit."""
    rng = host.rng
    a = AgentVM(host, plugin, uuid, name, "agent:")
    try:
        disks = [pick(host, [])]
        if rng.random() < 0.6:
            disks.append(pick(host, disks))
        if not start(a, sorted(disks)):
            return
        for _ in range(rng.randint(2, 6)):
            if a.hold(rng.uniform(0.15, 0.6)) != "done" or not a.writing:
                return
            have = sorted(a.writing)
            # unplugging the only disk looks like a pause to the agent (it stays reserved): rarely
            ops = {o: w for o, w in OPS.items() if (o != "attach" or len(have) < 3)
                   and (o != "detach" or len(have) > 1 or rng.random() < 0.1)}
            op = rng.choices(list(ops), weights=list(ops.values()))[0]
            going = (detach(a, rng.choice(have)) if op == "detach"
                     else attach(a, pick(host, have)) if op == "attach"
                     else pivot(a, rng.choice(have), pick(host, have)) if op == "pivot"
                     else pause(a))
            if not going:
                return
        a.hold(rng.uniform(0.1, 0.5))
    finally:
        if not a.dead.is_set() or a.writing:
            with operation(a, "exit", sorted(set(a.writing) | set(a.held()))):  # reserved ones too
                a.exit("exit", grace=rng.uniform(0.2, 1.0))
        else:
            a.exit("exit")  # killed (fenced), refused or paused and exited: drop what is left


def worker(host: Host, n: int) -> None:
    """An agent worker thread of ``host``: one VM after another."""
    for plugin in host.plugins():
        uuid = str(uuidlib.uuid4())
        if not host.take_uuid(uuid):
            continue
        try:
            life(host, plugin, uuid, f"{host.host_id}-a{n}-{uuid[:6]}")
        except v.VirtleaseError as exc:  # the session went away under the Domain
            host.ev("agent_failed", obj=uuid, error=type(exc).__name__, message=str(exc)[:200])
        except Exception as exc:
            host.ev("unexpected_error", obj=uuid, error=type(exc).__name__, message=str(exc)[:300], where="agent")
        finally:
            host.give_uuid(uuid)
        time.sleep(host.rng.uniform(0.05, 0.3))
