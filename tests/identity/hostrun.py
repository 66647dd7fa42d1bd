"""A "host" for the identity tests: a child process in its own mount namespace driving the etcd driver.

The parent starts ``unshare -m --propagation private python hostrun.py CONFIG`` (``Host``), the
child runs the mount commands of CONFIG inside its namespace (invisible to the parent and to the
other hosts), loads the etcd driver with CONFIG's driver settings and then answers one JSON
command per line on stdin with one JSON reply on stdout:

    {"op": "acquire", "uuid": ..., "name": ..., "disks": [...], "state": null, "migrate": false}
                                                                               -> {"ok": true}
    {"op": "release" | "inquire", "uuid": ..., "name": ..., "disks": [...]}     -> {"ok": true, "result": state}
    {"op": "prepare_migrate", ..., "dest": "host-b"}                           -> {"ok": true, "result": state}
    {"op": "complete_migrate_out", ..., "cancel": false}                       -> {"ok": true}

A failure replies ``{"ok": false, "error": <exception class>, "message": ...}``.  End of stdin
releases everything and unloads the driver; the namespace's mounts go with the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import virtlease as v


def _objects(plugin: v.Plugin, cache: dict[str, Any], cmd: dict[str, Any]) -> Any:
    """An acquire gets a fresh lock object (as libvirt does); the other calls
    use the domain's last one (its phase allows prepare/complete)."""
    if cmd["op"] != "acquire" and cmd["uuid"] in cache:
        return cache[cmd["uuid"]]
    if cmd["uuid"] in cache:
        cache.pop(cmd["uuid"]).free()
    flags = v.NewFlags.MIGRATE if cmd.get("migrate") else v.NewFlags(0)
    obj = plugin.new_object(uuid=cmd["uuid"], name=cmd["name"], flags=flags)
    for disk in cmd.get("disks", []):
        obj.add_resource(v.ResourceType.DISK, disk)
    cache[cmd["uuid"]] = obj
    return obj


def _serve(config: dict[str, Any]) -> None:
    for argv in config.get("mounts", []):
        os.makedirs(argv[-1], exist_ok=True)
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    plugin = v.load_driver("etcd", config=config["driver"],
                           capabilities=v.Capability.RESOURCES | v.Capability.MIGRATE)
    objects: dict[str, Any] = {}
    print(json.dumps({"ok": True, "ready": True}), flush=True)
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                obj = _objects(plugin, objects, cmd)
                op = cmd["op"]
                if op == "acquire":
                    obj.acquire(state=cmd.get("state"))
                    result: Any = None
                elif op == "release":
                    result = obj.release()
                elif op == "inquire":
                    result = obj.inquire()
                elif op == "prepare_migrate":
                    result = obj.prepare_migrate(cmd["dest"])
                elif op == "complete_migrate_out":
                    obj.complete_migrate_out(cancel=cmd.get("cancel", False))
                    result = None
                else:
                    raise ValueError(f"unknown op {op!r}")
                reply: dict[str, Any] = {"ok": True, "result": result}
            except Exception as exc:  # the parent asserts on the class and the message
                reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
            print(json.dumps(reply), flush=True)
    finally:
        for obj in objects.values():
            obj.free()
        release_all = getattr(plugin.driver, "release_all", None)
        if release_all is not None:
            release_all()
        plugin.unload()


class Host:
    """The parent's handle on one child host (use as a context manager)."""

    def __init__(self, driver: dict[str, Any], mounts: list[list[str]] = ()) -> None:  # type: ignore[assignment]
        config = {"driver": driver, "mounts": [list(m) for m in mounts]}
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", sys.executable, __file__, json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = self._reply()
        if not ready.get("ready"):
            raise RuntimeError(f"host did not start: {ready}")

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"host process ended: {err[-2000:]}")
        return dict(json.loads(line))

    def call(self, op: str, uuid: str, name: str, disks: list[str], **args: Any) -> dict[str, Any]:
        """Send one command; the reply (``ok``, ``result`` or ``error`` and ``message``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "uuid": uuid, "name": name, "disks": disks, **args}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
