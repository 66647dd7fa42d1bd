"""Crash and restart safety of the agent, with real etcd and real processes: the agent as a
process (``AgentProcess``), a stand-in QEMU holding a disk through it, and a second host (a
driver in this process) that wants the same disk.

The property: whatever happens to the agent, the stand-in QEMU is never running while the
second host holds its disk.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import etcd3
import pytest

import virtlease as v
from virtlease_etcd.agent.lockdclient import LockdClient, RemoteCallError
from virtlease_etcd.config import load_config
from virtlease_etcd.devtools.embedded import EmbeddedEtcd
from virtlease_etcd.etcd.client import EtcdClient
from virtlease_etcd.session import reattach
from virtlease_etcd.session.fencing import pid_alive
from virtlease_etcd.session.hostsession import HostSession
from virtlease_lab.agentprocess import LISTENING, SERVING, AgentProcess
from virtlease_lab.drivers import EXPIRY_SLACK, load, take
from virtlease_lab.etcdserver import EtcdServer, dump
from virtlease_lab.fakeclock import FakeClock
from virtlease_lab.ports import free_port
from virtlease_lab.relay import Relay
from virtlease_lab.standin import StandinQemu

TTL = 4
"""The agent's TTL where a test waits for its guard to fire or its lease to run out."""
STEADY = 10
"""Where the agent must keep its session whatever the machine's load (a restart that must come
back within the fence deadline: a Python start took 7 s at load 25 on 2 cores)."""


@pytest.fixture
def agents(etcd_process: EtcdServer, prefix: str, sock_dir: Path) -> Iterator[Callable[..., AgentProcess]]:
    """agents(*extra_options) -> an agent process of host hv-a on ``sock_dir`` (one at a time)."""
    made: list[AgentProcess] = []

    def start(*extra: str, via_virtlease: bool = False, ttl: int = TTL) -> AgentProcess:
        a = AgentProcess(sock_dir, etcd_process.endpoints, prefix, "hv-a", ttl=ttl, extra=extra,
                         via_virtlease=via_virtlease)
        made.append(a)
        return a

    yield start
    for a in reversed(made):
        a.stop()


@pytest.fixture
def other_host(etcd_process: EtcdServer, prefix: str) -> Iterator[v.Plugin]:
    plugin = load(etcd_process.endpoints, prefix, "hv-b")
    yield plugin
    plugin.driver.release_all()
    plugin.unload()


@pytest.fixture
def qemus() -> Iterator[list[StandinQemu]]:
    started: list[StandinQemu] = []
    yield started
    for q in started:
        if q.alive():
            q.kill()


def start_vm(agent: AgentProcess, disk: str, qemus: list[StandinQemu]) -> StandinQemu:
    q = StandinQemu(agent.socket, "web1")
    qemus.append(q)
    with LockdClient(agent.socket) as c:
        c.register(q.owner())
        c.acquire(disk)
    return q


def death_watch(q: StandinQemu) -> dict[str, float]:
    """``out["dead"]``: monotonic time the stand-in exited (set by a thread)."""
    out: dict[str, float] = {}

    def watch() -> None:
        q.proc.wait()
        out["dead"] = time.monotonic()

    threading.Thread(target=watch, daemon=True).start()
    return out


def wait_taken(plugin: v.Plugin, disk: str, seconds: float) -> float | None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if take(plugin, disk):
            return time.monotonic()
        time.sleep(0.1)
    return None


def gone_soon(pid: int, seconds: float = 2.0) -> bool:
    """``pid`` has exited (a zombie counts: init reaps orphans in its own time)."""
    until = time.monotonic() + seconds
    while pid_alive(pid):
        if time.monotonic() > until:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def disk(tmp_path: Path) -> str:
    p = tmp_path / "web1.img"
    p.write_bytes(b"")
    return str(p)


