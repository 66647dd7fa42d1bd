"""Real-system tests of the identity resolver: loop devices, mounts, namespaces, sshfs, tmpfs.

They need root (mount, losetup) and the tools named in README.md; without
them each test skips with the reason.  Every mount and loop device is undone
in a ``finally``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from virtlease_etcd.identity import IdentityConfig, IdentityError, Resolver
from virtlease_etcd.identity.blockdev import Roots, device_key, fs_uuid
from virtlease_etcd.identity.dirid import MARKER
from virtlease_lab.storage import blkid_uuid, filesystem, loop_device, mounted, need, run, sshfs


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_two_mounts_bind_mount_and_hard_link_one_identity(tmp_path: Path, fstype: str) -> None:
    with filesystem(tmp_path, fstype) as device, Resolver() as resolver:
        resolver.resolve(str(tmp_path))
        parses = resolver.parses
        with mounted(tmp_path / "m1", device) as m1:
            (m1 / "images").mkdir()
            disk = m1 / "images" / "web1.qcow2"
            disk.write_bytes(b"disk")
            os.link(disk, m1 / "hard.qcow2")
            with mounted(tmp_path / "m2", device) as m2, mounted(tmp_path / "m3", "--bind", str(m1 / "images")) as m3:
                found = [
                    resolver.resolve(str(p))
                    for p in (disk, m2 / "images" / "web1.qcow2", m3 / "web1.qcow2", m1 / "hard.qcow2")
                ]
                assert resolver.parses > parses, "a new mount must be seen (poll on mountinfo)"
                (m1 / "other.qcow2").write_bytes(b"other")
                other = resolver.resolve(str(m1 / "other.qcow2"))
                inode = disk.stat().st_ino
        expected = blkid_uuid(device)
    assert len({f.key for f in found[:3]}) == 1, found  # one directory, one id: two mounts and a bind mount
    assert len({f.name for f in found}) == 1, found  # the hard link in another directory meets on the name
    first = found[0]
    assert first.kind == "filesystem" and not first.fallback
    assert first.key.startswith("dir://") and first.key.endswith("/web1.qcow2") and found[3].key != first.key
    assert first.name.startswith("fs-uuid://") and first.name.endswith(f"/inode/{inode}")
    assert ":/images/web1.qcow2, dir " in first.readable
    assert other.key != first.key and other.name != first.name
    if expected:
        assert first.name.startswith(f"fs-uuid://{expected}/")


def test_btrfs_subvolumes_with_equal_inode_numbers_differ(tmp_path: Path) -> None:
    with filesystem(tmp_path, "btrfs") as device, mounted(tmp_path / "m", device) as m, Resolver() as resolver:
        for name in ("a", "b"):
            run("btrfs", "subvolume", "create", str(m / name))
            (m / name / "disk.img").write_bytes(name.encode())
        ino_a, ino_b = ((m / n / "disk.img").stat().st_ino for n in "ab")
        name_a, name_b = (resolver.resolve(str(m / n / "disk.img")).name for n in "ab")
    assert ino_a == ino_b  # btrfs numbers inodes per subvolume
    assert name_a != name_b and "/subvol/" in name_a


CHILD = """
import json, subprocess, sys
from virtlease_etcd.identity import Resolver
device, target, rel = sys.argv[1:4]
subprocess.run(["mount", device, target], check=True)
try:
    found = Resolver().resolve(target + "/" + rel)
    print(json.dumps({"key": found.key, "name": found.name, "path": found.path}))
finally:
    subprocess.run(["umount", target], check=True)
