"""A "host" in its own process: one etcd driver instance driven over a pipe.

The parent sends one JSON command per line on stdin and reads one JSON reply
per line on stdout.  Commands act on lock objects by a name of the test's
choosing.  Used wherever a crash (``kill -9``), a pause (SIGSTOP) or a
second host must be a real separate process.

    with HostProcess(endpoints, prefix, "host-a", ttl=3) as a:
        a.call("new", obj="web1", uuid=U, name="web1", disks=["/d1"], pid=vm.pid)
        a.call("acquire", obj="web1")          # {"ok": true, ...}
        reply = a.call("acquire", obj="x")     # {"ok": false, "error": "ResourceBusyError", ...}
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from types import TracebackType
from typing import Any


def serve() -> None:  # runs in the child
    import logging

    import virtlease as v

    logging.basicConfig(level=os.environ.get("HOSTPROC_LOG", "WARNING"), stream=sys.stderr)
    config = json.loads(sys.argv[2])
    plugin = v.load_driver("etcd", config=config)
    objects: dict[str, v.LockObject] = {}

    def reply(**kw: Any) -> None:
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()

    reply(ok=True, ready=True, pid=os.getpid(), lease=plugin.driver.session.lease_id)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "new":
                flags = v.NewFlags.MIGRATE if cmd.get("migrate") else v.NewFlags(0)
                obj = plugin.new_object(uuid=cmd["uuid"], name=cmd["name"], pid=cmd.get("pid"), flags=flags)
                for d in cmd.get("disks", []):
                    path, _, mode = d.partition(":")
                    rflags = {"": v.ResourceFlags(0), "shared": v.ResourceFlags.SHARED,
                              "readonly": v.ResourceFlags.READONLY}[mode]
                    obj.add_resource(v.ResourceType.DISK, path, flags=rflags)
                objects[cmd["obj"]] = obj
                reply(ok=True)
            elif op == "acquire":
                action = v.FailureAction[cmd.get("action", "DEFAULT")]
                objects[cmd["obj"]].acquire(cmd.get("state"), action=action)
                reply(ok=True, state=objects[cmd["obj"]].inquire())
            elif op == "release":
                reply(ok=True, state=objects[cmd["obj"]].release())
            elif op == "inquire":
                reply(ok=True, state=objects[cmd["obj"]].inquire())
            elif op == "prepare_migrate":
                reply(ok=True, state=objects[cmd["obj"]].prepare_migrate(cmd["dest"]))
            elif op == "complete_migrate_out":
                objects[cmd["obj"]].complete_migrate_out(cancel=cmd.get("cancel", False))
                reply(ok=True)
            elif op == "complete_migrate_in":
                reply(ok=True, state=objects[cmd["obj"]].complete_migrate_in(cancel=cmd.get("cancel", False)))
            elif op == "free":
                objects.pop(cmd["obj"]).free()
                reply(ok=True)
            elif op == "lost":
                reply(ok=True, lost=plugin.driver.session.lost)
            elif op == "session":
                import time

                session = plugin.driver.session
                reply(ok=True, fence_at=session.fence_at, now=time.monotonic(), lost=session.lost,
                      lease=session.lease_id)
            elif op == "exit":
                reply(ok=True)
                return
            else:
                reply(ok=False, error="UnknownCommand", message=op)
        except Exception as exc:
            reply(ok=False, error=type(exc).__name__, message=str(exc))


def process_state(pid: int) -> str:
    """The state letter of ``pid`` in /proc (R, S, T for stopped, Z, ...)."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


class HostProcess:
    """Parent side of ``serve``."""

    def __init__(self, endpoints: str, prefix: str, host_id: str, ttl: int = 3, *,
                 wrapper: list[str] | None = None, **config: Any) -> None:
        """``wrapper`` prefixes the child's command line (e.g. ``setpriv`` to
        run the host without some capability)."""
        cfg = {"endpoints": endpoints, "prefix": prefix, "host_id": host_id, "ttl": ttl, **config}
        self.host_id = host_id
        env = dict(os.environ)
        env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__)) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [*(wrapper or []), sys.executable, "-c", "import hostproc; hostproc.serve()", "serve", json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        hello = self._read()
        if not hello.get("ready"):
            raise RuntimeError(f"host {host_id} failed to start: {hello}")
        self.lease = hello["lease"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"host {self.host_id} exited (code {self.proc.poll()})")
        return dict(json.loads(line))

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def ok(self, op: str, **kw: Any) -> dict[str, Any]:
        """Like ``call`` but raises if the command failed."""
        reply = self.call(op, **kw)
        if not reply.get("ok"):
            raise AssertionError(f"{self.host_id} {op} failed: {reply}")
        return reply

    def kill(self) -> float:
        """kill -9; returns the monotonic time of the kill."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        at = time.monotonic()
        self.proc.wait()
        return at

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.call("exit")
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                stream.close()  # type: ignore[union-attr]

    def __enter__(self) -> HostProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
