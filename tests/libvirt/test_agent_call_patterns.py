"""Every libvirt call pattern that takes or drops a disk of a *running* domain, with stock
``virsh`` on the two-host rig and the agent on both hosts.

Each test defines one domain with the same UUID on host A and on host B (the double start a lock
manager exists to stop: the same domain defined on two hosts) and, while it runs on A, keeps
starting that twin on B, sampling etcd every few ms.  The twin must never run while A's QEMU can
write the disks.  What each call must do with the disk it names:

* ``detach-disk --live``: the detached disk is free for another domain at once, the others stay
  held (not reserved, so not claimable by the twin);
* ``attach-disk --live``: the new disk is held; a busy one is refused naming its holder;
* ``blockcopy --pivot``: the copy is held before QEMU writes it, the old image freed after the
  pivot;
* ``snapshot-create-as --disk-only`` (external snapshot): the overlay is held; ``blockcommit
  --active --pivot`` back into the base: the base is held, the overlay freed;
* ``managedsave`` then ``start``: nothing is held while the domain is saved, the restored QEMU
  holds its disks again.

The disks sit on a virtio-scsi controller: a SCSI disk is unplugged at once, with no guest OS to
acknowledge it (the rig's guests run none).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from virtlease_lab.libvirt.agentrig import AgentRig, DeathWatch, Watch
from virtlease_lab.libvirt.rig import wait_for

pytestmark = pytest.mark.libvirt


def twin(env: AgentRig, name: str, disks: list[Path]) -> str:
    """Define ``name`` with one UUID on A and on B (SCSI disks), start it on A; return the UUID."""
    u = str(uuid.uuid4())
    for host in ("A", "B"):
        env.rig.define_domain(host, name, disks, uuid=u, bus="scsi")
    env.rig.start("A", name)
    return u


def held(env: AgentRig, name: str) -> dict[str, tuple[str, str | None]]:
    """Disk file name -> (host, handoff) of every record of domain ``name`` in etcd."""
    return {Path(h.resource.split(" (")[0]).name: (h.host, h.handoff_to) for h in env.holders(name)}


def settles_to(env: AgentRig, name: str, expected: dict[str, tuple[str, str | None]]) -> None:
    """Wait until etcd shows ``expected`` for domain ``name``: the agent frees an unplugged or
    pivoted disk once the lock connection that released it has closed, just after virsh returns."""
    wait_for(lambda: held(env, name) == expected, 5.0, what=f"{name}'s records to be {expected}")


def never_ran(watch: Watch) -> None:
    twin_b = watch.intruders[0]
    assert twin_b.tries, "the twin was never tried"
    assert not twin_b.ran, f"the twin ran on B {len(twin_b.ran)} time(s) while A's QEMU had the disks"
    assert watch.samples and not watch.two_holders, watch.two_holders[:3]


def test_detach_disk_frees_it_at_once_and_keeps_the_others_held(
        env: AgentRig, record_property: pytest.RecordProperty) -> None:
    """Before: the RELEASE of the unplugged disk reserved *every* disk of the domain for its
    UUID, and the twin's start on B claimed the disks A's QEMU still wrote (two writers)."""
    r = env.rig
    root, data = r.image("cp1-root.img"), r.image("cp1-data.img")
    twin(env, "cp1", [root, data])
    r.define_domain("B", "cp1-rival", [data], bus="scsi")
    qemu = r.qemu_pid("A", "cp1")
    with Watch(env, ["cp1"], intruders=[("B", "cp1")], linger=1.5) as watch:
        time.sleep(0.5)  # the twin is refused while cp1 runs with both disks
        r.virsh("A", "detach-disk", "cp1", "sdb", "--live")
        detached = time.monotonic()
        _, granted = env.start_once_free("B", "cp1-rival", detached, 5, pause=0.02)
    never_ran(watch)
    assert r.qemu_pid("A", "cp1") == qemu and r.domstate("A", "cp1") == "running"
    settles_to(env, "cp1", {"cp1-root.img": ("hostA", None)})  # held, not reserved
    assert held(env, "cp1-rival") == {"cp1-data.img": ("hostB", None)}
    assert any("held exclusive by domain cp1" in e and "on host hostA" in e for e in watch.intruders[0].refusals)
    record_property("detached_disk_free_s", round(granted, 3))
    print(f"detach-disk: the detached disk granted to another domain {granted:.2f} s after virsh returned; "
          f"{watch.intruders[0].tries} twin starts refused, {len(watch.samples)} etcd samples")
    r.virsh("B", "destroy", "cp1-rival")
    r.virsh("A", "destroy", "cp1")


def test_attach_disk_holds_it_and_a_busy_one_is_refused_naming_the_holder(env: AgentRig) -> None:
    r = env.rig
    root, hot, busy = r.image("cp2-root.img"), r.image("cp2-hot.img"), r.image("cp2-busy.img")
    twin(env, "cp2", [root])
    r.define_domain("B", "cp2-owner", [busy], bus="scsi")
    r.start("B", "cp2-owner")
    with Watch(env, ["cp2"], intruders=[("B", "cp2")]) as watch:
        r.virsh("A", "attach-disk", "cp2", str(hot), "sdb", "--targetbus", "scsi", "--live")
        assert held(env, "cp2") == {"cp2-root.img": ("hostA", None), "cp2-hot.img": ("hostA", None)}
        cp = r.virsh("A", "attach-disk", "cp2", str(busy), "sdc", "--targetbus", "scsi", "--live", check=False)
    never_ran(watch)
    assert cp.returncode != 0
    assert "held exclusive by domain cp2-owner" in cp.stderr and "on host hostB" in cp.stderr, cp.stderr
    assert str(busy) not in r.virsh("A", "domblklist", "cp2").stdout
    assert r.domstate("A", "cp2") == "running"
    assert held(env, "cp2-owner") == {"cp2-busy.img": ("hostB", None)}
    r.virsh("B", "destroy", "cp2-owner")
    r.virsh("A", "destroy", "cp2")


def test_blockcopy_pivot_holds_the_copy_first_and_frees_the_source_after(env: AgentRig) -> None:
    r = env.rig
    root, data, copy = r.image("cp3-root.img"), r.image("cp3-data.img"), r.images / "cp3-copy.img"
    twin(env, "cp3", [root, data])
    with Watch(env, ["cp3"], intruders=[("B", "cp3")]) as watch:
        r.virsh("A", "blockcopy", "cp3", "sdb", str(copy), "--wait", "--pivot", "--transient-job",
                "--format", "raw", timeout=120)
    never_ran(watch)
    settles_to(env, "cp3", {"cp3-root.img": ("hostA", None), "cp3-copy.img": ("hostA", None)})
    names = [{Path(h.resource.split(" (")[0]).name for h in s} for s in watch.samples]
    first_copy = next(i for i, s in enumerate(names) if "cp3-copy.img" in s)
    last_data = max(i for i, s in enumerate(names) if "cp3-data.img" in s)
    assert first_copy <= last_data, "the copy was not held before the source was released"
    r.define_domain("B", "cp3-rival", [data], bus="scsi")
    env.start_once_free("B", "cp3-rival", time.monotonic(), 3)  # the old source is free
    r.virsh("B", "destroy", "cp3-rival")
    r.virsh("A", "destroy", "cp3")


def test_external_snapshot_holds_the_overlay_and_blockcommit_pivot_holds_the_base(env: AgentRig) -> None:
    r = env.rig
    root, data = r.image("cp4-root.img"), r.image("cp4-data.img")
    twin(env, "cp4", [root, data])
    with Watch(env, ["cp4"], intruders=[("B", "cp4")]) as watch:
        r.virsh("A", "snapshot-create-as", "cp4", "snap1", "--disk-only", "--atomic", "--no-metadata",
                "--diskspec", "sda,snapshot=no", "--diskspec", f"sdb,file={r.images / 'cp4-data.snap1'}")
        settles_to(env, "cp4", {"cp4-root.img": ("hostA", None), "cp4-data.snap1": ("hostA", None)})
        r.virsh("A", "blockcommit", "cp4", "sdb", "--active", "--pivot", "--wait", timeout=120)
    never_ran(watch)
    settles_to(env, "cp4", {"cp4-root.img": ("hostA", None), "cp4-data.img": ("hostA", None)})
    r.define_domain("B", "cp4-rival", [r.images / "cp4-data.snap1"], bus="scsi")
    env.start_once_free("B", "cp4-rival", time.monotonic(), 3)  # the committed overlay is free
    r.virsh("B", "destroy", "cp4-rival")
    r.virsh("A", "destroy", "cp4")


def test_managedsave_then_start(env: AgentRig) -> None:
    """The twin may run once A's QEMU has exited (the domain is saved), never before."""
    r = env.rig
    root = r.image("cp5-root.img")
    twin(env, "cp5", [root])
    death = DeathWatch(r.qemu_pid("A", "cp5") or 0)
    with Watch(env, ["cp5"], intruders=[("B", "cp5")], linger=0.2) as watch:
        r.virsh("A", "managedsave", "cp5")
        dead_at = death.wait(10)
    assert dead_at is not None
    assert all(t > dead_at for t in watch.intruders[0].ran), "the twin ran while A's QEMU was alive"
    assert watch.samples and not watch.two_holders
    r.virsh("B", "destroy", "cp5", check=False)
    env.start_once_free("A", "cp5", time.monotonic(), 5)  # restores the saved state
    assert r.domstate("A", "cp5") == "running" and held(env, "cp5") == {"cp5-root.img": ("hostA", None)}
    cp, _ = r.start("B", "cp5", check=False)
    assert cp.returncode != 0 and "on host hostA" in cp.stderr, cp.stderr
    r.virsh("A", "destroy", "cp5")
