"""A state is evidence, never a credential; holds belong to the owner.

Each test pins one way a caller (careless or hostile) could get one disk
granted to two hosts, or could leave something half-done, with the legal
calls of the ABI against a real etcd.  Each docstring says what the
driver did before its fix; every one of these tests failed on it then.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import etcd3
import pytest

import virtlease as v
from virtlease_etcd.etcd.client import EtcdClient
from virtlease_lab.drivers import new_uuid
from virtlease_lab.etcdserver import EtcdServer, dump

D = v.ResourceType.DISK
MakeDriver = Callable[..., v.Plugin]


@pytest.fixture
def make_driver(local_drivers: MakeDriver) -> MakeDriver:
    """Drivers of several hosts in this process (one session each)."""
    return local_drivers


@pytest.fixture
def kv(kv_process: etcd3.Etcd3Client) -> etcd3.Etcd3Client:
    return kv_process


@pytest.fixture
def vms() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def spawn() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sleep", "300"])
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        proc.kill()
        proc.wait()


def obj_of(plugin: v.Plugin, uuid: str, disks: list[str], *, name: str = "web1",
           flags: v.ResourceFlags = v.ResourceFlags(0), new_flags: v.NewFlags = v.NewFlags(0),
           pid: int | None = None) -> v.LockObject:
    obj = plugin.new_object(uuid=uuid, name=name, flags=new_flags, pid=pid)
    for d in disks:
        obj.add_resource(D, d, flags=flags)
    return obj


def holders(kv: etcd3.Etcd3Client, prefix: str) -> dict[str, tuple[bytes, int]]:
    return {k: (val, rev) for k, (val, rev, _) in dump(kv, prefix).items() if "/res/" in k}


def edit(state: str, **changes: object) -> str:
    head, _, body = state.partition(" ")
    data = json.loads(body)
    res_changes = changes.pop("res", None)
    data.update(changes)
    if isinstance(res_changes, dict):
        for r in data["res"]:
            r.update(res_changes)
    return f"{head} {json.dumps(data)}"


def lease_of(plugin: v.Plugin) -> int:
    return int(plugin.driver.session.lease_id)


# -- a resume takes only what nobody holds ------------------------------------------


def test_resume_state_of_a_running_holder_is_refused_on_another_host(make_driver: MakeDriver,
                                                                      kv: etcd3.Etcd3Client,
                                                                      prefix: str) -> None:
    """Host B acquiring with the state host A's inquire() returned (the
    migration-cookie pattern) while A still holds the disk replaced A's record."""
    a, b = make_driver("host-a"), make_driver("host-b")
    uuid = new_uuid()
    src = obj_of(a, uuid, ["/srv/ck/root.img"])
    src.acquire()
    state = src.inquire()
    before = holders(kv, prefix)
    dst = obj_of(b, uuid, ["/srv/ck/root.img"])
    with pytest.raises(v.ResourceBusyError) as info:
        dst.acquire(state)
    assert info.value.conflicts[0].host == "host-a"
    assert holders(kv, prefix) == before
    # once the source released (libvirt pauses it first), the same state resumes on B
    src.release()
    dst.acquire(state)
    assert [h.token for h in dst.held()] > [t for _, t in before.values()]


