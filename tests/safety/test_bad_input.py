"""Bad input, nothing lost: malformed input at every public entry gets a clear
error and leaves the etcd keyspace byte-for-byte unchanged.

Table-driven.  Every case runs against a populated keyspace (this host's
session, a disk held by another host, a released disk with its ``gen`` key),
dumps every key under the prefix with value, mod_revision and lease before
and after, and checks:

* the error is a ``VirtleaseError`` subclass of the expected type;
* its message names the offending field or resource;
* the dump is identical (nothing written, nothing deleted).

Covered: ABI calls (new_object, add_resource, acquire and its flags/actions,
release/inquire/migration calls out of order), state strings (truncated,
tampered, another cluster / version / prefix / host), driver configuration
(bad TOML, unknown keys, ttl 1, bad endpoints...), and foreign or corrupted
values under the prefix (garbage bytes and records of another format version
at holder keys, then acquiring that resource).  CLI arguments are covered by
the CLI's own tests.  Not marked ``safety``: it runs in ``make test``.
"""

from __future__ import annotations

import json
import subprocess
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import etcd3
import pytest

import virtlease as v
from conftest import STEADY_TTL, EtcdServer, dump, shut
from virtlease_etcd.model import keyspace as ks

CAPS = v.Capability.RESOURCES | v.Capability.MIGRATE | v.Capability.HOTPLUG | v.Capability.USES_STATE
DISK = "/vm/bad-input/disk0.img"
BUSY_DISK = "/vm/bad-input/held-by-b.img"
UUID = "3b0e6f1e-7f0c-4f55-9a3e-0c1f7b9d2e41"


def rid_of(path: str) -> str:
    return ks.ResourceId.of(v.ResourceSpec(v.ResourceType.DISK, path)).rid


@dataclass
class World:
    """A populated keyspace and what a case needs to poke at it."""

    etcd: EtcdServer
    prefix: str
    kv: etcd3.Etcd3Client
    a: v.Plugin
    b: v.Plugin
    state: str
    """A valid resume state of domain UUID on host-a for DISK (released)."""
    handoff: str
    """A valid handoff state of a domain on host-b, to host-c."""
    vm: subprocess.Popen[bytes]
    tmp: Path = Path("/nonexistent")
    ctx: Any = None

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"endpoints": self.etcd.endpoints, "prefix": self.prefix, "host_id": "host-a", "ttl": STEADY_TTL,
                **extra}

    def obj(self, *disks: str, flags: v.NewFlags = v.NewFlags(0), uuid: str = UUID) -> v.LockObject:
        o = self.a.new_object(uuid=uuid, name="victim", pid=self.vm.pid, flags=flags)
        for d in disks:
            o.add_resource(v.ResourceType.DISK, d)
        return o


@pytest.fixture
def world(etcd: EtcdServer, prefix: str, kv: etcd3.Etcd3Client) -> Iterator[World]:
    a = v.load_driver("etcd", config={"endpoints": etcd.endpoints, "prefix": prefix, "host_id": "host-a",
                                      "ttl": STEADY_TTL}, capabilities=CAPS)
    b = v.load_driver("etcd", config={"endpoints": etcd.endpoints, "prefix": prefix, "host_id": "host-b",
                                      "ttl": STEADY_TTL}, capabilities=CAPS)
    vm = subprocess.Popen(["sleep", "600"])
    # host-b holds BUSY_DISK; host-a held DISK and released it (gen key, a state)
    held = b.new_object(uuid=str(uuidlib.uuid4()), name="b-vm")
    held.add_resource(v.ResourceType.DISK, BUSY_DISK)
    held.acquire()
    mig = b.new_object(uuid=str(uuidlib.uuid4()), name="b-mig")
    mig.add_resource(v.ResourceType.DISK, "/vm/bad-input/migrating.img")
    mig.acquire()
    handoff = mig.prepare_migrate("host-c")
    first = a.new_object(uuid=UUID, name="victim", pid=vm.pid)
    first.add_resource(v.ResourceType.DISK, DISK)
    first.acquire()
    state = first.release()
    first.free()
    w = World(etcd, prefix, kv, a, b, state, handoff, vm)
    yield w
    vm.kill()
    vm.wait()
    for p in (a, b):
        for o in p.objects:
            try:
                o.free()
            except v.VirtleaseError:
                pass
        try:
            shut(p)
        except v.VirtleaseError:
            pass


