"""The least one call to a Python lockd server costs on this machine, with no lock work at all.

A child process serves length-prefixed frames (lockd's RPC framing) on a UNIX socket with asyncio
and answers each with the same bytes; this process calls it with a blocking socket, as
``LockdClient`` does.  Two variants: ``bare`` (answered in the event loop) and ``pool_hop`` (each
call handed to a worker thread and back first, as the agent hands each driver call over so that
its loop keeps serving other owners while a transaction is in flight).  The agent's ACQUIRE+RELEASE
pair is two such calls plus two etcd transactions, so twice ``pool_hop`` is what this agent design
costs above the transactions before it parses a message or builds a transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from measure import Latency, time_calls

FRAME = b"x" * 120
"""About the size of a lockd ACQUIRE frame."""


def _serve(path: str, hop: bool) -> None:
    pool = ThreadPoolExecutor(4)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                head = await reader.readexactly(4)
                body = await reader.readexactly(struct.unpack(">I", head)[0] - 4)
            except asyncio.IncompleteReadError:
                return
            if hop:
                await loop.run_in_executor(pool, lambda: None)
            writer.write(head + body)
            await writer.drain()

    async def main() -> None:
        server = await asyncio.start_unix_server(handle, path)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _caller(sock: socket.socket) -> Callable[[], None]:
    frame = struct.pack(">I", 4 + len(FRAME)) + FRAME

    def call() -> None:
        sock.sendall(frame)
        got = b""
        while len(got) < len(frame):
            chunk = sock.recv(len(frame) - len(got))
            if not chunk:
                raise ConnectionError("the echo server closed the connection")
            got += chunk

    return call


def one(hop: bool, n: int, budget: float) -> dict[str, Any]:
    """p50/p99 (ms) of one call to the echo server (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="vl-pycall-") as tmp:
        path = str(Path(tmp) / "echo.sock")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                _serve(path, hop)
            finally:
                os._exit(0)
        try:
            until = time.monotonic() + 10
            while not os.path.exists(path):
                if time.monotonic() > until:
                    raise RuntimeError("the echo server did not start")
                time.sleep(0.01)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(path)
                return Latency.of(time_calls(_caller(sock), max_n=n, budget=budget, warmup=200)).as_dict()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def python_call_floor(n: int, budget: float) -> dict[str, Any]:
    """Both variants: ``{"bare": ..., "pool_hop": ...}``."""
    return {"bare": one(False, n, budget), "pool_hop": one(True, n, budget)}