@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
def test_dead_or_frozen_agent_stops_the_owner_before_another_host_gets_the_disk(
        how: str, agents: Callable[..., AgentProcess], other_host: v.Plugin, qemus: list[StandinQemu], disk: str,
        record_property: Callable[[str, object], None]) -> None:
    agent = agents()
    q = start_vm(agent, disk, qemus)
    assert not take(other_host, disk)
    guard = agent.guard_pid()
    died = death_watch(q)
    killed_at = time.monotonic()
    agent.signal(signal.SIGKILL if how == "sigkill" else signal.SIGSTOP)
    taken_at = wait_taken(other_host, disk, TTL + 5)
    assert taken_at is not None, "the disk never became free after the agent died"
    assert "dead" in died, "the stand-in QEMU still runs while host hv-b holds its disk"
    assert died["dead"] <= taken_at
    assert q.proc.returncode == -signal.SIGKILL
    kill_delay = died["dead"] - killed_at
    assert kill_delay < TTL + EXPIRY_SLACK  # a liveness bound: the safety one is died <= taken_at above
    record_property(f"{how}_owner_killed_after_s", round(kill_delay, 3))
    record_property(f"{how}_disk_free_after_s", round(taken_at - killed_at, 3))
    assert gone_soon(guard), "the guard outlived its job"
    # the guard's lines are in the agent's log, in its format
    assert f"sent signal 9 to domain web1 ({q.uuid})" in agent.text(), agent.text()
    assert_log_format(agent.text())
    if how == "sigkill":  # an agent back too late starts a fresh session (the old lease is gone)
        agent.stop()
        again = agents()
        (line,) = [x for x in again.text().splitlines() if "cannot continue the previous agent's session" in x]
        assert "is gone from etcd" in line and "-1s" not in line, line
        assert f"domain web1 ({q.uuid}) QEMU pid {q.pid} has exited (fenced by the previous agent's guard" in line
        assert_log_format(again.text())


LOG_LINE = re.compile(r'ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=(debug|info|warning|error|critical) '
                      r'logger=[\w.]+ msg=".*"')


