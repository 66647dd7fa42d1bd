"""Scenario 10: the operations guide (deploy/OPERATIONS.md) on real libvirt.

*Switching a host from virtlockd to the agent*: host A runs stock virtlockd with a domain on it;
following the guide, A is drained (its domain live-migrated to B, whose agent takes the disk in
etcd), virtlockd is stopped and the agent started on its socket (the rig's libvirtd already has
``lock_manager = "lockd"``: the guide's libvirtd restart is for that change), and the domain
migrates back under the agents, its disk then refused to B naming host A.

*Upgrading the agent with domains running*: SIGUSR2 to A's agent, a new agent started as
``Restart=always`` does: the QEMUs keep running with the same pids, etcd keeps the same holder,
lease and token, a rival domain on B started over and over throughout never runs, and suspend,
resume and destroy work through the new agent."""

from __future__ import annotations

import os
import signal
import time

import pytest
from agentrig import AgentRig, Watch, serving
from rig import STOCK_VIRTLOCKD, wait_for

pytestmark = pytest.mark.libvirt


def test_switching_a_host_from_virtlockd_to_the_agent(env: AgentRig) -> None:
    r = env.rig
    disk = r.image("ops-switch.img")
    r.define_domain("A", "legacy", [disk])
    r.define_domain("B", "other", [disk])
    agent = r.hosts["A"].pid("lockdaemon")
    assert agent
    os.kill(agent, signal.SIGTERM)  # nothing held: it exits at once
    env.start_lock_daemon("A", STOCK_VIRTLOCKD)
    r.start("A", "legacy")
    assert env.holders("legacy") == []  # virtlockd's lock is local: etcd knows nothing of it

    # the guide: drain the host first (virtlockd's locks and the agent's leases know nothing of each other)
    r.migrate("legacy", "A", "B")
    held = env.holders("legacy")
    assert [h.host for h in held] == ["hostB"], held
    virtlockd = r.hosts["A"].pid("lockdaemon")
    assert virtlockd
    os.kill(virtlockd, signal.SIGTERM)
    env.restart_agent("A")

    r.migrate("legacy", "B", "A")
    held = env.holders("legacy")
    assert [h.host for h in held] == ["hostA"] and r.domstate("A", "legacy") == "running", held
    cp, _ = r.start("B", "other", check=False)
    assert cp.returncode != 0 and "domain legacy" in cp.stderr and "on host hostA" in cp.stderr, cp.stderr
    r.virsh("A", "destroy", "legacy")


def test_upgrading_the_agent_with_domains_running(env: AgentRig, record_property: pytest.RecordProperty) -> None:
    r = env.rig
    disks = [r.image(f"ops-up{i}.img") for i in range(2)]
    for i, disk in enumerate(disks):
        r.define_domain("A", f"up{i}", [disk])
        r.start("A", f"up{i}")
    r.define_domain("B", "rival", [disks[0]])
    pids = {f"up{i}": r.qemu_pid("A", f"up{i}") for i in range(2)}
    before = {(h.domain_name, h.host, h.lease, h.token) for h in env.holders("up0", "up1")}
    old = r.hosts["A"].pid("lockdaemon")
    assert old and all(pids.values()) and len(before) == 2

    with Watch(env, ["up0", "up1"], intruder=("B", "rival")) as watch:
        t0 = time.monotonic()
        os.kill(old, signal.SIGUSR2)  # what `systemctl kill --kill-whom=main --signal=SIGUSR2` sends
        wait_for(lambda: not serving(r.hosts["A"].lockd_socket), 10, what="the old agent to hand over")
        log = env.restart_agent("A")
        serving_after = time.monotonic() - t0
        time.sleep(env.ttl + 1)  # past the old agent's fence deadline and its lease's TTL
    record_property("upgrade_sigusr2_to_serving_s", round(serving_after, 3))
    print(f"upgrade: SIGUSR2 to the new agent serving {serving_after:.2f} s; {watch.intruder_tries} rival "
          f"starts refused, {len(watch.samples)} etcd samples")
    assert not watch.intruder_ran and watch.intruder_tries and not watch.two_holders
    assert {n: r.qemu_pid("A", n) for n in pids} == pids
    assert {(h.domain_name, h.host, h.lease, h.token) for h in env.holders("up0", "up1")} == before
    text = log.read_text()
    assert "re-attached to lease" in text and "re-adopted running domain up0" in text, text
    r.virsh("A", "suspend", "up0")
    r.virsh("A", "resume", "up0")
    for n in pids:
        r.virsh("A", "destroy", n)
    env.start_once_free("B", "rival", time.monotonic(), 5)
    r.virsh("B", "destroy", "rival")
