"""A demo "host": one etcd driver instance in its own process, driven over a pipe.

``virtlease demo`` runs two of these so that host-a and host-b are real,
separate processes with their own etcd session leases — and host-b can be
killed with SIGKILL like a crashed hypervisor.

Protocol: the parent writes the driver configuration as one JSON line on
stdin (never on the command line: it may hold a password), the child
answers ``{"ok": true, "ready": true, "pid": ..., "lease": ...}``; then one
JSON command per line, one JSON reply per line::

    {"op": "new", "obj": "web1", "uuid": "...", "name": "web1", "pid": 123,
     "disks": ["/d1", "/d2:shared"], "migrate": false}
    {"op": "acquire", "obj": "web1", "state": null, "action": "POWEROFF"}
    {"op": "prepare_migrate", "obj": "web1", "dest": "host-b"}
    {"op": "complete_migrate_in" | "complete_migrate_out", "obj": "web1", "cancel": false}
    {"op": "release" | "free", "obj": "web1"}
    {"op": "exit"}

A failed command answers ``{"ok": false, "error": TYPE, "message": ...,
"hint": ..., "conflicts": [Holder fields...]}``.

Run the child with ``python -m virtlease.cli.demo_host``; the parent side is
:class:`DemoHost`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import virtlease as v

# -- child side ---------------------------------------------------------------


def _tokens(obj: v.LockObject) -> list[dict[str, Any]]:
    from virtlease_etcd import state as vstate

    return [{"resource": r.res, "mode": r.mode, "token": r.token} for r in vstate.decode(obj.inquire()).resources]


def _handle(plugin: v.Plugin, objects: dict[str, v.LockObject], cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd["op"]
    if op == "new":
        flags = v.NewFlags.MIGRATE if cmd.get("migrate") else v.NewFlags(0)
        obj = plugin.new_object(uuid=cmd["uuid"], name=cmd["name"], pid=cmd.get("pid"), flags=flags)
        for disk in cmd.get("disks", []):
            path, _, mode = disk.partition(":")
            rflags = {"": v.ResourceFlags(0), "shared": v.ResourceFlags.SHARED,
                      "readonly": v.ResourceFlags.READONLY}[mode]
            obj.add_resource(v.ResourceType.DISK, path, flags=rflags)
        objects[cmd["obj"]] = obj
        return {}
    obj = objects[cmd["obj"]]
    if op == "acquire":
        obj.acquire(cmd.get("state"), action=v.FailureAction[cmd.get("action", "DEFAULT")])
        return {"tokens": _tokens(obj)}
    if op == "prepare_migrate":
        return {"state": obj.prepare_migrate(cmd["dest"])}
    if op == "complete_migrate_in":
        return {"state": obj.complete_migrate_in(cancel=bool(cmd.get("cancel")))}
    if op == "complete_migrate_out":
        obj.complete_migrate_out(cancel=bool(cmd.get("cancel")))
        return {}
    if op == "release":
        return {"state": obj.release()}
    if op == "free":
        objects.pop(cmd["obj"]).free()
        return {}
    raise ValueError(f"unknown command {op!r}")


def serve(stdin: IO[str] = sys.stdin, stdout: IO[str] = sys.stdout) -> None:
    """The child's main loop (see the module docstring for the protocol)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the demo process stops us, not the terminal's Ctrl-C
    logging.basicConfig(level=os.environ.get("VIRTLEASE_DEMO_LOG", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def reply(**kw: Any) -> None:
        stdout.write(json.dumps(kw) + "\n")
        stdout.flush()

    config = json.loads(stdin.readline())
    try:
        plugin = v.load_driver("etcd", config=config, capabilities=v.Capability.RESOURCES | v.Capability.MIGRATE)
    except v.VirtleaseError as exc:
        reply(ok=False, error=type(exc).__name__, message=str(exc), hint=exc.hint)
        return
    objects: dict[str, v.LockObject] = {}
    reply(ok=True, ready=True, pid=os.getpid(), lease=plugin.driver.session.lease_id,
          host=plugin.driver.host_id, ttl=plugin.driver.session.ttl)
    try:
        for line in stdin:
            cmd = json.loads(line)
            if cmd["op"] == "exit":
                break
            try:
                reply(ok=True, **_handle(plugin, objects, cmd))
            except v.ResourceBusyError as exc:
                reply(ok=False, error=type(exc).__name__, message=str(exc), hint=exc.hint,
                      conflicts=[dataclasses.asdict(h) for h in exc.conflicts])
            except Exception as exc:
                reply(ok=False, error=type(exc).__name__, message=str(exc), hint=getattr(exc, "hint", None))
    finally:
        for obj in list(objects.values()):
            with contextlib.suppress(Exception):
                obj.free()
        with contextlib.suppress(Exception):
            plugin.unload()
    reply(ok=True, bye=True)


# -- parent side ----------------------------------------------------------------


class HostCallError(Exception):
    """A command failed in the host process."""

    def __init__(self, host: str, op: str, reply: dict[str, Any]) -> None:
        self.host = host
        self.op = op
        self.error = str(reply.get("error"))
        self.message = str(reply.get("message"))
        self.hint: str | None = reply.get("hint")
        self.conflicts = [v.Holder(**h) for h in reply.get("conflicts") or []]
        super().__init__(f"{host}: {op} failed: {self.error}: {self.message}")


class DemoHost:
    """Parent side: start a host process, send it commands, kill it."""

    def __init__(self, host_id: str, config: dict[str, Any], *, env: dict[str, str],
                 log_path: Path | None) -> None:
        self.host_id = host_id
        self._log = open(log_path, "ab") if log_path is not None else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtlease.cli.demo_host"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
        )
        self._send({**config, "host_id": host_id})
        self.lease = 0
        self.ttl = 0

    def wait_ready(self) -> DemoHost:
        """Wait for the child's ready line; raise with its error if it failed."""
        hello = self._read("start")
        if not hello.get("ready"):
            raise HostCallError(self.host_id, "start", hello)
        self.lease = int(hello["lease"])
        self.ttl = int(hello["ttl"])
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _send(self, data: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(data) + "\n")
        self.proc.stdin.flush()

    def _read(self, op: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise HostCallError(self.host_id, op, {"error": "HostExited",
                                                   "message": f"host process exited (status {self.proc.wait()})"})
        return dict(json.loads(line))

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        """Run one command; HostCallError if it failed."""
        self._send({"op": op, **kw})
        reply = self._read(op)
        if not reply.get("ok"):
            raise HostCallError(self.host_id, op, reply)
        return reply

    def kill(self) -> None:
        """SIGKILL, like a crashed host: nothing is released."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self, timeout: float = 10.0) -> None:
        """Ask the host to free its objects and revoke its lease; kill it if it does not."""
        if self.proc.poll() is None:
            try:
                self._send({"op": "exit"})
                self.proc.wait(timeout=timeout)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                stream.close()  # type: ignore[union-attr]
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> DemoHost:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def spawn_vm() -> subprocess.Popen[bytes]:
    """A stand-in for a VM's qemu process: the pid a failure action would kill."""
    sleep = shutil.which("sleep")
    args = [sleep, "3600"] if sleep else [sys.executable, "-c", "import time; time.sleep(3600)"]
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # a Ctrl-C on the terminal is the demo's to handle


def stop_vm(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


if __name__ == "__main__":
    serve()
