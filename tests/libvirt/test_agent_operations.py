"""The operations guide (deploy/OPERATIONS.md) on real libvirt.

*Switching a host from virtlockd to the agent*: host A's lock daemon is brought to stock
virtlockd (the agent stopped while it holds nothing, ``virtlockd -p /run/libvirt/virtlockd.pid``
started in A's namespaces) and a domain runs under it: etcd knows nothing of it, and B's agent
lets a domain on B start on the same disk -- the guide's reason to drain the host first.  Then
the guide's steps: A is drained (its domain live-migrated to B, whose agent takes the disk in
etcd; nothing running on A), the agent refuses to start while virtlockd still serves the socket
(step 2's warning), virtlockd is stopped, the agent started on its socket, libvirtd restarted
(step 4), and step 5's checks: A's session is in etcd, the domain migrates back and, stopped and
started again, runs on A under the agent with its lease in etcd, and a domain on B with the same
disk is refused naming it and host A.  (systemd itself is not part of the rig: ``disable``,
``mask`` and the unit are not exercised, only what they do to the daemons.)

*Upgrading the agent with domains running*: SIGUSR2 to A's agent, a new agent started at once
(as ``Restart=always`` does): the QEMUs keep running with the same pids; etcd, sampled every
few ms throughout, always shows the same records (holder, lease and token) and never a gap; a
rival domain on B started over and over -- and once exactly while no agent serves A's socket --
never runs and is always refused naming the holder; suspend, resume and destroy work through
the new agent."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.ops.status import read_status
from virtlease_lab.libvirt.agentrig import AgentRig, DeathWatch, Watch, serving
from virtlease_lab.libvirt.rig import STOCK_VIRTLOCKD
from virtlease_lab.waiting import wait_for

pytestmark = pytest.mark.libvirt


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _session_hosts(env: AgentRig) -> set[str]:
    """The hosts with a session (host key) in etcd: what ``virtlease status`` lists under Hosts."""
    return {h.host for h in read_status(env.observer, ks.Keys(env.prefix), timeout=5).hosts}


def _restart_libvirtd(env: AgentRig, host: str) -> None:
    """``systemctl restart libvirtd``, in the host's namespaces."""
    h = env.rig.hosts[host]
    old = h.pid("libvirtd")
    assert old
    os.kill(old, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{old}").exists(), 30, what="libvirtd to exit")
    subprocess.run(["nsenter", "-t", str(h.pid("subreaper")), "-m", "-n", "-u", "--",
                    "libvirtd", "-d", "--listen", "-p", "/run/libvirt/libvirtd.pid"], check=True, timeout=30)
    wait_for(lambda: env.rig.virsh(host, "list", check=False).returncode == 0, 30, 0.1, what="libvirtd to answer")


def test_switching_a_host_from_virtlockd_to_the_agent(env: AgentRig) -> None:
    r = env.rig
    disk = r.image("ops-switch.img")
    r.define_domain("A", "legacy", [disk])
    r.define_domain("B", "other", [disk])
    agent = r.hosts["A"].pid("lockdaemon")
    assert agent
    os.kill(agent, signal.SIGTERM)  # nothing held: it exits at once
    env.start_lock_daemon("A", STOCK_VIRTLOCKD)
    virtlockd = r.hosts["A"].pid("lockdaemon")
    assert virtlockd and _comm(virtlockd) == "virtlockd"
    wait_for(lambda: "hostA" not in _session_hosts(env), 10, 0.1, what="the agent's session on A to end")
    r.start("A", "legacy")
    assert r.domstate("A", "legacy") == "running"
    assert env.holders("legacy") == []  # virtlockd's lock is local: etcd knows nothing of it
    # ... so the agents cannot see it: why the guide says to switch a host only with nothing running
    r.start("B", "other")
    r.virsh("B", "destroy", "other")

    # the guide: drain the host first -- live-migrate its VMs to a host already on the agent
    r.migrate("legacy", "A", "B")
    held = env.holders("legacy")
    assert [h.host for h in held] == ["hostB"], held
    assert r.domains("A", all_=False) == []
    # step 2's warning: the agent refuses to start while virtlockd still serves the socket
    h = r.hosts["A"]
    cp = subprocess.run(["nsenter", "-t", str(h.pid("subreaper")), "-m", "-n", "-u", "--",
                         *r._lock_command(h)], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 2 and "in use by a running daemon" in cp.stderr, (cp.returncode, cp.stderr)
    assert serving(h.lockd_socket) and r.hosts["A"].pid("lockdaemon") == virtlockd
    # steps 2 and 4: virtlockd stopped, the agent started on its socket, libvirtd restarted
    os.kill(virtlockd, signal.SIGTERM)
    env.restart_agent("A")
    _restart_libvirtd(env, "A")
    # step 5: the host has its session; the domain comes back and runs under the agent
    assert "hostA" in _session_hosts(env)
    r.migrate("legacy", "B", "A")
    held = env.holders("legacy")
    assert [h.host for h in held] == ["hostA"] and r.domstate("A", "legacy") == "running", held
    r.virsh("A", "destroy", "legacy")
    env.start_once_free("A", "legacy", time.monotonic(), 5)
    held = env.holders("legacy")
    assert [(h.host, h.resource.split(" (")[0]) for h in held] == [("hostA", str(disk))], held
    cp, _ = r.start("B", "other", check=False)
    assert cp.returncode != 0 and "resource busy" in cp.stderr and "domain legacy" in cp.stderr \
        and "on host hostA" in cp.stderr, cp.stderr
    assert r.domstate("B", "other") == "shut off"
    r.virsh("A", "destroy", "legacy")


def test_upgrading_the_agent_with_domains_running(env: AgentRig, record_property: Callable[[str, object], None]) -> None:
    r = env.rig
    disks = [r.image(f"ops-up{i}.img") for i in range(2)]
    for i, disk in enumerate(disks):
        r.define_domain("A", f"up{i}", [disk])
        r.start("A", f"up{i}")
    r.define_domain("B", "rival", [disks[0]])
    r.define_domain("B", "rival2", [disks[0]])  # for the start in the gap (two starts of one domain collide)
    pids = {f"up{i}": r.qemu_pid("A", f"up{i}") for i in range(2)}
    before = frozenset(env.holders("up0", "up1"))
    old = r.hosts["A"].pid("lockdaemon")
    assert old and all(pids.values()) and len(before) == 2 and {h.host for h in before} == {"hostA"}
    old_log = env.logs[-1] if env.logs else r.hosts["A"].log / "lockdaemon.log"

    in_gap: list[tuple[float, subprocess.CompletedProcess[str]]] = []

    def start_in_gap() -> None:  # a start on B while nothing serves A's socket
        began = time.monotonic()
        in_gap.append((began, r.start("B", "rival2", check=False)[0]))

    with Watch(env, ["up0", "up1"], intruder=("B", "rival"), linger=env.ttl + 1) as watch:
        time.sleep(1)
        death = DeathWatch(old)
        t0 = time.monotonic()
        os.kill(old, signal.SIGUSR2)  # what `systemctl kill --kill-whom=main --signal=SIGUSR2` sends
        dead_at = death.wait(10)
        assert dead_at is not None, "the old agent did not exit on SIGUSR2"
        gap_start = threading.Thread(target=start_in_gap)
        gap_start.start()
        log = env.restart_agent("A")  # Restart=always
        serving_at = time.monotonic()
        gap_start.join(60)
        # leaving lingers past the old agent's fence deadline and its lease's TTL
    handover, gap = serving_at - t0, serving_at - dead_at
    record_property("upgrade_sigusr2_to_serving_s", round(handover, 3))
    record_property("upgrade_no_agent_s", round(gap, 3))
    watched = watch.samples
    same = sum(1 for rec in watched if rec == before)
    print(f"\nupgrade: SIGUSR2 -> old agent exited {dead_at - t0:.2f} s -> new agent serving {handover:.2f} s "
          f"(no agent on A's socket for {gap:.2f} s); {watch.intruder_tries} rival starts on B + 1 begun in the gap "
          f"{in_gap[0][0] - dead_at:.2f} s after the old agent exited; {len(watched)} etcd samples, {same} "
          "identical to the records before")
    new_log = [line for line in log.read_text(errors="replace").splitlines()
               if "session" in line or "ERROR" in line or "WARNING" in line][:12]
    assert not watch.intruder_ran, ("the rival ran on B", watch.intruder_ran, "new agent:", new_log)
    assert watch.intruder_tries and len(in_gap) == 1 and in_gap[0][0] < serving_at
    for err in [*watch.refusals, in_gap[0][1].stderr]:
        assert "resource busy" in err and "domain up0" in err and "on host hostA" in err, err
    assert in_gap[0][1].returncode != 0
    assert all(rec == before for rec in watched), [rec for rec in watched if rec != before][:3]
    assert len(watched) > 100
    assert {n: r.qemu_pid("A", n) for n in pids} == pids
    assert frozenset(env.holders("up0", "up1")) == before
    assert "handing over: lease" in old_log.read_text()
    text = log.read_text()
    assert "re-attached to lease" in text and "re-adopted running domain up0" in text, text
    r.virsh("A", "suspend", "up0")
    assert r.domstate("A", "up0") == "paused"
    r.virsh("A", "resume", "up0")
    assert r.domstate("A", "up0") == "running"
    for n in pids:
        r.virsh("A", "destroy", n)
    env.start_once_free("B", "rival", time.monotonic(), 5)
    r.virsh("B", "destroy", "rival")
    r.reset()
