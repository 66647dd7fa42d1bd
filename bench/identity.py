"""Micro-benchmark of the disk identity resolver: microseconds per resolve, 64 disks on one mount.

``cold`` is a new ``Resolver`` for each round of 64 disks (the mount table
parsed and the mount's facts found once per round); ``warm`` is one resolver
reused (only a ``poll`` on mountinfo and the per-path ``realpath``/``stat``
remain).  Cases: files on a real ext4 loop mount (needs root, mkfs.ext4 and
losetup; skipped with a message otherwise), paths on an NFS mount described
by a mountinfo sample, and files on a local file system that falls back to
``path://``.

    .venv/bin/python bench/identity.py [--rounds N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from virtlease_etcd.identity import IdentityConfig, Resolver

DISKS = 64
SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "identity" / "samples" / "mountinfo-nfs"


def per_resolve_us(make: Callable[[], Resolver], paths: list[str], rounds: int) -> tuple[float, float, int]:
    """Median µs per resolve, cold and warm, and parses in the warm resolver."""
    cold = []
    for _ in range(rounds):
        start = time.perf_counter()
        with make() as resolver:
            for path in paths:
                resolver.resolve(path)
        cold.append((time.perf_counter() - start) / len(paths) * 1e6)
    warm = []
    with make() as resolver:
        for path in paths:
            resolver.resolve(path)
        for _ in range(rounds):
            start = time.perf_counter()
            for path in paths:
                resolver.resolve(path)
            warm.append((time.perf_counter() - start) / len(paths) * 1e6)
        parses = resolver.parses
    return statistics.median(cold), statistics.median(warm), parses


@contextlib.contextmanager
def ext4_mount(base: Path) -> Iterator[Path | None]:
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("mkfs.ext4", "losetup", "mount")):
        print("ext4 loop case skipped: needs root, mkfs.ext4, losetup and mount", file=sys.stderr)
        yield None
        return
    image, target = base / "ext4.img", base / "mnt"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True,
                            text=True).stdout.strip()
    try:
        target.mkdir()
        subprocess.run(["mount", device, str(target)], check=True)
        try:
            yield target
        finally:
            subprocess.run(["umount", str(target)], check=False)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        local = base / "local"
        local.mkdir()
        local_paths = []
        for n in range(DISKS):
            (local / f"disk{n}.img").write_bytes(b"")
            local_paths.append(str(local / f"disk{n}.img"))
        with ext4_mount(base) as mnt:
            if mnt is not None:
                paths = []
                for n in range(DISKS):
                    (mnt / f"disk{n}.qcow2").write_bytes(b"")
                    paths.append(str(mnt / f"disk{n}.qcow2"))
                kind = Resolver().resolve(paths[0]).kind
                rows.append((f"ext4 loop mount ({kind})", *per_resolve_us(Resolver, paths, args.rounds)))
        nfs = [f"/var/lib/libvirt/images/disk{n}.qcow2" for n in range(DISKS)]
        config = IdentityConfig(aliases={"filer1.example.com": "filer1"})
        rows.append(("nfs4 (mountinfo sample file)", *per_resolve_us(
            lambda: Resolver(config, mountinfo=str(SAMPLE)), nfs, args.rounds)))
        kind = Resolver().resolve(local_paths[0]).kind
        rows.append((f"local files ({kind})", *per_resolve_us(Resolver, local_paths, args.rounds)))
    print(f"{DISKS} disks on one mount, median of {args.rounds} rounds, µs per resolve")
    print(f"{'case':<34} {'cold':>8} {'warm':>8}  parses (warm resolver)")
    for name, cold, warm, parses in rows:
        print(f"{name:<34} {cold:>8.1f} {warm:>8.1f}  {parses}")


if __name__ == "__main__":
    main()
