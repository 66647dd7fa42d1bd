"""One file, one identity on every host: hosts that reach one file through different views of its
storage collide on at least one key (the id the file's directory carries), so the second host is
refused naming the first, whatever each host's mount table, server names and identity_map say.

Driver tests (real etcd, real mounts; two driver instances with their own host ids are the two
hosts): an NFS server that also runs VMs and its clients, with the default configuration (NFS
cannot be mounted on this kernel: the server's ext4 and an sshfs client of its exported
sub-directory are the same two views, a local file system and a network mount of part of it);
GlusterFS clients of one volume mounted from two volfile servers (real fuse mounts the kernel lists
as ``fuse.glusterfs gluster1:/vmstore`` and ``gluster2:/vmstore``); an ``identity_map`` on one host
only.  On the previous release each of these granted the disk to both hosts.

Key tests (no etcd): two hosts' disk namers over mount tables in which one real bind mount's line
is given the real format of a network mount this kernel cannot make (nfs4, nfs v3, kernel CephFS,
ceph-fuse): NFSv4 pseudo root vs NFSv3 export path, kernel CephFS vs ceph-fuse vs another monitor
list, the NFS server vs its client.  The names differ; the keys share the directory's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import etcd3
import pytest

import virtlease as v
from virtlease.abi import ResourceSpec, ResourceType
from virtlease_etcd.config import load_config
from virtlease_etcd.devtools.hostprocess import HostProcess
from virtlease_etcd.identity import Resolver
from virtlease_etcd.identity.mountinfo import unescape
from virtlease_etcd.ops.disks import DiskNames, identity_config
from virtlease_lab.drivers import new_uuid, shut
from virtlease_lab.etcdserver import EtcdServer, holder_keys
from virtlease_lab.storage import ext4_disks, mounted, need, sshfs

D = v.ResourceType.DISK


def vm(plugin: v.Plugin, disk: str, name: str = "web1") -> v.LockObject:
    obj = plugin.new_object(uuid=new_uuid(), name=name)
    obj.add_resource(D, disk)
    return obj


def shown(obj: v.LockObject) -> str:
    """What the holder's records say of the disk: ``<path> (<name>, dir <id>)``."""
    (held,) = obj.held()
    return held.identity


def refused(plugin: v.Plugin, disk: str) -> str:
    """The busy error of a domain on ``plugin`` that asks for ``disk`` (nothing taken)."""
    obj = vm(plugin, disk, "web1-elsewhere")
    with pytest.raises(v.ResourceBusyError) as err:
        obj.acquire()
    obj.free()
    return str(err.value)


def exclude_each_other(one: tuple[v.Plugin, str], other: tuple[v.Plugin, str], kv: etcd3.Etcd3Client,
                       prefix: str) -> tuple[str, str]:
    """Each view, holding the disk, makes the other refused naming it; return what each calls it."""
    names = []
    for (holder, disk), (rival, theirs) in ((one, other), (other, one)):
        obj = vm(holder, disk)
        obj.acquire()
        names.append(shown(obj))
        message = refused(rival, theirs)
        assert f"{disk} (" in message and f"on host {holder.driver.host_id}" in message, message
        assert {r["host"] for r in holder_keys(kv, prefix).values()} == {holder.driver.host_id}
        obj.release()
        obj.free()
    dir_ids = {name.rpartition(", dir ")[2] for name in names}
    assert len(dir_ids) == 1, names  # one directory id, whatever else each view calls the disk
    return names[0], names[1]


@pytest.mark.parametrize("legacy", [True, False], ids=["default", "legacy-path-keys-off"])
def test_a_storage_server_that_runs_vms_and_its_network_client(
        legacy: bool, tmp_path: Path, sshd: tuple[int, Path], make_driver: Callable[..., v.Plugin],
        kv: etcd3.Etcd3Client, prefix: str) -> None:
    need("mount", "losetup", "mkfs.ext4")
    port, key = sshd
    settings = {} if legacy else {"legacy_path_keys": False}
    with (ext4_disks(tmp_path / "fs", "vm/web1.qcow2") as device, mounted(tmp_path / "export", device) as export,
          sshfs(f"root@127.0.0.1:{export / 'vm'}", tmp_path / "client", port, key) as client):
        server = (make_driver("storage-host", **settings), str(export / "vm" / "web1.qcow2"))
        network = (make_driver("client-host", **settings), str(client / "web1.qcow2"))
        on_server, on_client = exclude_each_other(server, network, kv, prefix)
    assert on_server.startswith(f"{server[1]} (ext4 ") and ":/vm/web1.qcow2, dir " in on_server
    assert on_client.startswith(f"{network[1]} (sshfs://127.0.0.1{export}/vm/web1.qcow2, dir ")


