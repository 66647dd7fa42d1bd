"""Fixtures of the package tests: the wheel, sdist and .deb built once per session from a clean
copy of the repository (and once more as version N+1 for the upgrade), and clean Debian roots
with the package installed.  Without root or the tools (deploy/packaging-tools.sh) every test
here is skipped with the reason; in CI such a skip is a failure (tests/conftest.py)."""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from debroot import (
    Built,
    DebRoot,
    build,
    cached_root,
    depends_names,
    export_tree,
    kill_processes_in,
    missing_tools,
    next_version,
    tree_version,
)

from virtlease_lab.libvirt.rig import missing_requirements

HERE = Path(__file__).resolve().parent
ROOT_EXTRAS = ("systemd",)
"""Installed in the clean root besides the .deb's dependencies: systemd's units (not running),
so that ``systemd-analyze verify --root`` sees a host's unit tree."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, with the reason, where the tools or (for the ``libvirt`` tests) the rig are missing."""
    why, why_rig = missing_tools(), missing_requirements()
    for item in items:
        if Path(str(item.fspath)).parent != HERE:
            continue
        reason = why or (why_rig if "libvirt" in item.keywords else None)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """Version N: wheel, sdist and .deb of the repository as a clone would have it.  Version
    N+1 (``built_next``) is built meanwhile in a thread, and lintian starts on the .deb at once,
    in the background (``lintian_run``): together they take about a minute."""
    base = tmp_path_factory.mktemp("build")
    tree = export_tree(base / "tree")
    nxt = tmp_path_factory.mktemp("build-next")
    next_tree = export_tree(nxt / "tree")
    thread = threading.Thread(target=_build_next, args=(next_tree, nxt / "dist", next_version(tree_version(tree))),
                              daemon=True)
    thread.start()
    result = build(tree, base / "dist")
    _next["thread"] = thread
    with open(base / "lintian.out", "w") as out, open(base / "lintian.err", "w") as err:
        proc = subprocess.Popen(["lintian", "--tag-display-limit", "0", "--show-overrides", str(result.deb)],
                                stdout=out, stderr=err)
    _lintian[result.deb] = (proc, base)
    yield result
    if proc.poll() is None:
        proc.kill()
        proc.wait()


_lintian: dict[Path, tuple[subprocess.Popen[bytes], Path]] = {}


@pytest.fixture
def lintian_run(built: Built) -> subprocess.CompletedProcess[str]:
    """lintian's run over the .deb of ``built`` (waited for)."""
    proc, base = _lintian[built.deb]
    code = proc.wait(600)
    return subprocess.CompletedProcess(proc.args, code, (base / "lintian.out").read_text(),
                                       (base / "lintian.err").read_text())


_next: dict[str, Any] = {}


def _build_next(tree: Path, out: Path, version: str) -> None:
    try:
        _next["built"] = build(tree, out, version=version)
    except BaseException as exc:  # reported by built_next
        _next["error"] = exc


@pytest.fixture(scope="session")
def built_next(built: Built) -> Built:
    """Version N+1 (``next_version``) of the same tree: what an upgrade installs."""
    _next["thread"].join(1200)
    if "error" in _next:
        raise _next["error"]
    result: Built = _next["built"]
    assert result.version == next_version(built.version)
    return result


@pytest.fixture(scope="session")
def cached(built: Built) -> Path:
    """The cached clean bookworm root for the .deb's dependencies (never written to)."""
    packages = [*depends_names(built.deb), *ROOT_EXTRAS]
    path, seconds = cached_root(packages)
    print(f"\nclean bookworm root ({', '.join(packages)}): {seconds:.1f} s")
    return path


@pytest.fixture(scope="session")
def installed_layer(cached: Path, built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An overlay layer holding version N installed on the clean root (``dpkg -i`` once)."""
    root = DebRoot(tmp_path_factory.mktemp("installed"), [cached])
    try:
        root.install(built.deb)
    finally:
        kill_processes_in(root.path)
        root.close()
    return root.upper


@contextlib.contextmanager
def overlay_root(base: Path, layers: list[Path]) -> Iterator[DebRoot]:
    root = DebRoot(base, layers)
    try:
        yield root
    finally:
        kill_processes_in(root.path)
        root.close()


@pytest.fixture
def clean_root(cached: Path, tmp_path: Path) -> Iterator[DebRoot]:
    """A fresh clean root, nothing of virtlease in it; unmounted after the test, every process
    still running from it killed."""
    with overlay_root(tmp_path / "clean", [cached]) as root:
        yield root


@pytest.fixture
def root(cached: Path, installed_layer: Path, tmp_path: Path) -> Iterator[DebRoot]:
    """A fresh clean root with version N installed."""
    with overlay_root(tmp_path / "installed", [installed_layer, cached]) as root:
        yield root


