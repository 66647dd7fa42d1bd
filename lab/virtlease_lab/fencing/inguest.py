"""The lab guest's server: runs the host's calls inside the guest, one JSON line each way.

``init.sh`` starts it (``python -m virtlease_lab.fencing.inguest PORT``) on the virtio-serial
control port.  It says ``{"hello": true, "uptime": ...}`` once, then answers each request
``{"id": N, "call": "module:function", "kwargs": {...}}`` with ``{"id": N, "ok": true,
"result": ...}`` or ``{"id": N, "ok": false, "error": "...", "traceback": "..."}``.  A call
runs to its end before the next is read; its log goes to the guest's console (stderr).
Only functions of ``virtlease_lab.fencing`` modules may be called.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
import traceback
from typing import Any


def uptime() -> float:
    with open("/proc/uptime") as fh:
        return float(fh.read().split()[0])


def dispatch(request: dict[str, Any]) -> Any:
    module_name, _, function = str(request["call"]).partition(":")
    if not module_name.startswith("virtlease_lab.fencing."):
        raise PermissionError(f"{module_name}: only virtlease_lab.fencing modules are served")
    fn = getattr(importlib.import_module(module_name), function)
    return fn(**request.get("kwargs", {}))


def serve(port: str) -> None:
    logging.basicConfig(level=os.environ.get("VL_LOG", "INFO"), stream=sys.stderr,
                        format="guest %(asctime)s %(levelname)s %(name)s: %(message)s")
    fd = os.open(port, os.O_RDWR)
    reader = os.fdopen(fd, "rb", buffering=0)

    def send(obj: dict[str, Any]) -> None:
        data = (json.dumps(obj) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    send({"hello": True, "uptime": uptime(), "pid": os.getpid()})
    buf = b""
    while True:
        chunk = reader.read(65536)
        if not chunk:
            time.sleep(0.05)  # the host side is not connected (yet / any more): the port reads EOF
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if not line.strip():
                continue
            request = json.loads(line)
            try:
                reply = {"id": request.get("id"), "ok": True, "result": dispatch(request)}
            except BaseException as exc:  # the host decides what a failure means
                reply = {"id": request.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()}
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    send(reply)
                    raise
            send(reply)


if __name__ == "__main__":
    serve(sys.argv[1])
