"""``make demo LIBVIRT=1``: the virtlease agent on two real libvirt hosts, for a person to watch.

    python -m virtlease_lab.libvirt.demo

Brings up the rig of this directory (two libvirt hosts A and B in namespaces, the agent on each
host's virtlockd socket, a three-member etcd), then, with stock ``virsh``:

1. starts web1 on A; a domain on B that wants the same disk is refused, and virsh names the holder;
2. live-migrates web1 to B: migration time, guest downtime, and the holder and fencing token in
   etcd before and after;
3. kills web1's QEMU on B with ``kill -9``: a domain on A starts on the disk, and how soon.

Needs root, libvirt and QEMU (``deploy/libvirt/install.sh``); without them it exits 2 with the
reason.  Takes the rig down at the end, on an error and on Ctrl-C (a second Ctrl-C during the
teardown is ignored); if the teardown itself fails the work directory is kept and the command
that finishes the job is printed.  The first run on a machine probes QEMU's capabilities (~15 s).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from virtlease_etcd.ops.status import HeldInfo
from virtlease_lab.libvirt.agentrig import AgentRig, agent_rig
from virtlease_lab.libvirt.rig import DEFAULT_CACHE, HOSTS, RigError, missing_requirements

T0 = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.2f} s] {text}", flush=True)


def holder(env: AgentRig, domain: str) -> str:
    return "etcd: " + held_text(env.holders(domain))


def held_text(held: list[HeldInfo]) -> str:
    return "; ".join(f"{Path(h.resource).name} held by {h.domain_name} on {h.host}, token {h.token}"
                     for h in held) or "nobody holds it"


class Progress:
    """While the rig comes up: every ``every`` s, say which daemons of each host have started
    (from the pid files the rig writes under ``work``), so a person sees it is not stuck."""

    DAEMONS = ("virtlogd", "lockdaemon", "libvirtd")

    def __init__(self, work: Path, every: float = 2.0) -> None:
        self.work, self.every = work, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            parts = []
            for host in HOSTS:
                run = self.work / "rig" / "hosts" / host / "run"
                up = [d.replace("lockdaemon", "agent") for d in self.DAEMONS if (run / f"{d}.pid").exists()]
                answering = (run / "libvirt-sock").exists()
                parts.append(f"{host}: {'+'.join(up) or 'starting'}{', waiting for libvirtd' if up and not answering else ''}")
            if not self._stop.is_set():
                say("   ... still coming up (" + "; ".join(parts) + ")")


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
    say(f"   after the refusal: {holder(env, 'web1')}")
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


def interrupt_once(signum: int, frame: object) -> None:
    """The first Ctrl-C stops the demo (the rig is then taken down); later ones are ignored so
    they cannot cut the teardown short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = text.splitlines()
    return lines[0] + (f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else "")


def main() -> int:
    why = missing_requirements()
    if why:
        print(f"virtlease libvirt demo: cannot run here: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, interrupt_once)
    work = Path(tempfile.mkdtemp(prefix="virtlease-libvirt-demo-"))
    probe = "" if (DEFAULT_CACHE / "capabilities").exists() else " (first run: QEMU's capabilities probe, ~15 s)"
    say(f"bringing up hosts A and B with the virtlease agent and a three-member etcd in {work}{probe}")
    rc, outcome, left_behind = 1, "", False
    try:
        with Progress(work) as progress, agent_rig(work) as env:
            progress.stop()
            say(f"up: libvirtd + virtlogd + virtlease agent on each host, etcd at {env.etcd.endpoints}")
            try:
                summary = scenarios(env)
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # nothing may cut the teardown short
                say("taking the rig down")
        rc, outcome = 0, "done, nothing left behind: " + "; ".join(summary)
    except KeyboardInterrupt:
        rc, outcome = 130, "interrupted"
    except Exception as exc:  # a person watches: the details on stderr, then one line
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        outcome = f"failed: {one_line(exc)}"
        left_behind = isinstance(exc, RigError) and "left things behind" in str(exc)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if left_behind:  # Rig.down() ran but its verification failed (the list is on stderr)
            outcome += f"; work directory kept: {work}"
        elif (work / "rig" / "rig.json").exists():
            outcome += (f"; the rig is NOT fully down, its state is kept: take it down with "
                        f"{sys.executable} -P -m virtlease_lab.libvirt.rig_cli --workdir {work / 'rig'} down")
            rc = rc or 1
        else:
            shutil.rmtree(work, ignore_errors=True)
            if rc:
                outcome += "; the rig was taken down, nothing left behind"
    say(outcome)
    return rc


if __name__ == "__main__":
    sys.exit(main())