def test_forged_states_never_take_a_held_disk(make_driver: MakeDriver, kv: etcd3.Etcd3Client,
                                              prefix: str) -> None:
    """A state edited with another uuid/host and the holder's token
    (as a ResourceBusyError shows it), and a forged *shared* resume against an
    exclusive holder: every one refused, etcd unchanged."""
    a, b = make_driver("host-a"), make_driver("host-b")
    holder = obj_of(a, new_uuid(), ["/srv/ck/f.img"])
    holder.acquire()
    real = holder.inquire()
    (held,) = holder.held()
    before = holders(kv, prefix)
    thief_uuid = new_uuid()
    forgeries = [
        edit(real, uuid=thief_uuid, host="host-b", name="thief"),
        edit(real, uuid=thief_uuid, host="host-b", name="thief", res={"token": held.token}),
        edit(real, uuid=thief_uuid, host="host-b", name="thief",
             res={"mode": "shared", "xgen": held.token, "token": held.token}),
        edit(real, uuid=thief_uuid, host="host-b", name="thief",
             res={"mode": "shared", "xgen": 0, "token": 1}),
    ]
    for forged in forgeries:
        mode = json.loads(forged.partition(" ")[2])["res"][0]["mode"]
        flags = v.ResourceFlags.SHARED if mode == "shared" else v.ResourceFlags(0)
        thief = obj_of(b, thief_uuid, ["/srv/ck/f.img"], name="thief", flags=flags)
        with pytest.raises((v.ResourceBusyError, v.StaleStateError)):
            thief.acquire(forged)
        thief.free()
        assert holders(kv, prefix) == before, forged
    assert holder.held()[0].token == held.token


# -- holds belong to the owner (libvirt makes a fresh object per operation) -----------------


def test_a_fresh_object_of_the_domain_inquires_and_releases_what_an_earlier_one_took(
        make_driver: MakeDriver, kv: etcd3.Etcd3Client, prefix: str) -> None:
    """libvirt: start = new+add+acquire+free; the locks stay with the domain."""
    a, b = make_driver("host-a"), make_driver("host-b")
    uuid = new_uuid()
    start = obj_of(a, uuid, ["/srv/own/root.img"])
    start.acquire()
    token = start.held()[0].token
    start.free()  # the handle goes; the domain keeps its disk
    with pytest.raises(v.ResourceBusyError):
        obj_of(b, new_uuid(), ["/srv/own/root.img"], name="other").acquire()
    inq = obj_of(a, uuid, ["/srv/own/root.img"])
    assert [h.token for h in inq.held()] == [token]
    assert "virtlease-state/" in inq.inquire()
    inq.free()
    pause = obj_of(a, uuid, ["/srv/own/root.img"])
    state = pause.release()
    pause.free()
    assert holders(kv, prefix) == {}
    resume = obj_of(a, uuid, ["/srv/own/root.img"])
    resume.acquire(state)
    assert resume.held()[0].token > token
    resume.release()


def test_another_domain_on_the_same_host_cannot_release_or_inquire_its_neighbour(
        make_driver: MakeDriver, kv: etcd3.Etcd3Client, prefix: str) -> None:
    a = make_driver("host-a")
    web1 = obj_of(a, new_uuid(), ["/srv/own/n.img"])
    web1.acquire()
    before = holders(kv, prefix)
    neighbour = obj_of(a, new_uuid(), ["/srv/own/n.img"], name="neighbour")
    with pytest.raises(v.ObjectStateError):
        neighbour.release()
    assert neighbour.held() == []
    assert holders(kv, prefix) == before


def test_unload_is_refused_while_a_domain_holds_disks(make_driver: MakeDriver) -> None:
    """A VM must not keep running after its host silently dropped its lease."""
    a = make_driver("host-a")
    obj = obj_of(a, new_uuid(), ["/srv/own/u.img"])
    obj.acquire()
    obj.free()
    with pytest.raises(v.PluginBusyError, match="web1"):
        a.unload()
    obj_of(a, obj.uuid, ["/srv/own/u.img"]).release()
    for o in a.objects:
        o.free()
    a.unload()


# -- a claim checks that the marker names this host ---------------------------------


