"""Scenario 9: 20 small domains per host started at once against a pool of 30 disks.

Each of the 40 domains uses one disk of the pool, drawn with a fixed seed so that disks are
wanted by several domains on the same host and across hosts (asserted).  All 40 ``virsh start``
run concurrently; then a random half of the running ones are destroyed concurrently and every
shut-off one is started again, concurrently.  Throughout, a separate process reads every record
from etcd about every 10 ms: no disk ever has two records of which one is exclusive (two domains,
on one host or on two).  After each round, from both hosts' ``virsh list``: the running domains
are exactly those whose start worked, no disk is used by two of them, etcd's holders are exactly
the running domains, every refused start said "resource busy" and named the domain (and host)
holding its disk, and at least one start worked and one was refused."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from agentrig import AgentRig
from rig import wait_for

pytestmark = pytest.mark.libvirt
PER_HOST, DISKS, SEED = 20, 30, 9

Dom = tuple[str, str]  # (host, domain name)


SAMPLER = """
import json, select, sys, time
from virtlease_etcd import keyspace as ks
from virtlease_etcd.client import EtcdClient
from virtlease_etcd.config import load_config
endpoints, prefix, every = sys.argv[1], sys.argv[2], float(sys.argv[3])
client = EtcdClient(load_config({"endpoints": endpoints, "host_id": "sampler"}, environ={}))
keys = ks.Keys(prefix)
while True:
    held = {}
    kvs, _ = client.get_range(keys.res, ks.range_end(keys.res), timeout=2)  # one linearizable read
    for kv in kvs:
        rec = ks.decode(kv.value, kv.key.decode())
        if rec.get("legacy") is None:  # a legacy path key: the identity key's record names the disk
            held.setdefault(rec["res"], []).append((rec["host"], rec["name"], rec["mode"]))
    bad = {r: recs for r, recs in held.items() if len(recs) > 1 and any(m == ks.EXCLUSIVE for _, _, m in recs)}
    modes = sorted({m for recs in held.values() for _, _, m in recs})
    print(json.dumps([time.monotonic(), sum(map(len, held.values())), bad, modes]), flush=True)
    if select.select([sys.stdin], [], [], every)[0]:  # stdin closed: stop
        break