"""


def test_other_mount_namespace_same_identity(tmp_path: Path) -> None:
    need("unshare")
    with filesystem(tmp_path, "ext4") as device, mounted(tmp_path / "here", device) as here:
        (here / "vm").mkdir()
        (here / "vm" / "disk.img").write_bytes(b"x")
        mine = Resolver().resolve(str(here / "vm" / "disk.img"))
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        out = run("unshare", "-m", "--propagation", "private", sys.executable, "-c", CHILD,
                  device, str(elsewhere), "vm/disk.img")
        assert not os.path.ismount(elsewhere), "the child's mount must stay in its namespace"
    theirs = json.loads(out)
    assert theirs["path"] == str(elsewhere / "vm" / "disk.img")
    assert theirs["key"] == mine.key and not mine.fallback and mine.key.startswith("dir://")
    assert theirs["name"] == mine.name and mine.name.startswith("fs-uuid://")


def test_loop_device_is_named_by_its_backing_file(tmp_path: Path) -> None:
    with filesystem(tmp_path, "ext4") as device, mounted(tmp_path / "m", device) as m, Resolver() as resolver:
        inner = m / "inner.raw"
        run("truncate", "-s", "4M", str(inner))
        file_key = resolver.resolve(str(inner)).key
        with loop_device(inner) as whole, loop_device(inner, "-o", "1048576") as shifted:
            assert resolver.resolve(whole).key == file_key
            assert resolver.resolve(shifted).key == f"{file_key}?loop-offset=1048576"
            assert resolver.resolve(whole).kind == "filesystem"


def test_sshfs_two_mount_points_one_identity(tmp_path: Path, sshd: tuple[int, Path]) -> None:
    port, key = sshd
    export = tmp_path / "export"
    (export / "vm").mkdir(parents=True)
    (export / "vm" / "disk.img").write_bytes(b"x")
    config = IdentityConfig(aliases={"127.0.0.1": "store1", "localhost": "store1"})
    with (
        sshfs(f"root@127.0.0.1:{export}", tmp_path / "a", port, key) as a,
        sshfs(f"localhost:{export / 'vm'}", tmp_path / "b", port, key) as b,
        Resolver(config) as resolver,
    ):
        assert (a / "vm" / "disk.img").read_bytes() == (b / "disk.img").read_bytes() == b"x"
        one, two = resolver.resolve(str(a / "vm" / "disk.img")), resolver.resolve(str(b / "disk.img"))
    assert one.name == two.name == f"sshfs://store1{export}/vm/disk.img"
    assert one.key == two.key and one.key.startswith("dir://")
    assert one.kind == "network" and not one.fallback


def test_tmpfs_file_has_a_directory_id_and_its_path_as_name(tmp_path: Path) -> None:
    need("mount")
    with mounted(tmp_path / "t", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as t:
        (t / "disk.img").write_bytes(b"x")
        found = Resolver().resolve(str(t / "disk.img"))
        mapped = Resolver(IdentityConfig(mappings={str(t): "scratch://t"})).resolve(str(t / "disk.img"))
    assert not found.fallback and found.kind == "path" and found.key.startswith("dir://")
    assert found.name == f"path://{t}/disk.img"
    assert mapped.key == found.key and mapped.name == "scratch://t/disk.img" and mapped.kind == "mapped"


def test_a_directory_that_cannot_carry_an_id_is_refused_when_strict(tmp_path: Path) -> None:
    """A read-only view of a directory without an id (as a root-squashed NFS client sees one):
    strict refuses naming the directory and what to do; not strict, the name; a mapping, the mapping;
    once the id exists (made through a writable view) the read-only view reads it."""
    need("mount")
    (tmp_path / "rw" / "vm").mkdir(parents=True)
    (tmp_path / "rw" / "vm" / "disk.img").write_bytes(b"x")
    with mounted(tmp_path / "ro", "--bind", "-o", "ro", str(tmp_path / "rw")) as ro:
        disk = str(ro / "vm" / "disk.img")
        with pytest.raises(IdentityError) as err:
            Resolver().resolve(disk)
        assert not (tmp_path / "rw" / "vm" / MARKER).exists()
        loose = Resolver(IdentityConfig(strict=False)).resolve(disk)
        mapped = Resolver(IdentityConfig(mappings={str(ro): "san://pool"})).resolve(disk)
        made = Resolver().resolve(str(tmp_path / "rw" / "vm" / "disk.img"))
        now = Resolver().resolve(disk)
    message = str(err.value)
    assert "\n" not in message and disk in message and f"{ro}/vm has no directory id" in message
    assert "Read-only file system" in message and f"virtlease identity {ro}/vm" in message
    assert "identity_map" in message and "strict_identity = false" in message
    assert loose.key == loose.name == f"path://{disk}" and loose.fallback
    assert mapped.key == mapped.name == "san://pool/vm/disk.img" and not mapped.fallback
    assert now.key == made.key and now.key.startswith("dir://")


def test_superblock_read_when_nothing_else_answers(tmp_path: Path) -> None:
    """No ioctl (no open file), no by-uuid links, no udev: the super block on the device."""
    with filesystem(tmp_path, "ext4") as device:
        rdev = os.stat(device).st_rdev
        roots = Roots(sysfs="/sys", dev=str(tmp_path / "no-dev"), udev=str(tmp_path / "no-udev"))
        found = fs_uuid(roots, "ext4", os.major(rdev), os.minor(rdev), None, device)
        expected = blkid_uuid(device)
    assert found is not None and found[1] == "superblock"
    if expected:
        assert found[0] == expected


def test_by_id_and_by_uuid_links(tmp_path: Path) -> None:
    """udev's /dev/disk links, made with mknod in a private /dev root over sysfs samples."""
    need("mount")
    samples = Path(__file__).parent / "samples"
    dev = tmp_path / "dev"
    (dev / "disk" / "by-id").mkdir(parents=True)
    (dev / "disk" / "by-uuid").mkdir(parents=True)
    os.mknod(dev / "zram0", 0o600 | stat.S_IFBLK, os.makedev(253, 0))
    os.mknod(dev / "vdb", 0o600 | stat.S_IFBLK, os.makedev(254, 16))
    by_id, by_uuid = dev / "disk" / "by-id", dev / "disk" / "by-uuid"
    (by_id / "dm-name-zram").symlink_to("../../zram0")  # local names are not identities
    (by_id / "wwn-0x5000C500A1B2C3D4").symlink_to("../../zram0")
    (by_id / "virtio-serial42").symlink_to("../../vdb")
    (by_uuid / "0B7E2E2C-4C43-4E0B-9F8A-1A2B3C4D5E6F").symlink_to("../../zram0")
    roots = Roots(sysfs=str(samples / "sysfs-virtio-loop"), dev=str(dev), udev=str(tmp_path / "no-udev"))
    assert device_key(roots, 253, 0).key == "wwid://naa.5000c500a1b2c3d4"
    assert device_key(roots, 254, 16).key == "serial://virtio-serial42"
    # A partition: udev's link is <disk link>-part<N>, the key says -part<N> once.
    os.mknod(dev / "sdc1", 0o600 | stat.S_IFBLK, os.makedev(8, 33))
    (by_id / "wwn-0x600a098038303053453f463045727a41-part1").symlink_to("../../sdc1")
    (by_id / "scsi-3600a098038303053453f463045727a41-part1").symlink_to("../../sdc1")
    bare = Roots(sysfs=str(tmp_path / "sysfs-without-wwid"), dev=str(dev), udev=roots.udev)
    assert device_key(bare, 8, 33).key == "wwid://naa.600a098038303053453f463045727a41-part1"
    assert fs_uuid(roots, "xfs", 253, 0, None, None) == ("0b7e2e2c-4c43-4e0b-9f8a-1a2b3c4d5e6f", "by-uuid")


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_a_cloned_file_system_is_refused_naming_both(tmp_path: Path, fstype: str) -> None:
    """Two devices of this host carry one file-system UUID (a dd copy; xfs mounts it only with
    nouuid): a disk on either is refused, strict or not, naming both, until the copy is mounted
    read-only (a snapshot mounted for a backup) or gets a new UUID."""
    clone_opts = ("-o", "nouuid") if fstype == "xfs" else ()
    with filesystem(tmp_path, fstype) as device:
        with mounted(tmp_path / "seed", device) as seed:
            (seed / "web1.qcow2").write_bytes(b"disk")
        run("cp", "--sparse=always", str(tmp_path / f"{fstype}.img"), str(tmp_path / "copy.img"))
        with (loop_device(tmp_path / "copy.img") as copy, mounted(tmp_path / "orig", device) as orig):
            with mounted(tmp_path / "clone", *clone_opts, copy) as clone:
                for config in (IdentityConfig(), IdentityConfig(strict=False)):
                    for disk, mine, theirs in ((orig, device, copy), (clone, copy, device)):
                        with Resolver(config) as resolver, pytest.raises(IdentityError) as err:
                            resolver.resolve(str(disk / "web1.qcow2"))
                        message = str(err.value)
                        assert "\n" not in message and "two devices of this host carry file system" in message
                        assert f"{mine} (" in message and f"{theirs} (" in message and str(orig) in message
                        assert str(clone) in message and "new UUID" in message and "read-only" in message
            with mounted(tmp_path / "clone", "-o", ",".join(["ro", *clone_opts[1:]]), copy):
                found = Resolver().resolve(str(orig / "web1.qcow2"))
    assert found.key.startswith("dir://") and found.name.startswith("fs-uuid://")


