"""The connection server: capture replay, call order, backend dispatch, malformed input,
peer credentials, refusal of non-root peers and of unsafe socket directories."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from virtlease_etcd.agent import protocol as p
from virtlease_etcd.agent.lockdclient import LockdClient, RemoteCallError, make_owner
from virtlease_etcd.agent.server import AgentSetupError, Connection, LockdServer, ResourceBusy
from virtlease_lab.lockdharness import MALFORMED, RecordingBackend, ServerThread, Vector, frame

Start = Callable[..., ServerThread]


def remote_error(excinfo: pytest.ExceptionInfo[RemoteCallError]) -> tuple[int, int, str | None]:
    err = excinfo.value.error
    return err.code, err.domain, err.message


def assert_serves(agent: ServerThread) -> None:
    """A fresh client can still register, acquire and release."""
    with LockdClient(agent.path) as c:
        c.register(make_owner("probe"))
        c.acquire("/probe.img")
        c.release("/probe.img")


def test_replays_the_capture_byte_exact(agent: ServerThread, backend: RecordingBackend, vectors: list[Vector]) -> None:
    by_conn: dict[int, list[Vector]] = {}
    for v in vectors:
        by_conn.setdefault(v.conn, []).append(v)
    for frames in by_conn.values():
        backend.busy.clear()
        for call, reply in zip(frames[::2], frames[1::2], strict=True):
            _, proc, args = p.decode_call(call.frame)
            _, err = p.decode_reply(reply.frame)
            if err is not None and isinstance(args, p.ResourceArgs):
                op = "acquire" if proc == p.Procedure.ACQUIRE_RESOURCE else "release"
                assert err.str2 is not None
                backend.busy[(op, args.path, args.name)] = err.str2
        with LockdClient(agent.path) as c:
            for call, reply in zip(frames[::2], frames[1::2], strict=True):
                c.send_raw(call.frame)
                assert c.read_frame() == reply.frame
    calls = [p.decode_call(v.frame)[1] for v in vectors if v.direction == "C2S"]
    assert backend.ops() == [proc.name.lower().removesuffix("_resource") for proc in calls]


def test_register_restrict_acquire_release_reach_the_backend(agent: ServerThread, backend: RecordingBackend) -> None:
    owner = make_owner("vm1", owner_id=3, pid=4242)
    with LockdClient(agent.path) as a:
        a.register(owner)
        a.restrict()
        with LockdClient(agent.path) as b:
            b.register(owner)
            b.acquire("/img/a.qcow2")
            b.acquire("aa" * 32, "/var/lib/libvirt/lockd/files", p.AcquireResourceFlags.AUTOCREATE)
            b.release("/img/a.qcow2")
        deadline = time.monotonic() + 5
        while len(backend.closed) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(backend.closed) == 1
    assert backend.ops() == ["register", "restrict", "register", "acquire", "acquire", "release"]
    conn_a, conn_b = backend.calls[0][1], backend.calls[2][1]
    assert isinstance(conn_a, Connection) and conn_a is not conn_b
    assert backend.calls[1][1] is conn_a and conn_a.restricted and not conn_b.restricted
    assert backend.calls[3][1:] == (conn_b, owner, "", "/img/a.qcow2", p.AcquireResourceFlags(0))
    assert backend.calls[4][3:] == ("/var/lib/libvirt/lockd/files", "aa" * 32, p.AcquireResourceFlags.AUTOCREATE)
    assert backend.calls[5][1:] == (conn_b, owner, "", "/img/a.qcow2")
    assert backend.closed[0] is conn_b
    agent.stop()
    assert backend.closed == [conn_b, conn_a]  # every connection, once, also at shutdown


def test_peer_credentials_are_captured(agent: ServerThread, backend: RecordingBackend) -> None:
    with LockdClient(agent.path) as c:
        c.register(make_owner())
    conn = backend.calls[0][1]
    assert (conn.peer.pid, conn.peer.uid, conn.peer.gid) == (os.getpid(), os.getuid(), os.getgid())


def test_call_order_rules_match_virtlockd(agent: ServerThread, backend: RecordingBackend) -> None:
    owner = make_owner("vm")
    with LockdClient(agent.path) as c:
        calls: list[Callable[[], None]] = [lambda: c.acquire("/x"), lambda: c.release("/x"), c.restrict]
        for call in calls:
            with pytest.raises(RemoteCallError) as info:
                call()
            assert remote_error(info) == (55, 7, "Requested operation is not valid: lock owner details have not been registered")
        c.create_lockspace("/ls")  # allowed before REGISTER, as libvirt does it
        with pytest.raises(RemoteCallError) as info:
            c.register(make_owner(owner_id=0))
        assert remote_error(info)[0] == 55
        c.register(owner)
        c.register(owner)  # the same owner again: a no-op
        with pytest.raises(RemoteCallError) as info:
            c.register(make_owner("other"))
        assert remote_error(info) == (55, 7, "Requested operation is not valid: lock owner details have already been registered")
        with pytest.raises(RemoteCallError) as info:
            c.acquire("/x", flags=4)
        assert remote_error(info) == (8, 7, "invalid argument: unsupported flags (0x4) in function virLockSpaceProtocolDispatchAcquireResource")
        with pytest.raises(RemoteCallError) as info:
            c.release("/x", flags=p.AcquireResourceFlags.SHARED)
        assert remote_error(info)[0] == 8
        with pytest.raises(RemoteCallError) as info:
            c.call(p.Procedure.NEW, p.NewArgs("/n", 0))
        assert remote_error(info)[:2] == (84, 7)
        c.restrict()
        for call in (lambda: c.acquire("/x"), c.restrict, lambda: c.register(owner), lambda: c.create_lockspace("/ls")):
            with pytest.raises(RemoteCallError) as info:
                call()
            assert remote_error(info) == (29, 7, "operation forbidden: lock manager connection has been restricted")
    assert backend.ops() == ["create_lockspace", "register", "restrict"]  # refusals never reach it


def test_busy_disk_maps_to_resource_busy_with_the_backend_message(
    agent: ServerThread, backend: RecordingBackend
) -> None:
    msg = "disk /img/shared.img is leased by host hv-02 for domain web1 (uuid 1234)"
    backend.busy[("acquire", "", "/img/shared.img")] = msg
    with LockdClient(agent.path) as c:
        c.register(make_owner())
        with pytest.raises(RemoteCallError) as info:
            c.acquire("/img/shared.img")
        err = info.value.error
        assert (err.code, err.domain, err.level, err.message) == (87, 51, 2, f"resource busy: {msg}")
        assert (err.str1, err.str2) == ("resource busy: %s", msg)
        assert info.value.header.serial == 1 and info.value.header.status == p.Status.ERROR
        c.acquire("/img/other.img")  # the connection is still usable


def test_backend_crash_is_an_internal_error_and_the_connection_survives(
    agent: ServerThread, backend: RecordingBackend, caplog: pytest.LogCaptureFixture
) -> None:
    backend.fail.add("acquire")
    with LockdClient(agent.path) as c:
        c.register(make_owner())
        with caplog.at_level(logging.ERROR), pytest.raises(RemoteCallError) as info:
            c.acquire("/x")
        assert remote_error(info)[:2] == (1, 42)
        assert "injected failure" not in (info.value.error.message or "")  # no internals leak to libvirt
        backend.fail.clear()
        c.acquire("/x")
    assert "lock backend acquire failed" in caplog.text


def test_blocking_sync_backend_does_not_stall_other_connections(agent: ServerThread, backend: RecordingBackend) -> None:
    backend.gate = threading.Event()
    with LockdClient(agent.path) as slow, LockdClient(agent.path) as fast:
        slow.register(make_owner("slow"))
        fast.register(make_owner("fast"))
        done = threading.Event()

        def slow_acquire() -> None:
            slow.acquire("/slow")
            done.set()

        t = threading.Thread(target=slow_acquire)
        t.start()
        time.sleep(0.05)
        t0 = time.monotonic()
        fast.restrict()  # served while the other connection's backend call blocks
        assert time.monotonic() - t0 < 1 and not done.is_set()
        backend.gate.set()
        t.join(5)
        assert done.is_set()


class AsyncBackend:
    """Coroutine methods: awaited on the loop; a slow one must not delay other connections."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.closed = 0

    async def register(self, conn: Connection, owner: p.LockdOwner) -> None:
        self.calls.append(f"register {owner.name}")

    async def restrict(self, conn: Connection) -> None:
        self.calls.append("restrict")

    async def create_lockspace(self, conn: Connection, path: str) -> None:
        self.calls.append(f"create_lockspace {path}")

    async def acquire(self, conn: Connection, owner: p.LockdOwner, lockspace: str, name: str, flags: p.AcquireResourceFlags) -> None:
        if name == "/slow":
            await asyncio.sleep(0.5)
        if name == "/busy":
            raise ResourceBusy("held by hv-9 domain db")
        self.calls.append(f"acquire {name}")

    async def release(self, conn: Connection, owner: p.LockdOwner, lockspace: str, name: str) -> None:
        self.calls.append(f"release {name}")

    async def connection_closed(self, conn: Connection) -> None:
        self.closed += 1


