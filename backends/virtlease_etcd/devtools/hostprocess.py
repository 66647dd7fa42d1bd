"""A "host" in its own process: one etcd driver instance driven by JSON commands.

The one harness for everything that needs a host to be a real, separate
process — a second host, a crash (``kill -9``), a pause (SIGSTOP): the demo
(``virtlease demo``) and the tests.  The wire (``jsonwire``) is shared with
the nemesis workers of tests/safety, which run a workload instead of commands.

Protocol: the parent writes the driver configuration as one JSON line on
stdin (never on the command line: it may hold a password); the child
answers ``{"ok": true, "ready": true, "pid": ..., "lease": ..., "host": ...,
"ttl": ...}``; then one JSON command per line, one JSON reply per line
(each echoing the command's ``seq``).
Commands act on lock objects by a name of the caller's choosing::

    {"op": "new", "obj": "web1", "uuid": "...", "name": "web1", "pid": 123,
     "disks": ["/d1", "/d2:shared"], "migrate": false}
    {"op": "acquire", "obj": "web1", "state": null, "action": "POWEROFF"}
        -> {"state": ..., "tokens": [{"resource", "mode", "token"}, ...]}
    {"op": "release" | "inquire", "obj": "web1"}                  -> {"state": ...}
    {"op": "prepare_migrate", "obj": "web1", "dest": "host-b"}    -> {"state": ...}
    {"op": "complete_migrate_in", "obj": "web1", "cancel": false} -> {"state": ...}
    {"op": "complete_migrate_out", "obj": "web1", "cancel": false}
    {"op": "free", "obj": "web1"}    (drops the handle; never releases: ABI 2.0)
    {"op": "lost"}                   -> {"lost": reason or null}
    {"op": "session"}                -> {"fence_at", "now", "lost", "lease", "storage_s": the
                                     durations of the session's storage fencing on grants}
    {"op": "renew"}                  -> {"renewed": why the old session was lost or null, "lease"}
                                     (``EtcdDriver.renew_session``: a new session after a lost one)
    {"op": "exit"}                   frees the handles, releases what this driver
                                     granted, unloads (revoking the lease), answers, exits

A failed command answers ``{"ok": false, "error": TYPE, "message": ...,
"hint": ..., "conflicts": [Holder fields...]}``.

The child is ``python -m virtlease_etcd.devtools.hostprocess``; the parent side is
:class:`HostProcess`::

    with HostProcess(endpoints, prefix, "host-a", ttl=3) as a:
        a.ok("new", obj="web1", uuid=U, name="web1", disks=["/d1"], pid=vm.pid)
        a.ok("acquire", obj="web1")            # raises HostCallError if it failed
        reply = a.call("acquire", obj="x")     # {"ok": false, "error": "ResourceBusyError", ...}

See docs/DESIGN.md §10 (What runs where).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from virtlease_etcd.clock import SYSTEM

from .jsonwire import Channel, Replier, launch, python_argv

LOG_ENV = "VIRTLEASE_HOSTPROC_LOG"
"""The child's log level (default WARNING); its log goes to stderr."""

# -- child side ---------------------------------------------------------------

_MODES = {"": v.ResourceFlags(0), "shared": v.ResourceFlags.SHARED, "readonly": v.ResourceFlags.READONLY}


def _tokens(obj: v.LockObject) -> list[dict[str, Any]]:
    return [{"resource": h.identity, "name": h.name, "mode": h.mode, "token": h.token} for h in obj.held()]


