"""Disk identity: µs per resolve (64 disks on one mount), and a 64-key acquire+release through the driver vs by hand.

``cold`` is a new ``Resolver`` for each round of 64 disks (the mount table
parsed and the mount's and directory's facts found once per round);
``warm`` is one resolver reused, one ``resolve`` per disk (only a ``poll``
on mountinfo, the per-path ``realpath``/``stat`` and an ``lstat`` of the
directory id remain); ``lock op`` is the same resolver's ``resolve_many`` of
the 64 disks at once, as a lock operation resolves them (the directory id
checked once).  Cases: files on a real ext4 loop mount (needs root,
mkfs.ext4 and losetup; skipped with a message otherwise), paths on an NFS
mount described by a mountinfo sample (they do not exist here: named by
the mount source), and files on the local file system.

The driver part times one domain's acquire + release of N disks through the
etcd driver (identity resolution, records, the grant and release
transactions) against the *same* two etcd transactions built by hand with
python-etcd3 (per key: compare no holder, put holder on a lease, put gen;
then compare each token and delete), on one embedded etcd.  The ratio is
driver p50 / hand p50, the two called in turn (load from elsewhere hits
both alike).  Cases: one file on the ext4 loop mount (2 keys), then each
about 64 keys (etcd's default ``--max-txn-ops`` of 128 holds 64): files on
the ext4 loop mount with ``legacy_path_keys`` off (32 disks: directory id +
name each) and on (21 disks: + legacy path key), and 64 paths that do not
exist (named by their path: one key each).

    .venv/bin/python bench/identity.py [--rounds N] [--budget SECONDS] [--endpoints HOST:PORT]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from etcd3 import transactions as tx

import virtlease
from measure import Latency, progress
from virtlease_etcd.config import load_config
from virtlease_etcd.devtools.embedded import EmbeddedEtcd
from virtlease_etcd.etcd.client import EtcdClient
from virtlease_etcd.identity import IdentityConfig, Resolver
from virtlease_etcd.model import keyspace as ks

DISKS = 64
SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "identity" / "samples" / "mountinfo-nfs"


def per_resolve_us(make: Callable[[], Resolver], paths: list[str], rounds: int) -> tuple[float, float, float, int]:
    """Median µs per disk: cold, warm and warm in one ``resolve_many``; parses in the warm resolver."""
    cold = []
    for _ in range(rounds):
        start = time.perf_counter()
        with make() as resolver:
            for path in paths:
                resolver.resolve(path)
        cold.append((time.perf_counter() - start) / len(paths) * 1e6)
    warm = []
    many = []
    with make() as resolver:
        for path in paths:
            resolver.resolve(path)
        for _ in range(rounds):
            start = time.perf_counter()
            for path in paths:
                resolver.resolve(path)
            warm.append((time.perf_counter() - start) / len(paths) * 1e6)
            start = time.perf_counter()
            resolver.resolve_many(paths)
            many.append((time.perf_counter() - start) / len(paths) * 1e6)
        parses = resolver.parses
    return statistics.median(cold), statistics.median(warm), statistics.median(many), parses


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


class ByHand:
    """The driver's grant and release transactions for ``keys`` disk keys, built by hand on the
    driver's own gRPC client (so the difference is the driver's work, not the client library's)."""

    def __init__(self, client: EtcdClient, prefix: str, keys: int) -> None:
        self.client = client
        self.lease, _ttl = client.lease_grant(10, timeout=5)
        space = ks.Keys(prefix)
        rids = [hashlib.sha256(f"disk\0hand/{prefix}/{n}".encode()).hexdigest() for n in range(keys)]
        self.holders = [space.holder(rid, ks.EXCLUSIVE, "u") for rid in rids]
        self.ranges = [(space.resource(rid), ks.range_end(space.resource(rid))) for rid in rids]
        self.gens = [space.gen_key(rid, ks.EXCLUSIVE) for rid in rids]
        self.handoffs = (space.handoffs, ks.range_end(space.handoffs))
        self.value = json.dumps({"kind": "disk", "res": "/mnt/images/disk.qcow2 (fs-uuid://...)", "mode": "x",
                                 "host": "hand", "lease": self.lease, "uuid": "u", "name": "vm"})

    def op(self) -> None:
        compare = [tx.Version(start, end) == 0 for start, end in self.ranges]
        success = [op for holder, gen in zip(self.holders, self.gens, strict=True)
                   for op in (tx.Put(holder, self.value, lease=self.lease), tx.Put(gen, self.value))]
        failure = [tx.Get(start, end) for start, end in [*self.ranges, self.handoffs]]
        granted = self.client.txn(compare, success, failure, timeout=5)
        token = int(granted.header.revision)
        released = self.client.txn([tx.Mod(h) == token for h in self.holders], [tx.Delete(h) for h in self.holders],
                                   [tx.Get(h) for h in self.holders], timeout=5)
        if not (granted.succeeded and released.succeeded):
            raise RuntimeError("the hand-built grant or release failed")

    def close(self) -> None:
        self.client.lease_revoke(self.lease, timeout=5)