def edit_state(state: str, **changes: Any) -> str:
    head, body = state.split(" ", 1)
    data = json.loads(body)
    for key, value in changes.items():
        if key == "token_delta":
            for r in data["res"]:
                r["token"] += value
        elif key == "res_field":
            for r in data["res"]:
                r.update(value)
        else:
            data[key] = value
    return f"{head} {json.dumps(data)}"


@dataclass
class Case:
    id: str
    run: Callable[[World], Any]
    error: type[v.VirtleaseError]
    names: tuple[str, ...]
    """At least one must appear in the message (case-insensitive)."""


def acquire_with(state_fn: Callable[[World], str], *disks: str,
                 flags: v.NewFlags = v.NewFlags(0)) -> Callable[[World], Any]:
    def run(w: World) -> Any:
        return w.obj(*(disks or (DISK,)), flags=flags).acquire(state_fn(w))
    return run


def on_held(action: Callable[[v.LockObject], Any]) -> Callable[[World], Any]:
    """Run ``action`` on an object that holds a disk (taken before the dump)."""
    def setup(w: World) -> None:
        o = w.obj("/vm/bad-input/mine.img", uuid=str(uuidlib.uuid4()))
        o.acquire()
        w.ctx = o

    def run(w: World) -> Any:
        return action(w.ctx)

    run.setup = setup  # type: ignore[attr-defined]
    return run


def after_b_held(state_fn: Callable[[World], str]) -> Callable[[World], Any]:
    """Host-b takes and releases DISK (before the dump), then host-a resumes
    with a state from before: "nobody held it since" is false."""
    def setup(w: World) -> None:
        o = w.b.new_object(uuid=str(uuidlib.uuid4()), name="intruder")
        o.add_resource(v.ResourceType.DISK, DISK)
        o.acquire()
        o.release()
        o.free()

    run = acquire_with(state_fn)
    run.setup = setup  # type: ignore[attr-defined]
    return run


def freed(w: World) -> v.LockObject:
    o = w.obj(DISK, uuid=str(uuidlib.uuid4()))
    o.free()
    return o