def test_a_storage_server_and_its_client_as_two_hosts_in_their_own_mount_namespaces(
        tmp_path: Path, sshd: tuple[int, Path], namespaced: Callable[..., HostProcess]) -> None:
    """The same with the default configuration, each host a process with its own mount table: the
    server sees its ext4, the client only its network mount of the server's /export/vm."""
    need("mount", "losetup", "mkfs.ext4", "mountpoint")
    port, key = sshd
    with ext4_disks(tmp_path / "fs", "vm/web1.qcow2") as device, mounted(tmp_path / "export", device) as export:
        client = tmp_path / "client"
        options = f"IdentityFile={key},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,port={port}"
        mount_client = (f"umount {export} && mkdir -p {client} && "  # the client does not see the server's disk
                        f"{{ sshfs -f -o {options} root@127.0.0.1:{export}/vm {client} </dev/null >/dev/null 2>&1 & "
                        f"echo $! >> \"$KEEP\"; }} && "
                        f"for i in $(seq 100); do mountpoint -q {client} && break; sleep 0.1; done && "
                        f"mountpoint -q {client}")
        server = namespaced("storage-host", "true")
        network = namespaced("client-host", mount_client)
        views = ((server, f"{export}/vm/web1.qcow2"), (network, f"{client}/web1.qcow2"))
        for (holder, disk), (rival, theirs) in (views, views[::-1]):
            holder.ok("new", obj="web1", uuid=new_uuid(), name="web1", disks=[disk])
            (token,) = holder.ok("acquire", obj="web1")["tokens"]
            rival.ok("new", obj="rival", uuid=new_uuid(), name="web1-elsewhere", disks=[theirs])
            refused = rival.call("acquire", obj="rival")
            assert refused["error"] == "ResourceBusyError", refused
            assert f"{disk} (" in refused["message"] and f"on host {holder.host_id}" in refused["message"]
            holder.ok("release", obj="web1")
            rival.ok("free", obj="rival")
            holder.ok("free", obj="web1")
    assert token["resource"].startswith(f"{client}/web1.qcow2 (sshfs://127.0.0.1{export}/vm/web1.qcow2, dir ")


def test_a_migration_between_the_storage_server_and_its_client(
        tmp_path: Path, sshd: tuple[int, Path], etcd: EtcdServer, prefix: str, kv: etcd3.Etcd3Client) -> None:
    """A live migration from the storage server to its network client and back: the claim takes
    the directory key with its token and the destination's own name and path keys, and deletes the
    source's (the two hosts name the disk differently); a third domain is refused at every step."""
    need("mount", "losetup", "mkfs.ext4")
    port, key = sshd
    with (ext4_disks(tmp_path / "fs", "vm/web1.qcow2") as device, mounted(tmp_path / "export", device) as export,
          sshfs(f"root@127.0.0.1:{export / 'vm'}", tmp_path / "client", port, key) as client):
        paths = {"storage-host": str(export / "vm" / "web1.qcow2"), "client-host": str(client / "web1.qcow2")}
        plugins = {host: v.load_driver("etcd", capabilities=v.Capability.RESOURCES | v.Capability.MIGRATE, config={
            "endpoints": etcd.endpoints, "prefix": prefix, "host_id": host, "ttl": 3}) for host in paths}
        try:
            uuid = new_uuid()
            src = plugins["storage-host"].new_object(uuid=uuid, name="web1")
            src.add_resource(D, paths["storage-host"])
            src.acquire()
            for dest in ("client-host", "storage-host"):
                state = src.prepare_migrate(dest)
                dst = plugins[dest].new_object(uuid=uuid, name="web1", flags=v.NewFlags.MIGRATE)
                dst.add_resource(D, paths[dest])
                dst.acquire(state)
                dst.complete_migrate_in()
                src.complete_migrate_out()
                src.free()
                records = holder_keys(kv, prefix)
                assert {r["host"] for r in records.values()} == {dest} and len(records) == 3  # dir, name, path
                assert {r["path"] for r in records.values()} == {paths[dest]}
                assert len({r["identity"] for r in records.values()}) == 1
                for host in paths:
                    message = refused(plugins[host], paths[host])
                    assert f"held exclusive by domain web1 ({uuid}) on host {dest}" in message, message
                src = dst
            src.release()
            src.free()
        finally:
            for plugin in plugins.values():
                shut(plugin)