client.close()
"""


class Sampler:
    """While entered, read every record under the rig's prefix from etcd every ``every`` s and
    keep each sample in which some disk had two records, one of them exclusive: two domains
    holding one disk, whether on one host or on two.  It runs in its own process at nice -10
    (one client kept open, one range read of the records per sample), so that neither this process's threads nor the 40 QEMUs starting
    on two cores space the samples out much."""

    def __init__(self, env: AgentRig, every: float = 0.01) -> None:
        self.env, self.every = env, every
        self.times: list[float] = []
        self.bad: list[dict[str, list[list[str]]]] = []
        self.max_records = 0
        self.modes: set[str] = set()

    def __enter__(self) -> Sampler:
        self.proc = subprocess.Popen(
            ["nice", "-n", "-10", sys.executable, "-c", SAMPLER, self.env.etcd.endpoints,
             self.env.prefix, str(self.every)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self.proc.communicate(input="", timeout=30)  # stdin closed: the sampler stops
        assert self.proc.returncode == 0, f"the sampler failed ({self.proc.returncode})"
        for line in out.splitlines():
            t, n, bad, modes = json.loads(line)
            self.modes.update(modes)
            self.times.append(t)
            self.max_records = max(self.max_records, n)
            if bad:
                self.bad.append(bad)

    @property
    def gaps(self) -> list[float]:
        return sorted(b - a for a, b in zip(self.times, self.times[1:], strict=False))


def _start_all(env: AgentRig, doms: list[Dom]) -> tuple[dict[Dom, str], float]:
    """``virsh start`` every domain at once; the stderr of each refused one, and the wall time."""
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(doms)) as pool:
        results = list(pool.map(lambda d: env.rig.start(d[0], d[1], check=False)[0], doms))
    return {d: cp.stderr for d, cp in zip(doms, results, strict=True) if cp.returncode != 0}, time.monotonic() - t0


def _running(env: AgentRig) -> set[Dom]:
    return {(h, n) for h in ("A", "B") for n in env.rig.virsh(h, "list", "--name").stdout.split()}


def _check_round(env: AgentRig, disk_of: dict[Dom, str], refused: dict[Dom, str], what: str) -> set[Dom]:
    running = _running(env)
    per_disk = Counter(disk_of[d] for d in running)
    assert max(per_disk.values()) == 1, f"{what}: disks used by two running domains: " \
        f"{[k for k, n in per_disk.items() if n > 1]}"
    holder_of = {disk_of[d]: d for d in running}
    for dom, err in refused.items():
        assert "resource busy" in err, f"{what}: {dom} refused for another reason: {err}"
        h, n = holder_of[disk_of[dom]]
        assert f"domain {n} " in err and f"on host host{h}" in err, f"{what}: {dom} refused naming another holder: {err}"

    def etcd_matches() -> bool:
        held = {(h.host, h.domain_name, h.resource) for h in env.holders(*(n for _, n in disk_of))}
        return held == {(f"host{h}", n, disk_of[(h, n)]) for h, n in running}

    wait_for(etcd_matches, 10, interval=0.1, what=f"{what}: etcd's holders to be exactly the running domains")
    return running


def test_forty_domains_on_thirty_disks_never_two_holders(env: AgentRig) -> None:
    r = env.rig
    rnd = random.Random(SEED)
    pool = [str(r.image(f"pool{i:02d}.img")) for i in range(DISKS)]
    disk_of: dict[Dom, str] = {}
    for h in ("A", "B"):
        for i in range(PER_HOST):
            dom = (h, f"s{h.lower()}{i:02d}")
            disk_of[dom] = pool[rnd.randrange(DISKS)]
            r.define_domain(h, dom[1], [disk_of[dom]])
    doms = list(disk_of)
    contended = sum(1 for n in Counter(disk_of.values()).values() if n > 1)
    within = {d for d, n in Counter((h, disk) for (h, _), disk in disk_of.items()).items() if n > 1}
    across = {disk for disk in pool if {h for (h, _), dk in disk_of.items() if dk == disk} == {"A", "B"}}
    assert within and across, "the seed must make disks contended within a host and across hosts"
    print(f"\n{len(within)} (host, disk) pairs wanted by 2+ domains of that host, {len(across)} disks wanted "
          "from both hosts")
    with Sampler(env) as watch:
        refused, took = _start_all(env, doms)
        running = _check_round(env, disk_of, refused, "round 1")
        assert running == set(doms) - set(refused), "round 1: the running domains are not the started ones"
        print(f"round 1: 40 concurrent starts over {len(set(disk_of.values()))} disks ({contended} wanted by "
              f"2+ domains): {len(running)} started, {len(refused)} refused 'resource busy', {took:.1f} s")
        assert running and refused

        down = rnd.sample(sorted(running), len(running) // 2)
        t0 = time.monotonic()
        with ThreadPoolExecutor(len(down)) as p:
            list(p.map(lambda d: r.virsh(*d[:1], "destroy", d[1]), down))
        destroy_took = time.monotonic() - t0
        stopped = [d for d in doms if d not in running or d in down]
        kept = _check_round(env, disk_of, {}, "after the destroys")
        assert kept == running - set(down)
        refused, took = _start_all(env, stopped)
        running = _check_round(env, disk_of, refused, "round 2")
        assert running == kept | (set(stopped) - set(refused)), "round 2: the running domains are not the started ones"
        print(f"round 2: {len(down)} destroyed concurrently in {destroy_took:.1f} s, {len(stopped)} concurrent starts: "
              f"{len(stopped) - len(refused)} started, {len(refused)} refused, {took:.1f} s; "
              f"{len(running)} running")
        assert len(refused) < len(stopped) and refused
    gaps = watch.gaps
    print(f"{len(watch.times)} etcd samples, up to {watch.max_records} records in one (every {1000 * sum(gaps) / len(gaps):.0f} ms on average, median "
          f"{1000 * gaps[len(gaps) // 2]:.0f} ms, longest gap {1000 * gaps[-1]:.0f} ms), "
          f"{len(watch.bad)} with a disk held by two domains")
    assert watch.modes == {"exclusive"}, watch.modes  # what the two-holder check looks for
    assert len(watch.times) > 100 and not watch.bad, watch.bad[:3]
    r.reset()