def test_a_bind_mount_of_one_file_is_found_in_its_directory(tmp_path: Path) -> None:
    """A disk that is itself a mount point (a bind mount of one file): its directory is found through
    another mount of its file system; with none, it is refused (strict) rather than guessed."""
    with filesystem(tmp_path, "ext4") as device, mounted(tmp_path / "m", device) as m:
        (m / "vm").mkdir()
        (m / "vm" / "web1.qcow2").write_bytes(b"x")
        alone = tmp_path / "alone.qcow2"
        alone.write_bytes(b"")
        run("mount", "--bind", str(m / "vm" / "web1.qcow2"), str(alone))
        try:
            through, direct = Resolver().resolve(str(alone)), Resolver().resolve(str(m / "vm" / "web1.qcow2"))
            assert through.key == direct.key and through.name == direct.name
            run("umount", str(m))  # the file's own mount is all that is left of its file system
            with pytest.raises(IdentityError, match="a bind mount of one file"):
                Resolver().resolve(str(alone))
            assert Resolver(IdentityConfig(strict=False)).resolve(str(alone)).name == direct.name
        finally:
            subprocess.run(["umount", str(alone)], check=False, capture_output=True)


def test_directory_ids_through_sshfs_and_locally_are_one(tmp_path: Path, sshd: tuple[int, Path]) -> None:
    """Created through sshfs and read locally, and created by both views at once: one id (a create
    that lost the race through sshfs fails with EPERM, not EEXIST: SFTP v3 has no "exists")."""
    port, key = sshd
    export = tmp_path / "export"
    (export / "first").mkdir(parents=True)
    (export / "first" / "disk.img").write_bytes(b"x")
    with sshfs(f"root@127.0.0.1:{export}", tmp_path / "net", port, key) as net:
        remote = Resolver().resolve(str(net / "first" / "disk.img"))
        assert (export / "first" / MARKER).exists()
        assert Resolver().resolve(str(export / "first" / "disk.img")).key == remote.key
        for n in range(12):
            (export / f"d{n}").mkdir()
            (export / f"d{n}" / "disk.img").write_bytes(b"x")
            views = [str(net / f"d{n}" / "disk.img"), str(export / f"d{n}" / "disk.img")] * 3
            found: list[str] = []

            def one(disk: str, out: list[str] = found) -> None:
                out.append(Resolver().resolve(disk).key)

            threads = [threading.Thread(target=one, args=(view,)) for view in views]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(found) == len(views) and len(set(found)) == 1, (n, found)


def test_a_replaced_directory_id_is_seen_at_the_next_lock_operation(tmp_path: Path) -> None:
    (tmp_path / "disk.img").write_bytes(b"x")
    with Resolver() as resolver:
        first = resolver.resolve_many([str(tmp_path / "disk.img")])[0].key
        os.unlink(tmp_path / MARKER)
        (tmp_path / MARKER).write_text(f"virtlease-dir-id 1 {'cd' * 16}\n")
        assert resolver.resolve_many([str(tmp_path / "disk.img")])[0].key == f"dir://{'cd' * 16}/disk.img" != first
