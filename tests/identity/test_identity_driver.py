"""The etcd driver names disks by their cluster-wide identity, on real etcd and real mounts.

Each "host" of the multi-host tests is a ``virtlease_etcd.devtools.hostprocess`` process started under
``unshare -m`` (its own mount namespace) after mounting the shared storage where it likes; one-host
tests run the driver in this process.  They need root, loop devices and the tools of README.md: without them each test
skips saying why.  Legacy path keys: a record the previous release wrote (path-only key, old
record) must block a new host, and a new host's grant must be seen by the previous release's check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import etcd3
import pytest

import virtlease as v
from virtlease_etcd.devtools.hostprocess import HostProcess
from virtlease_etcd.model import statestring as st
from virtlease_etcd.session import reattach
from virtlease_lab.drivers import new_uuid
from virtlease_lab.etcdserver import dump, holder_keys
from virtlease_lab.storage import blkid_uuid, ext4_disks, mounted, need, sshfs

D = v.ResourceType.DISK


def legacy_rid(path: str) -> str:
    """The previous release's key of a disk: SHA-256 of its real path."""
    return hashlib.sha256(b"disk\0" + os.path.realpath(path).encode()).hexdigest()


def rid(key: str) -> str:
    """The etcd key component of a disk identity key."""
    return hashlib.sha256(b"disk\0" + key.encode()).hexdigest()


def two_hosts(tmp_path: Path, hosts: Callable[..., HostProcess], device_a: str, device_b: str,
              ) -> tuple[HostProcess, HostProcess, Path, Path]:
    """host-a mounting ``device_a`` at .../host-a/images, host-b ``device_b`` at .../host-b/pool."""
    a_mnt, b_mnt = tmp_path / "host-a" / "images", tmp_path / "host-b" / "pool"
    return hosts("host-a", [(device_a, a_mnt)]), hosts("host-b", [(device_b, b_mnt)]), a_mnt, b_mnt


def migrating_across_paths(tmp_path: Path, hosts: Callable[..., HostProcess], device: str,
                           ) -> tuple[HostProcess, HostProcess, str, str, str, str]:
    """``two_hosts`` on one ext4 holding vm/web1.qcow2; host-a's domain web1 holds it and
    prepares its migration to host-b: (a, b, uuid, a's path, b's path, the handoff state)."""
    a, b, a_mnt, b_mnt = two_hosts(tmp_path, hosts, device, device)
    uuid, a_disk, b_disk = new_uuid(), f"{a_mnt}/vm/web1.qcow2", f"{b_mnt}/vm/web1.qcow2"
    a.ok("new", obj="web1", uuid=uuid, name="web1", disks=[a_disk])
    a.ok("acquire", obj="web1")
    return a, b, uuid, a_disk, b_disk, a.ok("prepare_migrate", obj="web1", dest="host-b")["state"]


def test_two_hosts_mounting_one_ext4_at_different_points(tmp_path: Path, hosts: Callable[..., HostProcess],
                                                         kv: etcd3.Etcd3Client, prefix: str) -> None:
    with ext4_disks(tmp_path, "vm/web1.qcow2") as device:
        a, b, a_mnt, b_mnt = two_hosts(tmp_path, hosts, device, device)
        a.ok("new", obj="web1", uuid=new_uuid(), name="web1", disks=[f"{a_mnt}/vm/web1.qcow2"])
        (token,) = a.ok("acquire", obj="web1")["tokens"]
        assert token["name"] == f"{a_mnt}/vm/web1.qcow2"  # inquire(): the caller's path and the identity
        assert token["resource"].startswith(f"{a_mnt}/vm/web1.qcow2 (ext4 ")
        b.ok("new", obj="copy", uuid=new_uuid(), name="web1-copy", disks=[f"{b_mnt}/vm/web1.qcow2"])
        refused = b.call("acquire", obj="copy")
        assert refused["error"] == "ResourceBusyError", refused
        assert "on host host-a" in refused["message"] and "domain web1" in refused["message"]
        assert f"{a_mnt}/vm/web1.qcow2 (ext4 " in refused["message"]  # the holder's path and identity
        records = holder_keys(kv, prefix)
        identity = {r["identity"] for r in records.values()}
        assert len(identity) == 1 and next(iter(identity)).startswith("dir://")
        with mounted(tmp_path / "look", device) as look:
            name = f"fs-uuid://{blkid_uuid(device)}/inode/{(look / 'vm' / 'web1.qcow2').stat().st_ino}"
        # identity key (directory id) + name + legacy path key of host-a's path, one grant
        assert sorted(k.rsplit("/", 2)[-2] for k in records) == sorted(
            [rid(next(iter(identity))), rid(name), legacy_rid(f"{a_mnt}/vm/web1.qcow2")])
        a.ok("release", obj="web1")
        b.ok("acquire", obj="copy")


