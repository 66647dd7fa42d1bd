"""``make dist``: the wheel and the sdist, built from a clean copy of the repository, install into
a clean virtual environment and give both commands with every backend registered; one version
everywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from debroot import REPO, Built, deb_field, run, tree_version

COMMANDS = {"agent", "check", "demo", "etcd", "hold", "status", "switch-from-virtlockd"}


def test_one_version_everywhere(built: Built) -> None:
    assert built.version == tree_version(REPO)
    with zipfile.ZipFile(built.wheel) as whl:
        metadata = whl.read(f"virtlease-{built.version}.dist-info/METADATA").decode()
    assert f"\nVersion: {built.version}\n" in metadata
    assert deb_field(built.deb, "Version") == built.version
    print(f"\nbuilt {built.version} (wheel, sdist, .deb) in {built.seconds:.1f} s; .deb "
          f"{built.deb.stat().st_size / 1e6:.1f} MB (gzip; make deb uses xz), installed "
          f"{int(deb_field(built.deb, 'Installed-Size')) / 1024:.1f} MiB")


def test_wheel_holds_the_product_only(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as whl:
        tops = {name.split("/")[0] for name in whl.namelist()}
        metadata = whl.read(f"virtlease-{built.version}.dist-info/METADATA").decode()
        entry_points = whl.read(f"virtlease-{built.version}.dist-info/entry_points.txt").decode()
    assert tops == {"virtlease", "virtlease_nop", "virtlease_etcd", f"virtlease-{built.version}.dist-info"}
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert requires and all("<" in r and ">=" in r for r in requires), requires  # tested ranges, both ends
    for name in COMMANDS:
        assert f"\n{name} = " in entry_points
    with tarfile.open(built.sdist) as sdist:
        names = sdist.getnames()
    assert f"virtlease-{built.version}/src/virtlease/_version.py" in names
    assert not [n for n in names if "/tests/" in n or "/lab/" in n]


def test_wheel_installs_with_pipx(built: Built, tmp_path: Path) -> None:
    """``pipx install`` of the wheel (its dependencies from the index, within the stated ranges):
    a virtual environment of its own, both commands on PATH, every backend registered."""
    env = {**os.environ, "PIPX_HOME": str(tmp_path / "pipx"), "PIPX_BIN_DIR": str(tmp_path / "bin")}
    env.pop("VIRTUAL_ENV", None)
    run(["pipx", "install", "--python", "/usr/bin/python3", str(built.wheel)], env=env, timeout=600)
    bin_dir, venv = tmp_path / "bin", tmp_path / "pipx/venvs/virtlease"
    version = run([str(bin_dir / "virtlease"), "--version"]).stdout
    assert version.strip() == f"virtlease, version {built.version}"
    listed = run([str(bin_dir / "virtlease"), "--help"]).stdout
    assert all(f"  {name} " in listed for name in COMMANDS), listed
    assert "--socket PATH" in run([str(bin_dir / "virtlease-agent"), "--help"]).stdout
    drivers = run([str(venv / "bin/python"), "-c",
                   "import virtlease; "
                   "from importlib.metadata import entry_points; "
                   "names = sorted(e.name for e in entry_points(group='virtlease.drivers')); "
                   "print(names, virtlease.load_driver('nop').name)"]).stdout
    assert drivers.strip() == "['etcd', 'nop'] nop"
    broken = subprocess.run([str(venv / "bin/python"), "-m", "pip", "check"], capture_output=True, text=True)
    assert broken.returncode == 0, broken.stdout


def test_sdist_builds_the_same_wheel(built: Built, tmp_path: Path) -> None:
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(built.sdist)],
        timeout=600)
    rebuilt = tmp_path / built.wheel.name
    with zipfile.ZipFile(built.wheel) as a, zipfile.ZipFile(rebuilt) as b:
        assert sorted(a.namelist()) == sorted(b.namelist())