def _handle(plugin: v.Plugin, objects: dict[str, v.LockObject], cmd: dict[str, Any]) -> dict[str, Any]:
    op = cmd["op"]
    session = plugin.driver.session
    if op == "lost":
        return {"lost": session.lost}
    if op == "session":
        return {"fence_at": session.fence_at, "now": session.clock.now(), "lost": session.lost,
                "lease": session.lease_id,
                "storage_s": list(session.storage.durations) if session.storage is not None else None}
    if op == "renew":
        why = plugin.driver.renew_session()
        return {"renewed": why, "lease": plugin.driver.session.lease_id}
    if op == "new":
        flags = v.NewFlags.MIGRATE if cmd.get("migrate") else v.NewFlags(0)
        obj = plugin.new_object(uuid=cmd["uuid"], name=cmd["name"], pid=cmd.get("pid"), flags=flags)
        for disk in cmd.get("disks", []):
            path, _, mode = disk.partition(":")
            obj.add_resource(v.ResourceType.DISK, path, flags=_MODES[mode])
        objects[cmd["obj"]] = obj
        return {}
    if op == "free":
        objects.pop(cmd["obj"]).free()
        return {}
    obj = objects[cmd["obj"]]
    cancel = bool(cmd.get("cancel", False))
    if op == "acquire":
        obj.acquire(cmd.get("state"), action=v.FailureAction[cmd.get("action", "DEFAULT")])
        return {"state": obj.inquire(), "tokens": _tokens(obj)}
    if op == "release":
        return {"state": obj.release()}
    if op == "inquire":
        return {"state": obj.inquire()}
    if op == "prepare_migrate":
        return {"state": obj.prepare_migrate(cmd["dest"])}
    if op == "complete_migrate_in":
        return {"state": obj.complete_migrate_in(cancel=cancel)}
    if op == "complete_migrate_out":
        obj.complete_migrate_out(cancel=cancel)
        return {}
    raise LookupError(f"unknown command {op!r}")


def _failure(exc: BaseException) -> dict[str, Any]:
    reply: dict[str, Any] = {"ok": False, "error": type(exc).__name__, "message": str(exc),
                             "hint": getattr(exc, "hint", None)}
    if isinstance(exc, v.ResourceBusyError):
        reply["conflicts"] = [dataclasses.asdict(h) for h in exc.conflicts]
    if isinstance(exc, LookupError) and str(exc).startswith("unknown command"):
        reply["error"] = "UnknownCommand"
    return reply


def _shut(plugin: v.Plugin, objects: dict[str, v.LockObject]) -> None:
    """Free every handle, release what this driver instance granted, unload."""
    for obj in list(objects.values()):
        with contextlib.suppress(Exception):
            obj.free()
    release_all = getattr(plugin.driver, "release_all", None)
    if release_all is not None:
        with contextlib.suppress(Exception):
            release_all()
    with contextlib.suppress(Exception):
        plugin.unload()


def serve(stdin: IO[str] = sys.stdin, stdout: IO[str] = sys.stdout) -> None:
    """The child's main loop (see the module docstring for the protocol)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us, not the terminal's Ctrl-C
    logging.basicConfig(level=os.environ.get(LOG_ENV, "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    wire = Replier(stdin, stdout)
    config = wire.config()
    try:
        plugin = v.load_driver("etcd", config=config, capabilities=v.Capability.RESOURCES | v.Capability.MIGRATE)
    except Exception as exc:
        wire.send(_failure(exc))
        return
    objects: dict[str, v.LockObject] = {}
    driver: Any = plugin.driver
    wire.send({"ok": True, "ready": True, "pid": os.getpid(), "lease": driver.session.lease_id,
               "host": driver.host_id, "ttl": driver.session.ttl})
    seq: object = None
    try:
        for cmd in wire.commands():
            seq = cmd.get("seq")
            if cmd.get("op") == "exit":
                break
            try:
                wire.send({"ok": True, **_handle(plugin, objects, cmd)}, seq)
            except Exception as exc:
                wire.send(_failure(exc), seq)
    finally:
        _shut(plugin, objects)
    wire.send({"ok": True, "bye": True}, seq)


def process_state(pid: int) -> str:
    """The state letter of ``pid`` in /proc (R, S, T for stopped, Z, ...)."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


# -- parent side ----------------------------------------------------------------