def alternating(a: Callable[[], object], b: Callable[[], object], budget: float) -> tuple[list[float], list[float]]:
    """Durations of ``a`` and ``b`` called in turn (so load from elsewhere hits both alike)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(3):
        a()
        b()
    end = time.monotonic() + budget
    while len(times[0]) < 20 or time.monotonic() < end:
        for fn, out in ((a, times[0]), (b, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return times


def driver_vs_hand(endpoint: str, cases: list[tuple[str, list[str], dict[str, Any]]],
                   budget: float) -> list[tuple[str, int, int, float, float]]:
    """Per case: (name, disks, keys, driver p50 ms, hand p50 ms)."""
    client = EtcdClient(load_config({"endpoints": endpoint}))
    run = secrets.token_hex(4)
    rows = []
    try:
        for n, (name, paths, settings) in enumerate(cases):
            prefix = f"/virtlease-bench-identity/{run}/{n}"
            plugin = virtlease.load_driver("etcd", capabilities=virtlease.Capability.RESOURCES, config={
                "endpoints": endpoint, "prefix": prefix, "host_id": f"bench-{run}", "ttl": 10, **settings})
            try:
                obj = plugin.new_object(uuid=str(uuid.uuid4()), name="bench-vm")
                for path in paths:
                    obj.add_resource(virtlease.ResourceType.DISK, path)
                obj.acquire()
                res = f"{prefix}/v1/res/"
                keys = len(client.get_range(res, ks.range_end(res), timeout=5)[0])
                obj.release()
                hand = ByHand(client, prefix + "-hand", keys)

                def cycle(o: Any = obj) -> None:
                    o.acquire()
                    o.release()

                driver, by_hand = (Latency.of(t) for t in alternating(cycle, hand.op, budget))
                hand.close()
                obj.free()
            finally:
                plugin.driver.release_all()
                plugin.unload()
            rows.append((name, len(paths), keys, driver.p50_ms, by_hand.p50_ms))
    finally:
        client.close()
    return rows


def disk_files(directory: Path, suffix: str) -> list[str]:
    """``DISKS`` empty files in ``directory``."""
    directory.mkdir(exist_ok=True)
    for n in range(DISKS):
        (directory / f"disk{n}{suffix}").write_bytes(b"")
    return [str(directory / f"disk{n}{suffix}") for n in range(DISKS)]


def driver_cases(base: Path, ext4: list[str] | None) -> list[tuple[str, list[str], dict[str, Any]]]:
    """The driver-vs-hand cases (see the module doc); ``ext4``: files on the loop mount, if any."""
    cases: list[tuple[str, list[str], dict[str, Any]]] = []
    if ext4 is not None:
        kind = Resolver().resolve(ext4[0]).kind
        cases.append((f"ext4 ({kind}), 1 disk", ext4[:1], {"legacy_path_keys": False}))
        cases.append((f"ext4 ({kind}), legacy keys off", ext4[: DISKS // 2], {"legacy_path_keys": False}))
        cases.append((f"ext4 ({kind}), legacy keys on", ext4[: DISKS // 3], {}))
    cases.append(("no such files (path://)", [f"{base}/absent/disk{n}.qcow2" for n in range(DISKS)], {}))
    return cases


def print_driven(rows: list[dict[str, Any]]) -> None:
    print("acquire+release of one domain's disks: driver vs the same etcd transactions by hand, p50 ms")
    print(f"{'case':<40} {'disks':>5} {'keys':>5} {'driver':>8} {'hand':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['case']:<40} {r['disks']:>5} {r['keys']:>5} {r['driver_p50_ms']:>8.2f} {r['hand_p50_ms']:>8.2f} "
              f"{r['ratio']:>5.2f}x")


def driven_rows(endpoint: str, cases: list[tuple[str, list[str], dict[str, Any]]],
                budget: float) -> list[dict[str, Any]]:
    return [{"case": name, "disks": disks, "keys": keys, "driver_p50_ms": round(driver, 3),
             "hand_p50_ms": round(hand, 3), "ratio": round(driver / hand, 2)}
            for name, disks, keys, driver, hand in driver_vs_hand(endpoint, cases, budget)]


def driver_section(cluster: Any, plan: Any) -> list[dict[str, Any]]:
    """bench/run.py's ``identity`` section: the driver-vs-hand rows on the run's etcd."""
    with tempfile.TemporaryDirectory() as tmp, ext4_mount(Path(tmp)) as mnt:
        ext4 = disk_files(mnt, ".qcow2") if mnt is not None else None
        rows = driven_rows(cluster.endpoint, driver_cases(Path(tmp), ext4), 1.5 if plan.quick else 5.0)
    for r in rows:
        progress(f"identity {r['case']}: {r['disks']} disks, driver {r['driver_p50_ms']:.2f} ms vs by hand "
                 f"{r['hand_p50_ms']:.2f} ms = {r['ratio']:.2f}x")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per driver/hand cell")
    parser.add_argument("--endpoints", help="an etcd to use (default: start an embedded one)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        local_paths = disk_files(base / "local", ".img")
        with ext4_mount(base) as mnt:
            ext4 = disk_files(mnt, ".qcow2") if mnt is not None else None
            if ext4 is not None:
                kind = Resolver().resolve(ext4[0]).kind
                rows.append((f"ext4 loop mount ({kind})", *per_resolve_us(Resolver, ext4, args.rounds)))
            cases = driver_cases(base, ext4)
            if args.endpoints:
                driven = driven_rows(args.endpoints.split(",")[0], cases, args.budget)
            else:
                with EmbeddedEtcd(size=1) as etcd:
                    driven = driven_rows(etcd.endpoints, cases, args.budget)
        nfs = [f"/var/lib/libvirt/images/disk{n}.qcow2" for n in range(DISKS)]
        config = IdentityConfig(aliases={"filer1.example.com": "filer1"})
        rows.append(("nfs4 (mountinfo sample file)", *per_resolve_us(
            lambda: Resolver(config, mountinfo=str(SAMPLE)), nfs, args.rounds)))
        kind = Resolver().resolve(local_paths[0]).kind
        rows.append((f"local files ({kind})", *per_resolve_us(Resolver, local_paths, args.rounds)))
    print(f"{DISKS} disks on one mount, median of {args.rounds} rounds, µs per resolve")
    print(f"{'case':<34} {'cold':>8} {'warm':>8} {'lock op':>8}  parses (warm resolver)")
    for name, cold, warm, many, parses in rows:
        print(f"{name:<34} {cold:>8.1f} {warm:>8.1f} {many:>8.1f}  {parses}")
    print()
    print_driven(driven)


if __name__ == "__main__":
    main()