def mountinfo_line(mount_point: Path) -> str:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if unescape(line.split(" ")[4]) == str(mount_point):
            return line
    raise AssertionError(f"{mount_point} is not a mount point")


def test_glusterfs_clients_of_one_volume_from_two_volfile_servers(
        tmp_path: Path, sshd: tuple[int, Path], make_driver: Callable[..., v.Plugin],
        kv: etcd3.Etcd3Client, prefix: str) -> None:
    port, key = sshd
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "web1.qcow2").write_bytes(b"x")
    fuse = ("subtype=glusterfs",)
    with (sshfs(f"root@127.0.0.1:{volume}", tmp_path / "g1", port, key, "fsname=gluster1:/vmstore", *fuse) as g1,
          sshfs(f"root@127.0.0.1:{volume}", tmp_path / "g2", port, key, "fsname=gluster2:/vmstore", *fuse) as g2):
        assert " - fuse.glusterfs gluster1:/vmstore " in mountinfo_line(g1)
        assert " - fuse.glusterfs gluster2:/vmstore " in mountinfo_line(g2)
        one = (make_driver("host-a", legacy_path_keys=False), str(g1 / "web1.qcow2"))
        two = (make_driver("host-b", legacy_path_keys=False), str(g2 / "web1.qcow2"))
        first, second = exclude_each_other(one, two, kv, prefix)
    assert first.startswith(f"{g1}/web1.qcow2 (glusterfs://gluster1/vmstore/web1.qcow2, dir ")
    assert second.startswith(f"{g2}/web1.qcow2 (glusterfs://gluster2/vmstore/web1.qcow2, dir ")


def test_identity_map_rolled_out_to_one_host_first(tmp_path: Path, make_driver: Callable[..., v.Plugin],
                                                   kv: etcd3.Etcd3Client, prefix: str) -> None:
    need("mount", "losetup", "mkfs.ext4")
    with (ext4_disks(tmp_path / "fs", "web1.qcow2") as device, mounted(tmp_path / "a", device) as a,
          mounted(tmp_path / "b", device) as b):
        mapped = (make_driver("host-a", identity_map={str(a): "san://pool1"}, legacy_path_keys=False),
                  str(a / "web1.qcow2"))
        plain = (make_driver("host-b", legacy_path_keys=False), str(b / "web1.qcow2"))
        first, second = exclude_each_other(mapped, plain, kv, prefix)
    assert first.startswith(f"{a}/web1.qcow2 (san://pool1/web1.qcow2, dir ")
    assert second.startswith(f"{b}/web1.qcow2 (ext4 ")


# -- key tests over real-format lines of mounts this kernel cannot make --------------------------


def disguised(tmp_path: Path, mount_point: Path, fstype: str, source: str, options: str) -> str:
    """A copy of this process's mount table in which the line of ``mount_point`` (a real bind mount)
    says ``fstype source options``, with ``/`` as its root as NFS and CephFS mounts show it."""
    lines = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if unescape(fields[4]) == str(mount_point):
            sep = fields.index("-", 6)
            fields[3] = "/"
            fields[sep + 1:] = [fstype, source, options]
        lines.append(" ".join(fields))
    out = tmp_path / f"mountinfo-{mount_point.name}"
    out.write_text("\n".join(lines) + "\n")
    return str(out)


@contextlib.contextmanager
def namers(*mount_tables: str | None) -> Iterator[list[DiskNames]]:
    """One disk namer per host (default configuration), each over its own mount table."""
    cfg = load_config({"host_id": "h"}, environ={})
    made = [DiskNames(cfg, Resolver(identity_config(cfg), mountinfo=table or "/proc/self/mountinfo"))
            for table in mount_tables]
    try:
        yield made
    finally:
        for names in made:
            names.close()


