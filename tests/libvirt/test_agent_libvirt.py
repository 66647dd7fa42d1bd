"""Real libvirt over the virtlease agent: the rig's hosts run ``virtlease-agent`` (in each
host's namespaces, reaching a three-member etcd through relays) in place of virtlockd.

The scenarios of the README's "With libvirt" section, each against stock ``virsh``: start and
refusal naming the holder, shareable disks, suspend keeping the disk reserved, live migration
sampled in etcd, its failure paths, QEMU and agent crashes, a host cut off from etcd, and the
etcd leader killed mid-operation."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from virtlease_etcd.devtools.embedded import Member, wait_serving
from virtlease_etcd.ops.status import HeldInfo
from virtlease_lab.libvirt.agentrig import TTL, AgentRig, DeathWatch, Watch, agent_rig
from virtlease_lab.libvirt.rig import RigError
from virtlease_lab.waiting import wait_for

pytestmark = pytest.mark.libvirt


def test_start_busy_suspend_resume_destroy(env: AgentRig, record_property: Callable[[str, object], None]) -> None:
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
    wait_for(lambda: [h.handoff_to for h in env.holders("web1")] == ["*"], 2.0,
             what="the reservation (written after the RELEASE is answered)")
    cp, _ = r.start("B", "db1", check=False)
    assert cp.returncode != 0 and "reserved for domain web1" in cp.stderr, cp.stderr
    r.virsh("A", "resume", "web1")
    assert r.domstate("A", "web1") == "running"

    r.virsh("A", "destroy", "web1")
    env.start_once_free("B", "db1", time.monotonic(), 5)  # the lifeline's EOF releases once QEMU has exited
    assert r.domstate("B", "db1") == "running"
    r.virsh("B", "destroy", "db1")


def _one_disk(env: AgentRig, image: str, on_a: str, on_b: str) -> int:
    """Domain ``on_a`` on host A and ``on_b`` on host B, both on the disk ``image``; ``on_a``
    started.  Returns its QEMU's pid."""
    r = env.rig
    disk = r.image(image)
    r.define_domain("A", on_a, [disk])
    r.define_domain("B", on_b, [disk])
    r.start("A", on_a)
    pid = r.qemu_pid("A", on_a)
    assert pid
    return pid


def test_agent_sigkill_and_restart_keeps_the_running_domain(env: AgentRig) -> None:
    r = env.rig
    qemu = _one_disk(env, "agent-restart.img", "web2", "db2")
    old_agent = r.hosts["A"].pid("lockdaemon")
    assert old_agent
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
    """Shared: <shareable/> on A and B both start; a third domain wanting it exclusive is refused."""
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
        env: AgentRig, record_property: Callable[[str, object], None]) -> None:
    """``virsh migrate --live`` A->B with the agents. Sampled every few ms, etcd never shows
    the disk on two hosts; a third domain started on B over and over during the migration never
    runs; afterwards B holds the disk with a higher token. Guest downtime from QEMU's events."""
    r = env.rig
    _one_disk(env, "agent-mig.img", "mig1", "intruder")
    before = env.holders("mig1")
    assert [h.host for h in before] == ["hostA"], before
    t0 = time.time()
    with Watch(env, ["mig1"], intruder=("B", "intruder")) as watch:
        seconds = r.migrate("mig1", "A", "B")
    assert r.domstate("B", "mig1") == "running" and r.domstate("A", "mig1") == "shut off"
    assert not watch.intruder_ran and watch.intruder_tries, "a third domain started on the disk during the migration"
    assert watch.samples and not watch.two_holders, \
        f"{len(watch.two_holders)} of {len(watch.samples)} samples saw two holders: {watch.two_holders[:3]}"
    after = env.holders("mig1")
    assert [h.host for h in after] == ["hostB"] and after[0].token > before[0].token, after
    stop_at, resume_at = r.qmp_events("A", "STOP", t0), r.qmp_events("B", "RESUME", t0)
    assert stop_at and resume_at
    downtime_ms = 1000 * (resume_at[-1] - stop_at[0])
    record_property("migrate_s", round(seconds, 3))
    record_property("downtime_ms", round(downtime_ms, 1))
    print(f"agent rig, under the sampler and the intruder: migrate {seconds:.3f} s, guest downtime "
          f"{downtime_ms:.1f} ms, {len(watch.samples)} etcd samples, all {watch.intruder_tries} intruder starts refused")
    t1 = time.time()  # and back, with nothing else running: the figure to compare with virtlockd's
    seconds = r.migrate("mig1", "B", "A")
    stop_at, resume_at = r.qmp_events("B", "STOP", t1), r.qmp_events("A", "RESUME", t1)
    assert stop_at and resume_at and r.domstate("A", "mig1") == "running"
    downtime_ms = 1000 * (resume_at[-1] - stop_at[0])
    record_property("migrate_back_s", round(seconds, 3))
    record_property("downtime_back_ms", round(downtime_ms, 1))
    print(f"agent rig, quiet: migrate B->A {seconds:.3f} s, guest downtime {downtime_ms:.1f} ms")
    r.virsh("A", "destroy", "mig1")