ABI_CASES = [
    Case("new_object: no uuid", lambda w: w.a.new_object(name="x"), v.ValidationError, ("uuid",)),
    Case("new_object: bad uuid", lambda w: w.a.new_object(uuid="not-a-uuid", name="x"), v.ValidationError,
         ("uuid",)),
    Case("new_object: uuid int", lambda w: w.a.new_object(uuid=42, name="x"), v.ValidationError, ("uuid",)),
    Case("new_object: empty name", lambda w: w.a.new_object(uuid=UUID, name=""), v.ValidationError, ("name",)),
    Case("new_object: NUL in name", lambda w: w.a.new_object(uuid=UUID, name="a\0b"), v.ValidationError,
         ("name",)),
    Case("new_object: huge name", lambda w: w.a.new_object(uuid=UUID, name="n" * 5000), v.ValidationError,
         ("name",)),
    Case("new_object: pid 0", lambda w: w.a.new_object(uuid=UUID, name="x", pid=0), v.ValidationError, ("pid",)),
    Case("new_object: pid str", lambda w: w.a.new_object(uuid=UUID, name="x", pid="12"), v.ValidationError,
         ("pid",)),
    Case("new_object: pid bool", lambda w: w.a.new_object(uuid=UUID, name="x", pid=True), v.ValidationError,
         ("pid",)),
    Case("new_object: id -5", lambda w: w.a.new_object(uuid=UUID, name="x", id=-5), v.ValidationError, ("id",)),
    Case("new_object: unknown flag", lambda w: w.a.new_object(uuid=UUID, name="x", flags=1 << 7),
         v.ValidationError, ("flags",)),
    Case("new_object: type int", lambda w: w.a.new_object(5, uuid=UUID, name="x"), v.ValidationError,
         ("type",)),
    Case("new_object: empty uri", lambda w: w.a.new_object(uuid=UUID, name="x", uri=""), v.ValidationError,
         ("uri",)),
    Case("add_resource: type str", lambda w: w.obj().add_resource("disk", DISK), v.ValidationError,
         ("resource type",)),
    Case("add_resource: relative path", lambda w: w.obj().add_resource(v.ResourceType.DISK, "disk.img"),
         v.ValidationError, ("disk path",)),
    Case("add_resource: NUL in path", lambda w: w.obj().add_resource(v.ResourceType.DISK, "/vm/a\0b"),
         v.ValidationError, ("disk path",)),
    Case("add_resource: path too long", lambda w: w.obj().add_resource(v.ResourceType.DISK, "/" + "p" * 5000),
         v.ValidationError, ("disk path",)),
    Case("add_resource: path not str", lambda w: w.obj().add_resource(v.ResourceType.DISK, b"/vm/x"),
         v.ValidationError, ("disk path",)),
    Case("add_resource: disk with params",
         lambda w: w.obj().add_resource(v.ResourceType.DISK, DISK, params={"lockspace": "x"}),
         v.ValidationError, ("params",)),
    Case("add_resource: params not a mapping",
         lambda w: w.obj().add_resource(v.ResourceType.LEASE, "k", params=["lockspace"]),
         v.ValidationError, ("params",)),
    Case("add_resource: lease without lockspace", lambda w: w.obj().add_resource(v.ResourceType.LEASE, "k"),
         v.ValidationError, ("lockspace",)),
    Case("add_resource: lockspace with slash",
         lambda w: w.obj().add_resource(v.ResourceType.LEASE, "k", params={"lockspace": "a/b"}),
         v.ValidationError, ("lockspace",)),
    Case("add_resource: unknown lease param",
         lambda w: w.obj().add_resource(v.ResourceType.LEASE, "k", params={"lockspace": "l", "colour": 1}),
         v.ValidationError, ("params",)),
    Case("add_resource: negative offset",
         lambda w: w.obj().add_resource(v.ResourceType.LEASE, "k", params={"lockspace": "l", "offset": -1}),
         v.ValidationError, ("offset",)),
    Case("add_resource: unknown flag", lambda w: w.obj().add_resource(v.ResourceType.DISK, DISK, flags=1 << 5),
         v.ValidationError, ("flags",)),
    Case("add_resource: twice", lambda w: w.obj(DISK).add_resource(v.ResourceType.DISK, DISK),
         v.ValidationError, ("resource", DISK)),
    Case("acquire: unknown flag", lambda w: w.obj(DISK).acquire(flags=1 << 9), v.ValidationError, ("flags",)),
    Case("acquire: action 99", lambda w: w.obj(DISK).acquire(action=99), v.ValidationError, ("action",)),
    Case("acquire: action str", lambda w: w.obj(DISK).acquire(action="poweroff"), v.ValidationError,
         ("action",)),
    Case("acquire: RESTART without callback",
         lambda w: w.obj(DISK).acquire(action=v.FailureAction.RESTART), v.ValidationError, ("action",)),
    Case("acquire: state int", lambda w: w.obj(DISK).acquire(123), v.ValidationError, ("state",)),
    Case("acquire: state with NUL", lambda w: w.obj(DISK).acquire("virtlease-state/1 {\0}"), v.ValidationError,
         ("state",)),
    Case("acquire: state too long", lambda w: w.obj(DISK).acquire("x" * (1 << 21)), v.ValidationError,
         ("state",)),
    Case("acquire: MIGRATE object without state", lambda w: w.obj(DISK, flags=v.NewFlags.MIGRATE).acquire(),
         v.ValidationError, ("state",)),
    Case("acquire: same disk twice via symlinked path",
         lambda w: w.obj("/vm/bad-input/./dup.img", "/vm/bad-input/dup.img").acquire(),
         v.ValidationError, ("dup.img",)),
    Case("acquire: a disk another host holds", lambda w: w.obj(BUSY_DISK).acquire(), v.ResourceBusyError,
         (BUSY_DISK,)),
    Case("acquire: twice", on_held(lambda o: o.acquire()), v.ObjectStateError, ("acquire",)),
    Case("release: before acquire", lambda w: w.obj(DISK).release(), v.ObjectStateError, ("release",)),
    Case("release: a disk the domain does not hold", lambda w: w.obj(DISK).release(), v.ObjectStateError,
         ("release", "holds none")),
    Case("add_resource: after acquire", on_held(lambda o: o.add_resource(v.ResourceType.DISK, "/vm/z")),
         v.ObjectStateError, ("add_resource",)),
    Case("acquire: after free", lambda w: freed(w).acquire(), v.ObjectStateError, ("freed",)),
    Case("prepare_migrate: empty dest", on_held(lambda o: o.prepare_migrate("")), v.ValidationError,
         ("dest_host",)),
    Case("prepare_migrate: dest with space", on_held(lambda o: o.prepare_migrate("a b")), v.ValidationError,
         ("dest_host",)),
    Case("prepare_migrate: to itself", on_held(lambda o: o.prepare_migrate("host-a")), v.ValidationError,
         ("dest_host",)),
    Case("prepare_migrate: not held", lambda w: w.obj(DISK).prepare_migrate("host-b"), v.ObjectStateError,
         ("prepare_migrate",)),
    Case("complete_migrate_out: nothing in flight", on_held(lambda o: o.complete_migrate_out()),
         v.ObjectStateError, ("complete_migrate_out",)),
    Case("complete_migrate_in: not a MIGRATE object", on_held(lambda o: o.complete_migrate_in()),
         v.ObjectStateError, ("complete_migrate_in",)),
]