def test_third_host_cannot_claim_by_editing_the_destination(make_driver: MakeDriver, kv: etcd3.Etcd3Client,
                                                            prefix: str) -> None:
    """Host C edited the handoff state's ``to`` to itself and claimed."""
    a, b, c = make_driver("host-a"), make_driver("host-b"), make_driver("host-c")
    uuid = new_uuid()
    src = obj_of(a, uuid, ["/srv/mig2/r.img"])
    src.acquire()
    state = src.prepare_migrate("host-b")
    before = holders(kv, prefix)
    thief = obj_of(c, uuid, ["/srv/mig2/r.img"], new_flags=v.NewFlags.MIGRATE)
    with pytest.raises(v.StaleStateError):
        thief.acquire(edit(state, to="host-c"))
    assert holders(kv, prefix) == before
    dst = obj_of(b, uuid, ["/srv/mig2/r.img"], new_flags=v.NewFlags.MIGRATE)
    dst.acquire(state)
    src.complete_migrate_out()
    assert [json.loads(val)["host"] for val, _ in holders(kv, prefix).values()] == ["host-b"]
    dst.release()


# -- the hand-back leaves no marker, in one transaction -------------------


def test_handback_leaves_no_marker_and_the_vm_can_migrate_again(make_driver: MakeDriver,
                                                                kv: etcd3.Etcd3Client, prefix: str) -> None:
    """After a→b, cancel on b, reclaim on a, ``handoff/<uuid>/<b>`` stayed and
    a later migration of the VM from b was refused.  And the old marker was
    deleted in a separate request after the reclaim (a failure there made acquire
    raise with the disks held); now the claim removes it in its own transaction."""
    a, b = make_driver("host-a"), make_driver("host-b")
    uuid = new_uuid()
    src = obj_of(a, uuid, ["/srv/hb/r.img"])
    src.acquire()
    state = src.prepare_migrate("host-b")
    dst = obj_of(b, uuid, ["/srv/hb/r.img"], new_flags=v.NewFlags.MIGRATE)
    dst.acquire(state)
    back = dst.complete_migrate_in(cancel=True)
    assert back is not None
    with pytest.raises(v.StaleStateError, match="already claimed"):
        src.complete_migrate_out(cancel=True)  # the cancel of a→b: b already claimed it
    src.acquire(back)
    token = src.held()[0].token
    keys = dump(kv, prefix)
    assert not [k for k in keys if "/handoff/" in k], keys
    # the marker b wrote went in the reclaim's own transaction (no second request to fail)
    b_marker = f"{prefix}/v1/handoff/{uuid}/host-b"
    assert _exists_at(kv, b_marker, token - 1) and not _exists_at(kv, b_marker, token)
    assert a.driver.status().handoffs == []
    # everyone frees; then the VM runs on b and migrates from b again
    src.release()
    dst.free()
    again = obj_of(b, uuid, ["/srv/hb/r.img"])
    again.acquire()
    again.prepare_migrate("host-a")
    again.complete_migrate_out(cancel=True)
    again.release()


def _exists_at(kv: etcd3.Etcd3Client, key: str, revision: int) -> bool:
    """Whether ``key`` existed at ``revision`` (etcd's MVCC history)."""
    from etcd3 import etcdrpc

    resp = kv.kvstub.Range(etcdrpc.RangeRequest(key=key.encode(), revision=revision), 5)
    return bool(resp.kvs)


# -- a retried grant recognises its own earlier attempt -----------------------------