def test_kill9_of_qemu_frees_the_disk_through_its_lifeline_not_the_lease(
        env: AgentRig, record_property: Callable[[str, object], None]) -> None:
    """``kill -9`` of web1's QEMU on A; B starts a domain on the disk as soon as A's agent
    sees the QEMU gone (its lifeline and pidfd), long before A's lease could expire.  The time is
    a figure (0.27-0.47 s on an idle machine; ``make bench`` measures it), the bound only tells the
    lifeline apart from the lease: half the TTL."""
    r = env.rig
    pid = _one_disk(env, "agent-kill.img", "victim", "heir")
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    _, took = env.start_once_free("B", "heir", t0, TTL / 2, pause=0)
    record_property("kill9_to_start_b_s", round(took, 3))
    print(f"agent rig: kill -9 of QEMU on A -> domain started on B after {took:.3f} s")
    r.virsh("B", "destroy", "heir")


def _kill_when(pred: Callable[[], int | None], what: str, then: Callable[[int], None] | None = None,
               timeout: float = 30.0) -> tuple[threading.Thread, list[float]]:
    """In a thread: once ``pred()`` gives a pid, ``kill -9`` it (after ``then(pid)``, if given);
    the monotonic kill instant is appended to the returned list (nothing if the pid had gone,
    also if it went during ``then``)."""
    killed: list[float] = []

    def run() -> None:
        pid = wait_for(pred, timeout, interval=0.002, what=what)
        assert pid is not None  # wait_for returns the truthy value
        try:
            if then:
                then(pid)
            os.kill(pid, signal.SIGKILL)
            killed.append(time.monotonic())
        except ProcessLookupError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, killed


def _only_holder(env: AgentRig, domain: str, host: str) -> HeldInfo:
    held = env.holders(domain)
    assert [h.host for h in held] == [host] and held[0].handoff_to is None, held
    return held[0]


def test_migration_with_the_destination_qemu_killed_keeps_the_source_and_its_disk(env: AgentRig) -> None:
    """B's incoming QEMU is killed -9 during the migration: virsh reports the failure,
    web stays running on A, A still holds the disk (same token), B's agent keeps nothing, a domain
    on B stays refused past the reserve grace, and the same migration works afterwards."""
    r = env.rig
    _one_disk(env, "agent-mfail.img", "mfail", "grabber")
    before = _only_holder(env, "mfail", "hostA")
    with Watch(env, ["mfail"], intruder=("B", "grabber")) as watch:
        t, killed = _kill_when(lambda: r.qemu_pid("B", "mfail"), "the incoming QEMU on B",
                               then=lambda _: time.sleep(0.15))  # into the transfer
        cp = r.virsh("A", "migrate", "--live", "--unsafe", "mfail", r.hosts["B"].uri, check=False, timeout=120)
        t.join(30)
    assert killed, "the incoming QEMU was gone before it could be killed"
    assert cp.returncode != 0, "the migration succeeded although its destination was killed"
    print(f"migration with the destination killed: virsh said {cp.stderr.strip()!r}")
    assert r.domstate("A", "mfail") == "running"
    assert r.domstate("B", "mfail") == "absent"  # the incoming domain is gone with its QEMU
    assert _only_holder(env, "mfail", "hostA").token == before.token
    assert not watch.intruder_ran and not watch.two_holders
    time.sleep(2.5)  # past the reserve grace of anything B's agent might have kept
    cp, _ = r.start("B", "grabber", check=False)
    assert cp.returncode != 0 and "domain mfail" in cp.stderr and "on host hostA" in cp.stderr, cp.stderr
    r.migrate("mfail", "A", "B")
    assert _only_holder(env, "mfail", "hostB").token > before.token
    r.virsh("B", "destroy", "mfail")