def assert_log_format(text: str) -> None:
    """Every line of an agent's log (its guard's included) is one event in the agent's format."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines and all(LOG_LINE.fullmatch(line) for line in lines), text


@pytest.mark.parametrize("how", ["sigkill", "sigusr2"])
def test_restart_within_ttl_readopts_the_running_owner(
        how: str, agents: Callable[..., AgentProcess], other_host: v.Plugin, qemus: list[StandinQemu],
        disk: str) -> None:
    first = agents(via_virtlease=True, ttl=STEADY)  # the subcommand; the alias takes over from it
    q = start_vm(first, disk, qemus)
    old_guard = first.guard_pid()
    if how == "sigkill":
        first.proc.kill()
        first.wait()
    else:
        first.signal(signal.SIGUSR2)
        assert first.wait() == 75
    second = agents(ttl=STEADY)
    assert "re-attached to lease" in second.text()
    assert f"re-adopted running domain web1 ({q.uuid}) QEMU pid {q.pid}" in second.text()
    time.sleep(STEADY + 1)  # past the old fence deadline and the old lease's TTL
    assert q.alive(), "the restarted agent let the old guard kill a QEMU it had re-adopted"
    assert gone_soon(old_guard), "the old guard did not stand down"
    assert not take(other_host, disk), "the disk went free while its QEMU runs"
    died = death_watch(q)
    q.kill()  # the QEMU exits: the new agent sees it by pidfd and releases its disk
    taken_at = wait_taken(other_host, disk, 5)
    assert taken_at is not None and taken_at >= died["dead"]


def test_sigterm_with_a_vm_refuses_and_keeps_protection(
        agents: Callable[..., AgentProcess], other_host: v.Plugin, qemus: list[StandinQemu], disk: str) -> None:
    agent = agents(ttl=STEADY)
    q = start_vm(agent, disk, qemus)
    agent.signal(signal.SIGTERM)
    time.sleep(STEADY + 1)
    assert agent.proc.poll() is None
    assert "REFUSING TO EXIT: 1 domain(s)" in agent.text()
    assert q.alive() and not take(other_host, disk)
    q.kill()
    assert agent.wait(10) == 0  # exits by itself once the last owner is gone
    assert "exiting as requested" in agent.text()
    assert wait_taken(other_host, disk, 5) is not None


def test_metrics_endpoint(agents: Callable[..., AgentProcess], qemus: list[StandinQemu], disk: str,
                          other_host: v.Plugin, etcd_process: EtcdServer) -> None:
    port = free_port()
    etcd_endpoint = etcd_process.endpoints.split(",")[0]
    agent = agents("--metrics", f"127.0.0.1:{port}")
    start_vm(agent, disk, qemus)
    other = StandinQemu(agent.socket, "db1")
    qemus.append(other)
    with LockdClient(agent.socket) as c:
        c.register(other.owner())
        with pytest.raises(Exception, match="resource busy"):
            c.acquire(disk)
    time.sleep(TTL / 3 + 0.5)  # one keepalive
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    metrics = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in body.splitlines() if line and not line.startswith("#")}
    assert metrics['virtlease_agent_session_state{state="valid"}'] == 1
    assert metrics['virtlease_agent_session_state{state="lost"}'] == 0
    assert metrics["virtlease_agent_session_losses_total"] == 0
    assert 0 < metrics["virtlease_agent_fence_deadline_seconds"] <= TTL
    assert metrics["virtlease_agent_ttl_seconds"] == TTL
    assert metrics[f'virtlease_agent_etcd_endpoint_up{{endpoint="{etcd_endpoint}"}}'] == 1
    assert metrics['virtlease_agent_acquire_seconds_count{result="ok"}'] == 1
    assert metrics['virtlease_agent_acquire_seconds_count{result="refused"}'] == 1
    assert [k for k in metrics if k.startswith("virtlease_build_info{") and f'version="{v.__version__}"' in k]
    assert metrics['virtlease_agent_requests_total{op="acquire",result="granted"}'] == 1
    assert metrics['virtlease_agent_requests_total{op="acquire",result="busy"}'] == 1
    assert metrics["virtlease_agent_owners"] == 2
    assert metrics["virtlease_agent_held_disks"] == 1  # one disk (locked under its directory id and its name)
    assert metrics["virtlease_agent_keepalive_rtt_seconds_count"] >= 1


def test_reattach_refuses_a_lease_that_is_not_ours(etcd_process: EtcdServer, prefix: str) -> None:
    plugin = load(etcd_process.endpoints, prefix, "hv-c")
    try:
        session = plugin.driver.session
        with pytest.raises(reattach.CannotReattach, match="is not on lease"):
            reattach.adopt_session(session.cfg, session.lease_id, "not-the-session")
        with pytest.raises(reattach.CannotReattach, match="is gone from etcd"):
            reattach.adopt_session(session.cfg, session.lease_id + 12345, session.session_id)
        assert session.lost is None  # the failed attempts did not touch the live session
    finally:
        plugin.unload()


def test_a_second_agent_on_a_live_socket_touches_nothing(
        agents: Callable[..., AgentProcess], other_host: v.Plugin, qemus: list[StandinQemu], disk: str) -> None:
    first = agents(ttl=STEADY)
    q = start_vm(first, disk, qemus)
    guard = first.guard_pid()
    with pytest.raises(RuntimeError, match="exited 2") as exc:
        agents(ttl=STEADY)
    assert "is in use by a running daemon" in str(exc.value)
    assert "re-attached" not in str(exc.value)
    time.sleep(STEADY + 1)
    assert pid_alive(guard) and first.guard_pid() == guard, "the running agent's guard was touched"
    assert q.alive() and not take(other_host, disk)


def test_a_killed_guard_is_replaced_and_still_protects(
        agents: Callable[..., AgentProcess], other_host: v.Plugin, qemus: list[StandinQemu], disk: str) -> None:
    agent = agents()
    q = start_vm(agent, disk, qemus)
    old = agent.guard_pid()
    os.kill(old, signal.SIGKILL)
    until = time.monotonic() + 5
    while agent.guard_pid() == old and time.monotonic() < until:
        time.sleep(0.05)
    assert agent.guard_pid() != old and "is gone" in agent.text()
    died = death_watch(q)
    agent.proc.kill()
    taken_at = wait_taken(other_host, disk, TTL + 5)
    assert taken_at is not None and "dead" in died and died["dead"] <= taken_at


def test_restart_releases_what_an_owner_that_died_meanwhile_held(
        agents: Callable[..., AgentProcess], other_host: v.Plugin, qemus: list[StandinQemu], disk: str) -> None:
    first = agents(ttl=STEADY)
    q = start_vm(first, disk, qemus)
    first.proc.kill()
    first.wait()
    q.kill()  # the QEMU exits while no agent runs
    second = agents(ttl=STEADY)
    assert "re-attached to lease" in second.text()  # the lease lives on: only a release frees the disk
    assert "is no longer running: releasing what it held" in second.text()
    assert wait_taken(other_host, disk, 3) is not None, "the new agent did not release what the owner held"


def test_metrics_port_taken_the_agent_serves_without_metrics(agents: Callable[..., AgentProcess]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        agent = agents("--metrics", f"127.0.0.1:{busy.getsockname()[1]}")
        assert "going on without them" in agent.text()
        with LockdClient(agent.socket) as c:
            c.create_lockspace("/var/lib/libvirt/lockd/files")  # it answers


def test_after_a_network_cut_the_fenced_domain_starts_again_on_this_host(
        etcd_process: EtcdServer, prefix: str, sock_dir: Path, disk: str, qemus: list[StandinQemu]) -> None:
    """etcd out of reach past the fence deadline: the agent fences the domain (its QEMU killed).
    Once etcd answers, the same domain starts again on this host: its new QEMU REGISTERs and is
    not killed by a guard (no lost session covers it), and its ACQUIRE opens a new session.
    Before the fix the guard, armed with the lost session's past deadline, killed every new
    QEMU of the domain right after it registered, and was restarted over and over."""
    from virtlease_lab.relay import Relay

    with Relay.tcp(etcd_process.endpoints.split(",")[0]) as proxy:
        agent = AgentProcess(sock_dir, proxy.endpoint, prefix, "hv-c", ttl=TTL)
        try:
            old = start_vm(agent, disk, qemus)
            old_lease = json.loads(agent.state_dir.joinpath("agent-hv-c.json").read_text())["lease"]
            proxy.blackhole()
            assert gone_soon(old.pid, TTL + 3), "the domain was not fenced"
            time.sleep(1.0)  # the agent lives on with a lost session for a while
            proxy.heal()
            new = StandinQemu(agent.socket, "web1", old.uuid)  # virsh start web1 on this host again
            qemus.append(new)
            time.sleep(0.5)
            assert new.alive(), "a guard killed the new QEMU of the fenced domain"
            until = time.monotonic() + TTL + 5
            while True:  # refused while the lost lease is still in etcd (revoked once etcd answers)
                try:
                    with LockdClient(agent.socket) as c:
                        c.register(new.owner())
                        c.acquire(disk)
                    break
                except RemoteCallError as exc:
                    assert "still in etcd" in str(exc) and time.monotonic() < until, str(exc)
                    time.sleep(0.2)
            time.sleep(1.0)
            assert new.alive(), "the new QEMU was killed after its grant"
            state = json.loads(agent.state_dir.joinpath("agent-hv-c.json").read_text())
            assert state["lease"] != old_lease
            restarts = agent.text().count("starting a new one")
            assert restarts <= 1, f"the guard was restarted {restarts} times:\n{agent.text()[-3000:]}"
        finally:
            agent.stop()


def test_an_agent_started_before_etcd_serves_at_once_and_grants_once_etcd_answers(
        sock_dir: Path, prefix: str, disk: str, qemus: list[StandinQemu]) -> None:
    """A site-wide power-on where the hypervisors boot first: the agent listens at once, refuses
    ACQUIREs with 'etcd unreachable' (saying why) while it retries, and grants once etcd is up --
    for a domain registered before that too (its registration and lifeline carry over)."""
    etcd = EmbeddedEtcd()  # its ports chosen; not started yet
    agent = None
    try:
        agent = AgentProcess(sock_dir, etcd.endpoints, prefix, "hv-a", ready=LISTENING)
        early = StandinQemu(agent.socket, "web0")  # REGISTER + RESTRICT: accepted, nothing held
        qemus.append(early)
        with LockdClient(agent.socket) as c:
            c.register(early.owner())
            with pytest.raises(RemoteCallError) as refused:
                c.acquire(disk)
        msg = refused.value.error.message or ""
        assert "etcd unreachable, nothing changed: the virtlease agent has no etcd session yet" in msg, msg
        assert "connection refused" in msg, msg
        assert "no etcd session yet" in agent.text() and agent.proc.poll() is None
        etcd.start()
        agent.wait_ready(SERVING)
        with LockdClient(agent.socket) as c:
            c.register(early.owner())
            c.acquire(disk)  # granted on the session opened after the start
        dump = etcd_dump(etcd.endpoints, prefix)
        assert [(r["host"], r["name"]) for r in dump] == [("hv-a", "web0")], dump
        early.kill()  # its lifeline, opened before the session, is watched: the disk goes free
        until = time.monotonic() + 10
        while etcd_dump(etcd.endpoints, prefix) and time.monotonic() < until:
            time.sleep(0.05)
        assert etcd_dump(etcd.endpoints, prefix) == []
        assert_log_format(agent.text())
    finally:
        if agent is not None:
            agent.stop()
        etcd.stop()


def etcd_dump(endpoints: str, prefix: str) -> list[dict[str, Any]]:
    """The holder records under ``prefix``."""
    host, port = endpoints.rsplit(":", 1)
    client = etcd3.client(host=host, port=int(port))
    try:
        return [json.loads(value) for value, meta in client.get_prefix(prefix + "/")
                if b"/res/" in meta.key and b"legacy" not in value]
    finally:
        client.close()


def test_the_agents_log_says_when_a_disk_is_locked_by_this_hosts_path_only(
        agents: Callable[..., AgentProcess], qemus: list[StandinQemu], tmp_path: Path) -> None:
    """A disk path that does not exist has no directory to carry an id: it is locked under this
    host's path (nothing can have it open), and the agent's log says so at the acquire."""
    disk = tmp_path / "not-there.img"
    agent = agents()
    start_vm(agent, str(disk), qemus)
    (line,) = [x for x in agent.text().splitlines() if "has no cluster-wide identity" in x]
    assert f"disk {disk} has no cluster-wide identity: it is locked as path://{disk}, this host's path only" \
        in line and "it does not exist" in line and "level=warning" in line, line


def test_a_handover_renews_the_lease_first_so_the_successor_has_a_whole_ttl(
        etcd_process: EtcdServer, prefix: str, sock_dir: Path, disk: str, qemus: list[StandinQemu]) -> None:
    """SIGUSR2 just before a keepalive was due: the old agent renews the lease once more before it
    hands over, so its guard's deadline (and the successor's time to re-attach) is a whole
    ``ttl - margin`` away, not what was left of the keepalive rhythm (as little as two thirds of
    the TTL minus the margin: a successor slow to start under load found the VMs fenced)."""
    from virtlease_etcd.config import load_config

    ttl = 9
    agent = AgentProcess(sock_dir, etcd_process.endpoints, prefix, "hv-h", ttl=ttl)
    client = EtcdClient(load_config({"endpoints": etcd_process.endpoints}, environ={}))
    try:
        start_vm(agent, disk, qemus)
        lease = json.loads(agent.state_dir.joinpath("agent-hv-h.json").read_text())["lease"]
        until = time.monotonic() + 2 * ttl
        while client.lease_ttl(lease, timeout=2) > ttl * 2 // 3:  # the next keepalive is 0-1 s away
            assert time.monotonic() < until
            time.sleep(0.05)
        agent.signal(signal.SIGUSR2)
        assert agent.wait() == 75
        line = next(x for x in agent.text().splitlines() if "handing over: lease" in x)
        left = float(line.split("fence deadline (")[1].split("s from now")[0])
        margin = load_config({"endpoints": etcd_process.endpoints, "ttl": ttl}, environ={}).margin
        assert left >= ttl - margin - 1.0, line
    finally:
        client.close()
        agent.stop()


# -- what the guard and a successor do with the owners --------------------------------------------


def test_a_handover_without_successor_stops_only_the_owners_holding_leases(
        agents: Callable[..., AgentProcess], other_host: v.Plugin, qemus: list[StandinQemu], disk: str) -> None:
    """SIGUSR2 and no new agent comes: the guard the old one left armed stops the QEMU holding a
    disk before another host gets it, and leaves alone a QEMU that holds nothing."""
    agent = agents()
    q = start_vm(agent, disk, qemus)
    idle = StandinQemu(agent.socket, "idle")  # registered, lifeline, no lease (no disk to lock)
    qemus.append(idle)
    died = death_watch(q)
    agent.signal(signal.SIGUSR2)
    assert agent.wait() == 75
    taken_at = wait_taken(other_host, disk, TTL + 5)
    assert taken_at is not None and "dead" in died and died["dead"] <= taken_at, (
        "the owner still ran when another host was granted its disk")
    assert q.proc.returncode == -signal.SIGKILL
    time.sleep(0.3)
    assert idle.alive(), "the guard stopped a QEMU that held no lease"


def test_a_frozen_agents_guard_fires_half_a_margin_before_the_lease_can_expire(
        agents: Callable[..., AgentProcess], qemus: list[StandinQemu], disk: str, tmp_path: Path,
        kv_process: etcd3.Etcd3Client) -> None:
    """The agent is frozen (SIGSTOP): its guard waits half the fence margin past the fence
    deadline -- no more: the owner is stopped well before etcd can expire the lease."""
    config = tmp_path / "virtlease.toml"
    config.write_text("fence_margin = 3.5\n")
    agent = agents("--config", str(config), ttl=8)
    q = start_vm(agent, disk, qemus)
    lease = json.loads(agent.state_dir.joinpath("agent-hv-a.json").read_text())["lease"]
    died = death_watch(q)
    agent.signal(signal.SIGSTOP)
    try:
        until = time.monotonic() + 8 + 3
        while kv_process.get_lease_info(lease).TTL >= 0:
            assert time.monotonic() < until, "the lease never expired"
            time.sleep(0.02)
        expired_at = time.monotonic()
        assert "dead" in died, "the owner still ran when its lease expired"
        assert died["dead"] < expired_at - 0.9, (
            f"the owner was stopped only {expired_at - died['dead']:.2f}s before its lease expired")
    finally:
        agent.signal(signal.SIGCONT)


def test_an_agent_that_cannot_continue_stops_the_previous_sessions_owners_but_no_reused_pid(
        agents: Callable[..., AgentProcess], qemus: list[StandinQemu], disk: str, tmp_path: Path) -> None:
    """Agent and guard both killed, the lease expired: the next agent cannot continue the session,
    so it stops the owners of the state file still running -- except a pid whose start time
    differs from the recorded one (another process by now)."""
    first = agents()
    q = start_vm(first, disk, qemus)
    other = StandinQemu(first.socket, "db1")
    qemus.append(other)
    state_file = first.state_dir / "agent-hv-a.json"
    guard = first.guard_pid()
    first.proc.kill()
    first.wait()
    os.kill(guard, signal.SIGKILL)
    state = json.loads(state_file.read_text())
    for o in state["owners"]:
        if o["pid"] == other.pid:
            o["start"] += 1  # the recorded process is gone; its pid now belongs to another one
    state_file.write_text(json.dumps(state))
    time.sleep(TTL + 1)  # the lease has expired
    assert q.alive(), "the scenario needs an owner that outlived its lease"
    second = agents()
    assert "cannot continue the previous agent's session" in second.text()
    assert q.proc.wait(timeout=5) == -signal.SIGKILL
    assert other.alive(), "a pid with another start time was signalled"


def test_a_restarted_agent_readopts_an_owner_only_with_its_start_time(
        agents: Callable[..., AgentProcess], other_host: v.Plugin, qemus: list[StandinQemu], disk: str) -> None:
    """The state file's start time of an owner does not match its pid's any more (the QEMU died
    while no agent ran and the pid was reused): the new agent does not adopt that process, it
    releases the owner's disk -- and does not signal the process."""
    first = agents(ttl=STEADY)
    q = start_vm(first, disk, qemus)
    state_file = first.state_dir / "agent-hv-a.json"
    first.proc.kill()
    first.wait()
    state = json.loads(state_file.read_text())
    state["owners"][0]["start"] += 1
    state_file.write_text(json.dumps(state))
    second = agents(ttl=STEADY)
    assert "re-attached to lease" in second.text()
    assert "is no longer running: releasing what it held" in second.text()
    assert wait_taken(other_host, disk, 3) is not None, "the disk stayed held for another process"
    assert q.alive()


