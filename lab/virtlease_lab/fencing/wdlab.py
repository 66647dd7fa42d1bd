"""Guest side: the watchdog armed by the lease, with the real agent in the lab guest.

:func:`start_agent` runs ``virtlease agent`` in the guest with ``watchdog_device=/dev/watchdog``
(the i6300esb), talking to the etcd on the lab machine.  Each run: :func:`run_vm` starts a
stand-in QEMU that takes a disk through the agent's lockd socket (as libvirt would: a lifeline
connection from the QEMU, an ACQUIRE on another); :func:`stop_host` SIGSTOPs the agent *and*
its guard -- nothing of this host can fence any more, only the watchdog can; the lab machine
then watches QMP for the watchdog's expiry and etcd for the lease's; :func:`continue_host`
lets the agent and guard run again (they fence the stand-in: the lease is gone) and waits
until the watchdog is disarmed, ready for the next run (whose ACQUIRE opens a new session).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from virtlease_etcd.agent.lockdclient import LockdClient, make_owner
from virtlease_etcd.agent.runfile import load, state_path
from virtlease_etcd.fence.watchdog import describe

RUN = Path("/run/vl-agent")
HOST = "wd-host"
DISK = "/tmp/wd-disk.img"
AGENT: dict[str, Any] = {}
METRICS = "127.0.0.1:9477"


def metrics() -> dict[str, float]:
    """The agent's watchdog metrics, as scraped."""
    body = urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=30).read().decode()
    return {line.split(" ")[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
            if line.startswith("virtlease_agent_watchdog")}


def _log() -> Path:
    return Path(os.environ.get("VL_SHARE") or "/tmp") / "agent.log"


def start_agent(endpoints: str, prefix: str, ttl: int, timeout: int) -> dict[str, Any]:
    RUN.mkdir(mode=0o700, parents=True, exist_ok=True)
    Path(DISK).write_bytes(b"\0" * 4096)
    env = {**os.environ, "VIRTLEASE_ETCD_WATCHDOG_DEVICE": "/dev/watchdog",
           "VIRTLEASE_ETCD_WATCHDOG_TIMEOUT": str(timeout), "VIRTLEASE_ETCD_REQUEST_TIMEOUT": "1",
           "VIRTLEASE_ETCD_ACQUIRE_TIMEOUT": "20"}
    log = open(_log(), "a")
    cmd = [sys.executable, "-m", "virtlease_etcd.agent", "--endpoints", endpoints, "--prefix", prefix,
           "--host-id", HOST, "--ttl", str(ttl), "--socket", str(RUN / "virtlockd-sock"),
           "--state-dir", str(RUN / "state"), "--reserve-grace", "0.3", "--kill-grace", "1",
           "--metrics", METRICS]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    until = time.monotonic() + 120
    while "virtlease agent serving" not in _log().read_text():
        if proc.poll() is not None or time.monotonic() > until:
            raise RuntimeError(f"agent not serving (exit {proc.poll()}): {_log().read_text()[-2000:]}")
        time.sleep(0.1)
    AGENT.update(proc=proc, qemus=[])
    return {"pid": proc.pid}


def _state() -> Any:
    found = load(state_path(RUN / "state", HOST))
    assert found is not None, "the agent wrote no state file"
    return found


def _standin(name: str, owner_uuid: uuid.UUID) -> int:
    """A stand-in QEMU: a forked child that opens its lifeline (REGISTER itself, RESTRICT) and
    becomes ``sleep`` with the connection inherited, as QEMU keeps libvirt's."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no Python frames of the parent's may run here
        try:
            os.close(ready_r)
            client = LockdClient(RUN / "virtlockd-sock", timeout=60)
            client.register(make_owner(name, pid=os.getpid(), owner_uuid=owner_uuid))
            client.restrict()
            os.dup2(client.sock.fileno(), 3)
            os.write(ready_w, b"x")
            os.execvp("sleep", ["sleep", "3600"])
        finally:
            os._exit(1)
    os.close(ready_w)
    ok = os.read(ready_r, 1)
    os.close(ready_r)
    if ok != b"x":
        raise RuntimeError("the stand-in QEMU could not register with the agent")
    return pid


def run_vm(name: str) -> dict[str, Any]:
    """A stand-in QEMU holding the disk through the agent; returns once the watchdog is armed."""
    owner_uuid = uuid.uuid4()
    pid = _standin(name, owner_uuid)
    AGENT["qemus"].append(pid)
    until = time.monotonic() + 60
    while True:
        try:
            with LockdClient(RUN / "virtlockd-sock", timeout=60) as c:
                c.register(make_owner(name, pid=pid, owner_uuid=owner_uuid))
                c.acquire(DISK)
            break
        except Exception as exc:  # the previous session's lease may still be in etcd: retry
            if time.monotonic() > until:
                raise RuntimeError(f"ACQUIRE for {name} kept failing: {exc}") from None
            time.sleep(0.2)
    while describe("/dev/watchdog").state != "active":
        if time.monotonic() > until:
            raise RuntimeError("the agent did not arm the watchdog")
        time.sleep(0.05)
    state = _state()
    return {"qemu": pid, "lease": state.lease, "guard": state.guard.get("pid"), "agent": AGENT["proc"].pid,
            "metrics": metrics()}


def stop_host() -> float:
    """SIGSTOP the guard and the agent (every thread: nothing of this host can fence or pet)."""
    guard = _state().guard.get("pid")
    os.kill(guard, signal.SIGSTOP)
    os.kill(AGENT["proc"].pid, signal.SIGSTOP)
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def continue_host() -> dict[str, Any]:
    """SIGCONT both; wait until the stand-in was fenced and the watchdog is disarmed again."""
    guard = _state().guard.get("pid")
    for pid in (AGENT["proc"].pid, guard):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    qemu = AGENT["qemus"][-1]
    until = time.monotonic() + 60
    while True:
        with contextlib.suppress(ChildProcessError):
            done, _status = os.waitpid(qemu, os.WNOHANG)
            if done:
                break
        if time.monotonic() > until:
            raise RuntimeError(f"the stand-in QEMU {qemu} was not fenced")
        time.sleep(0.05)
    while describe("/dev/watchdog").state == "active":
        if time.monotonic() > until:
            raise RuntimeError("the agent did not disarm the watchdog after the fence")
        time.sleep(0.05)
    return {"fenced": qemu, "metrics": metrics()}


def drop_vm() -> dict[str, Any]:
    """After a false reset (the machine's load starved the agent past the watchdog's timeout: the
    emulated device then disables itself): kill the stand-in, wait until the agent released its
    disk and disarmed the watchdog, so that the next run arms it afresh."""
    qemu = AGENT["qemus"][-1]
    with contextlib.suppress(ProcessLookupError, ChildProcessError):
        os.kill(qemu, signal.SIGKILL)
        os.waitpid(qemu, 0)
    until = time.monotonic() + 60
    while describe("/dev/watchdog").state == "active":
        if time.monotonic() > until:
            raise RuntimeError("the agent did not disarm the watchdog once the stand-in was gone")
        time.sleep(0.05)
    return {"dropped": qemu}


def stop_agent() -> None:
    proc = AGENT.get("proc")
    for pid in AGENT.get("qemus", []):
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