class HostCallError(RuntimeError):
    """A command failed in the host process (or the process is gone)."""

    def __init__(self, host: str, op: str, reply: dict[str, Any]) -> None:
        self.host = host
        self.op = op
        self.reply = reply
        self.error = str(reply.get("error"))
        self.message = str(reply.get("message"))
        self.hint: str | None = reply.get("hint")
        self.conflicts = [v.Holder(**h) for h in reply.get("conflicts") or []]
        super().__init__(f"{host}: {op} failed: {self.error}: {self.message}")


class HostProcess:
    """Parent side of ``serve``: start a host process, send it commands, kill it."""

    def __init__(self, endpoints: str, prefix: str, host_id: str, ttl: int = 3, *,
                 wrapper: list[str] | None = None, env: dict[str, str] | None = None,
                 log_path: Path | None = None, wait: bool = True, **config: Any) -> None:
        """``config`` adds driver settings; ``wrapper`` prefixes the child's
        command line (e.g. ``setpriv`` to run the host without some
        capability); ``env`` is the child's environment (default: ours);
        ``log_path`` takes the child's stderr; ``wait=False`` returns before
        the child is ready (call ``wait_ready``)."""
        cfg = {"endpoints": endpoints, "prefix": prefix, "host_id": host_id, "ttl": ttl, **config}
        self.host_id = host_id
        self.lease = 0
        self.ttl = 0
        self._log = open(log_path, "ab") if log_path is not None else None
        self._log_path = log_path
        self.proc = launch([*(wrapper or []), *python_argv("virtlease_etcd.devtools.hostprocess")], cfg,
                           env=env, stderr=self._log)
        self._wire = Channel(self.proc)
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.close()
                raise

    def wait_ready(self) -> HostProcess:
        """Wait for the child's ready line; HostCallError with its error if it failed."""
        hello = self._wire.wait_hello() or self._exited()
        if not hello.get("ready"):
            raise HostCallError(self.host_id, "start", hello)
        self.lease = int(hello["lease"])
        self.ttl = int(hello["ttl"])
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _exited(self) -> dict[str, Any]:
        status = self.proc.wait()
        last = self._last_error_line()
        return {"error": "HostExited",
                "message": f"host process exited (status {status})" + (f": {last}" if last else "")}

    def _last_error_line(self) -> str | None:
        """The last line the child wrote to its log (``log_path``): a crash's exception line."""
        if self._log_path is None:
            return None  # its stderr is ours: the user saw it
        try:
            lines = [line.strip() for line in self._log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return None
        return lines[-1] if lines else None

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        """Run one command; its reply, failed or not."""
        return self._wire.call(op, **kw) or self._exited()

    def ok(self, op: str, **kw: Any) -> dict[str, Any]:
        """Like ``call`` but raises HostCallError if the command failed."""
        reply = self.call(op, **kw)
        if not reply.get("ok"):
            raise HostCallError(self.host_id, op, reply)
        return reply

    def kill(self) -> float:
        """SIGKILL, like a crashed host: nothing is released.  Returns the time of the kill (``SYSTEM.now()``)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        at = SYSTEM.now()
        self.proc.wait()
        return at

    def close(self, timeout: float = 10.0) -> None:
        """Ask the host to shut down cleanly (see ``exit``); kill it if it does not."""
        if self.proc.poll() is None:
            try:
                self._wire.call("exit", timeout=timeout)
                self.proc.wait(timeout=timeout)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                stream.close()  # type: ignore[union-attr]
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> HostProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def spawn_vm(env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A stand-in for a VM's qemu process: the pid a failure action would kill."""
    sleep = shutil.which("sleep")
    args = [sleep, "3600"] if sleep else [sys.executable, "-I", "-c", "import time; time.sleep(3600)"]
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)  # a Ctrl-C on the terminal is the parent's to handle


def stop_vm(proc: subprocess.Popen[bytes]) -> None:
    """Kill a VM stand-in and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


if __name__ == "__main__":
    serve()
