"""The fencing lab's kernel and initramfs, built once per machine and kept in a cache.

The guest runs Debian's stock kernel (the package ``linux-image-amd64`` depends on, fetched with
``apt-get download`` -- this machine's own kernel has no modules, no SCSI target and no
watchdog) with a busybox initramfs that holds ``init.sh`` (the guest's ``/init``), a static
busybox and the few modules the lab needs with their dependencies.  Everything else -- Python,
the project's virtualenv, sg3-utils, dmsetup -- comes from this machine's root file system,
which the guest mounts read-only over 9p.

:func:`build` returns an :class:`Image` (kernel + initramfs paths); it reuses the cache when the
kernel package, ``init.sh`` and the module list are unchanged, so a warm build costs nothing.
Cache: ``$XDG_CACHE_HOME/virtlease-fencing-lab`` (default ``~/.cache/...``), or ``cache_dir``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "virtlease-fencing-lab"
MODULES = ("virtio_pci", "virtio_net", "virtio_console", "9pnet_virtio", "9p", "i6300esb", "sd_mod", "sg",
           "tcm_loop", "target_core_file", "dm_mod", "dm_multipath", "dm_round_robin")
"""What init.sh loads: virtio, the 9p root, the watchdog, SCSI disks, LIO, dm-multipath."""
BUSYBOX = Path("/bin/busybox")
"""busybox-static's binary (the initramfs needs a static one)."""
REQUIRED_TOOLS = ("qemu-system-x86_64", "apt-get", "apt-cache", "dpkg-deb", "depmod", "dmsetup")


class ImageError(RuntimeError):
    """The lab's kernel or initramfs could not be built."""


@dataclass(frozen=True)
class Image:
    """A bootable kernel and initramfs."""

    kernel: Path
    initrd: Path
    version: str
    """The kernel release (``uname -r`` in the guest)."""


def missing_requirements() -> str | None:
    """Why the lab cannot run on this machine (not root, a tool missing), or None."""
    if os.geteuid() != 0:
        return "the fencing lab needs root (apt-get download, 9p export of /)"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if not BUSYBOX.is_file():
        missing.append("busybox (static)")
    if missing:
        return f"fencing lab tools missing: {' '.join(missing)} (run deploy/fencing-lab-packages.sh)"
    return None


def _run(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImageError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stdout


def kernel_package() -> str:
    """The kernel package ``linux-image-amd64`` depends on (e.g. ``linux-image-6.1.0-57-amd64``)."""
    for line in _run(["apt-cache", "depends", "linux-image-amd64"]).splitlines():
        dep = line.strip().removeprefix("Depends: ")
        if dep != line.strip() and dep.startswith("linux-image-") and dep[len("linux-image-")].isdigit():
            return dep
    raise ImageError("apt-cache knows no linux-image-amd64 dependency: run apt-get update")


def _fingerprint(package: str) -> str:
    digest = hashlib.sha256()
    digest.update(package.encode())
    digest.update((HERE / "init.sh").read_bytes())
    digest.update(" ".join(MODULES).encode())
    digest.update(BUSYBOX.read_bytes()[:4096])
    return digest.hexdigest()[:16]


def build(cache_dir: Path | None = None) -> Image:
    """The lab image, from the cache when it is current (see the module docstring)."""
    cache = Path(cache_dir or DEFAULT_CACHE)
    package = kernel_package()
    version = package.removeprefix("linux-image-")
    target = cache / _fingerprint(package)
    kernel, initrd = target / f"vmlinuz-{version}", target / "initrd.gz"
    if kernel.is_file() and initrd.is_file():
        return Image(kernel, initrd, version)
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.iterdir():  # one image at a time: an older kernel's is dropped
        if stale.is_dir() and stale != target:
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="build.") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # apt's _apt user must be able to write the download here
        log.info("fetching %s (once per machine; cached in %s)", package, cache)
        _run(["apt-get", "download", "-q", package], cwd=work)
        deb = next(work.glob(f"{package}_*.deb"))
        tree = work / "k"
        _run(["dpkg-deb", "-x", str(deb), str(tree)])
        _run(["depmod", "-b", str(tree), version])
        staging = work / "out"
        staging.mkdir()
        shutil.copy2(tree / "boot" / f"vmlinuz-{version}", staging / kernel.name)
        (staging / initrd.name).write_bytes(_initramfs(tree / "lib" / "modules" / version, version))
        target.mkdir(parents=True, exist_ok=True)
        for name in (kernel.name, initrd.name):
            os.replace(staging / name, target / name)
    return Image(kernel, initrd, version)


def _closure(moddir: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The module files MODULES need (dependencies included) and their modules.dep lines."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        name, _, rest = line.partition(":")
        deps[name] = rest.split()
    by_name = {Path(k).name.split(".ko")[0].replace("-", "_"): k for k in deps}
    builtin = {Path(line.strip()).name.split(".ko")[0].replace("-", "_")
               for line in (moddir / "modules.builtin").read_text().splitlines() if line.strip()}
    seen: list[str] = []

    def add(path: str) -> None:
        if path not in seen:
            seen.append(path)
            for dep in deps[path]:
                add(dep)

    for wanted in MODULES:
        if wanted in by_name:
            add(by_name[wanted])
        elif wanted not in builtin:
            raise ImageError(f"kernel module {wanted} is neither a module nor built in")
    return seen, {k: deps[k] for k in seen}


def _initramfs(moddir: Path, version: str) -> bytes:
    """A gzip'd newc cpio: /init, busybox, the modules and their modules.dep."""
    files, deps = _closure(moddir)
    entries: list[tuple[str, int, bytes]] = []  # (path, mode, data); data None for dirs
    dirs = {"bin", "sbin", "dev", "proc", "sys", "host", "tmp", "mnt", "lib", "lib/modules",
            f"lib/modules/{version}"}
    for rel in files:
        parts = Path(f"lib/modules/{version}/{rel}").parent.parts
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    for d in sorted(dirs):
        entries.append((d, stat.S_IFDIR | 0o755, b""))
    entries.append(("init", stat.S_IFREG | 0o755, (HERE / "init.sh").read_bytes()))
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes()))
    for rel in files:
        entries.append((f"lib/modules/{version}/{rel}", stat.S_IFREG | 0o644, (moddir / rel).read_bytes()))
    dep_text = "".join(f"{k}: {' '.join(v)}\n" for k, v in deps.items())
    entries.append((f"lib/modules/{version}/modules.dep", stat.S_IFREG | 0o644, dep_text.encode()))
    return gzip.compress(_cpio(entries), compresslevel=1)


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """The newc format (what the kernel unpacks), without a cpio binary."""
    out = io.BytesIO()

    def pad(n: int) -> None:
        out.write(b"\0" * ((4 - n % 4) % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        header = (f"070701{ino:08x}{mode:08x}{0:08x}{0:08x}{1:08x}{0:08x}{len(data):08x}"
                  f"{0:08x}{0:08x}{0:08x}{0:08x}{len(raw):08x}{0:08x}").encode()
        out.write(header + raw)
        pad(len(header) + len(raw))
        out.write(data)
        pad(len(data))
    return out.getvalue()


if __name__ == "__main__":  # fetch and cache ahead of the tests (.ci/run does)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    built = build()
    print(f"fencing lab image: kernel {built.version}: {built.kernel}, {built.initrd}")