def test_a_restarted_agent_frees_a_paused_domains_reservation_when_its_qemu_exits(
        agents: Callable[..., AgentProcess], qemus: list[StandinQemu], disk: str,
        kv_process: etcd3.Etcd3Client, prefix: str) -> None:
    """The domain is paused (its disk reserved) when the agent restarts: the new agent re-adopts
    the reservation with the records, so when the QEMU exits both go."""
    first = agents(ttl=STEADY)
    q = start_vm(first, disk, qemus)
    with LockdClient(first.socket) as c:
        c.register(q.owner())
        c.release(disk)  # the pause
    until = time.monotonic() + 5
    while not dump(kv_process, prefix + "/v1/handoff"):
        assert time.monotonic() < until, "the reservation was never written"
        time.sleep(0.05)
    first.proc.kill()
    first.wait()
    second = agents(ttl=STEADY)
    assert "re-attached to lease" in second.text(), second.text()
    q.kill()
    until = time.monotonic() + 5
    while dump(kv_process, prefix + "/v1/handoff") or [k for k in dump(kv_process, prefix) if "/res/" in k]:
        assert time.monotonic() < until, f"left behind: {sorted(dump(kv_process, prefix))}"
        time.sleep(0.05)


def test_reattach_refuses_a_lease_without_our_host_key_or_with_no_time_left(
        etcd_process: EtcdServer, prefix: str, kv_process: etcd3.Etcd3Client) -> None:
    plugin = load(etcd_process.endpoints, prefix, "hv-d", ttl=10, fence_margin=3)
    leases = [kv_process.lease(30), kv_process.lease(3)]
    try:
        session = plugin.driver.session
        with pytest.raises(reattach.CannotReattach, match="is not on lease"):
            reattach.adopt_session(session.cfg, leases[0].id, session.session_id)  # alive, not ours
        with pytest.raises(reattach.CannotReattach, match="too late"):
            reattach.adopt_session(session.cfg, leases[1].id, session.session_id)  # within the margin
        assert session.lost is None
    finally:
        for lease in leases:
            lease.revoke()
        plugin.unload()


