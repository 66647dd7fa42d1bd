"""Live migration handoff between two host processes (docs/DESIGN.md section 7):
ownership moves in one transaction, never zero or two owners, and every bad
claim is refused with etcd unchanged."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import etcd3
import pytest

import virtlease as v
from virtlease_etcd.clock import SYSTEM
from virtlease_etcd.devtools.hostprocess import HostProcess
from virtlease_lab.drivers import EXPIRY_SLACK, FAST_TTL, STEADY_TTL, new_uuid, shut
from virtlease_lab.etcdserver import EtcdServer, dump

D = v.ResourceType.DISK
DISKS = ["/srv/mig/root.img", "/srv/mig/data.img"]


@pytest.fixture
def hosts(etcd_process: EtcdServer, prefix: str) -> Iterator[Callable[..., HostProcess]]:
    started: list[HostProcess] = []

    def start(host_id: str, ttl: int = STEADY_TTL) -> HostProcess:
        proc = HostProcess(etcd_process.endpoints, prefix, host_id, ttl=ttl)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


@pytest.fixture
def kv(kv_process: etcd3.Etcd3Client) -> etcd3.Etcd3Client:
    return kv_process


@pytest.fixture
def third(etcd_process: EtcdServer, prefix: str) -> Iterator[v.Plugin]:
    plugin = v.load_driver("etcd", config={"endpoints": etcd_process.endpoints, "prefix": prefix,
                                           "host_id": "thief", "ttl": STEADY_TTL})
    yield plugin
    for obj in plugin.objects:
        obj.free()
    shut(plugin)


def holders(kv: etcd3.Etcd3Client, prefix: str) -> dict[str, dict[str, object]]:
    return {json.loads(val)["res"]: {**json.loads(val), "token": rev}
            for key, (val, rev, _) in dump(kv, prefix).items() if "/res/" in key}


def tokens(state: str) -> dict[str, int]:
    return {r["res"]: r["token"] for r in json.loads(state.partition(" ")[2])["res"]}


def start_vm(src: HostProcess, uuid: str, disks: list[str] = DISKS) -> dict[str, int]:
    src.ok("new", obj="web1", uuid=uuid, name="web1", disks=disks)
    return tokens(src.ok("acquire", obj="web1")["state"])


def steal(third: v.Plugin, disks: list[str] = DISKS) -> v.ResourceBusyError:
    obj = third.new_object(uuid=new_uuid(), name="thief-vm")
    for d in disks:
        obj.add_resource(D, d)
    try:
        obj.acquire()
    except v.ResourceBusyError as exc:
        obj.free()
        return exc
    raise AssertionError("a third host acquired disks during the handoff")


def test_handoff_moves_ownership_in_one_transaction(hosts: Callable[..., HostProcess], third: v.Plugin,
                                                    kv: etcd3.Etcd3Client, prefix: str) -> None:
    src, dst = hosts("host-a"), hosts("host-b")
    uuid = new_uuid()
    before = start_vm(src, uuid)
    assert steal(third).conflicts[0].handoff_to is None
    state = src.ok("prepare_migrate", obj="web1", dest="host-b")["state"]
    busy = steal(third)  # refused while marked, and the handoff is reported
    assert {h.handoff_to for h in busy.conflicts} == {"host-b"}
    assert "being migrated to host host-b" in str(busy)
    dst.ok("new", obj="web1", uuid=uuid, name="web1", disks=DISKS, migrate=True)
    after = tokens(dst.ok("acquire", obj="web1", state=state)["state"])
    assert len(set(after.values())) == 1  # every disk in one transaction
    assert all(after[d] > before[d] for d in DISKS)
    steal(third)  # refused after the claim, before completion
    dst.ok("complete_migrate_in", obj="web1")
    src.ok("complete_migrate_out", obj="web1")
    steal(third)
    now = holders(kv, prefix)
    assert {h["host"] for h in now.values()} == {"host-b"}
    assert {h["lease"] for h in now.values()} == {dst.lease}
    assert not any("host-a" in key for key in dump(kv, prefix) if "/handoff/" in key or "/res/" in key)
    assert third.driver.status().handoffs == []


@pytest.mark.parametrize("tamper", ["wrong-token", "wrong-marker", "other-dest", "truncated", "other-prefix",
                                    "other-version"])
def test_bad_claims_are_refused_and_change_nothing(hosts: Callable[..., HostProcess], kv: etcd3.Etcd3Client,
                                                   prefix: str, tamper: str) -> None:
    src, dst = hosts("host-a"), hosts("host-b")
    uuid = new_uuid()
    start_vm(src, uuid)
    state = src.ok("prepare_migrate", obj="web1", dest="host-b")["state"]
    head, _, body = state.partition(" ")
    data = json.loads(body)
    if tamper == "wrong-token":
        data["res"][0]["token"] -= 1
    elif tamper == "wrong-marker":
        data["marker"] = data["marker"].replace('"nonce":"', '"nonce":"0')
    elif tamper == "other-dest":
        data["to"] = "host-c"
    elif tamper == "other-prefix":
        data["prefix"] = "/elsewhere"
    bad = head + " " + json.dumps(data)
    if tamper == "truncated":
        bad = state[: len(state) // 2]
    if tamper == "other-version":
        bad = state.replace("virtlease-state/1 ", "virtlease-state/7 ", 1)
    before = dump(kv, prefix)
    dst.ok("new", obj="web1", uuid=uuid, name="web1", disks=DISKS, migrate=True)
    reply = dst.call("acquire", obj="web1", state=bad)
    assert not reply["ok"]
    assert reply["error"] in ("StaleStateError", "ValidationError")
    assert dump(kv, prefix) == before
    # the genuine state still works afterwards
    dst.ok("acquire", obj="web1", state=state)


def test_claim_by_another_host_is_refused(hosts: Callable[..., HostProcess], kv: etcd3.Etcd3Client,
                                          prefix: str) -> None:
    src, other = hosts("host-a"), hosts("host-c")
    uuid = new_uuid()
    start_vm(src, uuid)
    state = src.ok("prepare_migrate", obj="web1", dest="host-b")["state"]
    before = dump(kv, prefix)
    other.ok("new", obj="web1", uuid=uuid, name="web1", disks=DISKS, migrate=True)
    reply = other.call("acquire", obj="web1", state=state)
    assert reply["error"] == "StaleStateError" and "host-b" in reply["message"]
    assert dump(kv, prefix) == before


def test_replayed_claim_is_refused(hosts: Callable[..., HostProcess], kv: etcd3.Etcd3Client,
                                   prefix: str) -> None:
    src, dst = hosts("host-a"), hosts("host-b")
    uuid = new_uuid()
    start_vm(src, uuid)
    state = src.ok("prepare_migrate", obj="web1", dest="host-b")["state"]
    dst.ok("new", obj="web1", uuid=uuid, name="web1", disks=DISKS, migrate=True)
    dst.ok("acquire", obj="web1", state=state)
    before = dump(kv, prefix)
    dst.ok("new", obj="again", uuid=uuid, name="web1", disks=DISKS, migrate=True)
    reply = dst.call("acquire", obj="again", state=state)
    assert reply["error"] == "StaleStateError" and "already claimed" in reply["message"]
    assert dump(kv, prefix) == before


def test_two_concurrent_claims_exactly_one_wins(etcd_process: EtcdServer, prefix: str,
                                                hosts: Callable[..., HostProcess]) -> None:
    src = hosts("host-a")
    uuid = new_uuid()
    start_vm(src, uuid)
    state = src.ok("prepare_migrate", obj="web1", dest="host-b")["state"]
    # two driver instances of host-b in two processes cannot exist (host_id is
    # unique), so race two objects of the destination host in one process
    plugin = v.load_driver("etcd", config={"endpoints": etcd_process.endpoints, "prefix": prefix,
                                           "host_id": "host-b", "ttl": STEADY_TTL})
    try:
        objs = []
        for _ in range(2):
            obj = plugin.new_object(uuid=uuid, name="web1", flags=v.NewFlags.MIGRATE)
            for d in DISKS:
                obj.add_resource(D, d)
            objs.append(obj)
        results: list[str] = []
        barrier = threading.Barrier(2)

        def claim(obj: v.LockObject) -> None:
            barrier.wait()
            try:
                obj.acquire(state)
                results.append("won")
            except v.StaleStateError:
                results.append("lost")

        threads = [threading.Thread(target=claim, args=(o,)) for o in objs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["lost", "won"]
        for obj in objs:
            obj.free()
    finally:
        shut(plugin)


def test_source_killed_before_claim_fails_safely_then_disks_are_free(
        hosts: Callable[..., HostProcess], third: v.Plugin, kv: etcd3.Etcd3Client, prefix: str) -> None:
    src, dst = hosts("host-a", ttl=FAST_TTL), hosts("host-b")
    uuid = new_uuid()
    start_vm(src, uuid)
    state = src.ok("prepare_migrate", obj="web1", dest="host-b")["state"]
    lease = int(src.ok("session")["lease"])
    killed_at = src.kill()
    while holders(kv, prefix):  # the source's lease runs out; its marks go with it
        assert SYSTEM.now() - killed_at < FAST_TTL + EXPIRY_SLACK, "dead source still holds well after its TTL"
        try:
            steal(third)  # and until then nobody else gets the disks
        except AssertionError:  # granted: right only if the lease ran out since the look above
            assert kv.get_lease_info(lease).TTL == -1, "a third host got the disks while the source's lease lived"
            for obj in list(third.objects):
                obj.release()
                obj.free()
            break
        time.sleep(0.1)
    assert not [k for k in dump(kv, prefix) if "/handoff/" in k]
    dst.ok("new", obj="web1", uuid=uuid, name="web1", disks=DISKS, migrate=True)
    before = dump(kv, prefix)
    reply = dst.call("acquire", obj="web1", state=state)
    assert reply["error"] == "StaleStateError" and "no longer exists" in reply["message"]
    assert dump(kv, prefix) == before
    obj = third.new_object(uuid=new_uuid(), name="fresh")
    for d in DISKS:
        obj.add_resource(D, d)
    obj.acquire()  # a normal acquire works once the source lease is gone


def test_destination_killed_after_claim_frees_and_source_never_regains(
        hosts: Callable[..., HostProcess], third: v.Plugin, kv: etcd3.Etcd3Client, prefix: str) -> None:
    src, dst = hosts("host-a"), hosts("host-b", ttl=FAST_TTL)
    uuid = new_uuid()
    start_vm(src, uuid)
    state = src.ok("prepare_migrate", obj="web1", dest="host-b")["state"]
    dst.ok("new", obj="web1", uuid=uuid, name="web1", disks=DISKS, migrate=True)
    dst.ok("acquire", obj="web1", state=state)
    dst.kill()
    deadline = SYSTEM.now() + FAST_TTL + EXPIRY_SLACK
    while holders(kv, prefix):
        assert SYSTEM.now() < deadline
        time.sleep(0.1)
    # the source's old state cannot silently take the disks back
    assert src.call("complete_migrate_out", obj="web1", cancel=True)["error"] == "StaleStateError"
    src.ok("new", obj="again", uuid=uuid, name="web1", disks=DISKS)
    reply = src.call("acquire", obj="again", state=state)
    assert not reply["ok"]
    assert holders(kv, prefix) == {}
    obj = third.new_object(uuid=new_uuid(), name="fresh")
    for d in DISKS:
        obj.add_resource(D, d)
    obj.acquire()


def test_cancel_before_claim_leaves_the_source_sole_owner(hosts: Callable[..., HostProcess],
                                                          kv: etcd3.Etcd3Client, prefix: str) -> None:
    src, dst = hosts("host-a"), hosts("host-b")
    uuid = new_uuid()
    before = start_vm(src, uuid)
    state = src.ok("prepare_migrate", obj="web1", dest="host-b")["state"]
    src.ok("complete_migrate_out", obj="web1", cancel=True)
    now = holders(kv, prefix)
    assert {h["host"] for h in now.values()} == {"host-a"}
    assert {r: h["token"] for r, h in now.items()} == before  # same leases, same tokens
    assert not [k for k in dump(kv, prefix) if "/handoff/" in k]
    dst.ok("new", obj="web1", uuid=uuid, name="web1", disks=DISKS, migrate=True)
    assert dst.call("acquire", obj="web1", state=state)["error"] == "StaleStateError"


def test_cancel_after_claim_hands_back_to_the_source(hosts: Callable[..., HostProcess], third: v.Plugin,
                                                     kv: etcd3.Etcd3Client, prefix: str) -> None:
    src, dst = hosts("host-a"), hosts("host-b")
    uuid = new_uuid()
    start_vm(src, uuid)
    state = src.ok("prepare_migrate", obj="web1", dest="host-b")["state"]
    dst.ok("new", obj="web1", uuid=uuid, name="web1", disks=DISKS, migrate=True)
    claimed = tokens(dst.ok("acquire", obj="web1", state=state)["state"])
    # the source learns it is too late to cancel
    reply = src.call("complete_migrate_out", obj="web1", cancel=True)
    assert reply["error"] == "StaleStateError" and "already claimed" in reply["message"]
    back = dst.ok("complete_migrate_in", obj="web1", cancel=True)["state"]
    assert {h["host"] for h in holders(kv, prefix).values()} == {"host-b"}  # one owner while in flight
    steal(third)
    regained = tokens(src.ok("acquire", obj="web1", state=back)["state"])
    assert all(regained[d] > claimed[d] for d in DISKS)
    now = holders(kv, prefix)
    assert {h["host"] for h in now.values()} == {"host-a"}
    assert {h["lease"] for h in now.values()} == {src.lease}
    dst.ok("free", obj="web1")
    assert {h["host"] for h in holders(kv, prefix).values()} == {"host-a"}
    assert not [k for k in dump(kv, prefix) if "/handoff/" in k and "host-a" in k]


def test_handoff_of_63_disks_is_one_transaction_64_refused_at_prepare(
        hosts: Callable[..., HostProcess]) -> None:
    """A claim takes 2 operations per disk plus the marker's delete: 63 disks fit
    etcd's default --max-txn-ops of 128.  A 64-disk domain is refused at
    prepare_migrate, before anything is marked, naming the limit."""
    src, dst = hosts("host-a"), hosts("host-b")
    uuid = new_uuid()
    disks = [f"/srv/big/{i}.img" for i in range(63)]
    start_vm(src, uuid, disks)
    state = src.ok("prepare_migrate", obj="web1", dest="host-b")["state"]
    dst.ok("new", obj="web1", uuid=uuid, name="web1", disks=disks, migrate=True)
    after = tokens(dst.ok("acquire", obj="web1", state=state)["state"])
    assert len(after) == 63 and len(set(after.values())) == 1
    big = [f"/srv/bigger/{i}.img" for i in range(64)]
    src.ok("new", obj="web2", uuid=new_uuid(), name="web2", disks=big)
    src.ok("acquire", obj="web2")
    reply = src.call("prepare_migrate", obj="web2", dest="host-b")
    assert reply["error"] == "TransactionTooLargeError" and "max-txn-ops" in reply["message"]


def test_prepare_refuses_an_object_holding_nothing(hosts: Callable[..., HostProcess]) -> None:
    src = hosts("host-a")
    src.ok("new", obj="ro", uuid=new_uuid(), name="ro", disks=["/srv/iso:readonly"])
    src.ok("acquire", obj="ro")
    reply = src.call("prepare_migrate", obj="ro", dest="host-b")
    assert reply["error"] == "ObjectStateError" and "holds no locked resource" in reply["message"]
