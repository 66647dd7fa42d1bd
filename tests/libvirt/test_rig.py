"""The two-host libvirt rig with stock virtlockd (direct mode: the lease is an fcntl lock on the image).

These pin what real libvirt does, which the virtlease agent must reproduce later:
a second writer on the other host is refused, live migration hands the disk
over, and a QEMU killed with SIGKILL frees its disk.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from virtlease_lab.libvirt.rig import Rig, RigError
from virtlease_lab.waiting import wait_for

pytestmark = pytest.mark.libvirt

BUSY = "resource busy: Lockspace resource '{path}' is locked"


def _refused(rig: Rig, host: str, name: str) -> str:
    """Start ``name`` on ``host``, expecting lockd to refuse; return virsh's error text."""
    cp, _ = rig.start(host, name, check=False)
    assert cp.returncode != 0, f"{name} started on {host} although its disk is leased elsewhere"
    assert rig.domstate(host, name) == "shut off"
    return cp.stderr.strip()


def test_two_independent_hosts(hosts: Rig) -> None:
    """Own hostname, host UUID, network and mount namespace per host; the daemons of a host share them."""
    st = hosts.status()
    assert st["A"]["hostname"] == "hostA" and st["B"]["hostname"] == "hostB"
    assert st["A"]["host_uuid"] != st["B"]["host_uuid"]
    root = {os.readlink("/proc/self/ns/net"), os.readlink("/proc/self/ns/mnt")}
    for h in ("A", "B"):
        nets = {st[h][d]["net"] for d in ("subreaper", "virtlogd", "lockdaemon", "libvirtd")}
        mnts = {st[h][d]["mnt"] for d in ("subreaper", "virtlogd", "lockdaemon", "libvirtd")}
        assert len(nets) == 1 and len(mnts) == 1 and not (nets | mnts) & root
    assert st["A"]["libvirtd"]["net"] != st["B"]["libvirtd"]["net"]
    assert st["A"]["libvirtd"]["mnt"] != st["B"]["libvirtd"]["mnt"]
    hosts.define_domain("A", "only-on-a", ["only-on-a.img"])
    assert hosts.domains("A") == ["only-on-a"] and hosts.domains("B") == []


def test_start_on_a(hosts: Rig) -> None:
    """A domain starts on A; its QEMU runs in A's namespaces."""
    hosts.define_domain("A", "start1", ["start1.img"])
    _, seconds = hosts.start("A", "start1")
    pid = hosts.qemu_pid("A", "start1")
    assert pid and hosts.domstate("A", "start1") == "running"
    assert os.readlink(f"/proc/{pid}/ns/net") == hosts.status()["A"]["libvirtd"]["net"]
    print(f"start on A: {seconds:.3f} s")


def test_same_disk_on_b_refused(hosts: Rig, record_property: Callable[[str, object], None]) -> None:
    """The same disk in a second domain on B is refused by B's virtlockd (fcntl conflict, one kernel)."""
    disk = hosts.image("busy.img")
    hosts.define_domain("A", "busy-a", [disk])
    hosts.start("A", "busy-a")
    hosts.define_domain("B", "busy-b", [disk])
    err = _refused(hosts, "B", "busy-b")
    record_property("virsh_error", err)
    print(f"virsh on B says: {err!r}")
    assert BUSY.format(path=disk) in err
    assert hosts.domstate("A", "busy-a") == "running"


def test_live_migration_a_to_b(hosts: Rig) -> None:
    """``virsh migrate --live`` A→B: B runs the guest, A's QEMU is gone, and A can no longer take the disk."""
    disk = hosts.image("mig.img")
    hosts.define_domain("A", "mig", [disk])
    hosts.start("A", "mig")
    src_pid = hosts.qemu_pid("A", "mig")
    t0 = time.time()
    seconds = hosts.migrate("mig", "A", "B")
    assert hosts.domstate("B", "mig") == "running"
    assert hosts.domstate("A", "mig") == "shut off"
    assert src_pid and not hosts.qemu_pid("A", "mig")
    stop, resume = hosts.qmp_events("A", "STOP", t0), hosts.qmp_events("B", "RESUME", t0)
    assert stop and resume and resume[-1] > stop[0]
    print(f"migrate: {seconds:.3f} s, downtime {1000 * (resume[-1] - stop[0]):.1f} ms")
    hosts.define_domain("A", "mig-again", [disk])
    assert BUSY.format(path=disk) in _refused(hosts, "A", "mig-again")


def test_kill9_frees_disk(hosts: Rig) -> None:
    """SIGKILL of the QEMU on A: A's virtlockd sees its connection close and drops the lease; B starts."""
    disk = hosts.image("kill.img")
    hosts.define_domain("A", "victim", [disk])
    hosts.start("A", "victim")
    hosts.define_domain("B", "heir", [disk])
    _refused(hosts, "B", "heir")
    pid = hosts.qemu_pid("A", "victim")
    assert pid
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    def started() -> bool:
        return hosts.start("B", "heir", check=False)[0].returncode == 0

    try:
        wait_for(started, 10.0, 0.05, "B to start the disk after the kill")
    except RigError:
        pytest.fail("B could not start the domain after A's QEMU was killed")
    print(f"kill -9 on A -> started on B after {time.monotonic() - t0:.3f} s")
    assert hosts.domstate("B", "heir") == "running"
    wait_for(lambda: hosts.domstate("A", "victim") == "shut off", 5.0, 0.05, "A to notice the crash")


def test_lock_daemon_command_template(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A command template serves each host's lockd socket (here virtlockd itself, as the agent will later)."""
    cmd = ["virtlockd", "-p", "/run/libvirt/lockd-{host}.pid"]
    with Rig(tmp_path_factory.mktemp("template-rig"), lock_daemon=cmd) as r:
        for h in ("A", "B"):
            assert (r.hosts[h].run / f"lockd-{h}.pid").read_text().strip() == str(r.hosts[h].pid("lockdaemon"))
            assert (r.hosts[h].log / "lockdaemon.log").exists()
        r.define_domain("A", "tmpl", ["tmpl.img"])
        r.start("A", "tmpl")
        r.define_domain("B", "tmpl2", ["tmpl.img"])
        _refused(r, "B", "tmpl2")


def test_lock_daemon_that_dies_fails_up(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A lock daemon that exits without serving the socket makes up() fail loudly, leaving nothing behind."""
    r = Rig(tmp_path_factory.mktemp("dead-rig"), lock_daemon=["sh", "-c", "echo giving up on {host}; exit 3"])
    with pytest.raises(RigError, match="the lock daemon exited") as err:
        r.up()
    assert not getattr(err.value, "__notes__", None), "the clean-up after the failed up() left things"
    assert not r.state_file.exists()
    assert "giving up on A" in (r.hosts["A"].log / "lockdaemon.log").read_text()
