"""Building the package from a clean copy of the repository, and clean Debian roots to install it in.

* :func:`export_tree` copies what a clone would have (tracked files plus new ones not ignored,
  as they are in the working tree): nothing of ``.venv``, ``dist/`` or caches.
* :func:`build` runs ``python -m build`` and ``deploy/build-deb.sh`` there (gzip: see
  build-deb.sh), optionally under another version (the upgrade's N+1).
* :func:`cached_root` is ``debootstrap --variant=minbase bookworm`` with the packages the .deb
  depends on, cached in ``~/.cache/virtlease-debroot/<key>`` (key: the package list) and never
  written to: the first run downloads ~40 MB and takes about a minute, later ones a second.
* :class:`DebRoot` is an overlay mount of such a root (plus, for the tests that start with the
  package installed, a layer holding version N's installation, made once per session), written
  to in a layer of its own: a fresh root in milliseconds.  Commands run chrooted into it, in a
  private mount namespace with its own ``/proc`` and whatever bind mounts the caller names, with
  a clean environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "virtlease-debroot"
SUITE = "bookworm"
TOOLS = ("git", "dpkg-buildpackage", "dh", "debootstrap", "lintian", "unshare", "chroot", "systemd-analyze",
         "systemd-socket-activate", "promtool", "man", "pipx")
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}


def missing_tools() -> str | None:
    """Why the package tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "the package tests need root (dpkg, chroot, mount namespaces)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"package tools missing: {' '.join(missing)} (run deploy/packaging-tools.sh)"
    return None


