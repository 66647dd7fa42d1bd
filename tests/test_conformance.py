"""The ABI conformance suite: behaviour every driver must show.

Runs against every registered driver (nop, etcd).  Driver-specific
behaviour (conflicts, fencing, handoff details) is tested beside the driver.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

import virtlease as v
from conftest import STEADY_TTL, EtcdServer, new_uuid, shut

D = v.ResourceType.DISK
L = v.ResourceType.LEASE
ALL = v.Capability.RESOURCES | v.Capability.MIGRATE | v.Capability.HOTPLUG | v.Capability.USES_STATE


@pytest.fixture(params=["nop", "etcd"])
def driver_factory(request: pytest.FixtureRequest, prefix: str) -> Iterator[Callable[[str], v.Plugin]]:
    """``make(host_id)`` loads the driver under test (a fresh instance)."""
    plugins: list[v.Plugin] = []

    def make(host_id: str) -> v.Plugin:
        config = {}
        if request.param == "etcd":
            server: EtcdServer = request.getfixturevalue("etcd_process")
            config = {"endpoints": server.endpoints, "prefix": prefix, "host_id": host_id, "ttl": STEADY_TTL}
        plugin = v.load_driver(request.param, config=config, capabilities=ALL)
        plugins.append(plugin)
        return plugin

    yield make
    for plugin in plugins:
        shut(plugin)


def vm(plugin: v.Plugin, disks: list[str], **kw: object) -> v.LockObject:
    obj = plugin.new_object(uuid=kw.pop("uuid", new_uuid()), name=str(kw.pop("name", "vm")), **kw)  # type: ignore[arg-type]
    for d in disks:
        obj.add_resource(D, d)
    return obj


def test_declares_abi_and_every_capability(driver_factory: Callable[[str], v.Plugin]) -> None:
    plugin = driver_factory("h1")
    assert plugin.version == v.ABI_VERSION
    assert plugin.capabilities == ALL


def test_acquire_release_inquire_cycle(driver_factory: Callable[[str], v.Plugin]) -> None:
    plugin = driver_factory("h1")
    obj = vm(plugin, ["/conf/a.img", "/conf/b.img"])
    obj.add_resource(L, "lease1", params={"lockspace": "ls"})
    obj.acquire()
    assert obj.phase is v.Phase.HELD
    assert isinstance(obj.inquire(), str)
    state = obj.release()
    assert isinstance(state, str)
    assert obj.phase is v.Phase.RELEASED
    obj.acquire(state)  # resume with the state just returned
    assert obj.phase is v.Phase.HELD
    obj.free()
    assert obj.phase is v.Phase.FREED


def test_register_only_then_real_acquire(driver_factory: Callable[[str], v.Plugin]) -> None:
    plugin = driver_factory("h1")
    obj = vm(plugin, ["/conf/reg.img"])
    obj.acquire(flags=v.AcquireFlags.REGISTER_ONLY)
    assert obj.phase is v.Phase.REGISTERED
    obj.acquire()
    assert obj.phase is v.Phase.HELD


def test_restrict_blocks_later_acquire_and_release(driver_factory: Callable[[str], v.Plugin]) -> None:
    plugin = driver_factory("h1")
    obj = vm(plugin, ["/conf/r.img"])
    obj.acquire(flags=v.AcquireFlags.RESTRICT)
    with pytest.raises(v.ObjectStateError, match="restricted"):
        obj.release()
    with pytest.raises(v.ObjectStateError, match="restricted"):
        obj.acquire()
    with pytest.raises(v.ObjectStateError, match="restricted"):
        obj.acquire_resource(D, "/conf/r2.img")
    obj.free()  # free always works


def test_hotplug_add_and_remove(driver_factory: Callable[[str], v.Plugin]) -> None:
    plugin = driver_factory("h1")
    obj = vm(plugin, ["/conf/h1.img"])
    obj.acquire()
    obj.acquire_resource(D, "/conf/h2.img")
    assert [r.name for r in obj.resources] == ["/conf/h1.img", "/conf/h2.img"]
    obj.release_resource(D, "/conf/h1.img")
    assert [r.name for r in obj.resources] == ["/conf/h2.img"]


def test_migration_calls_in_order(driver_factory: Callable[[str], v.Plugin]) -> None:
    src, dst = driver_factory("src"), driver_factory("dst")
    uuid = new_uuid()
    a = vm(src, ["/conf/m.img"], uuid=uuid, name="web1")
    a.acquire()
    state = a.prepare_migrate("dst")
    assert a.phase is v.Phase.MIGRATING
    b = vm(dst, ["/conf/m.img"], uuid=uuid, name="web1", flags=v.NewFlags.MIGRATE)
    b.acquire(state)
    assert b.complete_migrate_in() is None
    a.complete_migrate_out()
    assert a.phase is v.Phase.GONE
    assert isinstance(b.release(), str)


def test_migration_cancel_before_claim_keeps_the_source(driver_factory: Callable[[str], v.Plugin]) -> None:
    src = driver_factory("src")
    a = vm(src, ["/conf/c.img"])
    a.acquire()
    a.prepare_migrate("dst")
    a.complete_migrate_out(cancel=True)
    assert a.phase is v.Phase.HELD
    a.release()


def test_complete_migrate_in_needs_a_migrate_object(driver_factory: Callable[[str], v.Plugin]) -> None:
    plugin = driver_factory("h1")
    obj = vm(plugin, ["/conf/x.img"])
    obj.acquire()
    with pytest.raises(v.ObjectStateError, match="MIGRATE"):
        obj.complete_migrate_in()


def test_context_manager_frees(driver_factory: Callable[[str], v.Plugin]) -> None:
    plugin = driver_factory("h1")
    with vm(plugin, ["/conf/ctx.img"]) as obj:
        obj.acquire()
    assert obj.phase is v.Phase.FREED
    assert plugin.objects == []


def test_unload_refused_with_live_objects_then_allowed(driver_factory: Callable[[str], v.Plugin]) -> None:
    plugin = driver_factory("h1")
    obj = vm(plugin, ["/conf/u.img"])
    with pytest.raises(v.PluginBusyError):
        plugin.unload()
    obj.free()
    plugin.unload()
    with pytest.raises(v.PluginBusyError, match="unloaded"):
        plugin.new_object(uuid=new_uuid(), name="late")


def test_free_keeps_the_domains_hold_and_a_fresh_object_releases_it(
        driver_factory: Callable[[str], v.Plugin]) -> None:
    """Holds belong to the domain on the host, not to the object (ABI 2.0)."""
    plugin = driver_factory("h1")
    uuid = new_uuid()
    first = vm(plugin, ["/conf/f.img"], uuid=uuid)
    first.acquire()
    first.free()
    if plugin.name != "nop":
        with pytest.raises(v.ResourceBusyError):
            vm(plugin, ["/conf/f.img"]).acquire()
    vm(plugin, ["/conf/f.img"], uuid=uuid).release()
    vm(plugin, ["/conf/f.img"]).acquire()


def test_libvirt_call_pattern_a_fresh_object_per_operation(driver_factory: Callable[[str], v.Plugin]) -> None:
    """The sequence of libvirt's QEMU driver (src/locking/domain_lock.c): every
    operation makes a new object, adds the disks again, calls, frees.  Start in
    the child before exec (REGISTER_ONLY|RESTRICT), resume (acquire), pause
    (release), resume (acquire(state)), inquire for the migration cookie,
    hotplug and unplug of one disk, then migration through the cookie: the
    source pauses (releases), the destination resumes with the inquired state."""
    src, dst = driver_factory("src"), driver_factory("dst")
    uuid = new_uuid()
    disks = ["/conf/lv/root.img", "/conf/lv/data.img"]

    def op(plugin: v.Plugin, fn: Callable[[v.LockObject], object], ds: list[str] = disks) -> object:
        obj = vm(plugin, ds, uuid=uuid, name="web1", pid=None)
        try:
            return fn(obj)
        finally:
            obj.free()

    def holders() -> list[tuple[str, int]]:
        if src.name == "nop":
            return []
        found = []
        for plugin in (src, dst):
            found += [(plugin.driver.host_id, h.token) for h in op(plugin, lambda o: o.held())]  # type: ignore[union-attr]
        return found

    locking = src.name != "nop"
    op(src, lambda o: o.acquire(flags=v.AcquireFlags.REGISTER_ONLY | v.AcquireFlags.RESTRICT))
    op(src, lambda o: o.acquire())                          # start: CPUs run
    assert [h for h, _ in holders()] == (["src", "src"] if locking else [])
    state = op(src, lambda o: o.release())                  # pause
    assert holders() == []
    op(src, lambda o: o.acquire(state))                     # resume with the pause state
    cookie = op(src, lambda o: o.inquire())                 # migration Begin: state for the cookie
    assert isinstance(cookie, str)
    op(src, lambda o: o.acquire(), ["/conf/lv/hot.img"])    # hotplug one disk
    op(src, lambda o: o.release(), ["/conf/lv/hot.img"])    # unplug it
    if locking:  # the destination resuming while the source still runs is refused
        with pytest.raises(v.ResourceBusyError):
            op(dst, lambda o: o.acquire(cookie))
    op(dst, lambda o: o.acquire(flags=v.AcquireFlags.REGISTER_ONLY | v.AcquireFlags.RESTRICT))
    op(src, lambda o: o.release())                          # the source pauses for the switch-over
    op(dst, lambda o: o.acquire(cookie))                    # the destination resumes
    assert [h for h, _ in holders()] == (["dst", "dst"] if locking else [])
    op(dst, lambda o: o.release())