STATE_CASES = [
    Case("state: not a state", acquire_with(lambda w: "hello"), v.ValidationError, ("state",)),
    Case("state: empty string", acquire_with(lambda w: ""), v.ValidationError, ("state",)),
    Case("state: truncated", acquire_with(lambda w: w.state[: len(w.state) // 2]), v.ValidationError,
         ("state",)),
    Case("state: header only", acquire_with(lambda w: "virtlease-state/1 "), v.ValidationError, ("state",)),
    Case("state: bad version", acquire_with(lambda w: w.state.replace("state/1", "state/x", 1)),
         v.ValidationError, ("state",)),
    Case("state: another format version", acquire_with(lambda w: w.state.replace("state/1", "state/2", 1)),
         v.StaleStateError, ("format",)),
    Case("state: JSON list", acquire_with(lambda w: "virtlease-state/1 []"), v.ValidationError, ("state",)),
    Case("state: unknown kind", acquire_with(lambda w: edit_state(w.state, kind="steal")), v.ValidationError,
         ("kind",)),
    Case("state: token not an int", acquire_with(lambda w: edit_state(w.state, res_field={"token": "7"})),
         v.ValidationError, ("state",)),
    Case("state: res not a list", acquire_with(lambda w: edit_state(w.state, res=5)), v.ValidationError,
         ("state",)),
    Case("state: another cluster", acquire_with(lambda w: edit_state(w.state, cluster="deadbeef")),
         v.StaleStateError, ("cluster",)),
    Case("state: another prefix", acquire_with(lambda w: edit_state(w.state, prefix="/elsewhere")),
         v.StaleStateError, ("prefix",)),
    Case("state: another domain", acquire_with(lambda w: edit_state(w.state, uuid=str(uuidlib.uuid4()))),
         v.StaleStateError, ("domain",)),
    Case("state: another disk", acquire_with(lambda w: w.state, "/vm/bad-input/other.img"), v.StaleStateError,
         ("other.img", "disk0.img")),
    Case("state: tampered rid",
         acquire_with(lambda w: edit_state(w.state, res_field={"rid": "0" * 64})), v.StaleStateError,
         ("disk0.img", "resources")),
    Case("state: tampered (older) token", acquire_with(lambda w: edit_state(w.state, token_delta=-1)),
         v.StaleStateError, ("disk0.img",)),
    Case("state: resume after another holder", after_b_held(lambda w: w.state), v.StaleStateError,
         ("disk0.img",)),
    Case("state: tampered (newer) token, after another holder",
         after_b_held(lambda w: edit_state(w.state, token_delta=1000)), v.StaleStateError, ("disk0.img",)),
    Case("state: handoff to another host",
         lambda w: w.obj("/vm/bad-input/migrating.img", flags=v.NewFlags.MIGRATE,
                         uuid=json.loads(w.handoff.split(" ", 1)[1])["uuid"]).acquire(w.handoff),
         v.StaleStateError, ("host-c",)),
    Case("state: handoff marker tampered",
         lambda w: _claim_as_c(w, edit_state(w.handoff, marker='{"v":1}')), v.StaleStateError,
         ("marker", "handoff")),
]


def _claim_as_c(w: World, state: str) -> Any:
    c = v.load_driver("etcd", config=w.config(host_id="host-c"), capabilities=CAPS)
    try:
        body = json.loads(state.split(" ", 1)[1])
        o = c.new_object(uuid=body["uuid"], name=body["name"], flags=v.NewFlags.MIGRATE)
        o.add_resource(v.ResourceType.DISK, "/vm/bad-input/migrating.img")
        try:
            o.acquire(state)
        finally:
            o.free()
    finally:
        shut(c)


def load(w: World, tmp: Path, toml: str | None = None, **config: Any) -> Any:
    cfg = {k: val for k, val in {**w.config(host_id="host-new"), **config}.items() if val is not None}
    if toml is not None:
        path = tmp / "virtlease.toml"
        path.write_text(toml)
        cfg["config_file"] = str(path)
    plugin = v.load_driver("etcd", config=cfg, capabilities=CAPS)
    shut(plugin)
    raise AssertionError("the configuration was accepted")


CONFIG_CASES = [
    Case("config: bad TOML", lambda w: load(w, w.tmp, toml="ttl = [unclosed"), v.ConfigError, ("config_file",)),
    Case("config: missing file", lambda w: load(w, w.tmp, config_file="/nonexistent/virtlease.toml"),
         v.ConfigError, ("config_file",)),
    Case("config: unknown key in TOML", lambda w: load(w, w.tmp, toml="colour = 'blue'\n"), v.ConfigError,
         ("colour",)),
    Case("config: [etcd] not a table", lambda w: load(w, w.tmp, toml="etcd = 5\n"), v.ConfigError,
         ("etcd", "config_file")),
    Case("config: unknown key", lambda w: load(w, w.tmp, colour="blue"), v.ConfigError, ("colour",)),
    Case("config: ttl 1", lambda w: load(w, w.tmp, ttl=1), v.ConfigError, ("ttl",)),
    Case("config: ttl 1 in TOML", lambda w: load(w, w.tmp, toml="[etcd]\nttl = 1\n", ttl=None), v.ConfigError,
         ("ttl",)),
    Case("config: ttl text", lambda w: load(w, w.tmp, ttl="ten"), v.ConfigError, ("ttl",)),
    Case("config: ttl bool", lambda w: load(w, w.tmp, ttl=True), v.ConfigError, ("ttl",)),
    Case("config: ttl 2.5", lambda w: load(w, w.tmp, ttl=2.5), v.ConfigError, ("ttl",)),
    Case("config: endpoints empty", lambda w: load(w, w.tmp, endpoints=""), v.ConfigError, ("endpoints",)),
    Case("config: endpoint without port", lambda w: load(w, w.tmp, endpoints="localhost"), v.ConfigError,
         ("endpoints",)),
    Case("config: endpoint port 99999", lambda w: load(w, w.tmp, endpoints="127.0.0.1:99999"), v.ConfigError,
         ("endpoints",)),
    Case("config: endpoints not a list", lambda w: load(w, w.tmp, endpoints=5), v.ConfigError, ("endpoints",)),
    Case("config: nobody listening", lambda w: load(w, w.tmp, endpoints="127.0.0.1:1", acquire_timeout=1.0,
                                                      request_timeout=0.3),
         v.VirtleaseError, ("127.0.0.1:1",)),
    Case("config: prefix without slash", lambda w: load(w, w.tmp, prefix="virtlease"), v.ConfigError,
         ("prefix",)),
    Case("config: prefix with trailing slash", lambda w: load(w, w.tmp, prefix="/virtlease/"), v.ConfigError,
         ("prefix",)),
    Case("config: host_id with space", lambda w: load(w, w.tmp, host_id="a b"), v.ConfigError, ("host_id",)),
    Case("config: host_id empty", lambda w: load(w, w.tmp, host_id=""), v.ConfigError, ("host_id",)),
    Case("config: host_id with slash", lambda w: load(w, w.tmp, host_id="a/b"), v.ConfigError, ("host_id",)),
    Case("config: fence_margin above ttl/2", lambda w: load(w, w.tmp, ttl=3, fence_margin=2.0), v.ConfigError,
         ("fence_margin",)),
    Case("config: request_timeout 0", lambda w: load(w, w.tmp, request_timeout=0), v.ConfigError,
         ("request_timeout",)),
    Case("config: default_action restart", lambda w: load(w, w.tmp, default_action="restart"), v.ConfigError,
         ("default_action",)),
    Case("config: default_action unknown", lambda w: load(w, w.tmp, default_action="explode"), v.ConfigError,
         ("default_action",)),
    Case("config: max_txn_ops 2", lambda w: load(w, w.tmp, max_txn_ops=2), v.ConfigError, ("max_txn_ops",)),
    Case("config: user without password", lambda w: load(w, w.tmp, user="root"), v.ConfigError,
         ("user", "password")),
    Case("config: missing ca_cert file", lambda w: load(w, w.tmp, ca_cert="/nonexistent/ca.pem"),
         v.ConfigError, ("ca_cert",)),
    Case("config: on_lease_lost not callable", lambda w: load(w, w.tmp, on_lease_lost="print"), v.ConfigError,
         ("on_lease_lost",)),
]


def _put_then_acquire(value: bytes, where: str, disk: str = DISK, shared: bool = False) -> Callable[[World], Any]:
    """Corrupt a key of ``disk`` (outside the dump: it is part of the world),
    then acquire ``disk``."""
    def setup(w: World) -> None:
        keys = ks.Keys(w.prefix)
        rid = rid_of(disk)
        key = {"holder": keys.exclusive(rid), "shared": keys.holder(rid, ks.SHARED, str(uuidlib.uuid4())),
               "gen": keys.gen_key(rid, ks.EXCLUSIVE)}[where]
        w.kv.put(key, value)

    def run(w: World) -> Any:
        o = w.a.new_object(uuid=str(uuidlib.uuid4()), name="victim", pid=w.vm.pid)
        o.add_resource(v.ResourceType.DISK, disk, flags=v.ResourceFlags.SHARED if shared else v.ResourceFlags(0))
        return o.acquire()

    run.setup = setup  # type: ignore[attr-defined]
    return run


FOREIGN_CASES = [
    Case("etcd: garbage bytes at the holder key", _put_then_acquire(b"\xff\x00garbage", "holder"),
         v.ResourceBusyError, (DISK,)),
    Case("etcd: record of format v99 at the holder key",
         _put_then_acquire(json.dumps({"v": 99, "host": "future", "res": DISK}).encode(), "holder"),
         v.ResourceBusyError, (DISK,)),
    Case("etcd: JSON that is not an object at the holder key", _put_then_acquire(b"[1,2,3]", "holder"),
         v.ResourceBusyError, (DISK,)),
    Case("etcd: v1 record missing every field at the holder key", _put_then_acquire(b'{"v":1}', "holder"),
         v.ResourceBusyError, (DISK,)),
    Case("etcd: garbage at a shared holder key, exclusive acquire", _put_then_acquire(b"\x00\x01", "shared"),
         v.ResourceBusyError, (DISK,)),
    Case("etcd: garbage at the holder key, shared acquire", _put_then_acquire(b"junk", "holder", shared=True),
         v.ResourceBusyError, (DISK,)),
]

@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.id) for c in ABI_CASES + STATE_CASES + CONFIG_CASES + FOREIGN_CASES],
)
def test_bad_input_is_refused_and_nothing_changes(world: World, case: Case, tmp_path: Path) -> None:
    world.tmp = tmp_path
    setup = getattr(case.run, "setup", None)
    if setup is not None:
        setup(world)
    before = dump(world.kv, world.prefix)
    with pytest.raises(v.VirtleaseError) as info:
        case.run(world)
    err = info.value
    after = dump(world.kv, world.prefix)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert not changed, f"keyspace changed at {sorted(changed)} by {type(err).__name__}: {err}"
    assert isinstance(err, case.error), f"expected {case.error.__name__}, got {type(err).__name__}: {err}"
    message = str(err).lower()
    if not any(n.lower() in message for n in case.names):
        raise AssertionError(f"the message does not name {' or '.join(case.names)}: {err}")