def test_hard_link_and_bind_mount_on_one_host_are_one_disk(tmp_path: Path,
                                                           make_driver: Callable[..., v.Plugin]) -> None:
    need("mount", "losetup", "mkfs.ext4")
    with ext4_disks(tmp_path, "vm/web1.qcow2") as device, mounted(tmp_path / "m", device) as m:
        os.link(m / "vm" / "web1.qcow2", m / "vm" / "alias.qcow2")
        with mounted(tmp_path / "bind", "--bind", str(m / "vm")) as bind:
            plugin = make_driver("host-a")
            first = plugin.new_object(uuid=new_uuid(), name="web1")
            first.add_resource(D, str(m / "vm" / "web1.qcow2"))
            first.acquire()
            for path in (m / "vm" / "alias.qcow2", bind / "web1.qcow2"):
                other = plugin.new_object(uuid=new_uuid(), name="other")
                other.add_resource(D, str(path))
                with pytest.raises(v.ResourceBusyError, match=r"held exclusive by domain web1"):
                    other.acquire()
                other.free()
            both = plugin.new_object(uuid=new_uuid(), name="both")
            both.add_resource(D, str(m / "vm" / "web1.qcow2"))
            both.add_resource(D, str(m / "vm" / "alias.qcow2"))
            with pytest.raises(v.ValidationError, match="are the same resource"):
                both.acquire()
            both.free()
            first.release()
            first.free()


def test_fuse_mount_at_two_points_is_one_disk(tmp_path: Path, sshd: tuple[int, Path],
                                               make_driver: Callable[..., v.Plugin]) -> None:
    port, key = sshd
    export = tmp_path / "export"
    (export / "vm").mkdir(parents=True)
    (export / "vm" / "disk.img").write_bytes(b"x")
    with (
        sshfs(f"root@127.0.0.1:{export}", tmp_path / "a", port, key) as a,
        sshfs(f"localhost:{export / 'vm'}", tmp_path / "b", port, key) as b,
    ):
        plugin = make_driver("host-a", server_aliases={"127.0.0.1": "store1", "localhost": "store1"})
        first = plugin.new_object(uuid=new_uuid(), name="web1")
        first.add_resource(D, str(a / "vm" / "disk.img"))
        first.acquire()
        (held,) = first.held()
        assert held.identity.startswith(f"{a}/vm/disk.img (sshfs://store1{export}/vm/disk.img, dir ")
        other = plugin.new_object(uuid=new_uuid(), name="other")
        other.add_resource(D, str(b / "disk.img"))
        with pytest.raises(v.ResourceBusyError, match=rf"sshfs://store1{export}/vm/disk.img, dir \w+\) is held"):
            other.acquire()
        other.free()
        first.release()
        first.free()


