"""Unit tests of the identity resolver over mountinfo and sysfs samples (no root needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virtlease_etcd.identity import IdentityConfig, Resolver
from virtlease_etcd.identity.blockdev import Roots, device_key, fs_uuid, normalise_wwid, parse_superblock
from virtlease_etcd.identity.mountinfo import MountTable, parse_mountinfo, unescape

SAMPLES = Path(__file__).parent / "samples"
ALIASES = {"10.0.0.5": "filer1", "filer1.example.com": "filer1", "FD00::5": "filer1"}


def resolver(sample: str, **config: object) -> Resolver:
    return Resolver(IdentityConfig(**config), mountinfo=str(SAMPLES / sample))  # type: ignore[arg-type]


def keys(sample: str, *paths: str, **config: object) -> list[str]:
    """The names of ``paths`` (files that do not exist here: their name is their key)."""
    with resolver(sample, **config) as r:
        found = [r.resolve(path) for path in paths]
    assert all(f.key == f.name for f in found)
    return [f.key for f in found]


def test_parse_fields_and_escapes() -> None:
    entries = parse_mountinfo((SAMPLES / "mountinfo-overmount").read_text())
    assert len(entries) == 8  # the garbage line is skipped
    first = entries[1]
    assert (first.mount_id, first.parent_id, first.major, first.minor) == (30, 22, 0, 50)
    assert first.optional == ("shared:2",) and first.fstype == "nfs4" and first.source == "old:/hidden"
    assert first.super_option("vers") == "4.2" and first.super_option("nope") is None
    assert entries[6].mount_point == "/srv/My Disks" and entries[6].source == "filer1:/export/with space"
    assert entries[7].mount_point == "/srv/tab\tand\\backslash"
    assert unescape("caf\\303\\251") == "café"


def test_overmounts_hide_what_is_below() -> None:
    table = MountTable(parse_mountinfo((SAMPLES / "mountinfo-overmount").read_text()))
    assert table.find("/mnt/a/b/disk.img").source == "new:/visible"  # type: ignore[union-attr]
    assert table.find("/mnt/s/sub/disk.img").source == "upper:/s"  # type: ignore[union-attr]
    assert table.find("/mnt/sx").fstype == "ext4"  # type: ignore[union-attr]
    assert table.find("/").fstype == "ext4"  # type: ignore[union-attr]


def test_nfs_same_file_every_way() -> None:
    got = keys(
        "mountinfo-nfs",
        "/var/lib/libvirt/images/web/web1.qcow2",  # nfs4 filer1.example.com:/export/vm
        "/mnt/filer/vm/web/web1.qcow2",  # nfs3 10.0.0.5:/export
        "/srv/web/web1.qcow2",  # nfs4 of a sub-directory
        "/mnt/v6/web/../web/web1.qcow2",  # IPv6 address, .. in the path
        aliases=ALIASES,
    )
    assert set(got) == {"nfs://filer1/export/vm/web/web1.qcow2"}


def test_nfs_without_aliases_names_the_server_as_mounted() -> None:
    assert keys("mountinfo-nfs", "/mnt/filer/a.img", "/mnt/v6/a.img") == [
        "nfs://10.0.0.5/export/a.img",
        "nfs://fd00::5/export/vm/a.img",
    ]


def test_cifs_and_smb3() -> None:
    got = keys("mountinfo-cifs", "/mnt/images/web/web1.qcow2", "/mnt/web/web1.qcow2", aliases=ALIASES)
    assert set(got) == {"smb://filer1/vmstore/web/web1.qcow2"}


def test_ceph_old_and_new_syntax() -> None:
    old, new, two = keys(
        "mountinfo-ceph", "/mnt/cephfs/web1.img", "/var/lib/libvirt/ceph/web1.img", "/mnt/ceph-two/vm/web1.img"
    )
    assert old == "ceph://10.0.1.1,10.0.1.2,10.0.1.3/vm/web1.img"  # ports dropped, sorted
    assert new == "ceph://b3acfc0d-575f-41d3-9c91-0e7ed3dbb3fa.cephfs/vm/web1.img"
    assert two == "ceph://10.0.1.1,10.0.1.3/vm/web1.img"
    cluster = {"10.0.1.1": "ceph1", "10.0.1.2": "ceph1", "10.0.1.3": "ceph1"}
    assert set(keys("mountinfo-ceph", "/mnt/cephfs/web1.img", "/mnt/ceph-two/vm/web1.img", aliases=cluster)) == {
        "ceph://ceph1/vm/web1.img"
    }


def test_glusterfs_volume_subdir_and_bind() -> None:
    got = keys(
        "mountinfo-glusterfs",
        "/var/lib/libvirt/gluster/web/web1.img",
        "/mnt/gv-sub/web1.img",
        "/mnt/gv-bind/web1.img",
        aliases={"gluster2.example.com": "gluster1"},
    )
    assert set(got) == {"glusterfs://gluster1/vmstore/web/web1.img"}


def test_sshfs_user_dropped_home_kept() -> None:
    got = keys(
        "mountinfo-sshfs",
        "/tmp/tmp.4VKvDnrcx9/m1/disk.img",
        "/tmp/tmp.4VKvDnrcx9/m2/exp/disk.img",
        "/home/ada/remote/vm/disk.img",
        aliases={"127.0.0.1": "loopback", "localhost": "loopback"},
    )
    assert got[0] == got[1] == "sshfs://loopback/tmp/tmp.4VKvDnrcx9/exp/disk.img"
    assert got[2] == "sshfs://store1/~ada/vm/disk.img"


def test_mapping_wins_longest_prefix() -> None:
    mappings = {"/mnt/filer": "san://pool1", "/mnt/filer/vm/web": "san://pool2/web"}
    got = keys("mountinfo-nfs", "/mnt/filer/x.img", "/mnt/filer/vm/web/w.img", "/mnt/filerx/y", mappings=mappings)
    assert got == ["san://pool1/x.img", "san://pool2/web/w.img", "path:///mnt/filerx/y"]


def test_a_missing_disk_is_named_by_its_path_strict_or_not() -> None:
    """Nothing can have a missing file open: it is locked under its name, even when strict (the
    refusal of a disk that exists and has no cluster-wide identity is in test_identity_system)."""
    for strict in (False, True):
        with resolver("mountinfo-overmount", strict=strict) as r:
            found = r.resolve("/srv/tab\tand\\backslash/disk.img")
        assert found.fallback and found.kind == "path" and found.key == "path:///srv/tab\tand\\backslash/disk.img"
        assert found.name == found.key


def test_ocfs2_uuid_from_udev_hard_link_and_two_mounts(tmp_path: Path) -> None:
    """Two mounts of one ocfs2 (one of a sub-directory) and a hard link: one identity."""
    cluster = tmp_path / "cluster"
    (cluster / "images").mkdir(parents=True)
    disk = cluster / "images" / "web1.qcow2"
    disk.write_bytes(b"x")
    os.link(disk, cluster / "hardlink.qcow2")
    libvirt = tmp_path / "libvirt"
    libvirt.symlink_to(cluster / "images")  # stands in for the second mount of /images
    text = (SAMPLES / "mountinfo-ocfs2").read_text()
    text = text.replace("/srv/cluster", str(cluster)).replace("/var/lib/libvirt/images", str(libvirt))
    (tmp_path / "mountinfo").write_text(text)
    with Resolver(mountinfo=str(tmp_path / "mountinfo"), udev_root=str(SAMPLES / "udev-ocfs2"),
                  dev_root=str(tmp_path / "dev"), sysfs_root=str(tmp_path / "sys")) as r:
        a = r.resolve(str(disk))
        b = r.resolve(str(cluster / "hardlink.qcow2"))
    uuid = "4a1f0b4e-6bde-4c2a-9b5e-3f2d1c0a9e77"
    assert a.name == b.name == f"fs-uuid://{uuid}/inode/{disk.stat().st_ino}"  # the links meet on the name
    assert a.kind == "filesystem" and a.readable.startswith(f"ocfs2 {uuid}:/images/web1.qcow2, dir ")
    assert a.key.startswith("dir://") and a.key.endswith("/web1.qcow2") and b.key.endswith("/hardlink.qcow2")


def test_superblocks() -> None:
    raw = bytearray(0x10048)
    raw[1024 + 0x38 : 1024 + 0x3A] = b"\x53\xef"
    raw[1024 + 0x68 : 1024 + 0x78] = bytes(range(1, 17))
    assert parse_superblock(bytes(raw)) == ("ext", "01020304-0506-0708-090a-0b0c0d0e0f10")
    xfs = b"XFSB" + bytes(28) + bytes(range(16, 32))
    assert parse_superblock(xfs) == ("xfs", "10111213-1415-1617-1819-1a1b1c1d1e1f")
    btrfs = bytearray(0x10048)
    btrfs[0x10040:0x10048] = b"_BHRfS_M"
    btrfs[0x10020:0x10030] = bytes([0xAB] * 16)
    assert parse_superblock(bytes(btrfs)) == ("btrfs", "abababab-abab-abab-abab-abababababab")
    assert parse_superblock(bytes(4096)) is None


def sysfs(sample: str) -> Roots:
    return Roots(sysfs=str(SAMPLES / sample), dev=str(SAMPLES / "no-dev"), udev=str(SAMPLES / "no-udev"))


def test_multipath_partition_and_scsi_path_agree() -> None:
    roots = sysfs("sysfs-multipath")
    mpath, part = device_key(roots, 253, 0), device_key(roots, 253, 1)
    sdc, sdc1 = device_key(roots, 8, 32), device_key(roots, 8, 33)
    assert mpath.key == sdc.key == "wwid://naa.600a098038303053453f463045727a41"
    assert part.key == sdc1.key == "wwid://naa.600a098038303053453f463045727a41-part1"
    assert mpath.readable == "dm mpatha"


def test_lvm_and_luks() -> None:
    roots = sysfs("sysfs-lvm")
    lv = device_key(roots, 253, 2)
    assert lv.key == "lvm://Qm2dY8vCk1Vt0x3ZyRkq7Jd0hN5sWb9e/Pj4XcGf6aL1uTz8rKn2oS3iHmD7yBw0E"
    assert lv.readable == "dm vg_vms-web1"
    assert device_key(roots, 253, 3).key == "luks://8e4b1d5a-2c9f-47e3-b6a0-d1c2e3f40516"


def test_nvme_namespaces_and_partition() -> None:
    roots = sysfs("sysfs-nvme")
    assert device_key(roots, 259, 0).key == "wwid://eui.0025388b91b1a2c3"
    assert device_key(roots, 259, 2).key == "wwid://eui.0025388b91b1a2c3-part2"
    assert device_key(roots, 259, 5).key.startswith("wwid://nvme.8086-5048")  # type: ignore[union-attr]


def test_virtio_serial_loop_backing_and_nothing() -> None:
    roots = sysfs("sysfs-virtio-loop")
    assert device_key(roots, 254, 0).key == "serial://virtio-211663562362316"
    loop = device_key(roots, 7, 1)
    assert loop.key is None and loop.backing_file == "/srv/images/web1.raw"
    assert loop.readable.endswith("offset 1048576")
    assert device_key(roots, 253, 0).key is None  # zram: nothing stable
    assert fs_uuid(roots, "ext4", 254, 0, None, None) is None


def test_wwid_spellings() -> None:
    assert normalise_wwid("3600A0980383030") == "naa.600a0980383030"
    assert normalise_wwid("wwn-0x5000C500A1B2C3D4") == "naa.5000c500a1b2c3d4"
    assert normalise_wwid("t10.ATA     QEMU HARDDISK   QM00001 ") == "t10.ATA QEMU HARDDISK QM00001"


def test_mountinfo_parsed_once_for_many_disks() -> None:
    with resolver("mountinfo-nfs", aliases=ALIASES) as r:
        for n in range(64):
            r.resolve(f"/var/lib/libvirt/images/disk{n}.qcow2")
        assert r.parses == 1


def test_config_checks_mappings() -> None:
    with pytest.raises(ValueError, match="absolute"):
        IdentityConfig(mappings={"relative/dir": "x://y"})
    assert IdentityConfig(aliases={"Filer1.Example.COM.": "filer1"}).aliases == {"filer1.example.com": "filer1"}