def test_source_qemu_killed_after_the_destination_resumed_leaves_the_destination_its_disk(env: AgentRig) -> None:
    """The source QEMU is frozen (SIGSTOP) as soon as the destination claimed the
    disk, so that libvirt's own clean-up cannot end it first, and killed -9 once the destination
    runs: the destination keeps running and keeps the disk with its new token; the source's
    lifeline EOF releases nothing of the destination's.  Libvirt's confirm step can still end
    the source before the freeze lands: then the domain is migrated back and it is tried again."""
    r = env.rig
    disk = r.image("agent-mhalf.img")
    r.define_domain("A", "mhalf", [disk])
    r.define_domain("A", "grabber2", [disk])
    r.define_domain("B", "grabber3", [disk])
    r.start("A", "mhalf")
    src, dst, attempt = "A", "B", 0
    while True:
        attempt += 1
        assert attempt <= 5, "in 5 migrations libvirt always ended the source QEMU before it could be frozen"
        source = r.qemu_pid(src, "mhalf")
        assert source
        before = _only_holder(env, "mhalf", f"host{src}")

        def dst_holds(src_pid: int = source, dst: str = dst) -> int | None:
            return src_pid if any(h.host == f"host{dst}" for h in env.holders("mhalf")) else None

        def freeze_until_dst_runs(pid: int, dst: str = dst) -> None:
            os.kill(pid, signal.SIGSTOP)  # ProcessLookupError if libvirt ended it first: not killed
            wait_for(lambda: r.domstate(dst, "mhalf") == "running", 30, what=f"mhalf running on {dst}")

        with Watch(env, ["mhalf"], intruder=(src, f"grabber{2 if src == 'A' else 3}")) as watch:
            t, killed = _kill_when(dst_holds, f"host {dst}'s claim of the disk", then=freeze_until_dst_runs)
            cp = r.virsh(src, "migrate", "--live", "--unsafe", "mhalf", r.hosts[dst].uri, check=False,
                         timeout=120)
            t.join(30)
        assert r.domstate(dst, "mhalf") == "running", cp.stderr
        assert _only_holder(env, "mhalf", f"host{dst}").token > before.token
        assert not watch.intruder_ran and not watch.two_holders
        if killed:
            break
        src, dst = dst, src
    print(f"source QEMU killed -9 after the destination resumed (attempt {attempt}): virsh migrate exit "
          f"{cp.returncode}")
    # shut off where it was defined (A), gone where it came in transient (B)
    wait_for(lambda: r.domstate(src, "mhalf") in ("shut off", "absent"), 10, what=f"mhalf stopped on {src}")
    time.sleep(2.5)  # past the reserve grace
    assert _only_holder(env, "mhalf", f"host{dst}").token > before.token
    cp, _ = r.start(src, f"grabber{2 if src == 'A' else 3}", check=False)
    assert cp.returncode != 0 and "domain mhalf" in cp.stderr and f"on host host{dst}" in cp.stderr, cp.stderr
    r.virsh(dst, "destroy", "mhalf")


def _fenced_before_granted(env: AgentRig, qemu: int, fault: Callable[[], object], repair: Callable[[], object],
                           taker: str, tag: str, label: str, record_property: Callable[[str, object], None]) -> None:
    """``fault()`` on host A, then start ``taker`` on B until it works, etcd sampled throughout:
    A's QEMU ``qemu`` must have exited before B was granted the disk -- before the last sample
    that did not show B holding it began (a lower bound of the grant); then ``repair()``.
    Records and prints when A's QEMU died, when B's start worked and the fence lead between."""
    death = DeathWatch(qemu)
    with Watch(env, [taker], linger=0.1) as watch:
        t0 = time.monotonic()
        fault()
        try:
            _, done = env.start_once_free("B", taker, t0, 3 * TTL, pause=0.05)
        finally:
            repair()
    dead = death.wait(0)
    assert dead is not None, "B was granted the disk while A's QEMU still ran"
    before_b = [t for t, s in zip(watch.sample_times, watch.samples, strict=True)
                if not any(h.domain_name == taker for h in s)]
    assert before_b and max(before_b) > t0, "no etcd sample before B's grant"
    granted_after = max(before_b) - t0
    assert dead - t0 < granted_after, \
        f"A's QEMU died {dead - t0:.3f} s after the fault, B was granted the disk after {granted_after:.3f} s"
    lead = granted_after - (dead - t0)
    record_property(f"{tag}_to_qemu_killed_s", round(dead - t0, 3))
    record_property(f"{tag}_to_b_started_s", round(done, 3))
    record_property(f"fence_lead_{tag}_s", round(lead, 3))
    print(f"{label}: A's QEMU killed after {dead - t0:.2f} s, B started after {done:.2f} s, "
          f"fence lead >= {lead:.2f} s")