def test_async_backend(start_agent: Start) -> None:
    backend = AsyncBackend()
    agent = start_agent(backend)
    with LockdClient(agent.path) as slow, LockdClient(agent.path) as fast:
        slow.register(make_owner("s"))
        fast.register(make_owner("f"))
        t = threading.Thread(target=slow.acquire, args=("/slow",))
        t.start()
        time.sleep(0.05)
        fast.acquire("/fast")
        with pytest.raises(RemoteCallError) as info:
            fast.acquire("/busy")
        assert remote_error(info) == (87, 51, "resource busy: held by hv-9 domain db")
        assert "acquire /slow" not in backend.calls
        t.join(5)
    agent.stop()
    assert backend.calls[-1] == "acquire /slow" and backend.closed == 2


@pytest.mark.parametrize(("data", "reason", "readable"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_input_gets_an_error_reply_or_a_close(
    agent: ServerThread, backend: RecordingBackend, data: bytes, reason: str, readable: bool
) -> None:
    with LockdClient(agent.path) as c:
        c.register(make_owner())
        c.send_raw(data)
        if readable:
            header, err = c.read_reply()
            assert err is not None and (err.code, err.domain, err.str1, err.message) == (39, 7, "%s", err.str2)
            assert header.status == p.Status.ERROR and header.type == p.MessageType.REPLY
            c.acquire("/after-bad-frame")  # the same connection goes on
        else:
            assert c.is_closed_by_server()
    assert_serves(agent)


def test_connection_cut_inside_a_frame_is_closed_quietly(agent: ServerThread, backend: RecordingBackend) -> None:
    whole = frame(2, b"\0\0\0\0")
    for cut in (2, 10, len(whole) - 1):
        with LockdClient(agent.path) as c:
            c.send_raw(whole[:cut])
            c.sock.shutdown(socket.SHUT_WR)
            assert c.is_closed_by_server()
    assert_serves(agent)


def test_max_connections(start_agent: Start, backend: RecordingBackend) -> None:
    agent = start_agent(backend, max_connections=2)
    with LockdClient(agent.path) as a, LockdClient(agent.path) as b:
        a.register(make_owner())
        b.register(make_owner())
        with LockdClient(agent.path) as c:
            assert c.is_closed_by_server()
    assert_serves(agent)


def test_socket_is_0700_and_removed_at_close(agent: ServerThread) -> None:
    st = os.stat(agent.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0
    agent.stop()
    assert not agent.path.exists()


CHILD = r"""
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
s.settimeout(5)
try:
    s.sendall(bytes.fromhex(sys.argv[2]))
    data = s.recv(64)
except (BrokenPipeError, ConnectionResetError):
    data = b""
print("closed" if data == b"" else "reply")
"""


def run_as_nobody(path: Path, payload: bytes, *, dac_override: bool) -> str:
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if dac_override:  # lets the child past the 0700 socket, to exercise the SO_PEERCRED check
        cmd += ["--inh-caps=+dac_override", "--ambient-caps=+dac_override"]
    cmd += [sys.executable, "-c", CHILD, str(path), payload.hex()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to uid 65534")
def test_non_root_peer_is_refused(agent: ServerThread, backend: RecordingBackend, caplog: pytest.LogCaptureFixture) -> None:
    register = p.encode_call(p.Procedure.REGISTER, 0, p.RegisterArgs(make_owner()))
    assert run_as_nobody(agent.path, register, dac_override=False) == "EACCES"  # mode 0700 stops it first
    with caplog.at_level(logging.WARNING, logger="virtlease_etcd.agent.server"):
        assert run_as_nobody(agent.path, register, dac_override=True) == "closed"
    assert "uid 65534" in caplog.text and "not root" in caplog.text
    assert backend.calls == [] and backend.closed == []
    assert_serves(agent)


def test_unsafe_socket_directory_is_refused(tmp_path: Path, backend: RecordingBackend) -> None:
    async def start(path: Path) -> None:
        server = LockdServer(path, backend)
        await server.start()
        await server.close()

    d = tmp_path / "d"
    with pytest.raises(AgentSetupError, match="does not exist"):
        asyncio.run(start(d / "sock"))
    d.mkdir(mode=0o700)
    for mode in (0o770, 0o757, 0o1777):
        os.chmod(d, mode)
        with pytest.raises(AgentSetupError, match="writable by group or others"):
            asyncio.run(start(d / "sock"))
    os.chmod(d, 0o755)
    if os.geteuid() == 0:
        os.chown(d, 65534, 65534)
        with pytest.raises(AgentSetupError, match="owned by uid 65534"):
            asyncio.run(start(d / "sock"))
        os.chown(d, 0, 0)
    (d / "file").write_text("x")
    with pytest.raises(AgentSetupError, match="not a socket"):
        asyncio.run(start(d / "file"))
    asyncio.run(start(d / "sock"))  # a safe directory works
    assert not (d / "sock").exists()


def test_live_socket_is_not_replaced_stale_one_is(start_agent: Start, backend: RecordingBackend) -> None:
    agent = start_agent(backend)
    with pytest.raises(AgentSetupError, match="in use"):
        asyncio.run(LockdServer(agent.path, backend).start())
    assert_serves(agent)
    agent.stop()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(agent.path))  # bound, never listening: what a crashed daemon leaves
    stale.close()
    again = start_agent(backend)
    assert_serves(again)


def test_pipelined_calls_are_answered_in_order(agent: ServerThread, backend: RecordingBackend) -> None:
    owner = make_owner()
    calls = [
        p.encode_call(p.Procedure.REGISTER, 0, p.RegisterArgs(owner)),
        p.encode_call(p.Procedure.ACQUIRE_RESOURCE, 1, p.ResourceArgs("", "/a", 0)),
        p.encode_call(p.Procedure.RELEASE_RESOURCE, 2, p.ResourceArgs("", "/a", 0)),
    ]
    with LockdClient(agent.path) as c:
        c.send_raw(b"".join(calls))  # in one write, as a pipelining client would
        replies = [c.read_reply() for _ in calls]
    assert [(h.serial, h.proc, err) for h, err in replies] == [(0, 1, None), (1, 6, None), (2, 7, None)]
    assert backend.ops() == ["register", "acquire", "release"]
