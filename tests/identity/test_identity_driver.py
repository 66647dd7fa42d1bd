"""The etcd driver names disks by their cluster-wide identity, on real etcd and real mounts.

Each "host" of the multi-host tests is a ``virtlease_etcd.devtools.hostprocess`` process started under
``unshare -m`` (its own mount namespace) after mounting the shared storage where it likes; one-host
tests run the driver in this process.  They need root, loop devices and the tools of README.md: without them each test
skips saying why.  Legacy path keys: a record the previous release wrote (path-only key, old
record) must block a new host, and a new host's grant must be seen by the previous release's check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import etcd3
import pytest
from test_identity_system import filesystem, mounted, need, sshd, sshfs

import virtlease as v
from conftest import STEADY_TTL, EtcdServer, dump, new_uuid
from virtlease_etcd.devtools.hostprocess import HostProcess

__all__ = ["sshd"]  # the fixture, imported for the sshfs test

D = v.ResourceType.DISK


def legacy_rid(path: str) -> str:
    """The previous release's key of a disk: SHA-256 of its real path."""
    return hashlib.sha256(b"disk\0" + os.path.realpath(path).encode()).hexdigest()


def holder_keys(kv: etcd3.Etcd3Client, prefix: str) -> dict[str, dict[str, object]]:
    return {key: json.loads(val) for key, (val, _rev, _lease) in dump(kv, prefix).items() if "/res/" in key}


@contextlib.contextmanager
def ext4_disks(base: Path, *names: str) -> Iterator[str]:
    """An ext4 loop device holding the files ``names`` (created through a mount undone at once)."""
    base.mkdir(parents=True, exist_ok=True)
    with filesystem(base, "ext4") as device:
        with mounted(base / "seed", device) as seed:
            for name in names:
                (seed / name).parent.mkdir(parents=True, exist_ok=True)
                (seed / name).write_bytes(b"disk")
        yield device


@pytest.fixture
def hosts(etcd: EtcdServer, prefix: str) -> Iterator[Callable[..., HostProcess]]:
    """Start host processes, each in its own mount namespace after its mounts:
    ``hosts("host-a", [(device, mount_point)], **driver settings)``."""
    need("unshare", "mount", "losetup", "mkfs.ext4")
    started: list[HostProcess] = []

    def start(host_id: str, mounts: Sequence[tuple[str, Path]], **settings: object) -> HostProcess:
        script = "".join(f"mkdir -p {shlex.quote(str(at))} && mount {shlex.quote(dev)} {shlex.quote(str(at))} && "
                         for dev, at in mounts) + 'exec "$@"'
        wrapper = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "host"]
        host = HostProcess(etcd.endpoints, prefix, host_id, wrapper=wrapper, **{"ttl": STEADY_TTL, **settings})
        started.append(host)
        return host

    yield start
    for host in started:
        host.close()


def two_hosts(tmp_path: Path, hosts: Callable[..., HostProcess], device_a: str, device_b: str,
              ) -> tuple[HostProcess, HostProcess, Path, Path]:
    """host-a mounting ``device_a`` at .../host-a/images, host-b ``device_b`` at .../host-b/pool."""
    a_mnt, b_mnt = tmp_path / "host-a" / "images", tmp_path / "host-b" / "pool"
    return hosts("host-a", [(device_a, a_mnt)]), hosts("host-b", [(device_b, b_mnt)]), a_mnt, b_mnt


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
        assert len(identity) == 1 and next(iter(identity)).startswith("fs-uuid://")
        # identity key + legacy path key of host-a's path, one grant
        assert sorted(k.rsplit("/", 2)[-2] for k in records) == sorted(
            [hashlib.sha256(b"disk\0" + next(iter(identity)).encode()).hexdigest(),
             legacy_rid(f"{a_mnt}/vm/web1.qcow2")])
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
        assert held.identity == f"{a}/vm/disk.img (sshfs://store1{export}/vm/disk.img)"
        other = plugin.new_object(uuid=new_uuid(), name="other")
        other.add_resource(D, str(b / "disk.img"))
        with pytest.raises(v.ResourceBusyError, match=rf"sshfs://store1{export}/vm/disk.img\) is held"):
            other.acquire()
        other.free()
        first.release()
        first.free()


