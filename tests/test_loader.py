"""Plugin loading: every level of failure provoked for real, with throwaway
plugin directories (no mocks)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import virtlease as v
from virtlease import loader

GOOD = """
from virtlease.abi import ABI_VERSION, Capability

class Obj:
    def __init__(self, spec): self.spec = spec
    def acquire(self, resources, state, flags, action): pass
    def release(self, resources): return "released"
    def inquire(self, resources): return "state"
    def free(self): pass

class Driver:
    name = "{name}"
    version = {version}
    capabilities = Capability.RESOURCES
    {hooks}
    def new_object(self, spec): return Obj(spec)

LOCK_DRIVER = Driver
"""


def write_plugin(directory: Path, name: str, *, version: str = "ABI_VERSION", hooks: str = "",
                 body: str | None = None, package: bool = False) -> Path:
    text = body if body is not None else GOOD.format(name=name, version=version, hooks=hooks)
    if package:
        (directory / name).mkdir()
        path = directory / name / "__init__.py"
    else:
        path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(text))
    return path


def load(tmp_path: Path, name: str, **kw: object) -> v.Plugin:
    return v.load_driver(name, config={"plugin_dir": str(tmp_path)}, **kw)  # type: ignore[arg-type]


def test_loads_a_module_from_the_plugin_dir(tmp_path: Path) -> None:
    write_plugin(tmp_path, "mine")
    plugin = load(tmp_path, "mine")
    assert plugin.name == "mine" and plugin.version == v.ABI_VERSION
    assert plugin.capabilities == v.Capability.RESOURCES
    obj = plugin.new_object(uuid="6b0c1c6a-56e7-4f2b-9d26-0f1d8b1a4f00", name="vm")
    obj.acquire()
    assert obj.release() == "released"
    obj.free()
    plugin.unload()


def test_loads_a_package_from_the_env_plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_plugin(tmp_path, "pkgdrv", package=True)
    monkeypatch.setenv("VIRTLEASE_PLUGIN_DIR", str(tmp_path))
    plugin = v.load_driver("pkgdrv")
    assert plugin.name == "pkgdrv"
    plugin.unload()


def test_entry_point_drivers_load_by_name() -> None:
    plugin = v.load_driver("nop", capabilities=v.Capability.MIGRATE | v.Capability.HOTPLUG)
    assert plugin.capabilities & v.Capability.USES_STATE
    plugin.unload()


def test_not_found_lists_every_place_searched(tmp_path: Path) -> None:
    with pytest.raises(v.PluginNotFoundError) as info:
        load(tmp_path, "nosuchdriver")
    text = str(info.value)
    assert str(tmp_path / "nosuchdriver.py") in text
    assert str(tmp_path / "nosuchdriver") in text
    assert "virtlease.drivers" in text
    assert len(info.value.searched) == 3


def test_import_failure_chains_the_original_exception(tmp_path: Path) -> None:
    write_plugin(tmp_path, "broken", body="raise RuntimeError('kaboom at import')\n")
    with pytest.raises(v.PluginImportError, match="kaboom at import") as info:
        load(tmp_path, "broken")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_syntax_error_is_an_import_failure(tmp_path: Path) -> None:
    write_plugin(tmp_path, "syntax", body="def (:\n")
    with pytest.raises(v.PluginImportError) as info:
        load(tmp_path, "syntax")
    assert isinstance(info.value.__cause__, SyntaxError)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("X = 1\n", "no LOCK_DRIVER"),
        ("LOCK_DRIVER = 42\n", "must be a class"),
        ("class D:\n    version = 'one'\n    capabilities = 1\n    def new_object(self, s): pass\nLOCK_DRIVER = D\n",
         "version must be a positive int"),
        ("class D:\n    version = 1000000\n    capabilities = 1 << 9\n    def new_object(self, s): pass\n"
         "LOCK_DRIVER = D\n", "unknown bits"),
        ("class D:\n    version = 1000000\n    capabilities = 1\nLOCK_DRIVER = D\n", "no new_object"),
    ],
)
def test_invalid_lock_driver(tmp_path: Path, body: str, message: str) -> None:
    write_plugin(tmp_path, "invalid", body=body)
    with pytest.raises(v.PluginInvalidError, match=message):
        load(tmp_path, "invalid")


def test_major_version_mismatch_is_refused(tmp_path: Path) -> None:
    write_plugin(tmp_path, "future", version="3_000_000")
    with pytest.raises(v.PluginVersionError, match=r"requested ABI 2\.0\.0, driver offers 3\.0\.0"):
        load(tmp_path, "future")


def test_missing_capability_is_refused_at_load_time(tmp_path: Path) -> None:
    write_plugin(tmp_path, "basic")
    with pytest.raises(v.PluginVersionError, match="missing") as info:
        load(tmp_path, "basic", capabilities=v.Capability.MIGRATE)
    assert "MIGRATE" in str(info.value)


def test_newer_minor_than_offered_is_refused_by_default(tmp_path: Path) -> None:
    write_plugin(tmp_path, "older")
    with pytest.raises(v.PluginVersionError, match=r"2\.1\.0"):
        load(tmp_path, "older", version=v.encode_version(2, 1, 0))


def test_driver_load_hook_may_refuse(tmp_path: Path) -> None:
    hooks = ("def load(self, version, capabilities, config):\n"
             "        from virtlease.errors import PluginVersionError\n"
             "        raise PluginVersionError('not today')\n")
    write_plugin(tmp_path, "picky", hooks=hooks)
    with pytest.raises(v.PluginVersionError, match="not today"):
        load(tmp_path, "picky")


def test_driver_load_hook_failure_is_an_init_error(tmp_path: Path) -> None:
    hooks = ("def load(self, version, capabilities, config):\n"
             "        raise OSError('backend gone')\n")
    write_plugin(tmp_path, "initfail", hooks=hooks)
    with pytest.raises(v.PluginInitError, match="backend gone") as info:
        load(tmp_path, "initfail")
    assert isinstance(info.value.__cause__, OSError)


def test_load_hook_receives_config_without_plugin_dir(tmp_path: Path) -> None:
    hooks = ("def load(self, version, capabilities, config):\n"
             "        self.seen = (version, int(capabilities), dict(config))\n")
    write_plugin(tmp_path, "cfg", hooks=hooks)
    plugin = v.load_driver("cfg", config={"plugin_dir": str(tmp_path), "answer": 42})
    assert plugin.driver.seen == (v.ABI_VERSION, 0, {"answer": 42})
    plugin.unload()


def test_unload_refused_while_objects_are_alive(tmp_path: Path) -> None:
    write_plugin(tmp_path, "busy")
    plugin = load(tmp_path, "busy")
    obj = plugin.new_object(uuid="6b0c1c6a-56e7-4f2b-9d26-0f1d8b1a4f00", name="vm")
    with pytest.raises(v.PluginBusyError, match="1 lock object"):
        plugin.unload()
    obj.free()
    plugin.unload()


def test_unload_hook_may_refuse(tmp_path: Path) -> None:
    hooks = "def unload(self):\n        raise RuntimeError('still flushing')\n"
    write_plugin(tmp_path, "sticky", hooks=hooks)
    plugin = load(tmp_path, "sticky")
    with pytest.raises(v.PluginBusyError, match="still flushing"):
        plugin.unload()


def test_loads_are_reference_counted(tmp_path: Path) -> None:
    path = write_plugin(tmp_path, "shared")
    origin = str(path.resolve())
    first = load(tmp_path, "shared")
    second = load(tmp_path, "shared")
    assert first.driver is not second.driver
    assert type(first.driver) is type(second.driver)  # one module import
    assert loader.loaded_count(origin) == 2
    first.unload()
    assert loader.loaded_count(origin) == 1
    second.unload()
    assert loader.loaded_count(origin) == 0


def test_invalid_driver_name_is_not_found() -> None:
    with pytest.raises(v.PluginNotFoundError):
        v.load_driver("../etc/passwd")