def test_agent_killed_and_not_restarted_stops_the_domain_before_b_gets_the_disk(
        env: AgentRig, record_property: Callable[[str, object], None]) -> None:
    """``kill -9`` of A's agent while a domain runs, no agent back: the
    agent's guard kills the QEMU at the fence deadline, before B can be granted the disk; B
    gets it once etcd expired A's lease."""
    r = env.rig
    qemu = _one_disk(env, "agent-orphan.img", "orphan", "taker")
    agent = r.hosts["A"].pid("lockdaemon")
    assert agent
    _fenced_before_granted(env, qemu, lambda: os.kill(agent, signal.SIGKILL), lambda: env.restart_agent("A"),
                           "taker", "agent_kill", f"agent kill -9, no restart (TTL {TTL} s)", record_property)
    assert r.domstate("A", "orphan") == "shut off"
    r.virsh("B", "destroy", "taker")


def test_host_cut_off_from_etcd_stops_its_domain_before_b_is_granted(
        env: AgentRig, record_property: Callable[[str, object], None]) -> None:
    """A's links to every etcd member go dead (bytes dropped, nothing closed): A's
    agent kills its domain at the fence deadline; B is granted the disk only after that (the
    fence lead); once the links are back, A's agent starts domains again."""
    r = env.rig
    qemu = _one_disk(env, "agent-island.img", "island", "mainland")
    r.define_domain("A", "back", [r.image("agent-back.img")])
    _fenced_before_granted(env, qemu, lambda: env.cut("A"), lambda: env.heal("A"), "mainland", "cut",
                           f"A cut off from etcd (TTL {TTL} s)", record_property)
    assert r.domstate("A", "island") == "shut off"
    healed = time.monotonic()
    _, back = env.start_once_free("A", "back", healed, 3 * TTL, pause=0.5)
    print(f"A's agent started a domain {back:.2f} s after its links came back")
    r.virsh("A", "destroy", "back")
    r.virsh("B", "destroy", "mainland")


def test_interface_down_and_up_the_fenced_domain_starts_again_on_its_host(
        env: AgentRig, record_property: Callable[[str, object], None]) -> None:
    """Host A's network interface goes down (``lo`` in A's namespace: the one its agent reaches
    etcd through) past the fence deadline: the agent fences its domain.  Once the interface is
    back, the *same* domain starts again on A at once.  Before the fix every new QEMU of it was
    killed by a guard armed with the lost session's deadline, and the guard restarted in a loop."""
    r = env.rig
    qemu = _one_disk(env, "agent-ifdown.img", "ifdown", "ifdown-b")
    log = r.hosts["A"].log / "lockdaemon.log"
    restarts_before = log.read_text().count("starting a new one")
    netns = r.hosts["A"].netns
    death = DeathWatch(qemu)
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "down"], check=True)
    try:
        assert death.wait(TTL + 5) is not None, "the domain was not fenced"
        time.sleep(1.0)
    finally:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    up = time.monotonic()
    _, started = env.start_once_free("A", "ifdown", up, 3 * TTL, pause=0.2)
    time.sleep(1.5)
    assert r.domstate("A", "ifdown") == "running", "the restarted domain was killed"
    assert [h.host for h in env.holders("ifdown")] == ["hostA"]
    restarts = log.read_text().count("starting a new one") - restarts_before
    assert restarts <= 1, f"the guard was restarted {restarts} times"
    record_property("restart_after_interface_up_s", round(started, 2))
    print(f"interface down past the fence deadline: domain fenced; interface up: the same domain "
          f"ran again {started:.2f} s later, guard restarted {restarts} time(s)")
    r.virsh("A", "destroy", "ifdown")