def run(cmd: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, output captured; AssertionError with its output when it fails and ``check``."""
    cp = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} failed ({cp.returncode}):\n{cp.stdout}\n{cp.stderr}")
    return cp


def export_tree(dest: Path, repo: Path = REPO) -> Path:
    """Copy the files a clone would have into ``dest`` (modes kept, symlinks as links)."""
    listed = run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    for rel in sorted({name for name in listed.split("\0") if name}):
        src, dst = repo / rel, dest / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree, not yet committed
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    return dest


VERSION_FILE = "src/virtlease/_version.py"


def tree_version(tree: Path) -> str:
    m = re.search(r'^__version__ = "([^"]+)"', (tree / VERSION_FILE).read_text(), re.M)
    assert m, f"no __version__ in {tree / VERSION_FILE}"
    return m.group(1)


def next_version(version: str) -> str:
    """A version that sorts after ``version`` for pip and dpkg alike (``0.1.0`` -> ``0.1.0.post1``)."""
    m = re.search(r"\.post(\d+)$", version)
    return f"{version[:m.start()]}.post{int(m.group(1)) + 1}" if m else f"{version}.post1"


@dataclass(frozen=True)
class Built:
    """What one build of a tree produced."""

    version: str
    wheel: Path
    sdist: Path
    deb: Path
    seconds: float


def build(tree: Path, out: Path, version: str | None = None) -> Built:
    """``python -m build`` and ``deploy/build-deb.sh`` in ``tree`` (its version file set to
    ``version`` first, if given); the artifacts go to ``out``."""
    t0 = time.monotonic()
    if version is not None:
        path = tree / VERSION_FILE
        path.write_text(re.sub(r'^__version__ = "[^"]+"', f'__version__ = "{version}"', path.read_text(), flags=re.M))
    version = tree_version(tree)
    out.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "build", "--outdir", str(out), str(tree)], cwd=tree)
    wheel = out / f"virtlease-{version}-py3-none-any.whl"
    sdist = out / f"virtlease-{version}.tar.gz"
    assert wheel.exists() and sdist.exists(), sorted(p.name for p in out.iterdir())
    env = {**os.environ, "DEB_COMPRESSION": "gzip"}
    deb = Path(run([str(tree / "deploy/build-deb.sh"), str(wheel), str(out)], cwd=tree, env=env).stdout.splitlines()[-1])
    assert deb.exists(), deb
    return Built(version, wheel, sdist, deb, time.monotonic() - t0)


def deb_field(deb: Path, name: str) -> str:
    return run(["dpkg-deb", "-f", str(deb), name]).stdout.strip()


def depends_names(deb: Path) -> list[str]:
    """The package names in the .deb's Depends (alternatives and versions dropped)."""
    return sorted({re.split(r"[ (:]", part.strip().split("|")[0].strip())[0]
                   for part in deb_field(deb, "Depends").split(",") if part.strip()})


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def cached_root(packages: Sequence[str]) -> tuple[Path, float]:
    """A minbase root of :data:`SUITE` with ``packages``, made once per package list; returns its
    path (never to be changed: copy it) and the seconds this call took."""
    t0 = time.monotonic()
    key = hashlib.sha256(f"{SUITE} minbase {' '.join(sorted(set(packages)))}".encode()).hexdigest()[:16]
    base = CACHE / key
    with _locked(CACHE / f"{key}.lock"):
        if not (base / ".complete").exists():
            shutil.rmtree(base, ignore_errors=True)
            partial = base / "root"
            partial.mkdir(parents=True)
            run(["debootstrap", "--variant=minbase", f"--include={','.join(sorted(set(packages)))}", SUITE,
                 str(partial)], timeout=1800)
            for deb in (partial / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            (base / "packages").write_text("\n".join(sorted(set(packages))) + "\n")
            (base / ".complete").touch()
    return base / "root", time.monotonic() - t0


def processes_in(path: Path) -> list[int]:
    """The pids of the processes whose root directory is ``path`` (chrooted into it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "root") == str(path):
                    found.append(int(entry.name))
    return found


def kill_processes_in(path: Path) -> list[int]:
    """SIGKILL every process chrooted into ``path`` (an agent, its guard); their pids."""
    killed = processes_in(path)
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return killed


class DebRoot:
    """A root that commands run chrooted into (see the module docstring): an overlay mount of
    ``layers`` (the cached root at the bottom, never written to) with a writable layer of its own
    in ``base/upper``; :meth:`close` unmounts it."""

    def __init__(self, base: Path, layers: Sequence[Path]) -> None:
        self.base = base
        self.path = base / "root"
        self.upper = base / "upper"
        for d in (self.path, self.upper, base / "work"):
            d.mkdir(parents=True)
        lower = ":".join(str(layer) for layer in layers)
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={lower},upperdir={self.upper},workdir={base / 'work'}", str(self.path)])

    def close(self) -> None:
        """Unmount the root (its processes must be gone); its writable layer stays in ``upper``."""
        if run(["umount", str(self.path)], check=False).returncode != 0:
            run(["umount", "--lazy", str(self.path)])

    def wrap(self, argv: Sequence[str], *, binds: Sequence[tuple[str | Path, str]] = (),
             env: dict[str, str] | None = None) -> list[str]:
        """The command line that runs ``argv`` in this root: a private mount namespace with a
        fresh /proc and each ``(source, target)`` bind-mounted (recursively) at ``target`` in the
        root, a clean environment (``CLEAN_ENV`` plus ``env``)."""
        script = ['set -e', 'mount -t proc proc "$0/proc"']
        for src, dst in binds:
            target = f'"$0"{shlex.quote(dst)}'
            script.append(f"mkdir -p {target}; mount --rbind {shlex.quote(str(src))} {target}")
        envs = [f"{k}={v}" for k, v in {**CLEAN_ENV, **(env or {})}.items()]
        script.append(f'exec chroot "$0" /usr/bin/env -i {shlex.join(envs)} "$@"')
        return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", "; ".join(script),
                str(self.path), *argv]

    def run(self, *argv: str, binds: Sequence[tuple[str | Path, str]] = (), env: dict[str, str] | None = None,
            check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run(self.wrap(argv, binds=binds, env=env), check=check, timeout=timeout)

    def popen(self, *argv: str, log: Path, binds: Sequence[tuple[str | Path, str]] = (),
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the root with stdout and stderr appended to ``log``."""
        with open(log, "ab") as out:
            return subprocess.Popen(self.wrap(argv, binds=binds, env=env), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)

    def talk(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start ``argv`` in the root with a text pipe to its stdin and from its stdout."""
        return subprocess.Popen(self.wrap(argv, env=env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)

    def install(self, deb: Path, *, binds: Sequence[tuple[str | Path, str]] = (),
                env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``dpkg -i`` of ``deb`` (copied into the root's /tmp first)."""
        inside = Path("/tmp") / deb.name
        shutil.copy2(deb, self.path / inside.relative_to("/"))
        return self.run("dpkg", "-i", str(inside), binds=binds, env=env, check=check)

    def version(self) -> str | None:
        """The virtlease version installed and configured, None when it is not (a removal that
        was refused leaves it so, selected for removal: ``deinstall ok installed``)."""
        cp = self.run("dpkg-query", "-W", "-f=${Status} ${Version}", "virtlease", check=False)
        status, _, version = cp.stdout.rpartition(" ")
        return version if cp.returncode == 0 and status.endswith(" ok installed") else None

