"""Real libvirt over the virtlease agent: the rig's hosts run ``virtlease-agent`` (in each
host's namespaces, reaching a three-member etcd through relays) in place of virtlockd.

The scenarios of the README's "With libvirt" section, each against stock ``virsh``: start and
refusal naming the holder, shareable disks, suspend keeping the disk reserved, live migration
sampled in etcd, its failure paths, QEMU and agent crashes, a host cut off from etcd, and the
etcd leader killed mid-operation."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from agentrig import TTL, AgentRig, agent_rig

pytestmark = pytest.mark.libvirt


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentRig]:
    with agent_rig(tmp_path_factory.mktemp("agent")) as a:
        yield a


def test_start_busy_suspend_resume_destroy(env: AgentRig, record_property: pytest.RecordProperty) -> None:
    r = env.rig
    disk = r.image("agent-shared.img")
    r.define_domain("A", "web1", [disk])
    r.define_domain("B", "db1", [disk])
    _, seconds = r.start("A", "web1")
    record_property("virsh_start_s", round(seconds, 3))
    print(f"virsh start with the agent: {seconds:.3f} s")
    assert r.domstate("A", "web1") == "running"

    cp, _ = r.start("B", "db1", check=False)
    assert cp.returncode != 0 and r.domstate("B", "db1") == "shut off"
    err = cp.stderr
    assert "resource busy" in err and "domain web1" in err and "on host hostA" in err, err

    r.virsh("A", "suspend", "web1")
    assert r.domstate("A", "web1") == "paused"
    cp, _ = r.start("B", "db1", check=False)
    assert cp.returncode != 0 and "reserved for domain web1" in cp.stderr, cp.stderr
    r.virsh("A", "resume", "web1")
    assert r.domstate("A", "web1") == "running"

    r.virsh("A", "destroy", "web1")
    env.start_once_free("B", "db1", time.monotonic(), 5)  # the lifeline's EOF releases once QEMU has exited
    assert r.domstate("B", "db1") == "running"
    r.virsh("B", "destroy", "db1")


def test_agent_sigkill_and_restart_keeps_the_running_domain(env: AgentRig) -> None:
    r = env.rig
    disk = r.image("agent-restart.img")
    r.define_domain("A", "web2", [disk])
    r.define_domain("B", "db2", [disk])
    r.start("A", "web2")
    qemu = r.qemu_pid("A", "web2")
    old_agent = r.hosts["A"].pid("lockdaemon")
    assert qemu and old_agent
    os.kill(old_agent, signal.SIGKILL)
    log = env.restart_agent("A")
    time.sleep(TTL + 1)  # past the old agent's fence deadline and its lease's TTL
    assert r.qemu_pid("A", "web2") == qemu and r.domstate("A", "web2") == "running"
    cp, _ = r.start("B", "db2", check=False)
    assert cp.returncode != 0 and "domain web2" in cp.stderr and "on host hostA" in cp.stderr, cp.stderr
    r.virsh("A", "suspend", "web2")  # new lock connections to the new agent, for the re-adopted owner
    r.virsh("A", "resume", "web2")
    assert r.domstate("A", "web2") == "running"
    r.virsh("A", "destroy", "web2")
    # the new agent watches the re-adopted QEMU by pidfd (its lifeline died with the old agent)
    env.start_once_free("B", "db2", time.monotonic(), 5)
    r.virsh("B", "destroy", "db2")
    log_text = log.read_text()
    assert "re-attached to lease" in log_text and "re-adopted running domain web2" in log_text, log_text


def test_shareable_disk_on_both_hosts_and_an_exclusive_one_refused(env: AgentRig) -> None:
    """Scenario 1, shared: <shareable/> on A and B both start; a third domain wanting it exclusive is refused."""
    r = env.rig
    disk = r.image("agent-shareable.img")
    r.define_domain("A", "sh-a", [disk], shareable=True)
    r.define_domain("B", "sh-b", [disk], shareable=True)
    r.define_domain("B", "excl", [disk])
    r.start("A", "sh-a")
    r.start("B", "sh-b")
    cp, _ = r.start("B", "excl", check=False)
    assert cp.returncode != 0 and "resource busy" in cp.stderr, cp.stderr
    assert r.domstate("A", "sh-a") == "running" and r.domstate("B", "sh-b") == "running"
    r.virsh("A", "destroy", "sh-a")
    r.virsh("B", "destroy", "sh-b")


def test_live_migration_never_two_holders_and_no_third_domain_gets_in(
        env: AgentRig, record_property: pytest.RecordProperty) -> None:
    """Scenario 3: virsh migrate --live A->B with the agents. Sampled every few ms, etcd never shows
    the disk on two hosts; a third domain started on B over and over during the migration never
    runs; afterwards B holds the disk with a higher token. Guest downtime from QEMU's events."""
    r = env.rig
    disk = r.image("agent-mig.img")
    r.define_domain("A", "mig1", [disk])
    r.define_domain("B", "intruder", [disk])
    r.start("A", "mig1")
    before = env.holders("mig1")
    assert [h.host for h in before] == ["hostA"], before
    stop = threading.Event()
    samples: list[set[str]] = []
    intruder_ran: list[str] = []

    def sample() -> None:
        while not stop.is_set():
            samples.append({h.host for h in env.holders("mig1", "intruder") if h.handoff_to is None
                            or h.host == "hostB"})
            time.sleep(0.005)

    def intrude() -> None:
        while not stop.is_set():
            cp, _ = r.start("B", "intruder", check=False)
            if cp.returncode == 0:
                intruder_ran.append(cp.stdout)
                r.virsh("B", "destroy", "intruder", check=False)

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=intrude, daemon=True)]
    for t in threads:
        t.start()
    t0 = time.time()
    try:
        seconds = r.migrate("mig1", "A", "B")
    finally:
        time.sleep(0.5)  # keep sampling and intruding just after the handover
        stop.set()
        for t in threads:
            t.join(30)
    assert r.domstate("B", "mig1") == "running" and r.domstate("A", "mig1") == "shut off"
    assert not intruder_ran, "a third domain started on the disk during the migration"
    two = [s for s in samples if len(s) > 1]
    assert samples and not two, f"{len(two)} of {len(samples)} samples saw two holders: {two[:3]}"
    after = env.holders("mig1")
    assert [h.host for h in after] == ["hostB"] and after[0].token > before[0].token, after
    stop_at, resume_at = r.qmp_events("A", "STOP", t0), r.qmp_events("B", "RESUME", t0)
    assert stop_at and resume_at
    downtime_ms = 1000 * (resume_at[-1] - stop_at[0])
    record_property("migrate_s", round(seconds, 3))
    record_property("downtime_ms", round(downtime_ms, 1))
    print(f"agent rig, under the sampler and the intruder: migrate {seconds:.3f} s, guest downtime "
          f"{downtime_ms:.1f} ms, {len(samples)} etcd samples, every intruder start refused")
    t1 = time.time()  # and back, with nothing else running: the figure to compare with virtlockd's
    seconds = r.migrate("mig1", "B", "A")
    stop_at, resume_at = r.qmp_events("B", "STOP", t1), r.qmp_events("A", "RESUME", t1)
    assert stop_at and resume_at and r.domstate("A", "mig1") == "running"
    downtime_ms = 1000 * (resume_at[-1] - stop_at[0])
    record_property("migrate_back_s", round(seconds, 3))
    record_property("downtime_back_ms", round(downtime_ms, 1))
    print(f"agent rig, quiet: migrate B->A {seconds:.3f} s, guest downtime {downtime_ms:.1f} ms")
    r.virsh("A", "destroy", "mig1")


def test_kill9_of_qemu_frees_the_disk_within_a_second(env: AgentRig, record_property: pytest.RecordProperty) -> None:
    """Scenario 5: kill -9 of web1's QEMU on A; B starts a domain on the disk within a second."""
    r = env.rig
    disk = r.image("agent-kill.img")
    r.define_domain("A", "victim", [disk])
    r.define_domain("B", "heir", [disk])
    r.start("A", "victim")
    pid = r.qemu_pid("A", "victim")
    assert pid
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    _, took = env.start_once_free("B", "heir", t0, 1.0, pause=0)
    assert took < 1.0, f"the start on B ended {took:.3f} s after the kill"
    record_property("kill9_to_start_b_s", round(took, 3))
    print(f"agent rig: kill -9 of QEMU on A -> domain started on B after {took:.3f} s")
    r.virsh("B", "destroy", "heir")
