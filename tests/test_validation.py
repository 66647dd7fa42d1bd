"""Bad input is refused by the core, naming the field, before a driver sees it.
Every rule of the validation section has a case here (nop driver)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import virtlease as v

U = "6b0c1c6a-56e7-4f2b-9d26-0f1d8b1a4f00"
D = v.ResourceType.DISK
L = v.ResourceType.LEASE


@pytest.fixture
def plugin() -> Iterator[v.Plugin]:
    p = v.load_driver("nop")
    yield p
    for o in p.objects:
        o.free()
    p.unload()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "vm"}, "uuid"),
        ({"uuid": "", "name": "vm"}, "uuid"),
        ({"uuid": "not-a-uuid", "name": "vm"}, "uuid"),
        ({"uuid": "6b0c1c6a56e74f2b9d260f1d8b1a4f0", "name": "vm"}, "uuid"),
        ({"uuid": 12, "name": "vm"}, "uuid"),
        ({"uuid": U}, "name"),
        ({"uuid": U, "name": ""}, "name"),
        ({"uuid": U, "name": "a\x00b"}, "name"),
        ({"uuid": U, "name": "x" * 2000}, "name"),
        ({"uuid": U, "name": "vm", "pid": 0}, "pid"),
        ({"uuid": U, "name": "vm", "pid": "12"}, "pid"),
        ({"uuid": U, "name": "vm", "id": -5}, "id"),
        ({"uuid": U, "name": "vm", "uri": ""}, "uri"),
        ({"uuid": U, "name": "vm", "flags": 1 << 7}, "flags"),
    ],
)
def test_new_object_rejects(plugin: v.Plugin, kwargs: dict[str, Any], field: str) -> None:
    kwargs.setdefault("uuid", None)
    with pytest.raises(v.ValidationError) as info:
        plugin.new_object(v.ObjectType.DOMAIN, **kwargs)
    assert info.value.field == field
    assert field in str(info.value)


def test_wrong_object_type(plugin: v.Plugin) -> None:
    with pytest.raises(v.ValidationError, match="ObjectType"):
        plugin.new_object(3, uuid=U, name="vm")  # type: ignore[arg-type]


def test_uuid_forms_are_canonicalised(plugin: v.Plugin) -> None:
    assert plugin.new_object(uuid=U.upper(), name="a").uuid == U
    assert plugin.new_object(uuid=U.replace("-", ""), name="b").uuid == U
    assert plugin.new_object(uuid=uuid.UUID(U), name="c").uuid == U


@pytest.mark.parametrize(
    ("rtype", "name", "params", "field"),
    [
        (D, "", None, "disk path"),
        (D, "relative/disk.img", None, "disk path"),
        (D, "/a\x00b", None, "disk path"),
        (D, "/" + "a" * 4096, None, "disk path"),
        (D, "/ok", {"lockspace": "x"}, "params"),
        (D, b"/bytes", None, "disk path"),
        (L, "key", None, "lockspace"),
        (L, "key", {"lockspace": ""}, "lockspace"),
        (L, "key", {"lockspace": "a/b"}, "lockspace"),
        (L, "key", {"lockspace": "ls", "offset": -1}, "offset"),
        (L, "key", {"lockspace": "ls", "path": "rel"}, "lease path"),
        (L, "key", {"lockspace": "ls", "colour": "red"}, "params"),
        (L, "", {"lockspace": "ls"}, "lease key"),
        (7, "/x", None, "resource type"),
    ],
)
def test_add_resource_rejects(plugin: v.Plugin, rtype: Any, name: Any, params: Any, field: str) -> None:
    obj = plugin.new_object(uuid=U, name="vm")
    with pytest.raises(v.ValidationError) as info:
        obj.add_resource(rtype, name, params=params)
    assert info.value.field == field


def test_path_of_exactly_4096_bytes_is_accepted(plugin: v.Plugin) -> None:
    obj = plugin.new_object(uuid=U, name="vm")
    obj.add_resource(D, "/" + "a" * 4095)


def test_unknown_resource_flag_bits(plugin: v.Plugin) -> None:
    obj = plugin.new_object(uuid=U, name="vm")
    with pytest.raises(v.ValidationError, match="unknown ResourceFlags bits"):
        obj.add_resource(D, "/d", flags=1 << 5)  # type: ignore[arg-type]


def test_duplicate_resource(plugin: v.Plugin) -> None:
    obj = plugin.new_object(uuid=U, name="vm")
    obj.add_resource(D, "/d")
    with pytest.raises(v.ValidationError, match="already added"):
        obj.add_resource(D, "/d")


def test_unknown_acquire_flag_bits_and_bad_action(plugin: v.Plugin) -> None:
    obj = plugin.new_object(uuid=U, name="vm")
    with pytest.raises(v.ValidationError, match="AcquireFlags"):
        obj.acquire(flags=1 << 6)  # type: ignore[arg-type]
    with pytest.raises(v.ValidationError) as info:
        obj.acquire(action=99)  # type: ignore[arg-type]
    assert info.value.field == "action"
    with pytest.raises(v.ValidationError) as info:
        obj.acquire(state=b"bytes")  # type: ignore[arg-type]
    assert info.value.field == "state"


def test_add_after_acquire_needs_hotplug(plugin: v.Plugin) -> None:
    obj = plugin.new_object(uuid=U, name="vm")
    obj.acquire()
    with pytest.raises(v.ObjectStateError, match="held"):
        obj.add_resource(D, "/late")
    obj.acquire_resource(D, "/late")  # the HOTPLUG way works
    assert [r.name for r in obj.resources] == ["/late"]


def test_acquire_twice(plugin: v.Plugin) -> None:
    obj = plugin.new_object(uuid=U, name="vm")
    obj.acquire()
    with pytest.raises(v.ObjectStateError, match="acquire"):
        obj.acquire()


def test_release_of_a_restricted_object(plugin: v.Plugin) -> None:
    """A fresh object may release what its domain holds (libvirt's pause); a
    restricted one may not."""
    obj = plugin.new_object(uuid=U, name="vm")
    assert isinstance(obj.release(), str)
    obj.acquire(flags=v.AcquireFlags.RESTRICT)
    with pytest.raises(v.ObjectStateError, match="restricted"):
        obj.release()


OPS: list[tuple[str, Callable[[v.LockObject], object]]] = [
    ("add_resource", lambda o: o.add_resource(D, "/x")),
    ("acquire", lambda o: o.acquire()),
    ("release", lambda o: o.release()),
    ("inquire", lambda o: o.inquire()),
    ("free", lambda o: o.free()),
    ("prepare_migrate", lambda o: o.prepare_migrate("other")),
]


@pytest.mark.parametrize(("name", "call"), OPS, ids=[n for n, _ in OPS])
def test_use_after_free(plugin: v.Plugin, name: str, call: Callable[[v.LockObject], object]) -> None:
    obj = plugin.new_object(uuid=U, name="vm")
    obj.free()
    with pytest.raises(v.ObjectStateError, match="freed"):
        call(obj)


def test_capability_missing_for_call(tmp_path: Any) -> None:
    (tmp_path / "plain.py").write_text(
        "from virtlease.abi import ABI_VERSION, Capability\n"
        "class O:\n"
        "    def acquire(self, r, s, f, a): pass\n"
        "    def release(self): return ''\n"
        "    def inquire(self): return ''\n"
        "    def free(self): pass\n"
        "class D:\n    version = ABI_VERSION\n    capabilities = Capability.RESOURCES\n"
        "    def new_object(self, spec): return O()\n"
        "LOCK_DRIVER = D\n")
    p = v.load_driver("plain", config={"plugin_dir": str(tmp_path)})
    obj = p.new_object(uuid=U, name="vm")
    obj.acquire()
    with pytest.raises(v.CapabilityError, match="HOTPLUG"):
        obj.acquire_resource(D, "/x")
    with pytest.raises(v.CapabilityError, match="MIGRATE"):
        obj.prepare_migrate("b")
    obj.free()
    p.unload()


def test_bad_dest_host(plugin: v.Plugin) -> None:
    obj = plugin.new_object(uuid=U, name="vm")
    obj.acquire()
    for bad in ("", "a/b", "has space"):
        with pytest.raises(v.ValidationError) as info:
            obj.prepare_migrate(bad)
        assert info.value.field == "dest_host"


def test_migrate_object_needs_a_state_for_its_first_acquire(plugin: v.Plugin) -> None:
    obj = plugin.new_object(uuid=U, name="vm", flags=v.NewFlags.MIGRATE)
    with pytest.raises(v.ValidationError, match="prepare_migrate") as info:
        obj.acquire()
    assert info.value.field == "state"


def test_release_resource_not_added(plugin: v.Plugin) -> None:
    obj = plugin.new_object(uuid=U, name="vm")
    obj.acquire()
    with pytest.raises(v.ValidationError, match="not a resource"):
        obj.release_resource(D, "/never")