def views(pairs: list[tuple[DiskNames, str]]) -> list[tuple[str, set[str]]]:
    """Per host: what it calls the disk, and the keys it locks it under."""
    out = []
    for names, path in pairs:
        ids = names.ids(ResourceSpec(ResourceType.DISK, path))
        out.append((ids[0].readable, {r.rid for r in ids}))
    return out


def collide(found: list[tuple[str, set[str]]]) -> None:
    for n, (name, keys) in enumerate(found):
        for other, other_keys in found[n + 1:]:
            assert keys & other_keys, f"{name} and {other}: no key in common, both would be granted"


NFS4 = "rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,addr=10.0.0.5"
NFS3 = "rw,vers=3,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,sec=sys,mountaddr=10.0.0.5,addr=10.0.0.5"


def test_nfs_server_and_its_client_keys(tmp_path: Path) -> None:
    """The server's own ext4 (default configuration) and an nfs4 client of its /export/vm."""
    need("mount", "losetup", "mkfs.ext4")
    with (ext4_disks(tmp_path / "fs", "export/vm/web1.qcow2") as device, mounted(tmp_path / "srv", device) as srv,
          mounted(tmp_path / "client", "--bind", str(srv / "export" / "vm")) as client):
        table = disguised(tmp_path, client, "nfs4", "filer1.example.com:/export/vm", NFS4)
        with namers(None, table) as (server, nfs):
            found = views([(server, str(srv / "export" / "vm" / "web1.qcow2")), (nfs, str(client / "web1.qcow2"))])
    collide(found)  # first: the previous release failed here
    assert found[0][0].startswith(f"{srv}/export/vm/web1.qcow2 (ext4 ")
    assert found[1][0].startswith(f"{client}/web1.qcow2 (nfs://filer1.example.com/export/vm/web1.qcow2, dir ")


def one_file_seen_as(tmp_path: Path, name: str, *lines: tuple[str, str, str, str]) -> list[tuple[str, set[str]]]:
    """A file ``name`` in one directory, bind-mounted once per host at ``tmp_path/<point>``, the
    line of that mount in the host's own mount table saying ``fstype source options``, for
    ``(point, fstype, source, options)`` in ``lines``: per host, its name for the file and its keys,
    checked to collide."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / name).write_bytes(b"x")
    points = [tmp_path / line[0] for line in lines]
    with contextlib.ExitStack() as stack:
        for point in points:
            stack.enter_context(mounted(point, "--bind", str(shared)))
        tables = [disguised(tmp_path, point, *line[1:]) for point, line in zip(points, lines, strict=True)]
        with namers(*tables) as made:
            found = views([(names, str(point / name)) for names, point in zip(made, points, strict=True)])
    collide(found)  # first: the previous release failed here
    return found


def test_nfs4_pseudo_root_and_nfs3_export_path_keys(tmp_path: Path) -> None:
    need("mount")
    found = one_file_seen_as(tmp_path, "web1.qcow2",
                             ("v4", "nfs4", "filer1:/", NFS4),  # the export is the v4 pseudo root
                             ("v3", "nfs", "filer1:/export/vm", NFS3))
    assert found[0][0].startswith(f"{tmp_path}/v4/web1.qcow2 (nfs://filer1/web1.qcow2, dir ")
    assert found[1][0].startswith(f"{tmp_path}/v3/web1.qcow2 (nfs://filer1/export/vm/web1.qcow2, dir ")


def test_kernel_cephfs_ceph_fuse_and_two_monitor_lists_keys(tmp_path: Path) -> None:
    need("mount")
    found = one_file_seen_as(tmp_path, "web1.img",
                             ("kernel", "ceph", "10.0.1.1:6789,10.0.1.2:6789:/vm", "rw,name=admin,acl"),
                             ("other-mons", "ceph", "10.0.1.3:/vm", "rw,name=admin,acl"),
                             ("fuse", "fuse.ceph-fuse", "ceph-fuse", "rw,user_id=0,group_id=0,allow_other"))
    assert found[0][0].startswith(f"{tmp_path}/kernel/web1.img (ceph://10.0.1.1,10.0.1.2/vm/web1.img, dir ")
    assert found[1][0].startswith(f"{tmp_path}/other-mons/web1.img (ceph://10.0.1.3/vm/web1.img, dir ")
    assert found[2][0].startswith(f"{tmp_path}/fuse/web1.img (dir ")  # ceph-fuse: no name but its path
