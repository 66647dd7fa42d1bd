"""20 small domains per host started at once against a pool of 30 disks.

Each of the 40 domains uses one disk of the pool, drawn with a fixed seed so that disks are
wanted by several domains on the same host and across hosts (asserted).  All 40 ``virsh start``
run concurrently; then a random half of the running ones are destroyed concurrently and every
shut-off one is started again, concurrently.  Throughout, etcd is read every few ms: no disk
ever has two holders of which one is exclusive (two domains, on one host or on two).  After each
round, from both hosts' ``virsh list``: the running domains are exactly those whose start
worked, no disk is used by two of them, etcd's holders are exactly the running domains, every
refused start said "resource busy" and named the domain (and host) holding its disk -- or, when
the machine starved etcd past a start's deadline, "etcd unreachable, nothing changed" (counted
and printed; at least one refusal must be "busy") -- and at least one start worked and one was
refused."""

from __future__ import annotations

import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from virtlease_lab.libvirt.agentrig import AgentRig, Watch
from virtlease_lab.waiting import wait_for

pytestmark = pytest.mark.libvirt
PER_HOST, DISKS, SEED = 20, 30, 9

Dom = tuple[str, str]  # (host, domain name)


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
    late = {dom for dom, err in refused.items() if "etcd unreachable, nothing changed" in err}
    if late:  # 40 TCG QEMUs starting on 2 cores can starve the three members past a start's deadline
        print(f"{what}: {len(late)} start(s) refused because etcd did not answer in time (nothing changed)")
    assert not refused or len(late) < len(refused), f"{what}: no start was refused as busy: {refused}"
    for dom, err in refused.items():
        if dom in late:
            continue
        assert "resource busy" in err, f"{what}: {dom} refused for another reason: {err}"
        h, n = holder_of[disk_of[dom]]
        assert f"domain {n} " in err and f"on host host{h}" in err, f"{what}: {dom} refused naming another holder: {err}"

    def etcd_matches() -> bool:
        held = {(h.host, h.domain_name, h.resource.split(" (")[0]) for h in env.holders(*(n for _, n in disk_of))}
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
    with Watch(env, [n for _, n in doms]) as watch:
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
    print(f"{len(watch.samples)} etcd samples ({watch.read_errors} failed reads), "
          f"{len(watch.two_holders)} with a disk held by two domains")
    assert len(watch.samples) > 100 and not watch.two_holders, watch.two_holders[:3]
    r.reset()