def test_reattach_refuses_a_lease_that_ends_during_the_reattach(
        etcd_process: EtcdServer, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease passes the checks, then is revoked before the adoption's keepalive."""

    session = HostSession(load_config({"endpoints": etcd_process.endpoints, "prefix": prefix, "host_id": "hv-e",
                                       "ttl": 10})).start()
    real = EtcdClient.lease_keepalive

    def revoked_first(self: EtcdClient, lease_id: int, *, timeout: float) -> int:
        if threading.current_thread() is threading.main_thread():  # the reattach, not the session's own
            self.lease_revoke(lease_id, timeout=timeout)
        return real(self, lease_id, timeout=timeout)

    monkeypatch.setattr(EtcdClient, "lease_keepalive", revoked_first)
    try:
        with pytest.raises(reattach.CannotReattach, match="expired during the reattach"):
            reattach.adopt_session(session.cfg, session.lease_id, session.session_id)
    finally:
        monkeypatch.undo()
        session.close()


def test_a_continued_session_is_valid_from_its_keepalive_send_time(etcd_process: EtcdServer, prefix: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The adoption's keepalive is sent at 1000.0 and its reply comes 5 s later (the session's
    clock): the continued session is valid until 1000.0 + TTL, and fences a margin before."""
    cfg = load_config({"endpoints": etcd_process.endpoints, "prefix": prefix, "host_id": "hv-f", "ttl": 10,
                       "fence_margin": 3})
    first = HostSession(cfg).start()
    clock = FakeClock(1000.0)
    real = EtcdClient.lease_keepalive
    slow = [True]

    def slow_reply(self: EtcdClient, lease_id: int, *, timeout: float) -> int:
        ttl = real(self, lease_id, timeout=timeout)
        if self.clock is clock and slow:
            slow.clear()
            clock.advance(5.0)  # the adoption's reply comes 5 s after its send
        return ttl

    monkeypatch.setattr(EtcdClient, "lease_keepalive", slow_reply)
    adopted = reattach.adopt_session(cfg, first.lease_id, first.session_id, clock=clock)
    try:
        assert not slow, "the adoption sent no keepalive"
        assert adopted.session.fence_at == pytest.approx(1000.0 + 10 - 3)
    finally:
        adopted.session.close()
        first.close()


def test_a_continuation_fails_over_when_the_first_member_does_not_answer(
        etcd_process: EtcdServer, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first endpoint swallows every byte (a member stalled, or a link that drops): the new
    agent's adoption asks the next member instead of giving up on the session (which would let
    the guard stop every domain at the fence deadline)."""
    endpoint = etcd_process.endpoints.split(",")[0]
    settings = {"prefix": prefix, "host_id": "hv-g", "ttl": 10, "request_timeout": 1.0}
    first = HostSession(load_config({"endpoints": endpoint, **settings})).start()
    with Relay.tcp(endpoint) as dead:
        dead.blackhole()
        cfg = load_config({"endpoints": f"{dead.endpoint},{endpoint}", **settings})
        monkeypatch.setattr("virtlease_etcd.etcd.client.random.randrange", lambda n: 0)  # the dead one first
        adopted = reattach.adopt_session(cfg, first.lease_id, first.session_id)
        try:
            assert adopted.session.lease_id == first.lease_id and adopted.session.lost is None
        finally:
            adopted.session.close()
            first.close()
