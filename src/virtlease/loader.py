"""Finding, loading, negotiating with and unloading lock drivers.

The Python counterpart of libvirt's ``lock_manager.c``: a driver is found by
name among the ``virtlease.drivers`` entry points or in a plugin directory
(``NAME.py`` or a package ``NAME/``, like ``lock-manager/NAME.so``), its
``LOCK_DRIVER`` is checked against the ABI, version and capabilities are
negotiated, and the driver is initialised with its configuration.  Each way a
load can fail has its own exception type (see ``errors``).

Modules are cached and reference counted: loading ``etcd`` twice imports it
once but gives two independent driver instances (two host sessions, say).

See docs/DESIGN.md §3 (The ABI).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from .abi import (
    ABI_VERSION,
    ENTRY_POINT_GROUP,
    Capability,
    NewFlags,
    ObjectSpec,
    ObjectType,
    format_version,
    version_major,
)
from .errors import (
    PluginBusyError,
    PluginImportError,
    PluginInitError,
    PluginInvalidError,
    PluginNotFoundError,
    PluginVersionError,
    VirtleaseError,
)
from .objects import LockObject
from .validation import (
    check_flags,
    check_name,
    check_object_type,
    check_optional_int,
    check_optional_text,
    check_uuid,
)

log = logging.getLogger(__name__)

#: Environment variable naming extra plugin directories (``os.pathsep`` separated).
PLUGIN_DIR_ENV = "VIRTLEASE_PLUGIN_DIR"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class _Cached:
    module: ModuleType
    origin: str
    refs: int = 0


_cache: dict[str, _Cached] = {}
_cache_lock = threading.Lock()


def _plugin_dirs(config: Mapping[str, Any]) -> list[Path]:
    dirs: list[Path] = []
    configured = config.get("plugin_dir")
    if configured:
        dirs.append(Path(configured))
    env = os.environ.get(PLUGIN_DIR_ENV)
    if env:
        dirs.extend(Path(p) for p in env.split(os.pathsep) if p)
    return dirs


def _import_file(name: str, path: Path, is_package: bool) -> ModuleType:
    modname = f"virtlease_plugin_{name}"
    if is_package:
        spec = importlib.util.spec_from_file_location(
            modname, path / "__init__.py", submodule_search_locations=[str(path)]
        )
    else:
        spec = importlib.util.spec_from_file_location(modname, path)
    if spec is None or spec.loader is None:
        raise PluginInvalidError(f"lock driver {name!r} at {path} is not an importable module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(modname, None)
        raise PluginImportError(
            f"lock driver {name!r} at {path} failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _find_module(name: str, config: Mapping[str, Any]) -> _Cached:
    """Import (or reuse) the module of driver ``name``."""
    searched: list[str] = []
    for directory in _plugin_dirs(config):
        for candidate, is_package in ((directory / f"{name}.py", False), (directory / name, True)):
            searched.append(str(candidate) + ("/" if is_package else ""))
            if is_package and not (candidate / "__init__.py").is_file():
                continue
            if not is_package and not candidate.is_file():
                continue
            origin = str(candidate.resolve())
            cached = _cache.get(origin)
            if cached is None:
                cached = _Cached(_import_file(name, candidate, is_package), origin)
                _cache[origin] = cached
            return cached
    searched.append(f"entry points in group {ENTRY_POINT_GROUP!r}")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name != name:
            continue
        origin = f"entry point {ep.value}"
        cached = _cache.get(origin)
        if cached is None:
            modname = ep.module
            try:
                module = importlib.import_module(modname)
            except BaseException as exc:
                raise PluginImportError(
                    f"lock driver {name!r} ({origin}) failed to import: {type(exc).__name__}: {exc}"
                ) from exc
            cached = _Cached(module, origin)
            _cache[origin] = cached
        return cached
    raise PluginNotFoundError(name, searched)


def _driver_class(name: str, cached: _Cached) -> type:
    attr = getattr(cached.module, "LOCK_DRIVER", None)
    where = f"lock driver {name!r} ({cached.origin})"
    if attr is None:
        raise PluginInvalidError(f"{where} has no LOCK_DRIVER attribute")
    if not isinstance(attr, type):
        raise PluginInvalidError(f"{where}: LOCK_DRIVER must be a class, got {type(attr).__name__}")
    version = getattr(attr, "version", None)
    if isinstance(version, bool) or not isinstance(version, int) or version <= 0:
        raise PluginInvalidError(f"{where}: LOCK_DRIVER.version must be a positive int, got {version!r}")
    caps = getattr(attr, "capabilities", None)
    if not isinstance(caps, int) or isinstance(caps, bool):
        raise PluginInvalidError(f"{where}: LOCK_DRIVER.capabilities must be Capability bits")
    known = 0
    for cap in Capability:
        known |= int(cap)
    if int(caps) & ~known:
        raise PluginInvalidError(f"{where}: LOCK_DRIVER.capabilities has unknown bits {int(caps) & ~known:#x}")
    if not callable(getattr(attr, "new_object", None)):
        raise PluginInvalidError(f"{where}: LOCK_DRIVER has no new_object method")
    return attr


def _negotiate(name: str, driver: Any, version: int, capabilities: Capability, config: dict[str, Any]) -> None:
    offered_v: int = driver.version
    offered_c = Capability(int(driver.capabilities))
    if version_major(version) != version_major(offered_v):
        raise PluginVersionError(
            f"lock driver {name!r}: requested ABI {format_version(version)}, driver offers "
            f"{format_version(offered_v)} (major versions differ)"
        )
    hook = getattr(driver, "load", None)
    if hook is None:
        missing = capabilities & ~offered_c
        if version > offered_v or missing:
            raise PluginVersionError(
                f"lock driver {name!r}: requested ABI {format_version(version)} with "
                f"capabilities {capabilities!r}, driver offers {format_version(offered_v)} "
                f"with {offered_c!r}" + (f" (missing {missing!r})" if missing else "")
            )
        return
    try:
        hook(version, capabilities, config)
    except VirtleaseError:
        raise  # PluginVersionError (refusal), ConfigError, BackendUnavailableError...
    except Exception as exc:
        raise PluginInitError(
            f"lock driver {name!r} failed to initialise: {type(exc).__name__}: {exc}"
        ) from exc


def load_driver(
    name: str,
    *,
    config: Mapping[str, Any] | None = None,
    version: int = ABI_VERSION,
    capabilities: Capability = Capability(0),
) -> Plugin:
    """Load lock driver ``name`` and negotiate ``version`` / ``capabilities``.

    ``config`` goes to the driver's ``load`` hook (``plugin_dir`` is read by
    the loader itself).  Raises a :class:`PluginError` subclass saying at
    which level the load failed.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PluginNotFoundError(str(name), [f"(invalid driver name {name!r}: use letters, digits, _)"])
    if isinstance(version, bool) or not isinstance(version, int) or version <= 0:
        raise PluginVersionError(f"lock driver {name!r}: requested version {version!r} is not an encoded ABI version")
    caps = Capability(int(check_flags(capabilities, Capability, "capabilities")))
    cfg: dict[str, Any] = dict(config or {})
    with _cache_lock:
        cached = _find_module(name, cfg)
        cls = _driver_class(name, cached)
        try:
            driver = cls()
        except Exception as exc:
            raise PluginInitError(f"lock driver {name!r}: LOCK_DRIVER() raised {type(exc).__name__}: {exc}") from exc
        driver_cfg = {k: v for k, v in cfg.items() if k != "plugin_dir"}
        _negotiate(name, driver, version, caps, driver_cfg)
        cached.refs += 1
    log.debug("loaded lock driver %s from %s (refs %d)", name, cached.origin, cached.refs)
    return Plugin(name, driver, cached, requested=caps)