def test_strict_identity_refuses_a_disk_whose_directory_cannot_carry_an_id(
        tmp_path: Path, make_driver: Callable[..., v.Plugin], kv: etcd3.Etcd3Client, prefix: str) -> None:
    """The default: a disk in a directory this host can neither read an id from nor create one in
    (a read-only view, as a root-squashed NFS client has) is refused naming the directory and what
    to do, and nothing is written; a tmpfs disk (no UUID, no network name) has a directory id."""
    need("mount")
    with mounted(tmp_path / "t", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as t:
        (t / "vm").mkdir()
        (t / "vm" / "disk.img").write_bytes(b"x")
        with mounted(tmp_path / "ro", "--bind", "-o", "ro", str(t)) as ro:
            plugin = make_driver("host-a")
            obj = plugin.new_object(uuid=new_uuid(), name="web1")
            obj.add_resource(D, str(ro / "vm" / "disk.img"))
            with pytest.raises(v.ValidationError, match=rf"no cluster-wide identity for {ro}/vm/disk.img .*"
                                                        rf"{ro}/vm has no directory id .*Read-only file system.*"
                                                        r"identity_map") as err:
                obj.acquire()
            assert "\n" not in str(err.value) and not holder_keys(kv, prefix)
            obj.free()
            ok = plugin.new_object(uuid=new_uuid(), name="web1")
            ok.add_resource(D, str(t / "vm" / "disk.img"))
            ok.acquire()
            assert ok.held()[0].identity.startswith(f"{t}/vm/disk.img (dir ")
            again = plugin.new_object(uuid=new_uuid(), name="web2")  # now the read-only view reads the id
            again.add_resource(D, str(ro / "vm" / "disk.img"))
            with pytest.raises(v.ResourceBusyError, match=r"held exclusive by domain web1"):
                again.acquire()
            again.free()
            ok.release()
            ok.free()


def test_mapping_wins_over_automatic_resolution(tmp_path: Path, make_driver: Callable[..., v.Plugin],
                                                kv: etcd3.Etcd3Client, prefix: str) -> None:
    need("mount", "losetup", "mkfs.ext4")
    with ext4_disks(tmp_path, "web1.qcow2") as device, mounted(tmp_path / "m", device) as m:
        plugin = make_driver("host-a", identity_map={str(m): "san://pool1"}, legacy_path_keys=False)
        obj = plugin.new_object(uuid=new_uuid(), name="web1")
        obj.add_resource(D, str(m / "web1.qcow2"))
        obj.acquire()
        state = json.loads(obj.inquire().partition(" ")[2])
        shown = {r["res"] for r in state["res"]}
        assert len(shown) == 1 and next(iter(shown)).startswith(f"{m}/web1.qcow2 (san://pool1/web1.qcow2, dir ")
        records = holder_keys(kv, prefix)  # legacy_path_keys off: the directory id and the mapped name
        assert sorted(k.rsplit("/", 2)[-2] for k in records) == sorted(
            [rid(next(iter(records.values()))["identity"]), rid("san://pool1/web1.qcow2")])
        record = next(r for r in records.values() if "legacy" not in r)
        assert record["identity"].startswith("dir://") and record["path"] == str(m / "web1.qcow2")
        assert [h.resource for h in plugin.driver.status().resources] == [record["res"]]
        obj.release()
        obj.free()


def old_release_record(kv: etcd3.Etcd3Client, prefix: str, path: str, host: str) -> int:
    """Write a holder the way the previous release did: path-only key, record without identity."""
    lease = kv.lease(10)
    rid = legacy_rid(path)
    record = {"v": 1, "kind": "disk", "res": os.path.realpath(path), "mode": "exclusive", "host": host,
              "lease": lease.id, "uuid": new_uuid(), "name": "old-vm", "pid": None,
              "since": round(time.time(), 3), "grant": "0123456789abcdef"}
    kv.put(f"{prefix}/v1/res/{rid}/x", json.dumps(record, sort_keys=True, separators=(",", ":")), lease=lease)
    kv.put(f"{prefix}/v1/gen/{rid}/x", json.dumps({"v": 1, "res": record["res"], "host": host,
                                                   "uuid": record["uuid"]}))
    return int(lease.id)


def old_scheme_busy(kv: etcd3.Etcd3Client, prefix: str, path: str) -> bool:
    """The previous release's check before a grant: any holder under the path key."""
    return any(True for _ in kv.get_prefix(f"{prefix}/v1/res/{legacy_rid(path)}/"))


def test_legacy_path_keys_exclude_hosts_of_the_previous_release(
        tmp_path: Path, make_driver: Callable[..., v.Plugin], kv: etcd3.Etcd3Client, prefix: str) -> None:
    need("mount", "losetup", "mkfs.ext4")
    with ext4_disks(tmp_path, "old.qcow2", "new.qcow2") as device, mounted(tmp_path / "m", device) as m:
        lease = old_release_record(kv, prefix, str(m / "old.qcow2"), "old-host")
        plugin = make_driver("new-host")
        blocked = plugin.new_object(uuid=new_uuid(), name="web1")
        blocked.add_resource(D, str(m / "old.qcow2"))
        with pytest.raises(v.ResourceBusyError, match=rf"{m}/old.qcow2 is held exclusive by domain old-vm "
                                                       r"\(.*\) on host old-host"):
            blocked.acquire()
        blocked.free()
        kv.revoke_lease(lease)
        obj = plugin.new_object(uuid=new_uuid(), name="web2")
        obj.add_resource(D, str(m / "new.qcow2"))
        obj.acquire()
        assert old_scheme_busy(kv, prefix, str(m / "new.qcow2"))  # an old host sees the disk busy
        status = plugin.driver.status()
        assert len(status.resources) == 1  # the legacy record is not listed twice
        obj.release()
        assert not old_scheme_busy(kv, prefix, str(m / "new.qcow2"))
        obj.free()
        off = make_driver("newer-host", legacy_path_keys=False)
        obj = off.new_object(uuid=new_uuid(), name="web3")
        obj.add_resource(D, str(m / "new.qcow2"))
        obj.acquire()
        assert not old_scheme_busy(kv, prefix, str(m / "new.qcow2"))
        obj.release()
        obj.free()


def test_transaction_size_per_file_disk(tmp_path: Path, make_driver: Callable[..., v.Plugin]) -> None:
    """A file disk takes its directory id and its name (2 keys, 4 operations), and its legacy path
    key with legacy_path_keys (6 operations): 21 disks fit etcd's default 128 operations, 32 without."""
    need("mount", "losetup", "mkfs.ext4")
    names = [f"d{i}.img" for i in range(33)]
    with ext4_disks(tmp_path, *names) as device, mounted(tmp_path / "m", device) as m:
        for settings, fits in (({}, 21), ({"legacy_path_keys": False}, 32)):
            plugin = make_driver(f"host-{fits}", **settings)
            obj = plugin.new_object(uuid=new_uuid(), name="big")
            for name in names[:fits + 1]:
                obj.add_resource(D, str(m / name))
            with pytest.raises(v.TransactionTooLargeError, match=rf"{fits + 1} resource.*A file disk takes two keys "
                                                                  r"\(its directory id and its name\): about 32 disks"):
                obj.acquire()
            obj.free()
            ok = plugin.new_object(uuid=new_uuid(), name="fits")
            for name in names[:fits]:
                ok.add_resource(D, str(m / name))
            ok.acquire()
            ok.release()
            ok.free()


def test_migration_claim_across_different_mount_paths(tmp_path: Path, hosts: Callable[..., HostProcess],
                                                      kv: etcd3.Etcd3Client, prefix: str,
                                                      make_driver: Callable[..., v.Plugin]) -> None:
    with ext4_disks(tmp_path, "vm/web1.qcow2") as device:
        a, b, uuid, a_disk, b_disk, state = migrating_across_paths(tmp_path, hosts, device)
        (handoff,) = make_driver("observer").driver.status().handoffs
        (shown,) = handoff.resources  # the disk once (its legacy key is not listed), path and identity
        assert shown.startswith(f"{a_disk} (ext4 ") and not handoff.claimed
        b.ok("new", obj="web1", uuid=uuid, name="web1", disks=[b_disk], migrate=True)
        b.ok("acquire", obj="web1", state=state)
        a.ok("complete_migrate_out", obj="web1")
        records = holder_keys(kv, prefix)
        assert {r["host"] for r in records.values()} == {"host-b"}
        assert {r["path"] for r in records.values()} == {b_disk}
        assert not old_scheme_busy(kv, prefix, a_disk) and old_scheme_busy(kv, prefix, b_disk)
        resumed = b.ok("release", obj="web1")["state"]
        a.ok("new", obj="again", uuid=uuid, name="web1", disks=[a_disk])
        a.ok("acquire", obj="again", state=resumed)  # resume under the other path
        assert old_scheme_busy(kv, prefix, a_disk) and not old_scheme_busy(kv, prefix, b_disk)


def test_migration_claim_of_another_disk_is_refused_naming_both(tmp_path: Path, hosts: Callable[..., HostProcess],
                                                                kv: etcd3.Etcd3Client, prefix: str) -> None:
    with (ext4_disks(tmp_path / "one", "web1.qcow2") as one, ext4_disks(tmp_path / "two", "web1.qcow2") as two):
        a, b, a_mnt, b_mnt = two_hosts(tmp_path, hosts, one, two)
        uuid = new_uuid()
        a.ok("new", obj="web1", uuid=uuid, name="web1", disks=[f"{a_mnt}/web1.qcow2"])
        a.ok("acquire", obj="web1")
        before = dump(kv, prefix)
        state = a.ok("prepare_migrate", obj="web1", dest="host-b")["state"]
        b.ok("new", obj="web1", uuid=uuid, name="web1", disks=[f"{b_mnt}/web1.qcow2"], migrate=True)
        refused = b.call("acquire", obj="web1", state=state)
        assert refused["error"] == "StaleStateError", refused
        uuid_a, uuid_b = blkid_uuid(one), blkid_uuid(two)  # probed: a reused loop device fools blkid's cache
        assert f"{a_mnt}/web1.qcow2 (ext4 {uuid_a}:/web1.qcow2, dir " in refused["message"], refused["message"]
        assert f"{b_mnt}/web1.qcow2 (ext4 {uuid_b}:/web1.qcow2, dir " in refused["message"], refused["message"]
        assert {k: val for k, val in dump(kv, prefix).items() if "/handoff/" not in k} == before


def test_a_lock_operation_checks_the_mount_table_once(tmp_path: Path, make_driver: Callable[..., v.Plugin],
                                                      kv: etcd3.Etcd3Client, prefix: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = make_driver("host-a")
    names = plugin.driver.names
    checks: list[int] = []
    refresh = names.resolver._refresh
    def counted() -> None:
        checks.append(1)
        refresh()

    monkeypatch.setattr(names.resolver, "_refresh", counted)
    obj = plugin.new_object(uuid=new_uuid(), name="many")
    for n in range(20):
        (tmp_path / f"d{n}.img").write_bytes(b"")
        obj.add_resource(D, str(tmp_path / f"d{n}.img"))
    obj.acquire()
    assert len(checks) == 1  # 20 disks, one look at the mount table
    state = obj.release()
    obj.acquire(state)
    assert len(checks) == 3
    assert len({r["identity"] for r in holder_keys(kv, prefix).values()}) == 20
    assert make_driver("host-b").driver.names is not names  # one per driver instance
    assert plugin.driver.lockd(new_uuid(), "web1", None)._d.names is names  # the agent's way in too
    obj.release()
    obj.free()


def test_prepare_refuses_what_a_claim_by_another_path_could_not_take(tmp_path: Path,
                                                                     hosts: Callable[..., HostProcess]) -> None:
    # legacy keys on: a file disk has 3 keys (directory id, name, path); a claim by a destination
    # that names a disk differently writes its 3 keys (6 ops) and deletes the source's name and path
    # keys (2 ops), + the marker: 15 disks need 121 of etcd's 128 operations, 16 need 129
    names = [f"d{i}.img" for i in range(16)]
    with ext4_disks(tmp_path, *names) as device:
        a, b, a_mnt, b_mnt = two_hosts(tmp_path, hosts, device, device)
        too_many = new_uuid()
        a.ok("new", obj="big", uuid=too_many, name="big", disks=[f"{a_mnt}/{n}" for n in names])
        a.ok("acquire", obj="big")
        refused = a.call("prepare_migrate", obj="big", dest="host-b")
        assert refused["error"] == "TransactionTooLargeError", refused
        assert "migration claim of 16 resource(s) needs 129 operations" in refused["message"]
        a.ok("release", obj="big")
        uuid = new_uuid()
        a.ok("new", obj="fits", uuid=uuid, name="fits", disks=[f"{a_mnt}/{n}" for n in names[:15]])
        a.ok("acquire", obj="fits")
        state = a.ok("prepare_migrate", obj="fits", dest="host-b")["state"]
        b.ok("new", obj="fits", uuid=uuid, name="fits", disks=[f"{b_mnt}/{n}" for n in names[:15]], migrate=True)
        b.ok("acquire", obj="fits", state=state)
        a.ok("complete_migrate_out", obj="fits")


def test_a_reattached_session_knows_which_keys_belong_to_which_disk(tmp_path: Path,
                                                                    make_driver: Callable[..., v.Plugin]) -> None:
    """A restarted agent rebuilds its owners from the records on its lease: a disk's other keys
    (its name, its legacy path key) stay marked as belonging to its identity key, as before the
    restart (without it, a migration after an agent restart was refused and the held-disks
    metric counted keys)."""
    (tmp_path / "vm").mkdir()
    disk = tmp_path / "vm" / "web1.qcow2"
    disk.write_bytes(b"x")
    plugin = make_driver("host-a")
    obj = plugin.new_object(uuid=new_uuid(), name="web1")
    obj.add_resource(D, str(disk))
    obj.acquire()
    session = plugin.driver.session
    owner = session.owners.peek(obj.uuid)
    assert owner is not None and len(owner.held) >= 2
    before = {rid: h.rid for rid, h in owner.held.items()}
    assert sum(1 for r in before.values() if r.legacy_of is None) == 1
    owner.held.clear()
    reattach.readopt_owners(session, plugin.driver.policy)
    assert {rid: h.rid for rid, h in owner.held.items()} == before
    obj.release()
    obj.free()


def test_a_resume_state_of_the_previous_release_covers_a_disk_by_its_name(
        tmp_path: Path, make_driver: Callable[..., v.Plugin], kv: etcd3.Etcd3Client, prefix: str) -> None:
    """The previous release's states list a disk's name as its identity key (and the path key as
    its legacy key), without the directory key: an upgraded host resumes such a state, its
    directory key bound by the state's token."""
    need("mount", "losetup", "mkfs.ext4")
    with ext4_disks(tmp_path, "web1.qcow2") as device, mounted(tmp_path / "m", device) as m:
        plugin = make_driver("host-a")
        uuid = new_uuid()
        obj = plugin.new_object(uuid=uuid, name="web1")
        obj.add_resource(D, str(m / "web1.qcow2"))
        obj.acquire()
        mine = st.decode(obj.release())
        obj.free()
        (identity,) = [r for r in mine.resources if r.legacy is None]
        name = next(r for r in mine.resources if r.legacy is not None and r.rid != legacy_rid(str(m / "web1.qcow2")))
        path = next(r for r in mine.resources if r.rid == legacy_rid(str(m / "web1.qcow2")))
        old = dataclasses.replace(mine, resources=(dataclasses.replace(name, legacy=None),
                                                   dataclasses.replace(path, legacy=name.rid))).encode()
        again = make_driver("host-b").new_object(uuid=uuid, name="web1")
        again.add_resource(D, str(m / "web1.qcow2"))
        again.acquire(old)
        records = holder_keys(kv, prefix)
        assert {k.rsplit("/", 2)[-2] for k in records} == {identity.rid, name.rid, path.rid}
        assert {r["host"] for r in records.values()} == {"host-b"}
        again.release()
        again.free()


# -- legacy path keys: a state or marker never widens what a host may take -------------------------


def _edited(state: str, edit: Callable[[dict[str, object]], None]) -> str:
    head, _, body = state.partition(" ")
    data = json.loads(body)
    edit(data)
    return f"{head} {json.dumps(data)}"


def test_a_resume_under_another_path_is_refused_once_that_path_was_granted(
        tmp_path: Path, hosts: Callable[..., HostProcess], kv: etcd3.Etcd3Client, prefix: str) -> None:
    """The state (host-b's) lists host-b's path key; host-a resumes under its own path, whose key
    the state does not list: it is bounded by the state's token for the disk.  A host of the
    previous release held that path key meanwhile (and let go): the resume is refused."""
    with ext4_disks(tmp_path, "vm/web1.qcow2") as device:
        a, b, a_mnt, b_mnt = two_hosts(tmp_path, hosts, device, device)
        uuid, a_disk, b_disk = new_uuid(), f"{a_mnt}/vm/web1.qcow2", f"{b_mnt}/vm/web1.qcow2"
        b.ok("new", obj="web1", uuid=uuid, name="web1", disks=[b_disk])
        b.ok("acquire", obj="web1")
        state = b.ok("release", obj="web1")["state"]
        kv.revoke_lease(old_release_record(kv, prefix, a_disk, "old-host"))
        before = dump(kv, prefix)
        a.ok("new", obj="web1", uuid=uuid, name="web1", disks=[a_disk])
        refused = a.call("acquire", obj="web1", state=state)
        assert refused["error"] == "StaleStateError", refused
        assert dump(kv, prefix) == before


def test_a_claim_never_deletes_a_source_path_key_replaced_behind_the_marker(
        tmp_path: Path, hosts: Callable[..., HostProcess], kv: etcd3.Etcd3Client, prefix: str) -> None:
    """A claim from another path drops the source's path key only if it is still the source's
    (its token): replaced behind the marker, the claim fails and leaves it."""
    with ext4_disks(tmp_path, "vm/web1.qcow2") as device:
        _a, b, uuid, a_disk, b_disk, state = migrating_across_paths(tmp_path, hosts, device)
        (a_key,) = [k for k in holder_keys(kv, prefix) if f"/res/{legacy_rid(a_disk)}/" in k]
        kv.put(a_key, dump(kv, prefix)[a_key][0])  # rewritten: same bytes, another revision
        before = dump(kv, prefix)
        b.ok("new", obj="web1", uuid=uuid, name="web1", disks=[b_disk], migrate=True)
        refused = b.call("acquire", obj="web1", state=state)
        assert refused["error"] == "StaleStateError", refused
        assert dump(kv, prefix) == before


def test_a_handoff_state_with_edited_legacy_marks_is_refused(
        tmp_path: Path, hosts: Callable[..., HostProcess], kv: etcd3.Etcd3Client, prefix: str) -> None:
    """Both hosts use the same path; the state's legacy marks must be the marker's."""
    with ext4_disks(tmp_path, "vm/web1.qcow2") as device:
        mnt = tmp_path / "images"
        a, b = hosts("host-a", [(device, mnt)]), hosts("host-b", [(device, mnt)])
        uuid, disk = new_uuid(), f"{mnt}/vm/web1.qcow2"
        a.ok("new", obj="web1", uuid=uuid, name="web1", disks=[disk])
        a.ok("acquire", obj="web1")
        state = a.ok("prepare_migrate", obj="web1", dest="host-b")["state"]

        def unmark(data: dict[str, object]) -> None:
            for r in data["res"]:  # type: ignore[attr-defined]
                r.pop("legacy", None)

        before = dump(kv, prefix)
        b.ok("new", obj="web1", uuid=uuid, name="web1", disks=[disk], migrate=True)
        refused = b.call("acquire", obj="web1", state=_edited(state, unmark))
        assert refused["error"] == "StaleStateError" and "legacy keys differ" in refused["message"], refused
        assert dump(kv, prefix) == before
        b.ok("acquire", obj="web1", state=state)  # the genuine state still works