def test_retry_after_a_late_commit_recognises_its_own_grant(make_driver: MakeDriver, kv: etcd3.Etcd3Client,
                                                            prefix: str, monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """The first attempt's reply is lost, the read-back runs before that
    attempt commits, the retry then meets the caller's own record: it raised
    ResourceBusyError naming the caller's own domain and left the record on the
    lease after free()."""
    from virtlease_etcd.etcd.client import TransientError

    a = make_driver("host-a")
    client = a.driver.session.client
    real_txn, real_get = client.txn, client.get_range
    first: dict[str, bool] = {"txn": True, "get": True}

    def late_txn(compare: object, success: object, failure: object = (), *, timeout: float) -> object:
        if first["txn"] and success:
            first["txn"] = False
            threading.Timer(0.3, lambda: real_txn(compare, success, failure, timeout=2.0)).start()
            raise TransientError("reply lost (test)", ambiguous=True)
        return real_txn(compare, success, failure, timeout=timeout)

    def slow_get(*args: object, **kw: object) -> object:
        result = real_get(*args, **kw)  # read before the late commit...
        if first["get"]:
            first["get"] = False
            time.sleep(0.6)  # ...and answered after it
        return result

    monkeypatch.setattr(client, "txn", late_txn)
    monkeypatch.setattr(client, "get_range", slow_get)
    obj = obj_of(a, new_uuid(), ["/srv/retry/r.img"])
    obj.acquire()
    ((_, token),) = holders(kv, prefix).values()
    assert [h.token for h in obj.held()] == [token]
    obj.release()
    obj.free()
    assert holders(kv, prefix) == {}


# -- a lease revoked from outside fences at once -----------------------------------


def test_lease_revoked_from_outside_fences_and_raises_lease_lost(make_driver: MakeDriver,
                                                                 kv: etcd3.Etcd3Client,
                                                                 vms: Callable[[], subprocess.Popen[bytes]]
                                                                 ) -> None:
    """``etcdctl lease revoke`` surfaced as an internal LeaseNotFound and the
    host kept running its VMs until the next keepalive."""
    a = make_driver("host-a", ttl=30)
    vm = vms()
    obj_of(a, new_uuid(), ["/srv/rev/r.img"], pid=vm.pid).acquire()
    kv.revoke_lease(lease_of(a))
    with pytest.raises(v.LeaseLostError):
        obj_of(a, new_uuid(), ["/srv/rev/other.img"], name="web2").acquire()
    assert vm.wait(timeout=2) is not None  # killed by the fence, long before a keepalive (10 s)


def test_a_request_refused_for_a_revoked_lease_fences_by_itself(make_driver: MakeDriver, kv: etcd3.Etcd3Client,
                                                                vms: Callable[[], subprocess.Popen[bytes]],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The request path alone: the host-key watch is kept deaf (it would otherwise notice the
    revocation first and fence before any request), so the acquire's transaction is the first
    to hear "lease not found" from etcd; it must fence the session and raise LeaseLostError, not
    pass the internal error up while the VMs run on a revoked lease."""
    def deaf(self: EtcdClient, key: str, *, stop: Callable[[], bool]) -> Iterator[bool]:
        while not stop():
            time.sleep(0.05)
        yield from ()

    monkeypatch.setattr(EtcdClient, "watch_deleted", deaf)
    a = make_driver("host-a", ttl=30)
    vm = vms()
    obj_of(a, new_uuid(), ["/srv/rev/q.img"], pid=vm.pid).acquire()
    kv.revoke_lease(lease_of(a))
    time.sleep(0.5)
    assert a.driver.session.lost is None, "something else noticed the revocation first"
    with pytest.raises(v.LeaseLostError):
        obj_of(a, new_uuid(), ["/srv/rev/other-q.img"], name="web2").acquire()
    assert vm.wait(timeout=2) is not None  # fenced by the refused request, long before a keepalive (10 s)


def test_lease_revoked_from_outside_fences_without_any_call(make_driver: MakeDriver, kv: etcd3.Etcd3Client,
                                                           vms: Callable[[], subprocess.Popen[bytes]]) -> None:
    """The host notices the revocation itself (its host key is watched)."""
    a = make_driver("host-a", ttl=30)
    vm = vms()
    obj_of(a, new_uuid(), ["/srv/rev/w.img"], pid=vm.pid).acquire()
    kv.revoke_lease(lease_of(a))
    started = time.monotonic()
    vm.wait(timeout=5)
    assert time.monotonic() - started < 2.0  # a keepalive would come only after 10 s
    assert a.driver.session.lost is not None


# -- every driver instance keeps its own policy ---------------------------------------


def test_second_driver_of_a_host_keeps_its_own_failure_policy(make_driver: MakeDriver, kv: etcd3.Etcd3Client,
                                                              vms: Callable[[], subprocess.Popen[bytes]]) -> None:
    """A second load_driver for the same host silently used the first one's
    configuration: one that asked for poweroff got ignore."""
    lenient = make_driver("host-a", ttl=30, default_action="ignore")
    strict = make_driver("host-a", ttl=30, default_action="poweroff")
    assert lenient.driver.session is strict.driver.session
    spared, killed = vms(), vms()
    obj_of(lenient, new_uuid(), ["/srv/pol/1.img"], pid=spared.pid, name="lenient").acquire()
    obj_of(strict, new_uuid(), ["/srv/pol/2.img"], pid=killed.pid, name="strict").acquire()
    kv.revoke_lease(lease_of(strict))
    assert killed.wait(timeout=5) is not None
    time.sleep(0.2)
    assert spared.poll() is None


def test_second_driver_with_another_ttl_is_refused(make_driver: MakeDriver) -> None:
    make_driver("host-a", ttl=3)
    with pytest.raises(v.ConfigError, match="ttl"):
        make_driver("host-a", ttl=5)


# -- REGISTER_ONLY takes no state ------------------------------------------------------


def test_register_only_refuses_a_state(make_driver: MakeDriver) -> None:
    """REGISTER_ONLY ignored its state, also on a NewFlags.MIGRATE object."""
    a = make_driver("host-a")
    obj = obj_of(a, new_uuid(), ["/srv/reg/r.img"])
    obj.acquire()
    state = obj.release()
    with pytest.raises(v.ValidationError, match="REGISTER_ONLY"):
        obj.acquire(state, flags=v.AcquireFlags.REGISTER_ONLY)
    incoming = obj_of(a, new_uuid(), ["/srv/reg/m.img"], new_flags=v.NewFlags.MIGRATE)
    with pytest.raises(v.ValidationError, match="REGISTER_ONLY"):
        incoming.acquire(state, flags=v.AcquireFlags.REGISTER_ONLY)
    incoming.acquire(flags=v.AcquireFlags.REGISTER_ONLY | v.AcquireFlags.RESTRICT)  # libvirt's incoming start


# -- the unconfirmed ones, settled ------------------------------------------------------


def test_destination_is_fenced_after_handing_back_while_its_records_remain(
        make_driver: MakeDriver, kv: etcd3.Etcd3Client, vms: Callable[[], subprocess.Popen[bytes]]) -> None:
    """After complete_migrate_in(cancel=True) the destination object was
    never fenced although its records were still on its lease."""
    a, b = make_driver("host-a"), make_driver("host-b", ttl=30)
    uuid = new_uuid()
    src = obj_of(a, uuid, ["/srv/f8/r.img"])
    src.acquire()
    vm = vms()
    dst = obj_of(b, uuid, ["/srv/f8/r.img"], new_flags=v.NewFlags.MIGRATE, pid=vm.pid)
    dst.acquire(src.prepare_migrate("host-b"))
    dst.complete_migrate_in(cancel=True)
    kv.revoke_lease(lease_of(b))
    assert vm.wait(timeout=5) is not None


def test_complete_migrate_out_does_not_mistake_vanished_records_for_a_claim(
        make_driver: MakeDriver, kv: etcd3.Etcd3Client) -> None:
    """Records gone because the source's lease went away were read as
    'the destination claimed' and complete_migrate_out() reported success."""
    a = make_driver("host-a", ttl=30, default_action="ignore")
    src = obj_of(a, new_uuid(), ["/srv/f8/c.img"])
    src.acquire()
    src.prepare_migrate("host-b")
    kv.revoke_lease(lease_of(a))
    with pytest.raises((v.LeaseLostError, v.StaleStateError)):
        src.complete_migrate_out()


def test_release_resource_of_a_replaced_record_forgets_it(make_driver: MakeDriver, kv: etcd3.Etcd3Client,
                                                          prefix: str) -> None:
    """Release_resource hitting StaleStateError left the disk in the held list."""
    a = make_driver("host-a")
    obj = obj_of(a, new_uuid(), ["/srv/f8/h1.img", "/srv/f8/h2.img"])
    obj.acquire()
    key = next(k for k, (val, _) in holders(kv, prefix).items() if b"h1.img" in val)
    kv.delete(key)
    with pytest.raises(v.StaleStateError):
        obj.release_resource(D, "/srv/f8/h1.img")
    assert [h.name for h in obj.held()] == ["/srv/f8/h2.img"]
    assert "h1.img" not in obj.release()


def test_a_wall_clock_step_back_does_not_blacklist_endpoints(etcd_process: EtcdServer, prefix: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint was marked failed with the wall clock; after a step back
    of the clock every endpoint that had failed once (a short outage) stayed
    blacklisted for as long as the step, so a healthy host fenced itself."""
    from virtlease_etcd.config import load_config
    from virtlease_etcd.etcd.client import EtcdClient

    client = EtcdClient(load_config({"endpoints": etcd_process.endpoints}))
    try:
        for endpoint in client._endpoints:
            endpoint.fail()  # a short outage...
        time.sleep(1.2)  # ...over, past the endpoints' retry time (1 s)
        # ...and NTP steps the wall clock back, as python-etcd3's endpoint logic sees it (gRPC
        # computes its deadlines from the wall clock too, so the whole process cannot be stepped)
        import sys
        import types

        stepped = types.SimpleNamespace(time=lambda: time.time() - 3600, monotonic=time.monotonic,
                                        clock_gettime=time.clock_gettime, sleep=time.sleep)
        monkeypatch.setattr(sys.modules["etcd3.client"], "time", stepped)
        monkeypatch.setattr(sys.modules["virtlease_etcd.clock"], "time", stepped)  # the one clock
        kvs, revision = client.get_range(prefix + "/x", timeout=2.0)
        assert kvs == [] and revision > 0
    finally:
        monkeypatch.undo()
        client.close()


# -- migration bookkeeping is checked against etcd, never taken from the books ----------------


def test_complete_migrate_out_before_the_claim_is_refused_and_keeps_the_records(
        make_driver: MakeDriver, kv: etcd3.Etcd3Client, prefix: str) -> None:
    """complete_migrate_out() before the destination claimed must not forget the records: they
    are still ours in etcd (and the handoff still claimable), so the domain keeps them, and the
    fence, release and unload still see them."""
    a, b = make_driver("host-a"), make_driver("host-b")
    uuid = new_uuid()
    src = obj_of(a, uuid, ["/srv/early/r.img"])
    src.acquire()
    state = src.prepare_migrate("host-b")
    before = holders(kv, prefix)
    with pytest.raises(v.StaleStateError, match="has not claimed"):
        src.complete_migrate_out()
    assert holders(kv, prefix) == before
    assert [h.name for h in src.held()] == ["/srv/early/r.img"]
    with pytest.raises(v.PluginBusyError):
        a.unload()
    dst = obj_of(b, uuid, ["/srv/early/r.img"], new_flags=v.NewFlags.MIGRATE)
    dst.acquire(state)
    src.complete_migrate_out()
    assert src.held() == []


@pytest.mark.parametrize("taker", ["other-domain-on-destination", "same-domain-on-third-host"])
def test_complete_migrate_out_takes_only_the_destinations_record_of_the_domain_for_a_claim(
        make_driver: MakeDriver, kv: etcd3.Etcd3Client, prefix: str, taker: str) -> None:
    """The source's records vanish without a claim (deleted behind its back), then the disk is
    granted to someone else: to another domain on the destination host, or to the same domain
    on a third host.  Neither is the handoff's claim; complete_migrate_out() says the records
    vanished instead of reporting the migration done."""
    a, b, c = make_driver("host-a"), make_driver("host-b"), make_driver("host-c")
    uuid = new_uuid()
    src = obj_of(a, uuid, ["/srv/fates/r.img"])
    src.acquire()
    src.prepare_migrate("host-b")
    for key in holders(kv, prefix):
        kv.delete(key)
    if taker == "other-domain-on-destination":
        obj_of(b, new_uuid(), ["/srv/fates/r.img"], name="other").acquire()
    else:
        obj_of(c, uuid, ["/srv/fates/r.img"]).acquire()
    with pytest.raises(v.StaleStateError, match="vanished from etcd without host host-b claiming them"):
        src.complete_migrate_out()


def test_a_claim_never_overwrites_records_replaced_behind_its_marker(make_driver: MakeDriver,
                                                                     kv: etcd3.Etcd3Client, prefix: str) -> None:
    """The marker is intact but the source's record was deleted behind its back and another host
    was granted the disk: the claim compares every record's token, not only the marker, and
    fails with etcd unchanged."""
    a, b, c = make_driver("host-a"), make_driver("host-b"), make_driver("host-c")
    uuid = new_uuid()
    src = obj_of(a, uuid, ["/srv/behind/r.img"])
    src.acquire()
    state = src.prepare_migrate("host-b")
    for key in holders(kv, prefix):
        kv.delete(key)
    obj_of(c, new_uuid(), ["/srv/behind/r.img"], name="other").acquire()
    before = dump(kv, prefix)
    dst = obj_of(b, uuid, ["/srv/behind/r.img"], new_flags=v.NewFlags.MIGRATE)
    with pytest.raises(v.StaleStateError, match="changed since the handoff was prepared"):
        dst.acquire(state)
    assert dump(kv, prefix) == before


def test_prepare_migrate_refuses_records_that_are_no_longer_ours(make_driver: MakeDriver,
                                                                 kv: etcd3.Etcd3Client, prefix: str) -> None:
    """A record replaced behind the source's back: prepare_migrate writes no marker (the claim
    could never take it) and says so."""
    a, c = make_driver("host-a"), make_driver("host-c")
    src = obj_of(a, new_uuid(), ["/srv/prep/r1.img", "/srv/prep/r2.img"])
    src.acquire()
    key = next(k for k, (val, _) in holders(kv, prefix).items() if b"r2.img" in val)
    kv.delete(key)
    obj_of(c, new_uuid(), ["/srv/prep/r2.img"], name="other").acquire()
    before = dump(kv, prefix)
    with pytest.raises(v.StaleStateError, match="no longer holds all its records"):
        src.prepare_migrate("host-b")
    assert dump(kv, prefix) == before


# -- what an owner may do, by what it holds ---------------------------------------------------


def test_a_fresh_object_acquiring_what_its_domain_holds_is_told_so(make_driver: MakeDriver) -> None:
    a = make_driver("host-a")
    uuid = new_uuid()
    obj_of(a, uuid, ["/srv/own/twice.img"]).acquire()
    with pytest.raises(v.ObjectStateError, match=r"already holds /srv/own/twice\.img"):
        obj_of(a, uuid, ["/srv/own/twice.img"]).acquire()


def test_a_domain_migrating_away_can_neither_release_nor_acquire(make_driver: MakeDriver,
                                                                 kv: etcd3.Etcd3Client, prefix: str) -> None:
    """While its handoff is in flight the records belong to the handoff: a release would delete
    what the destination is about to claim."""
    a = make_driver("host-a")
    uuid = new_uuid()
    src = obj_of(a, uuid, ["/srv/own/mig.img"])
    src.acquire()
    src.prepare_migrate("host-b")
    before = dump(kv, prefix)
    with pytest.raises(v.ObjectStateError, match="being handed to host host-b"):
        obj_of(a, uuid, ["/srv/own/mig.img"]).release()
    with pytest.raises(v.ObjectStateError, match="being handed to host host-b"):
        obj_of(a, uuid, ["/srv/own/mig2.img"]).acquire()
    assert dump(kv, prefix) == before


def test_a_registration_lives_on_the_lease_until_the_domain_releases_its_last_disk(
        make_driver: MakeDriver, kv: etcd3.Etcd3Client, prefix: str) -> None:
    a = make_driver("host-a")
    uuid = new_uuid()
    obj_of(a, uuid, ["/srv/own/r1.img", "/srv/own/r2.img"]).acquire(flags=v.AcquireFlags.REGISTER_ONLY)
    obj_of(a, uuid, ["/srv/own/r1.img", "/srv/own/r2.img"]).acquire()
    (dom_key,) = [k for k in dump(kv, prefix) if "/dom/" in k]
    assert dump(kv, prefix)[dom_key][2] == lease_of(a)
    obj_of(a, uuid, ["/srv/own/r1.img"]).release()
    assert dom_key in dump(kv, prefix), "releasing one disk dropped the domain's registration"
    assert [d.domain_uuid for d in a.driver.status().domains] == [uuid]
    obj_of(a, uuid, ["/srv/own/r2.img"]).release()
    assert dom_key not in dump(kv, prefix)


def test_a_destination_that_handed_back_may_unload(make_driver: MakeDriver) -> None:
    """After complete_migrate_in(cancel=True) the domain runs on the source again: the
    destination's driver protects no running VM and may unload."""
    a, b = make_driver("host-a"), make_driver("host-b")
    uuid = new_uuid()
    src = obj_of(a, uuid, ["/srv/own/hb.img"])
    src.acquire()
    dst = obj_of(b, uuid, ["/srv/own/hb.img"], new_flags=v.NewFlags.MIGRATE)
    dst.acquire(src.prepare_migrate("host-b"))
    with pytest.raises(v.PluginBusyError):
        b.unload()  # it holds the disk for a VM that runs there now
    dst.complete_migrate_in(cancel=True)
    dst.free()
    b.unload()


def test_a_destination_that_handed_back_learns_the_source_took_the_disk_back(make_driver: MakeDriver) -> None:
    """Once the source reclaimed (and still holds) the disk, the destination's books follow etcd:
    its next call finds nothing held there, and an acquire is refused as busy on the source."""
    a, b = make_driver("host-a"), make_driver("host-b")
    uuid = new_uuid()
    src = obj_of(a, uuid, ["/srv/own/back.img"])
    src.acquire()
    dst = obj_of(b, uuid, ["/srv/own/back.img"], new_flags=v.NewFlags.MIGRATE)
    dst.acquire(src.prepare_migrate("host-b"))
    back = dst.complete_migrate_in(cancel=True)
    with pytest.raises(v.StaleStateError, match="already claimed"):
        src.complete_migrate_out(cancel=True)
    src.acquire(back)
    later = obj_of(b, uuid, ["/srv/own/back.img"])
    with pytest.raises(v.ResourceBusyError, match="on host host-a"):
        later.acquire()
    assert later.held() == [] and dst.held() == []


def test_a_shared_resume_state_must_say_what_exclusive_grant_it_saw(make_driver: MakeDriver) -> None:
    """A shared state without ``xgen`` (edited, or from a tool that dropped it) cannot prove
    that no writer held the disk meanwhile: refused, even when none did."""
    a = make_driver("host-a")
    obj = obj_of(a, new_uuid(), ["/srv/own/sh.img"], flags=v.ResourceFlags.SHARED)
    obj.acquire()
    state = obj.release()
    head, _, body = state.partition(" ")
    data = json.loads(body)
    for r in data["res"]:
        r.pop("xgen", None)
    with pytest.raises(v.StaleStateError, match="does not record the last exclusive grant"):
        obj.acquire(f"{head} {json.dumps(data)}")
    obj.acquire(state)


def test_a_state_of_more_disks_than_the_object_is_refused(make_driver: MakeDriver) -> None:
    a = make_driver("host-a")
    uuid = new_uuid()
    both = obj_of(a, uuid, ["/srv/own/m1.img", "/srv/own/m2.img"])
    both.acquire()
    state = both.release()
    with pytest.raises(v.StaleStateError, match="only in state"):
        obj_of(a, uuid, ["/srv/own/m1.img"]).acquire(state)
