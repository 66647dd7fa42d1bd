"""The etcd backend behind the lockd server, real etcd, driven by LockdClient as libvirt
drives virtlockd: a stand-in QEMU (a child that opens its lock connection, then execs sleep)
owns the lifeline; other connections REGISTER and ACQUIRE/RELEASE per disk."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from etcd3 import transactions as tx

import virtlease as v
from virtlease_etcd.agent.backend import EtcdLockBackend
from virtlease_etcd.agent.lockdclient import LockdClient, RemoteCallError, make_owner
from virtlease_etcd.agent.protocol import ErrorCode
from virtlease_lab.agents import agent_behind_relay, hold_then_cut, images
from virtlease_lab.drivers import EXPIRY_SLACK, FAST_TTL, STEADY_TTL, backend, load
from virtlease_lab.etcdserver import EtcdServer, dump
from virtlease_lab.lockdharness import MALFORMED, ServerThread
from virtlease_lab.standin import StandinQemu
from virtlease_lab.waiting import wait_for

Agent = tuple[ServerThread, v.Plugin]


@pytest.fixture
def agents(etcd_process: EtcdServer, prefix: str, tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """agents(host) -> (server, plugin): an agent of ``host`` on its own socket, same etcd."""
    made: list[tuple[ServerThread, v.Plugin, EtcdLockBackend]] = []

    def make(host: str, **kwargs: Any) -> Agent:
        run = tmp_path / host
        run.mkdir(mode=0o700)
        plugin = load(etcd_process.endpoints, prefix, host)
        be = backend(plugin, **{"reserve_grace": 0.5, **kwargs})
        server = ServerThread(run / "virtlockd-sock", be)
        made.append((server, plugin, be))
        return server, plugin

    yield make
    for server, plugin, be in made:
        server.run(be.close())
        server.stop()
        plugin.driver.release_all()
        plugin.unload()


@pytest.fixture
def qemus() -> Iterator[Callable[..., StandinQemu]]:
    started: list[StandinQemu] = []

    def start(agent: Agent, name: str, owner_uuid: str | None = None) -> StandinQemu:
        q = StandinQemu(agent[0].path, name, owner_uuid)
        started.append(q)
        return q

    yield start
    for q in started:
        if q.alive():
            q.kill()


def call(agent: Agent, q: StandinQemu, op: str, *disks: str) -> None:
    """One libvirt-style connection: REGISTER, then ``op`` per disk, then close."""
    with LockdClient(agent[0].path) as c:
        c.register(q.owner())
        for d in disks:
            getattr(c, op)(d)


def error_of(fn: Callable[[], None]) -> str:
    with pytest.raises(RemoteCallError) as exc:
        fn()
    return exc.value.error.message or ""


def holders(etcd_process: EtcdServer, prefix: str) -> dict[str, bytes]:
    return {k: val for k, (val, _m, _l) in dump(etcd_process.client(), prefix).items() if "/res/" in k}


def reserved_in_etcd(etcd_process: EtcdServer, prefix: str) -> None:
    """Wait for a reservation marker: the agent answers a RELEASE before it is written."""
    wait_for(lambda: any("/handoff/" in k for k in dump(etcd_process.client(), prefix)), 2)


def test_libvirt_sequence_busy_pause_resume(agents: Callable[..., Agent], qemus: Callable[..., StandinQemu],
                                            tmp_path: Path, etcd_process: EtcdServer, prefix: str) -> None:
    a = agents("host-a")
    d1, d2 = images(tmp_path, "d1.img", "d2.img")
    web = qemus(a, "web1")
    call(a, web, "acquire", d1, d2)  # start: conn B acquires each disk
    db = qemus(a, "db1")
    msg = error_of(lambda: call(a, db, "acquire", d1))
    assert "held exclusive by domain web1" in msg and "on host host-a" in msg and web.uuid in msg
    # pause: REGISTER + RELEASE, twice (the second on a new connection gets an error)
    call(a, web, "release", d1, d2)
    msg = error_of(lambda: call(a, web, "release", d1))
    assert "not locked" in msg
    reserved_in_etcd(etcd_process, prefix)
    msg = error_of(lambda: call(a, db, "acquire", d1))
    assert "reserved for domain web1" in msg and "paused/migrating on host host-a" in msg
    call(a, web, "acquire", d1, d2)  # resume: cancels the reservation
    owner = a[1].driver.session.owners.peek(web.uuid)
    assert owner is not None and owner.handoff is None
    assert len([h for h in owner.held.values() if h.rid.legacy_of is None]) == 2  # two disks (each has 2 keys)


def test_owner_eof_releases_through_the_lifeline_not_the_lease(
        agents: Callable[..., Agent], qemus: Callable[..., StandinQemu], tmp_path: Path,
        etcd_process: EtcdServer, prefix: str) -> None:
    """The QEMU dies: its disk is released as soon as the agent sees it (lifeline EOF, pidfd), well
    before the lease (TTL 4 s) could expire; the bound tells the two apart (half the TTL), the
    time itself is a benchmark figure."""
    a = agents("host-a")
    (d1,) = images(tmp_path, "d1.img")
    web = qemus(a, "web1")
    call(a, web, "acquire", d1)
    assert holders(etcd_process, prefix)
    web.kill()
    wait_for(lambda: not holders(etcd_process, prefix), 2.0, what="the dead owner's disk to be released")
    assert a[1].driver.session.lost is None
    call(a, qemus(a, "db1"), "acquire", d1)


def test_lifeline_eof_with_live_pid_kills_it_first(agents: Callable[..., Agent], tmp_path: Path,
                                                   etcd_process: EtcdServer, prefix: str) -> None:
    """The lifeline closes while the QEMU lives: SIGTERM, and only once it is gone, release."""
    a = agents("host-a", kill_grace=1.0)
    (d1,) = images(tmp_path, "d1.img")
    web = StandinQemu(a[0].path, "web1", close=True)
    try:
        with LockdClient(a[0].path) as c:
            c.register(web.owner())
            c.acquire(d1)
    except RemoteCallError:
        pass  # the shell may already have closed the lifeline: the owner is ending
    wait_for(lambda: not web.alive(), 3)
    wait_for(lambda: not holders(etcd_process, prefix), 2)
    assert web.proc.returncode == -15  # SIGTERM from the agent


def test_owner_death_without_lifeline_releases(agents: Callable[..., Agent], tmp_path: Path,
                                               etcd_process: EtcdServer, prefix: str) -> None:
    """pidfd: the owner pid exits, no lifeline ever existed: its disks are released."""
    a = agents("host-a")
    (d1,) = images(tmp_path, "d1.img")
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        with LockdClient(a[0].path) as c:
            c.register(make_owner("web1", pid=sleeper.pid))
            c.acquire(d1)
        assert holders(etcd_process, prefix)
        sleeper.terminate()
        wait_for(lambda: not holders(etcd_process, prefix), 1)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_unknown_pid_is_refused(agents: Callable[..., Agent]) -> None:
    a = agents("host-a")
    with LockdClient(a[0].path) as c:
        with pytest.raises(RemoteCallError) as exc:
            c.register(make_owner("ghost", pid=2**22 + 12345))
        assert exc.value.error.code == ErrorCode.INVALID_ARG


def test_reservation_taken_over_by_same_uuid_on_another_host(
        agents: Callable[..., Agent], qemus: Callable[..., StandinQemu], tmp_path: Path,
        etcd_process: EtcdServer, prefix: str) -> None:
    a, b = agents("host-a"), agents("host-b")
    d1, d2 = images(tmp_path, "d1.img", "d2.img")
    src = qemus(a, "web1")
    call(a, src, "acquire", d1, d2)
    before = {k: m for k, (_v, m, _l) in dump(etcd_process.client(), prefix).items() if "/res/" in k}
    dst = qemus(b, "web1", src.uuid)  # the destination QEMU registers (no acquire yet)
    call(a, src, "release", d1, d2)  # end of migration on the source: reserved
    reserved_in_etcd(etcd_process, prefix)
    other = qemus(b, "db1")
    msg = error_of(lambda: call(b, other, "acquire", d1))
    assert "reserved for domain web1" in msg and "host host-a" in msg
    call(b, dst, "acquire", d1, d2)  # the destination resumes: claims both
    after = dump(etcd_process.client(), prefix)
    for key, mod in before.items():
        assert after[key][1] > mod
        assert b'"host":"host-b"' in after[key][0]
    src.kill()  # confirm: the source QEMU stops; nothing of B's is touched
    time.sleep(1.0)
    assert {k: val for k, val in dump(etcd_process.client(), prefix).items() if "/res/" in k} == \
        {k: val for k, val in after.items() if "/res/" in k}


def test_unplug_frees_the_disk_and_keeps_the_others_held(
        agents: Callable[..., Agent], qemus: Callable[..., StandinQemu], tmp_path: Path,
        etcd_process: EtcdServer, prefix: str) -> None:
    """libvirt's hot-unplug (and a block-job pivot) RELEASEs one disk of a running QEMU on a
    connection of its own.  Once that connection closes the disk is free for any domain, and the
    QEMU's other disks stay held: the same UUID started on another host is refused (before the
    fix every disk turned into a reservation that such a start claimed: two writers)."""
    a, b = agents("host-a"), agents("host-b")
    root, data = images(tmp_path, "root.img", "data.img")
    web = qemus(a, "web1")
    call(a, web, "acquire", root, data)
    call(a, web, "release", data)  # virsh detach-disk web1 sdb --live
    twin = qemus(b, "web1", web.uuid)  # the same domain defined on host B, started there
    msg = error_of(lambda: call(b, twin, "acquire", root))
    assert "held exclusive by domain web1" in msg and "on host host-a" in msg and "reserved" not in msg, msg
    other = qemus(b, "db1")
    wait_for(lambda: not [k for k in dump(etcd_process.client(), prefix) if "/handoff/" in k], 2)
    call(b, other, "acquire", data)  # the unplugged disk is free at once
    owner = a[1].driver.session.owners.peek(web.uuid)
    assert owner is not None and owner.handoff is None
    assert [h.rid.path for h in owner.held.values() if h.rid.legacy_of is None] == [root]  # its other keys too
    msg = error_of(lambda: call(b, twin, "acquire", root))
    assert "held exclusive by domain web1" in msg and "on host host-a" in msg, msg
    call(a, web, "release", root)  # now a pause: the last disk stays reserved for the domain
    reserved_in_etcd(etcd_process, prefix)
    msg = error_of(lambda: call(b, other, "acquire", root))
    assert "reserved for domain web1" in msg, msg


def test_a_release_etcd_did_not_answer_is_retried_until_it_does(
        etcd_process: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """The QEMU exits while etcd is out of reach for longer than the release deadline (not long
    enough to lose the session): the agent keeps its records and frees the disk once etcd answers.
    Before the fix the failed release forgot them, and the disk stayed held on a live lease."""
    with agent_behind_relay(etcd_process, prefix, tmp_path, "host-f", ttl=STEADY_TTL, acquire_timeout=1.0) \
            as (proxy, plugin, server):
        (d1,) = images(tmp_path, "d1.img")
        web = StandinQemu(server.path, "web1")
        with LockdClient(server.path) as c:
            c.register(web.owner())
            c.acquire(d1)
        lease = plugin.driver.session.lease_id
        proxy.cut()  # connections reset and refused (a blackhole would garble the HTTP/2 stream for good)
        web.kill()
        time.sleep(2.5)  # the release (deadline 1 s) has failed at least once
        proxy.heal()
        # liveness: a loaded machine (load 30 here) took over 6 s to get the healed link working
        wait_for(lambda: not holders(etcd_process, prefix), 20)
        assert plugin.driver.session.lost is None and plugin.driver.session.lease_id == lease


def test_unclaimed_reservation_freed_after_grace(agents: Callable[..., Agent], qemus: Callable[..., StandinQemu],
                                                 tmp_path: Path, etcd_process: EtcdServer, prefix: str) -> None:
    a = agents("host-a", reserve_grace=1.0)
    (d1,) = images(tmp_path, "d1.img")
    web = qemus(a, "web1")
    call(a, web, "acquire", d1)
    call(a, web, "release", d1)
    web.kill()
    time.sleep(0.5)
    assert holders(etcd_process, prefix), "freed before the reserve grace"
    wait_for(lambda: not dump(etcd_process.client(), prefix + "/v1/handoff") and not holders(etcd_process, prefix), 3)
    call(a, qemus(a, "db1"), "acquire", d1)


@pytest.mark.parametrize(("case", "data"), [(m[0], m[1]) for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_frames_change_nothing(agents: Callable[..., Agent], qemus: Callable[..., StandinQemu],
                                         tmp_path: Path, etcd_process: EtcdServer, prefix: str,
                                         case: str, data: bytes) -> None:
    a = agents("host-a")
    (d1,) = images(tmp_path, "d1.img")
    web = qemus(a, "web1")
    call(a, web, "acquire", d1)
    before = dump(etcd_process.client(), prefix)
    with LockdClient(a[0].path) as c:
        c.register(web.owner())
        c.send_raw(data)
        c.is_closed_by_server(0.3)
    with LockdClient(a[0].path) as c:
        c.send_raw(data)
        c.is_closed_by_server(0.3)
    assert dump(etcd_process.client(), prefix) == before
    assert web.alive()


def test_etcd_unreachable_is_an_error_reply_not_a_hang(etcd_process: EtcdServer, prefix: str,
                                                       tmp_path: Path) -> None:
    """An agent whose etcd goes away answers within its deadline (acquire_timeout 2 s here)."""
    from virtlease_lab.relay import Relay

    host, port = etcd_process.endpoints.split(",")[0].rsplit(":", 1)
    with Relay.tcp(f"{host}:{port}") as proxy:
        plugin = load(proxy.endpoint, prefix, "host-p", acquire_timeout=2.0, request_timeout=0.5)
        run = tmp_path / "p"
        run.mkdir(mode=0o700)
        server = ServerThread(run / "virtlockd-sock", backend(plugin))
        sleeper = subprocess.Popen(["sleep", "600"])
        try:
            (d1,) = images(tmp_path, "d1.img")
            proxy.blackhole()
            with LockdClient(server.path, timeout=10) as c:
                c.register(make_owner("web1", pid=sleeper.pid))
                t0 = time.monotonic()
                msg = error_of(lambda: c.acquire(d1))
                took = time.monotonic() - t0
            # an answer after the 2 s deadline, not a hang (the client waits 10 s; slack for a loaded machine)
            assert took < 2.0 + EXPIRY_SLACK and ("etcd unreachable" in msg or "session is lost" in msg), (took, msg)
        finally:
            sleeper.kill()
            sleeper.wait()
            server.stop()
            proxy.heal()
            plugin.driver.release_all()
            plugin.unload()


def test_after_a_lost_session_the_next_acquire_opens_a_new_one(etcd_process: EtcdServer, prefix: str,
                                                               tmp_path: Path) -> None:
    """etcd out of reach past the fence deadline: the owner is fenced (killed) and the session
    lost; once etcd answers, the next ACQUIRE opens a new session (a new lease) and is granted,
    checked against etcd as always (the old owner's disk is free, the old lease revoked or gone)."""
    with agent_behind_relay(etcd_process, prefix, tmp_path, "host-r", ttl=FAST_TTL) as (proxy, plugin, server):
        d1, d2 = images(tmp_path, "d1.img", "d2.img")
        old, old_lease = hold_then_cut(proxy, plugin, server, d1)
        wait_for(lambda: not old.alive(), 10)  # fenced: poweroff
        assert plugin.driver.session.lost is not None
        proxy.heal()
        # the fenced lease is revoked once etcd answers (its domain exited); until then an ACQUIRE
        # is refused (test_no_new_session_while_the_lost_one_is_still_in_etcd)
        wait_for(lambda: etcd_process.client().get_lease_info(old_lease).TTL < 0, 10)
        new = StandinQemu(server.path, "web2")
        with LockdClient(server.path) as c:
            c.register(new.owner())
            c.acquire(d1)  # the fenced owner's disk: free again, granted on the new lease
            c.acquire(d2)
        assert plugin.driver.session.lost is None and plugin.driver.session.lease_id != old_lease
        assert any(b"web2" in value for value in holders(etcd_process, prefix).values())
        new.kill()


def test_no_new_session_while_the_lost_one_is_still_in_etcd(etcd_process: EtcdServer, prefix: str,
                                                             tmp_path: Path) -> None:
    """A paused (fenced) domain keeps the lost lease from early revocation: until etcd expires
    it, an ACQUIRE is refused saying so (a new session then would be a second live session of
    this host); after that it opens a new session and is granted."""
    with agent_behind_relay(etcd_process, prefix, tmp_path, "host-s", default_action="pause", ttl=6,
                             fence_margin=2.9) as (proxy, plugin, server):  # a wide window: fence -> expiry
        (d2,) = images(tmp_path, "d2.img")
        old, old_lease = hold_then_cut(proxy, plugin, server, d2)
        wait_for(lambda: plugin.driver.session.lost is not None, 10)  # fenced: paused, still alive
        proxy.heal()
        new = StandinQemu(server.path, "web2")
        with LockdClient(server.path) as c:
            c.register(new.owner())
            msg = error_of(lambda: c.acquire(d2))
            assert f"lease {old_lease:x} is still in etcd" in msg and "nothing changed" in msg, msg
            wait_for(lambda: etcd_process.client().get_lease_info(old_lease).TTL < 0, 10)
            c.acquire(d2)  # the paused domain's disk: its lease expired, granted on the new session
        assert plugin.driver.session.lease_id != old_lease
        new.kill()
        old.kill()


# -- the QEMU's life: no lease outlives its process, no process runs unguarded -----------------


def test_an_acquire_is_refused_when_the_guard_cannot_be_armed(agents: Callable[..., Agent],
                                                              qemus: Callable[..., StandinQemu],
                                                              tmp_path: Path) -> None:
    """The owner-change hook (the agent's guard re-arming) fails: the ACQUIRE is answered with an
    error, so libvirt does not start a QEMU the guard does not know."""
    a = agents("host-a")
    (d1,) = images(tmp_path, "d1.img")

    def guard_gone() -> None:
        raise OSError("[Errno 32] Broken pipe: the guard process cannot be re-armed (test)")

    cast(EtcdLockBackend, a[0].server.backend).on_change = guard_gone
    web = qemus(a, "web1")
    msg = error_of(lambda: call(a, web, "acquire", d1))
    assert "cannot arm its guard process" in msg and "no QEMU runs unguarded" in msg, msg


@pytest.mark.parametrize("lifeline", [True, False], ids=["with-lifeline", "without-lifeline"])
def test_a_second_pid_for_a_domain_whose_qemu_runs_is_refused(agents: Callable[..., Agent],
                                                              qemus: Callable[..., StandinQemu],
                                                              lifeline: bool) -> None:
    """A QEMU of the domain runs (with its lifeline, or registered without one as after an agent
    restart): a REGISTER of another pid for the same domain is refused, the running one stays
    the owner."""
    a = agents("host-a")
    other = subprocess.Popen(["sleep", "600"])
    first = subprocess.Popen(["sleep", "600"])
    try:
        if lifeline:
            web = qemus(a, "web1")
            uuid, pid = web.uuid, web.pid
        else:
            uuid, pid = str(uuidlib.uuid4()), first.pid
            with LockdClient(a[0].path) as c:
                c.register(make_owner("web1", pid=pid, owner_uuid=uuidlib.UUID(uuid)))
        with LockdClient(a[0].path) as c:
            with pytest.raises(RemoteCallError) as exc:
                c.register(make_owner("web1", pid=other.pid, owner_uuid=uuidlib.UUID(uuid)))
        assert exc.value.error.code == ErrorCode.OPERATION_INVALID
        assert f"QEMU pid {pid} is still running" in (exc.value.error.message or "")
        tracked = cast(EtcdLockBackend, a[0].server.backend).tracked(uuid)
        assert tracked is not None and tracked.pid == pid
    finally:
        for p in (other, first):
            p.kill()
            p.wait()


def test_only_the_qemus_own_connection_is_its_lifeline(agents: Callable[..., Agent],
                                                       qemus: Callable[..., StandinQemu], tmp_path: Path,
                                                       etcd_process: EtcdServer, prefix: str) -> None:
    """Another process (here the test) registers the QEMU's pid and RESTRICTs, then closes: that
    is not the QEMU's lifeline (its peer pid differs), so the QEMU is not killed and keeps its disk."""
    a = agents("host-a")
    (d1,) = images(tmp_path, "d1.img")
    web = qemus(a, "web1")
    call(a, web, "acquire", d1)
    with LockdClient(a[0].path) as c:
        c.register(web.owner())
        c.restrict()
    time.sleep(1.0)
    assert web.alive(), "the QEMU was killed when another process's connection closed"
    assert holders(etcd_process, prefix)


def test_a_grant_whose_qemu_exited_while_it_was_in_flight_is_undone(agents: Callable[..., Agent],
                                                                    qemus: Callable[..., StandinQemu],
                                                                    tmp_path: Path, etcd_process: EtcdServer,
                                                                    prefix: str) -> None:
    """The QEMU dies while its ACQUIRE's grant is on its way to etcd: the grant lands after the
    agent released what the QEMU had, so the agent undoes it and answers with an error."""
    a = agents("host-a")
    (d1,) = images(tmp_path, "d1.img")
    web = qemus(a, "web1")
    client = a[1].driver.session.client
    real: Callable[..., Any] = client.txn

    def txn(compare: Any, success: Any, failure: Any = (), *, timeout: float) -> Any:
        if web.alive() and any(isinstance(op, tx.Put) for op in success):
            web.kill()  # the QEMU dies with its grant in flight...
            time.sleep(0.5)  # ...and the agent sees it before the grant's reply
        return real(compare, success, failure, timeout=timeout)

    client.txn = txn
    msg = error_of(lambda: call(a, web, "acquire", d1))
    assert "during the acquire" in msg and "nothing is held" in msg, msg
    wait_for(lambda: not holders(etcd_process, prefix), 3)


def test_a_release_of_a_disk_this_qemu_never_acquired_is_refused(agents: Callable[..., Agent],
                                                                  qemus: Callable[..., StandinQemu], tmp_path: Path,
                                                                  etcd_process: EtcdServer, prefix: str) -> None:
    """A RELEASE of a disk the QEMU acquired is answered from the agent's memory; one of a disk
    it never acquired (another domain holds it) must still be refused, and change nothing."""
    a = agents("host-a")
    (d1,) = images(tmp_path, "d1.img")
    web, db = qemus(a, "web1"), qemus(a, "db1")
    call(a, web, "acquire", d1)
    before = dump(etcd_process.client(), prefix + "/v1/res")
    assert "not locked" in error_of(lambda: call(a, db, "release", d1))
    time.sleep(0.3)  # a reservation written in the background would be there by now
    assert dump(etcd_process.client(), prefix + "/v1/res") == before
    assert not dump(etcd_process.client(), prefix + "/v1/handoff")
    assert "not locked" in error_of(lambda: call(a, web, "release", d1, d1))  # its own, twice


def test_a_destination_reads_the_markers_when_its_resume_registers(agents: Callable[..., Agent],
                                                                   qemus: Callable[..., StandinQemu], tmp_path: Path,
                                                                   etcd_process: EtcdServer, prefix: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A live migration's destination QEMU started paused (RESTRICTed, holding nothing): when
    libvirt's resume connection REGISTERs, the agent reads the domain's markers at once, and the
    ACQUIRE that follows claims the source's reservation with what it read: no read of its own in
    the guest's downtime."""
    from virtlease_etcd.ops import handoff

    reads: list[int] = []
    real = handoff.markers_of

    def counted(d: Any) -> Any:
        reads.append(1)
        return real(d)

    monkeypatch.setattr(handoff, "markers_of", counted)
    a, b = agents("host-a"), agents("host-b")
    (d1,) = images(tmp_path, "d1.img")
    src = qemus(a, "web1")
    call(a, src, "acquire", d1)
    dst = qemus(b, "web1", src.uuid)  # prepare: the destination QEMU starts paused
    call(a, src, "release", d1)  # the pause on the source
    reserved_in_etcd(etcd_process, prefix)
    reads.clear()
    with LockdClient(b[0].path) as c:
        c.register(dst.owner())
        wait_for(lambda: len(reads) == 1, 2)  # read ahead, before any ACQUIRE was sent
        c.acquire(d1)
    assert len(reads) == 1, "the ACQUIRE read the markers again"
    records = holders(etcd_process, prefix).values()  # the disk's keys (its directory id, its name)
    assert records and all(b"host-b" in r and b"host-a" not in r for r in records)
    assert not dump(etcd_process.client(), prefix + "/v1/handoff")


def test_a_resume_right_after_a_pause_leaves_no_reservation(agents: Callable[..., Agent],
                                                            qemus: Callable[..., StandinQemu], tmp_path: Path,
                                                            etcd_process: EtcdServer, prefix: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The pause's RELEASEs are answered before their reservation is written; the first one is
    slow to start (a disk's identity on a slow file server, say).  The resume that follows at
    once must wait for both, then cancel the reservation: none may land after it (a migration's
    destination could claim the disks of a running domain)."""
    from virtlease_etcd.ops.lockd import LockdDomain

    real = LockdDomain.release
    calls: list[int] = []

    def slow_start(self: LockdDomain, resource: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.6)
        return real(self, resource)

    monkeypatch.setattr(LockdDomain, "release", slow_start)
    a = agents("host-a")
    d1, d2 = images(tmp_path, "d1.img", "d2.img")
    web = qemus(a, "web1")
    call(a, web, "acquire", d1, d2)
    call(a, web, "release", d1, d2)  # the pause
    call(a, web, "acquire", d1, d2)  # the resume, at once
    time.sleep(1.0)
    assert len(calls) == 2
    assert not dump(etcd_process.client(), prefix + "/v1/handoff"), "a reservation of a running domain"
    owner = a[1].driver.session.owners.peek(web.uuid)
    assert owner is not None and owner.handoff is None
    assert sum(1 for h in owner.held.values() if h.rid.legacy_of is None) == 2  # two disks (each under 2 keys)


@pytest.mark.system
def test_a_qemu_that_outlives_its_sigkill_keeps_its_leases_until_it_exits(
        agents: Callable[..., Agent], tmp_path: Path, etcd_process: EtcdServer, prefix: str, frozen: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    """The QEMU loses its lifeline while it runs, ignores the agent's SIGTERM and is stuck in
    storage I/O (frozen: state D) when the SIGKILL comes, so the SIGKILL stays pending: its leases
    stay held however long that takes (its write may still land), and go once it has exited."""
    a = agents("host-a", kill_grace=3.0, sigkill_wait=0.5)
    (d1,) = images(tmp_path, "d1.img")
    web = StandinQemu(a[0].path, "web1", stubborn=True)

    def logged(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records)

    try:
        caplog.set_level(logging.INFO, logger="virtlease_etcd.agent.tracking")
        call(a, web, "acquire", d1)
        web.proc.send_signal(signal.SIGUSR1)  # it loses its lock connection while it runs
        wait_for(lambda: logged("sending SIGTERM") > 0, 10)
        frozen.freeze(web.pid)  # stuck in I/O before the SIGKILL comes (kill_grace later)
        wait_for(lambda: logged("does not exit after SIGKILL") >= 3, 30)  # the agent waited three rounds
        assert web.alive() and holders(etcd_process, prefix), "released while the QEMU still exists"
        frozen.thaw()
        assert web.proc.wait(timeout=3) == -signal.SIGKILL
        wait_for(lambda: not holders(etcd_process, prefix), 3)
    finally:
        frozen.thaw()
        if web.alive():
            web.kill()
