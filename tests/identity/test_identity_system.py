"""Real-system tests of the identity resolver: loop devices, mounts, namespaces, sshfs, tmpfs.

They need root (mount, losetup) and the tools named in README.md; without
them each test skips with the reason.  Every mount and loop device is undone
in a ``finally``.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from virtlease_etcd.identity import IdentityConfig, IdentityError, Resolver
from virtlease_etcd.identity.blockdev import Roots, device_key, fs_uuid
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
        expected = blkid_uuid(device)
    assert len({f.key for f in found}) == 1, found
    first = found[0]
    assert first.kind == "filesystem" and not first.fallback
    assert first.key.startswith("fs-uuid://") and first.key.endswith(f"/inode/{found[0].key.rsplit('/', 1)[1]}")
    assert first.readable.endswith(":/images/web1.qcow2")
    assert other.key != first.key
    if expected:
        assert first.key.startswith(f"fs-uuid://{expected}/")


def test_btrfs_subvolumes_with_equal_inode_numbers_differ(tmp_path: Path) -> None:
    with filesystem(tmp_path, "btrfs") as device, mounted(tmp_path / "m", device) as m, Resolver() as resolver:
        for name in ("a", "b"):
            run("btrfs", "subvolume", "create", str(m / name))
            (m / name / "disk.img").write_bytes(name.encode())
        ino_a, ino_b = ((m / n / "disk.img").stat().st_ino for n in "ab")
        key_a, key_b = (resolver.resolve(str(m / n / "disk.img")).key for n in "ab")
    assert ino_a == ino_b  # btrfs numbers inodes per subvolume
    assert key_a != key_b and "/subvol/" in key_a


CHILD = """
import json, subprocess, sys
from virtlease_etcd.identity import Resolver
device, target, rel = sys.argv[1:4]
subprocess.run(["mount", device, target], check=True)
try:
    found = Resolver().resolve(target + "/" + rel)
    print(json.dumps({"key": found.key, "path": found.path}))
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
    assert theirs["key"] == mine.key and not mine.fallback


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
    assert one.key == two.key == f"sshfs://store1{export}/vm/disk.img"
    assert one.kind == "network" and not one.fallback


def test_tmpfs_falls_back_or_raises_when_strict(tmp_path: Path) -> None:
    need("mount")
    with mounted(tmp_path / "t", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as t:
        (t / "disk.img").write_bytes(b"x")
        found = Resolver().resolve(str(t / "disk.img"))
        with pytest.raises(IdentityError, match=r"tmpfs.*configure an identity mapping") as err:
            Resolver(IdentityConfig(strict=True)).resolve(str(t / "disk.img"))
        mapped = Resolver(IdentityConfig(mappings={str(t): "scratch://t"})).resolve(str(t / "disk.img"))
    assert found.fallback and found.kind == "path" and found.key == f"path://{t}/disk.img"
    assert str(t / "disk.img") in str(err.value)
    assert mapped.key == "scratch://t/disk.img" and not mapped.fallback


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
