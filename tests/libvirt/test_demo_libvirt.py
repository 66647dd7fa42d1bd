"""``make demo LIBVIRT=1`` (lab/virtlease_lab/libvirt/demo.py) runs its three scenarios and leaves nothing behind.

One subprocess run of the script (~10 s once QEMU's capabilities are cached, ~25 s on a first
run), asserting on what a person watching it would read.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from virtlease_lab.libvirt.rig import Rig

pytestmark = pytest.mark.libvirt


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{proc.name}: {cmdline}")
    return found


def test_libvirt_demo_runs_the_three_scenarios() -> None:
    cp = subprocess.run([sys.executable, "-P", "-m", "virtlease_lab.libvirt.demo"], capture_output=True, text=True, timeout=120)
    out = cp.stdout
    print(out)
    assert cp.returncode == 0, out + cp.stderr

    # 1. the second host is refused, and virsh names the holder: domain web1 on host A
    assert re.search(r"refused: error: resource busy: .* held exclusive by domain web1 .* on host hostA", out), out
    # 2. after the live migration etcd shows web1 on B, with a higher fencing token
    before = re.search(r"before: +demo-web1\.img held by web1 on hostA, token (\d+)", out)
    after = re.search(r"after: +demo-web1\.img held by web1 on hostB, token (\d+)", out)
    assert before and after and int(after.group(1)) > int(before.group(1)), out
    assert re.search(r"migrated in [0-9.]+ s, guest downtime [0-9.]+ ms", out), out
    # 3. after kill -9 of web1's QEMU on B, a domain on A starts on the disk
    assert re.search(r"virsh -c A start db2 \(the same disk\) works [0-9.]+ s after the kill; "
                     r"etcd: demo-web1\.img held by db2 on hostA", out), out
    assert re.search(r"done, nothing left behind: .*token \d+ -> \d+; kill -9 to a start on the other host", out), out

    # nothing left: the demo keeps its work directory (and rig.json) when the rig's own
    # verified teardown fails, so a removed directory means Rig.down() passed; and none of
    # what down() verifies is left either: namespaces, processes, mounts
    work = re.search(r"etcd in (\S+)", out)
    assert work, out
    workdir = Path(work.group(1))
    assert not workdir.exists(), f"the demo left {workdir}: {sorted(p.name for p in workdir.iterdir())}"
    netns = {h.netns for h in Rig(workdir / "rig").hosts.values()}
    listed = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert not netns & listed, f"network namespaces left: {sorted(netns & listed)}"
    assert not processes_mentioning(str(workdir)), processes_mentioning(str(workdir))
    assert str(workdir) not in Path("/proc/self/mountinfo").read_text()