def test_strict_identity_refuses_a_disk_on_tmpfs(tmp_path: Path, make_driver: Callable[..., v.Plugin]) -> None:
    need("mount")
    with mounted(tmp_path / "t", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as t:
        (t / "disk.img").write_bytes(b"x")
        plugin = make_driver("host-a", strict_identity=True)
        obj = plugin.new_object(uuid=new_uuid(), name="web1")
        obj.add_resource(D, str(t / "disk.img"))
        with pytest.raises(v.ValidationError, match=r"tmpfs.*set identity_map") as err:
            obj.acquire()
        assert str(t / "disk.img") in str(err.value)
        obj.free()
        mapped = make_driver("host-b", strict_identity=True, identity_map={str(t): "scratch://t"})
        ok = mapped.new_object(uuid=new_uuid(), name="web1")
        ok.add_resource(D, str(t / "disk.img"))
        ok.acquire()
        assert ok.held()[0].identity == f"{t}/disk.img (scratch://t/disk.img)"
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
        assert [r["res"] for r in state["res"]] == [f"{m}/web1.qcow2 (san://pool1/web1.qcow2)"]
        (record,) = holder_keys(kv, prefix).values()  # legacy_path_keys off: one key
        assert record["identity"] == "san://pool1/web1.qcow2" and record["path"] == str(m / "web1.qcow2")
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


def test_legacy_keys_halve_the_disks_per_transaction(tmp_path: Path,
                                                     make_driver: Callable[..., v.Plugin]) -> None:
    need("mount", "losetup", "mkfs.ext4")
    names = [f"d{i}.img" for i in range(33)]
    with ext4_disks(tmp_path, *names) as device, mounted(tmp_path / "m", device) as m:
        plugin = make_driver("host-a")
        obj = plugin.new_object(uuid=new_uuid(), name="big")
        for name in names:
            obj.add_resource(D, str(m / name))
        with pytest.raises(v.TransactionTooLargeError, match=r"33 resource.*legacy_path_keys is on.*about 32 "
                                                              r"disks instead of 64"):
            obj.acquire()
        obj.free()
        fits = plugin.new_object(uuid=new_uuid(), name="fits")
        for name in names[:32]:
            fits.add_resource(D, str(m / name))
        fits.acquire()
        fits.release()
        fits.free()


def test_migration_claim_across_different_mount_paths(tmp_path: Path, hosts: Callable[..., HostProcess],
                                                      kv: etcd3.Etcd3Client, prefix: str,
                                                      make_driver: Callable[..., v.Plugin]) -> None:
    with ext4_disks(tmp_path, "vm/web1.qcow2") as device:
        a, b, a_mnt, b_mnt = two_hosts(tmp_path, hosts, device, device)
        uuid, a_disk, b_disk = new_uuid(), f"{a_mnt}/vm/web1.qcow2", f"{b_mnt}/vm/web1.qcow2"
        a.ok("new", obj="web1", uuid=uuid, name="web1", disks=[a_disk])
        a.ok("acquire", obj="web1")
        state = a.ok("prepare_migrate", obj="web1", dest="host-b")["state"]
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
        uuid_a, uuid_b = (subprocess.run(["blkid", "-o", "value", "-s", "UUID", dev], capture_output=True,
                                         text=True, check=True).stdout.strip() for dev in (one, two))
        assert f"{a_mnt}/web1.qcow2 (ext4 {uuid_a}:/web1.qcow2)" in refused["message"]
        assert f"{b_mnt}/web1.qcow2 (ext4 {uuid_b}:/web1.qcow2)" in refused["message"]
        assert {k: val for k, val in dump(kv, prefix).items() if "/handoff/" not in k} == before


def test_a_lock_operation_checks_the_mount_table_once(tmp_path: Path, make_driver: Callable[..., v.Plugin],
                                                      kv: etcd3.Etcd3Client, prefix: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = make_driver("host-a")
    names = plugin.driver.names
    checks: list[int] = []
    refresh = names.resolver._refresh
    monkeypatch.setattr(names.resolver, "_refresh", lambda: (checks.append(1), refresh())[1])
    obj = plugin.new_object(uuid=new_uuid(), name="many")
    for n in range(40):
        (tmp_path / f"d{n}.img").write_bytes(b"")
        obj.add_resource(D, str(tmp_path / f"d{n}.img"))
    obj.acquire()
    assert len(checks) == 1  # 40 disks, one look at the mount table
    state = obj.release()
    obj.acquire(state)
    assert len(checks) == 3
    assert len({r["identity"] for r in holder_keys(kv, prefix).values()}) == 40
    assert make_driver("host-b").driver.names is not names  # one per driver configuration
    obj.release()
    obj.free()


def test_prepare_refuses_what_a_claim_by_another_path_could_not_take(tmp_path: Path,
                                                                     hosts: Callable[..., HostProcess]) -> None:
    # legacy keys on: a claim by another path writes 2 keys per disk (4 ops) and deletes the
    # source's legacy key (1 op) + the marker: 25 disks need 126 of etcd's 128 operations, 26 need 131
    names = [f"d{i}.img" for i in range(26)]
    with ext4_disks(tmp_path, *names) as device:
        a, b, a_mnt, b_mnt = two_hosts(tmp_path, hosts, device, device)
        too_many = new_uuid()
        a.ok("new", obj="big", uuid=too_many, name="big", disks=[f"{a_mnt}/{n}" for n in names])
        a.ok("acquire", obj="big")
        refused = a.call("prepare_migrate", obj="big", dest="host-b")
        assert refused["error"] == "TransactionTooLargeError", refused
        assert "migration claim of 26 resource(s) needs 131 operations" in refused["message"]
        a.ok("release", obj="big")
        uuid = new_uuid()
        a.ok("new", obj="fits", uuid=uuid, name="fits", disks=[f"{a_mnt}/{n}" for n in names[:25]])
        a.ok("acquire", obj="fits")
        state = a.ok("prepare_migrate", obj="fits", dest="host-b")["state"]
        b.ok("new", obj="fits", uuid=uuid, name="fits", disks=[f"{b_mnt}/{n}" for n in names[:25]], migrate=True)
        b.ok("acquire", obj="fits", state=state)
        a.ok("complete_migrate_out", obj="fits")
