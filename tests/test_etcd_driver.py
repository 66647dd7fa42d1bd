"""The etcd driver against a real etcd (a local process and a container):
conflicts, shared/exclusive/readonly, atomic multi-disk acquire, tokens,
pause/resume, hotplug, transaction limits, lost replies, host identity."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable

import etcd3
import pytest

import virtlease as v
from virtlease_etcd.clock import SYSTEM
from virtlease_etcd.config import load_config
from virtlease_etcd.devtools.hostprocess import HostProcess
from virtlease_etcd.etcd.client import EtcdClient
from virtlease_etcd.model import keyspace as ks
from virtlease_lab.drivers import EXPIRY_SLACK, STEADY_TTL, new_uuid, shut
from virtlease_lab.etcdserver import EtcdServer, dump
from virtlease_lab.relay import Relay

D = v.ResourceType.DISK
MakeDriver = Callable[..., v.Plugin]


def vm(plugin: v.Plugin, disks: list[str], *, name: str = "vm", uuid: str | None = None,
       flags: v.ResourceFlags = v.ResourceFlags(0), **kw: object) -> v.LockObject:
    obj = plugin.new_object(uuid=uuid or new_uuid(), name=name, **kw)  # type: ignore[arg-type]
    for d in disks:
        obj.add_resource(D, d, flags=flags)
    return obj


def tokens(state: str) -> dict[str, int]:
    body = json.loads(state.partition(" ")[2])
    return {r["res"]: r["token"] for r in body["res"]}


def test_conflict_names_the_holder(make_driver: MakeDriver) -> None:
    a, b = make_driver("host-a"), make_driver("host-b")
    web1 = vm(a, ["/srv/web1-root.img"], name="web1")
    web1.acquire()
    other = vm(b, ["/srv/web1-root.img"], name="web1-copy")
    with pytest.raises(v.ResourceBusyError) as info:
        other.acquire()
    (holder,) = info.value.conflicts
    assert holder.host == "host-a"
    assert holder.domain_name == "web1" and holder.domain_uuid == web1.uuid
    assert holder.mode == "exclusive" and holder.resource == "/srv/web1-root.img"
    assert holder.token == tokens(web1.inquire())["/srv/web1-root.img"]
    assert holder.since > 0
    assert "host-a" in str(info.value) and "web1" in str(info.value)


def test_one_busy_disk_means_none_taken(make_driver: MakeDriver, kv: etcd3.Etcd3Client, prefix: str) -> None:
    a, b = make_driver("host-a"), make_driver("host-b")
    vm(b, ["/srv/d2"]).acquire()
    before = dump(kv, prefix)
    many = vm(a, ["/srv/d1", "/srv/d2", "/srv/d3"])
    with pytest.raises(v.ResourceBusyError) as info:
        many.acquire()
    assert [h.resource for h in info.value.conflicts] == ["/srv/d2"]
    assert dump(kv, prefix) == before  # nothing written, not even d1 or d3
    assert many.phase is v.Phase.NEW


def test_all_conflicts_are_reported_in_one_error(make_driver: MakeDriver) -> None:
    a, b = make_driver("host-a"), make_driver("host-b")
    vm(b, ["/srv/x1", "/srv/x2"], name="holder").acquire()
    with pytest.raises(v.ResourceBusyError) as info:
        vm(a, ["/srv/x1", "/srv/x2", "/srv/x3"]).acquire()
    assert sorted(h.resource for h in info.value.conflicts) == ["/srv/x1", "/srv/x2"]


def test_shared_holders_coexist_and_exclude_exclusive(make_driver: MakeDriver) -> None:
    a, b = make_driver("host-a"), make_driver("host-b")
    s1 = vm(a, ["/srv/cluster.img"], flags=v.ResourceFlags.SHARED, name="s1")
    s2 = vm(b, ["/srv/cluster.img"], flags=v.ResourceFlags.SHARED, name="s2")
    s1.acquire()
    s2.acquire()
    with pytest.raises(v.ResourceBusyError) as info:
        vm(b, ["/srv/cluster.img"], name="writer").acquire()
    assert sorted(h.domain_name for h in info.value.conflicts) == ["s1", "s2"]
    assert {h.mode for h in info.value.conflicts} == {"shared"}
    s1.release()
    s2.release()
    excl = vm(a, ["/srv/cluster.img"], name="excl")
    excl.acquire()
    with pytest.raises(v.ResourceBusyError) as info:
        vm(b, ["/srv/cluster.img"], flags=v.ResourceFlags.SHARED, name="s3").acquire()
    assert info.value.conflicts[0].mode == "exclusive"


def test_same_domain_cannot_hold_a_shared_disk_on_two_hosts(make_driver: MakeDriver) -> None:
    a, b = make_driver("host-a"), make_driver("host-b")
    uuid = new_uuid()
    vm(a, ["/srv/shared.img"], flags=v.ResourceFlags.SHARED, uuid=uuid).acquire()
    with pytest.raises(v.ResourceBusyError, match="host-a"):
        vm(b, ["/srv/shared.img"], flags=v.ResourceFlags.SHARED, uuid=uuid).acquire()


def test_readonly_disks_are_not_locked(make_driver: MakeDriver, kv: etcd3.Etcd3Client, prefix: str) -> None:
    a, b = make_driver("host-a"), make_driver("host-b")
    vm(a, ["/srv/iso.img"]).acquire()
    before = {k for k in dump(kv, prefix) if "/res/" in k}
    ro = vm(b, ["/srv/iso.img"], flags=v.ResourceFlags.READONLY)
    ro.acquire()
    assert {k for k in dump(kv, prefix) if "/res/" in k} == before
    assert tokens(ro.inquire()) == {}


def test_symlinked_paths_are_the_same_disk(make_driver: MakeDriver, tmp_path: os.PathLike[str]) -> None:
    real = os.path.join(tmp_path, "real.img")
    link = os.path.join(tmp_path, "link.img")
    open(real, "w").close()
    os.symlink(real, link)
    a, b = make_driver("host-a"), make_driver("host-b")
    vm(a, [real]).acquire()
    with pytest.raises(v.ResourceBusyError) as info:
        vm(b, [link]).acquire()
    assert info.value.conflicts[0].resource.startswith(f"{real} (dir ")  # the path and its directory's id


def test_named_leases_conflict_by_lockspace_and_key(make_driver: MakeDriver) -> None:
    a, b = make_driver("host-a"), make_driver("host-b")
    obj = a.new_object(uuid=new_uuid(), name="vm")
    obj.add_resource(v.ResourceType.LEASE, "vm-lease", params={"lockspace": "cluster"})
    obj.acquire()
    same = b.new_object(uuid=new_uuid(), name="vm2")
    same.add_resource(v.ResourceType.LEASE, "vm-lease", params={"lockspace": "cluster"})
    with pytest.raises(v.ResourceBusyError, match="cluster:vm-lease"):
        same.acquire()
    other_space = b.new_object(uuid=new_uuid(), name="vm3")
    other_space.add_resource(v.ResourceType.LEASE, "vm-lease", params={"lockspace": "other"})
    other_space.acquire()


def test_tokens_are_grant_revisions_and_strictly_increase(make_driver: MakeDriver, kv: etcd3.Etcd3Client,
                                                           prefix: str) -> None:
    a, b = make_driver("host-a"), make_driver("host-b")
    seen = []
    for plugin in (a, b, a, b):
        obj = vm(plugin, ["/srv/tok.img", "/srv/tok2.img"])
        obj.acquire()
        t = tokens(obj.inquire())
        assert t["/srv/tok.img"] == t["/srv/tok2.img"]  # one transaction, one revision
        holder_keys = {k: meta for k, meta in dump(kv, prefix).items() if "/res/" in k}
        assert sorted(rev for _, rev, _ in holder_keys.values()) == [t["/srv/tok.img"]] * 2
        seen.append(t["/srv/tok.img"])
        obj.release()
        obj.free()
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


def test_records_live_on_the_host_session_lease(make_driver: MakeDriver, kv: etcd3.Etcd3Client,
                                                prefix: str) -> None:
    a = make_driver("host-a")
    vm(a, ["/srv/l1", "/srv/l2"]).acquire()
    vm(a, ["/srv/l3"]).acquire()
    leases = {lease for key, (_, _, lease) in dump(kv, prefix).items() if "/res/" in key or "/hosts/" in key}
    assert leases == {a.driver.session.lease_id}


def test_release_removes_only_own_records_and_resume_checks_nobody_held_between(
        make_driver: MakeDriver, kv: etcd3.Etcd3Client, prefix: str) -> None:
    a, b = make_driver("host-a"), make_driver("host-b")
    paused = vm(a, ["/srv/p.img"], name="paused")
    paused.acquire()
    first = tokens(paused.inquire())["/srv/p.img"]
    state = paused.release()
    assert not [k for k in dump(kv, prefix) if "/res/" in k]
    # nobody in between: resume works, with a newer token
    paused.acquire(state)
    assert tokens(paused.inquire())["/srv/p.img"] > first
    state = paused.release()
    # someone held it in between (and let go): resume is refused, nothing taken
    intruder = vm(b, ["/srv/p.img"], name="intruder")
    intruder.acquire()
    with pytest.raises(v.ResourceBusyError, match="intruder"):
        paused.acquire(state)
    intruder.release()
    before = dump(kv, prefix)
    with pytest.raises(v.StaleStateError, match="another holder"):
        paused.acquire(state)
    assert dump(kv, prefix) == before
    paused.acquire()  # a fresh acquire (the caller's decision) still works


def test_resume_state_must_match_the_object(make_driver: MakeDriver) -> None:
    a = make_driver("host-a")
    obj = vm(a, ["/srv/m1"])
    obj.acquire()
    state = obj.release()
    other = vm(a, ["/srv/m1"])
    with pytest.raises(v.StaleStateError, match="not domain"):
        other.acquire(state)
    differing = vm(a, ["/srv/m1", "/srv/m2"], uuid=obj.uuid)
    with pytest.raises(v.StaleStateError, match="only in object"):
        differing.acquire(state)


def test_release_by_a_replaced_owner_leaves_the_new_owner_alone(
        make_driver: MakeDriver, kv: etcd3.Etcd3Client, prefix: str) -> None:
    a, b = make_driver("host-a"), make_driver("host-b")
    old = vm(a, ["/srv/r1", "/srv/r2"], name="old")
    old.acquire()
    # r2's record disappears behind a's back (as if expired) and b takes it
    (r2_key,) = [k for k, (val, _, _) in dump(kv, prefix).items() if b'"/srv/r2"' in val and "/res/" in k]
    kv.delete(r2_key)
    new = vm(b, ["/srv/r2"], name="new")
    new.acquire()
    with pytest.raises(v.StaleStateError, match="/srv/r2"):
        old.release()
    keys = dump(kv, prefix)
    assert r2_key in keys and b'"new"' in keys[r2_key][0]
    assert not any(b'"/srv/r1"' in val for k, (val, _, _) in keys.items() if "/res/" in k)


def test_hotplug_busy_disk_keeps_the_rest(make_driver: MakeDriver) -> None:
    a, b = make_driver("host-a"), make_driver("host-b")
    vm(b, ["/srv/hot-busy"], name="other").acquire()
    obj = vm(a, ["/srv/hot-1"])
    obj.acquire()
    with pytest.raises(v.ResourceBusyError, match="other"):
        obj.acquire_resource(D, "/srv/hot-busy")
    obj.acquire_resource(D, "/srv/hot-2")
    assert set(tokens(obj.inquire())) == {"/srv/hot-1", "/srv/hot-2"}
    obj.release_resource(D, "/srv/hot-1")
    vm(b, ["/srv/hot-1"], name="taker").acquire()  # really released
    assert set(tokens(obj.inquire())) == {"/srv/hot-2"}


def test_register_only_shows_in_status_without_locking(make_driver: MakeDriver) -> None:
    a, b = make_driver("host-a"), make_driver("host-b")
    reg = vm(a, ["/srv/reg"], name="registered")
    reg.acquire(flags=v.AcquireFlags.REGISTER_ONLY)
    status = a.driver.status()
    assert [(d.domain_name, d.host) for d in status.domains] == [("registered", "host-a")]
    vm(b, ["/srv/reg"]).acquire()  # the disk was not taken


def test_status_lists_hosts_and_holders(make_driver: MakeDriver) -> None:
    a = make_driver("host-a")
    make_driver("host-b")
    obj = vm(a, ["/srv/st1"], name="web9")
    obj.acquire()
    status = a.driver.status()
    hosts = {h.host: h for h in status.hosts}
    assert set(hosts) == {"host-a", "host-b"}
    assert 0 < hosts["host-a"].ttl_left <= STEADY_TTL
    (held,) = status.resources
    assert (held.resource, held.host, held.domain_name, held.mode) == ("/srv/st1", "host-a", "web9", "exclusive")
    assert held.token == tokens(obj.inquire())["/srv/st1"]


def test_64_disks_in_one_transaction_65_refused_naming_max_txn_ops(
        make_driver: MakeDriver, kv: etcd3.Etcd3Client, prefix: str) -> None:
    a = make_driver("host-a")
    big = vm(a, [f"/srv/many/{i}.img" for i in range(64)])
    big.acquire()
    assert len(set(tokens(big.inquire()).values())) == 1
    big.release()
    before = dump(kv, prefix)
    too_big = vm(a, [f"/srv/many/{i}.img" for i in range(65)])
    with pytest.raises(v.TransactionTooLargeError, match="--max-txn-ops") as info:
        too_big.acquire()
    assert "Nothing was taken" in str(info.value)
    assert dump(kv, prefix) == before


def test_restart_action_needs_a_callback(make_driver: MakeDriver) -> None:
    a = make_driver("host-a")
    obj = vm(a, ["/srv/restart"])
    with pytest.raises(v.ValidationError, match="restart_callback"):
        obj.acquire(action=v.FailureAction.RESTART)
    b = make_driver("host-b", restart_callback=lambda spec: None)
    vm(b, ["/srv/restart2"]).acquire(action=v.FailureAction.RESTART)


def test_lost_reply_is_resolved_by_reading_back(etcd: EtcdServer, prefix: str, kv: etcd3.Etcd3Client) -> None:
    """The txn commits but its reply is dropped: the driver reads back its own
    record instead of retrying into a conflict with itself."""
    with Relay.tcp(etcd.endpoints.split(",")[0]) as proxy:
        plugin = v.load_driver("etcd", config={"endpoints": proxy.endpoint, "prefix": prefix,
                                               "host_id": "flaky", "ttl": 6, "request_timeout": 0.5})
        try:
            obj = vm(plugin, ["/srv/lost-reply"], name="flaky-vm")
            proxy.drop_replies()
            threading.Timer(1.2, proxy.heal).start()
            obj.acquire()
            token = tokens(obj.inquire())["/srv/lost-reply"]
            holders = {k: m for k, m in dump(kv, prefix).items() if "/res/" in k}
            assert [rev for _, rev, _ in holders.values()] == [token]
            obj.release()
            obj.free()
        finally:
            shut(plugin)


def test_host_id_must_be_unique_across_processes(etcd: EtcdServer, prefix: str) -> None:
    with HostProcess(etcd.endpoints, prefix, "twin", ttl=3):
        with pytest.raises(v.ConfigError, match="already has a live session"):
            v.load_driver("etcd", config={"endpoints": etcd.endpoints, "prefix": prefix, "host_id": "twin"})


def test_same_host_in_one_process_shares_one_lease(make_driver: MakeDriver) -> None:
    first, second = make_driver("host-a"), make_driver("host-a")
    assert first.driver.session is second.driver.session
    vm(first, ["/srv/share-1"]).acquire()
    with pytest.raises(v.ResourceBusyError):
        vm(second, ["/srv/share-1"]).acquire()


def test_crash_frees_disks_after_ttl_not_before_fence(etcd: EtcdServer, prefix: str,
                                                      make_driver: MakeDriver) -> None:
    ttl = 3
    with HostProcess(etcd.endpoints, prefix, "doomed", ttl=ttl) as doomed:
        doomed.ok("new", obj="vm", uuid=new_uuid(), name="doomed-vm", disks=["/srv/crash.img"])
        doomed.ok("acquire", obj="vm")
        fence_at = doomed.ok("session")["fence_at"]
        killed_at = doomed.kill()
    survivor = make_driver("survivor")
    obj = vm(survivor, ["/srv/crash.img"])
    while True:
        try:
            obj.acquire()
            granted_at = SYSTEM.now()
            break
        except v.ResourceBusyError as exc:
            assert exc.conflicts[0].host == "doomed"
            assert SYSTEM.now() - killed_at < ttl + EXPIRY_SLACK, "disk still held well after the TTL"
            time.sleep(0.05)
    assert granted_at - killed_at <= ttl + EXPIRY_SLACK
    assert granted_at > fence_at, "granted before the dead holder's fence deadline"
    assert granted_at - killed_at >= ttl * 2 / 3 - 0.1  # the lease was refreshed at most TTL/3 before


def test_ttl_below_two_seconds_is_refused(etcd: EtcdServer, prefix: str) -> None:
    with pytest.raises(v.ConfigError, match="ttl: 1s is below the minimum of 2s"):
        v.load_driver("etcd", config={"endpoints": etcd.endpoints, "prefix": prefix, "ttl": 1})


def test_unresolved_grant_is_withdrawn_not_left_behind(etcd: EtcdServer, prefix: str,
                                                       kv: etcd3.Etcd3Client) -> None:
    """etcd applies the grant but no reply comes back before the deadline:
    acquire fails, and the record it may have left is withdrawn (at once if its request gets
    through, or once etcd is reachable again), so no disk stays locked by a grant nobody knows
    of."""
    observer = EtcdClient(load_config({"endpoints": etcd.endpoints, "host_id": "observer"}, environ={}))
    records = prefix + "/v1/res/"

    def written_since(start: int) -> bool:
        """A record existed at some revision after ``start`` (it may have been withdrawn since)."""
        now = observer.get_range(records, ks.range_end(records), timeout=5)[1]
        return any(observer.get_page(records, ks.range_end(records), limit=1, revision=r, timeout=5)[0]
                   for r in range(start + 1, now + 1))

    with Relay.tcp(etcd.endpoints.split(",")[0]) as proxy:
        plugin = v.load_driver("etcd", config={"endpoints": proxy.endpoint, "prefix": prefix, "host_id": "unsure",
                                               "ttl": 8, "request_timeout": 0.4, "acquire_timeout": 1.2})
        obj = vm(plugin, ["/srv/unsure.img"], name="unsure-vm")
        try:
            for _ in range(3):  # the request itself can be lost with the broken connection: try again
                start = observer.get_range(records, ks.range_end(records), timeout=5)[1]
                proxy.drop_replies()
                with pytest.raises(v.BackendUnavailableError):
                    obj.acquire()
                reached = written_since(start)
                proxy.heal()
                if reached:
                    break
                time.sleep(1.0)
            assert reached, "the grant never reached etcd: the scenario did not happen"
            deadline = SYSTEM.now() + 5
            while [k for k in dump(kv, prefix) if "/res/" in k]:
                assert SYSTEM.now() < deadline, "the uncertain grant was never withdrawn"
                time.sleep(0.1)
            assert plugin.driver.session.lost is None
            obj.acquire()  # and the object can still acquire for real
        finally:
            shut(plugin)
            observer.close()


def test_shared_resume_survives_other_shared_holders_but_not_an_exclusive_one(make_driver: MakeDriver) -> None:
    a, b = make_driver("host-a"), make_driver("host-b")
    mine = vm(a, ["/srv/gfs.img"], flags=v.ResourceFlags.SHARED, name="mine")
    mine.acquire()
    state = mine.release()
    vm(b, ["/srv/gfs.img"], flags=v.ResourceFlags.SHARED, name="neighbour").acquire()
    mine.acquire(state)  # another shared holder in between is fine
    state = mine.release()
    for obj in b.objects:
        obj.release()
        obj.free()
    writer = vm(b, ["/srv/gfs.img"], name="writer")
    writer.acquire()
    writer.release()
    with pytest.raises(v.StaleStateError, match="another holder"):
        mine.acquire(state)  # an exclusive writer held it while we were paused


def test_exclusive_resume_is_refused_after_a_shared_holder_in_between(make_driver: MakeDriver) -> None:
    """A shared holder used the disk while the exclusive owner was paused (and let go): the
    resume compares the newest grant of *any* mode, not only the last exclusive one."""
    a, b = make_driver("host-a"), make_driver("host-b")
    paused = vm(a, ["/srv/xs.img"], name="paused")
    paused.acquire()
    state = paused.release()
    reader = vm(b, ["/srv/xs.img"], flags=v.ResourceFlags.SHARED, name="reader")
    reader.acquire()
    reader.release()
    with pytest.raises(v.StaleStateError, match="another holder"):
        paused.acquire(state)


def test_shared_resume_knows_the_last_exclusive_grant_not_the_first(make_driver: MakeDriver) -> None:
    """Two exclusive grants before a shared hold: the state records the *last* one (the gen key's
    newest revision, not its creation), so the resume works; one more exclusive grant while the
    domain is paused makes the resume fail."""
    a, b = make_driver("host-a"), make_driver("host-b")
    for writer in ("first", "second"):
        w = vm(b, ["/srv/sx.img"], name=writer)
        w.acquire()
        w.release()
    mine = vm(a, ["/srv/sx.img"], flags=v.ResourceFlags.SHARED, name="mine")
    mine.acquire()
    state = mine.release()
    mine.acquire(state)  # nobody in between
    state = mine.release()
    third = vm(b, ["/srv/sx.img"], name="third")
    third.acquire()
    third.release()
    with pytest.raises(v.StaleStateError, match="another holder"):
        mine.acquire(state)


@pytest.mark.parametrize("mode", ["exclusive", "shared"])
def test_resume_state_with_raised_tokens_is_refused(make_driver: MakeDriver, mode: str) -> None:
    a, b = make_driver("host-a"), make_driver("host-b")
    flags = v.ResourceFlags.SHARED if mode == "shared" else v.ResourceFlags(0)
    paused = vm(a, ["/srv/raised.img"], flags=flags, name="paused")
    paused.acquire()
    state = paused.release()
    intruder = vm(b, ["/srv/raised.img"], name="intruder")
    intruder.acquire()
    newest = tokens(intruder.inquire())["/srv/raised.img"]
    intruder.release()
    head, _, body = state.partition(" ")
    data = json.loads(body)
    for r in data["res"]:  # claim a token newer than the intruder's grant
        r["token"] = newest + 5
        if "xgen" in r:
            r["xgen"] = newest + 5
    with pytest.raises(v.StaleStateError):
        paused.acquire(head + " " + json.dumps(data))


@pytest.mark.parametrize("junk", [b"\xfe\xfd", b'{"v": 99}'])
def test_an_unreadable_gen_record_is_replaced_and_old_states_fail(
        make_driver: MakeDriver, kv: etcd3.Etcd3Client, prefix: str, junk: bytes) -> None:
    """gen records are bookkeeping without an owner: a grant replaces an
    unreadable one (holders, by contrast, are never overwritten).  Replacing
    it bumps its revision, so a resume state from before still fails."""
    a = make_driver("host-a")
    obj = vm(a, ["/srv/gen.img"])
    obj.acquire()
    state = obj.release()
    (gen_key,) = [k for k in dump(kv, prefix) if "/gen/" in k]
    kv.put(gen_key, junk)
    with pytest.raises(v.StaleStateError):
        obj.acquire(state)
    fresh = vm(a, ["/srv/gen.img"])
    fresh.acquire()
    value, rev, _ = dump(kv, prefix)[gen_key]
    assert json.loads(value)["v"] == 1 and rev == tokens(fresh.inquire())["/srv/gen.img"]