def _restart_member(env: AgentRig, member: Member) -> None:
    member.start()
    wait_serving(member.endpoint, 30)


def test_etcd_leader_killed_during_a_start_and_during_a_migration(env: AgentRig) -> None:
    """The etcd leader is killed -9 while ``virsh start`` runs on A, then while a
    migration A->B runs: each operation succeeds or fails cleanly (nothing half-held in etcd),
    the disk is never held by two hosts, and a rival domain never starts on it."""
    r = env.rig
    disk = r.image("agent-leader.img")
    r.define_domain("A", "ldr", [disk])
    r.define_domain("B", "rival", [disk])
    leader = env.etcd.leader()
    assert leader is not None
    killer = threading.Timer(0.1, leader.kill)
    killer.start()
    try:
        cp, took = r.start("A", "ldr", check=False)
        killer.join()
    finally:
        _restart_member(env, leader)
    print(f"leader {leader.name} killed 0.1 s into virsh start: exit {cp.returncode} after {took:.2f} s "
          f"{cp.stderr.strip()!r}")
    if cp.returncode == 0:
        assert r.domstate("A", "ldr") == "running"
        _only_holder(env, "ldr", "hostA")
    else:
        assert r.domstate("A", "ldr") == "shut off" and env.holders("ldr") == []
        r.start("A", "ldr")
    before = _only_holder(env, "ldr", "hostA")

    leader = env.etcd.leader()
    assert leader is not None
    with Watch(env, ["ldr"], intruder=("B", "rival")) as watch:
        t, killed = _kill_when(lambda: leader.proc.pid if leader.proc and r.qemu_pid("B", "ldr") else None,
                               "the incoming QEMU on B")
        try:
            cp = r.virsh("A", "migrate", "--live", "--unsafe", "ldr", r.hosts["B"].uri, check=False, timeout=120)
        finally:
            t.join(30)
            _restart_member(env, leader)
    assert killed, "the leader was not killed during the migration"
    print(f"leader {leader.name} killed during migrate: exit {cp.returncode} {cp.stderr.strip()!r}; "
          f"{len(watch.samples)} etcd samples, {watch.intruder_tries} rival starts refused")
    assert not watch.intruder_ran and not watch.two_holders
    states = {h: r.domstate(h, "ldr") for h in ("A", "B")}
    running = [h for h, s in states.items() if s == "running"]
    assert len(running) == 1, states
    assert (cp.returncode == 0) == (running == ["B"]), (cp.returncode, states)
    held = _only_holder(env, "ldr", f"host{running[0]}")
    assert held.token >= before.token
    r.virsh(running[0], "destroy", "ldr")


def test_without_relays_the_agents_dial_etcd_and_migrate(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The benchmarks' rig (``agent_rig(relays=False)``): each host's agent runs in the host's
    mount namespace but this test's network namespace and dials the members itself, so no relay
    carries its etcd traffic; a start, a refusal naming the holder and a live migration work as
    through the relays, and no host can be cut off."""
    with agent_rig(tmp_path_factory.mktemp("direct"), relays=False) as direct:
        r = direct.rig
        assert not direct.relays
        own_net, status = os.readlink("/proc/self/ns/net"), r.status()
        for h in ("A", "B"):
            agent = r.hosts[h].pid("lockdaemon")
            assert agent and os.readlink(f"/proc/{agent}/ns/net") == own_net, "the agent is not in the test's netns"
            assert os.readlink(f"/proc/{agent}/ns/mnt") == status[h]["libvirtd"]["mnt"]
        _one_disk(direct, "direct.img", "direct1", "direct2")
        cp, _ = r.start("B", "direct2", check=False)
        assert cp.returncode != 0 and "direct1" in cp.stderr and "hostA" in cp.stderr, cp.stderr
        before = direct.holders("direct1")
        r.migrate("direct1", "A", "B")
        after = direct.holders("direct1")
        assert [h.host for h in after] == ["hostB"] and after[0].token > before[0].token, after
        assert r.domstate("B", "direct1") == "running" and r.domstate("A", "direct1") == "shut off"
        with pytest.raises(RigError, match="cannot be cut off"):
            direct.cut("A")
        r.virsh("B", "destroy", "direct1")
