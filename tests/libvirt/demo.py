"""``make demo LIBVIRT=1``: the virtlease agent on two real libvirt hosts, for a person to watch.

    python tests/libvirt/demo.py

Brings up the rig of this directory (two libvirt hosts A and B in namespaces, the agent on each
host's virtlockd socket, a three-member etcd), then, with stock ``virsh``:

1. starts web1 on A; a domain on B that wants the same disk is refused, and virsh names the holder;
2. live-migrates web1 to B: migration time, guest downtime, and the holder and fencing token in
   etcd before and after;
3. kills web1's QEMU on B with ``kill -9``: a domain on A starts on the disk, and how soon.

Needs root, libvirt and QEMU (``deploy/libvirt/install.sh``).  Takes the rig down at the end, on
an error and on Ctrl-C; the first run on a machine probes QEMU's capabilities (~15 s).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agentrig import AgentRig, agent_rig
from rig import DEFAULT_CACHE, RigError, missing_requirements

from virtlease_etcd.status import HeldInfo

T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.2f} s] {text}", flush=True)


def holder(env: AgentRig, domain: str) -> str:
    return "etcd: " + held_text(env.holders(domain))


def held_text(held: list[HeldInfo]) -> str:
    return "; ".join(f"{Path(h.resource).name} held by {h.domain_name} on {h.host}, token {h.token}"
                     for h in held) or "nobody holds it"


def virsh_error(stderr: str) -> str:
    return next((line for line in stderr.splitlines() if "resource busy" in line), stderr.strip())


def scenarios(env: AgentRig) -> list[str]:
    r = env.rig
    disk = r.image("demo-web1.img")
    r.define_domain("A", "web1", [disk])
    r.define_domain("B", "db1", [disk])
    r.define_domain("A", "db2", [disk])

    say("1. virsh -c A start web1")
    _, took = r.start("A", "web1")
    say(f"   web1 runs on A ({took:.2f} s); {holder(env, 'web1')}")
    say("   virsh -c B start db1   (the same disk)")
    cp, _ = r.start("B", "db1", check=False)
    if cp.returncode == 0:
        raise RigError("db1 started on B on web1's disk")
    say(f"   refused: {virsh_error(cp.stderr)}")
    summary = [f"start {took:.2f} s, second host refused"]

    say("2. virsh -c A migrate --live web1 B")
    before = env.holders("web1")
    since = time.time()
    seconds = r.migrate("web1", "A", "B")
    stop, resume = r.qmp_events("A", "STOP", since), r.qmp_events("B", "RESUME", since)
    downtime = f"{1000 * (resume[-1] - stop[0]):.1f} ms" if stop and resume else "not measured"
    after = env.holders("web1")
    say(f"   migrated in {seconds:.2f} s, guest downtime {downtime} (QEMU's STOP on A to RESUME on B)")
    say(f"   before: {held_text(before)}")
    say(f"   after:  {held_text(after)}")
    if not (after and before and after[0].host == "hostB" and after[0].token > before[0].token):
        raise RigError(f"after the migration etcd shows {after}")
    summary.append(f"migration {seconds:.2f} s, downtime {downtime}, token {before[0].token} -> {after[0].token}")

    pid = r.qemu_pid("B", "web1")
    if not pid:
        raise RigError("web1 has no QEMU on B")
    say(f"3. kill -9 {pid}   (web1's QEMU on B)")
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    _, took = env.start_once_free("A", "db2", t0, 5, pause=0)
    say(f"   virsh -c A start db2 (the same disk) works {took:.2f} s after the kill; {holder(env, 'db2')}")
    summary.append(f"kill -9 to a start on the other host {took:.2f} s")
    r.virsh("A", "destroy", "db2")
    return summary


def main() -> int:
    why = missing_requirements()
    if why:
        print(f"virtlease libvirt demo: cannot run here: {why}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="virtlease-libvirt-demo-"))
    probe = "" if (DEFAULT_CACHE / "capabilities").exists() else " (first run: QEMU's capabilities probe, ~15 s)"
    say(f"bringing up hosts A and B with the virtlease agent and a three-member etcd in {work}{probe}")
    try:
        with agent_rig(work) as env:
            say(f"up: libvirtd + virtlogd + virtlease agent on each host, etcd at {env.etcd.endpoints}")
            summary = scenarios(env)
            say("taking the rig down")
        say("done, nothing left behind: " + "; ".join(summary))
        return 0
    except KeyboardInterrupt:
        say("interrupted; the rig was taken down")
        return 130
    except RigError as exc:
        say(f"failed: {exc}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