class Plugin:
    """A loaded driver instance.  Use :func:`load_driver` to make one."""

    def __init__(self, name: str, driver: Any, cached: _Cached, requested: Capability) -> None:
        self.name = name
        self.driver = driver
        self.version: int = driver.version
        self.capabilities = Capability(int(driver.capabilities))
        self.requested_capabilities = requested
        self._cached = cached
        self._objects: set[LockObject] = set()
        self._lock = threading.Lock()
        self._unloaded = False

    def __repr__(self) -> str:
        return f"<Plugin {self.name} {format_version(self.version)} {self.capabilities!r}>"

    @property
    def objects(self) -> list[LockObject]:
        """Lock objects of this plugin not yet freed."""
        with self._lock:
            return list(self._objects)

    def new_object(
        self,
        type: ObjectType = ObjectType.DOMAIN,
        *,
        uuid: Any = None,
        name: str | None = None,
        id: int | None = None,
        pid: int | None = None,
        uri: str | None = None,
        flags: NewFlags = NewFlags(0),
    ) -> LockObject:
        """Create the lock object of one VM.  ``uuid`` and ``name`` are
        required; ``pid`` is the process a failure action acts on."""
        if self._unloaded:
            raise PluginBusyError(f"lock driver {self.name!r} was unloaded; load it again")
        spec = ObjectSpec(
            type=check_object_type(type),
            uuid=check_uuid(uuid),
            name=check_name(name),
            id=check_optional_int(id, "id", minimum=-1),
            pid=check_optional_int(pid, "pid", minimum=1),
            uri=check_optional_text(uri, "uri"),
            flags=check_flags(flags, NewFlags),
        )
        obj = LockObject(spec, self.driver.new_object(spec), driver_name=self.name,
                         capabilities=self.capabilities, on_free=self._forget)
        with self._lock:
            self._objects.add(obj)
        return obj

    def _forget(self, obj: LockObject) -> None:
        with self._lock:
            self._objects.discard(obj)

    def unload(self) -> None:
        """Unload; refused with PluginBusyError while objects are alive or
        if the driver's ``unload`` hook refuses."""
        with _cache_lock:
            if self._unloaded:
                return
            with self._lock:
                alive = len(self._objects)
            if alive:
                raise PluginBusyError(
                    f"lock driver {self.name!r} still has {alive} lock object(s); free them first"
                )
            hook = getattr(self.driver, "unload", None)
            if hook is not None:
                try:
                    hook()
                except Exception as exc:
                    raise PluginBusyError(
                        f"lock driver {self.name!r} refused to unload: {type(exc).__name__}: {exc}"
                    ) from exc
            self._unloaded = True
            self._cached.refs -= 1
            if self._cached.refs <= 0:
                _cache.pop(self._cached.origin, None)
            log.debug("unloaded lock driver %s (refs %d)", self.name, self._cached.refs)

    def __enter__(self) -> Plugin:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for obj in self.objects:
            obj.free()
        self.unload()


def loaded_count(name_or_origin: str) -> int:
    """Reference count of a cached driver module (for tests and status)."""
    with _cache_lock:
        return sum(c.refs for o, c in _cache.items() if name_or_origin in o)
