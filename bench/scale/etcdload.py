"""etcd under the traffic of N hosts, without N Python sessions: an asyncio load generator.

The harness's real sessions cost about 1 ms of CPU per host per second in this Python (six
threads each, gRPC's polling of every open stream), so on a shared 2-core machine a thousand
of them starve before etcd does.  This generator sends etcd what those sessions send, from
one asyncio process, to measure etcd itself at 1,000 and 5,000 hosts:

* per host: a lease grant (TTL 10 s), the host record on it, ``vms x disks`` holder records
  on the lease and their ``gen`` records (the driver's keys and record shapes, written by
  ``keyspace``), a watch on the host key (a Watch stream of its own, as each session has),
  and a keepalive every TTL/3 on a new LeaseKeepAlive stream (as ``EtcdClient`` does);
* churn: ``rate`` grant attempts/s, each a transaction of the driver's shape (compare the
  holder key empty, put the holder on the lease and bump the ``gen`` key) followed by the
  release (compare the token, delete), on disks of its own.

It is *not* the product's code (``scale.worker`` is): it stands for it where the machine
cannot run the real thing, and says so wherever its figures appear.  Each keepalive's round
trip and the event loop's lateness are recorded, so a late reply can be told from a busy
generator.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from typing import Any

import grpc
from etcd3 import etcdrpc

from virtlease_etcd.model import keyspace as ks

from .rig import EtcdRig, HostKeyWatch, Sampler, etcd_stalls
from .runner import Run, progress, time_status, time_status_parts
from .stats import Histogram
from .workload import Workload, disk_paths, vm_name


class EtcdLoad:
    """``load.hosts`` hosts' worth of etcd traffic (see the module docstring)."""

    def __init__(self, load: Workload, endpoints: list[str], channels: int = 32) -> None:
        self.load = load
        self.endpoints = endpoints
        self.channels_n = channels
        self.keys = ks.Keys(load.prefix)
        self.rtt = Histogram()
        self.loop_late = Histogram()
        self.grant = Histogram()
        self.failed = 0
        self.keepalives = 0
        self.leases: list[int] = []
        self._stop = asyncio.Event()
        self._hosts: dict[int, asyncio.Task[None]] = {}

    def _channel(self, i: int) -> grpc.aio.Channel:
        return self._chans[i % len(self._chans)]

    async def run(self, *, ready: asyncio.Event, measure: Any) -> None:
        """Start every host (``open_rate`` per second), set ``ready``, keep them alive until
        ``measure()`` (awaited) returns, then stop."""
        opts = [("grpc.use_local_subchannel_pool", 1)]
        self._chans = [grpc.aio.insecure_channel(self.endpoints[i % len(self.endpoints)], options=opts)
                       for i in range(self.channels_n)]
        tasks: list[asyncio.Task[None]] = []
        try:
            started = asyncio.Event()
            counter = {"n": 0}

            def up() -> None:
                counter["n"] += 1
                if counter["n"] == self.load.hosts:
                    started.set()

            async def one(i: int) -> None:
                await self._host(i, up)

            tasks.append(asyncio.create_task(self._probe()))
            for i in range(self.load.hosts):
                self._hosts[i] = asyncio.create_task(one(i))
                tasks.append(self._hosts[i])
                await asyncio.sleep(1 / self.load.open_rate)
            await started.wait()
            ready.set()
            await measure()
        finally:
            self._stop.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for ch in self._chans:
                await ch.close()

    async def _probe(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(0.1)
            self.loop_late.add(max(0.0, time.monotonic() - t0 - 0.1))

    async def _host(self, i: int, up: Any) -> None:
        load, keys = self.load, self.keys
        ch = self._channel(i)
        lease_stub, kv = etcdrpc.LeaseStub(ch), etcdrpc.KVStub(ch)
        host = load.host_id(i)
        lease = (await lease_stub.LeaseGrant(etcdrpc.LeaseGrantRequest(TTL=load.ttl), timeout=30)).ID
        self.leases.append(lease)
        record = ks.encode({"host": host, "lease": lease, "pid": 1, "ttl": load.ttl, "started": round(time.time(), 3),
                            "session": uuid.uuid4().hex[:16]})
        puts = [_put(keys.host(host), record, lease)]
        for slot in range(load.vms_per_host):
            vm = i * load.vms_per_host + slot
            owner = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{load.run_id}/{vm}"))
            for path in disk_paths(load.run_id, vm, load.disks_per_vm):
                rid = _rid(path)
                value = ks.encode(ks.holder_record(rid, host=host, lease=lease, uuid=owner, name=vm_name(vm), pid=None,
                                                   since=time.time(), grant=uuid.uuid4().hex[:16]))
                puts += [_put(keys.holder(rid.rid, rid.mode, owner), value, lease),
                         _put(keys.gen_key(rid.rid, rid.mode), ks.encode({"uuid": owner}), 0)]
        for start in range(0, len(puts), 100):  # under --max-txn-ops 128
            await kv.Txn(etcdrpc.TxnRequest(success=puts[start:start + 100]), timeout=30)
        watch = asyncio.create_task(self._watch(ch, keys.host(host)))
        up()
        try:
            await self._keepalive(lease_stub, lease)
        finally:
            watch.cancel()

    async def _watch(self, ch: grpc.aio.Channel, key: str) -> None:
        """The session's host-key watch: one Watch stream, idle until the key goes."""
        call = etcdrpc.WatchStub(ch).Watch()
        await call.write(etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(key=key.encode())))
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError:
            return
        finally:
            call.cancel()

    async def _keepalive(self, stub: Any, lease: int) -> None:
        interval = self.load.ttl / 3
        await asyncio.sleep(random.uniform(0, interval))
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                call = stub.LeaseKeepAlive(timeout=2.0)
                await call.write(etcdrpc.LeaseKeepAliveRequest(ID=lease))
                await call.read()
                call.cancel()
                self.rtt.add(time.monotonic() - sent)
                self.keepalives += 1
                next_at = sent + interval
            except (TimeoutError, grpc.aio.AioRpcError):
                self.failed += 1
                next_at = time.monotonic() + 0.25
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def churn(self, rate: float) -> None:
        """``rate`` grants per second of the driver's shape, each released right after."""
        interval = 1.0 / rate
        next_at = time.monotonic()
        n = 0
        pending: set[asyncio.Task[None]] = set()
        while not self._stop.is_set():
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            n += 1
            task = asyncio.create_task(self._grant_release(n))
            pending.add(task)
            task.add_done_callback(pending.discard)

    async def _grant_release(self, n: int) -> None:
        load, keys = self.load, self.keys
        i = n % load.hosts
        lease = self.leases[i % len(self.leases)]
        kv = etcdrpc.KVStub(self._channel(n))
        owner = str(uuid.uuid4())
        rids = [_rid(p) for p in disk_paths(f"{load.run_id}-churn", n % 5000, load.disks_per_vm)]
        compare, success, failure = [], [], []
        for rid in rids:
            key = keys.holder(rid.rid, rid.mode, owner)
            compare.append(etcdrpc.Compare(key=key.encode(), target=etcdrpc.Compare.VERSION,
                                           result=etcdrpc.Compare.EQUAL, version=0))
            value = ks.encode(ks.holder_record(rid, host=load.host_id(i), lease=lease, uuid=owner, name="churn",
                                               pid=None, since=time.time(), grant=uuid.uuid4().hex[:16]))
            success += [_put(key, value, lease), _put(keys.gen_key(rid.rid, rid.mode), ks.encode({"uuid": owner}), 0)]
            failure.append(etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key.encode())))
        t0 = time.monotonic()
        try:
            resp = await kv.Txn(etcdrpc.TxnRequest(compare=compare, success=success, failure=failure), timeout=10)
            self.grant.add(time.monotonic() - t0)
            if resp.succeeded:
                rev = resp.header.revision
                dels = [etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(
                    key=keys.holder(r.rid, r.mode, owner).encode())) for r in rids]
                cmp = [etcdrpc.Compare(key=keys.holder(r.rid, r.mode, owner).encode(), target=etcdrpc.Compare.MOD,
                                       result=etcdrpc.Compare.EQUAL, mod_revision=rev) for r in rids]
                await kv.Txn(etcdrpc.TxnRequest(compare=cmp, success=dels), timeout=10)
        except grpc.aio.AioRpcError:
            self.failed += 1

    def stop_hosts(self, hosts: list[int]) -> None:
        """These hosts die: their keepalives and watches stop at once, nothing is revoked."""
        for i in hosts:
            self._hosts[i].cancel()

    def figures(self, seconds: float) -> dict[str, Any]:
        return {"keepalives_per_s": round(self.keepalives / seconds, 1), "keepalive_rtt": self.rtt.summary_ms(),
                "generator_loop_late": self.loop_late.summary_ms(), "grant": self.grant.summary_ms(),
                "failed": self.failed}

    def reset(self) -> None:
        self.rtt, self.loop_late, self.grant = Histogram(), Histogram(), Histogram()
        self.failed = self.keepalives = 0


def _put(key: str, value: bytes, lease: int) -> Any:
    return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key.encode(), value=value, lease=lease))


def _rid(path: str) -> ks.ResourceId:
    """A disk's key as the driver makes it for a path without an identity (``path://``)."""
    return ks.ResourceId("disk", f"{path} (path://{path})", ks.legacy_disk_rid(path), ks.EXCLUSIVE,
                         f"path://{path}", path)


class GeneratedRun(Run):
    """One size measured with :class:`EtcdLoad` instead of worker processes: etcd's side only
    (keepalives, keys, churn transactions, status, an expiry storm), no fence logic."""

    def run(self) -> dict[str, Any]:
        self.result["generated"] = True
        try:
            asyncio.run(self._main())
        finally:
            self._teardown()
        return self.result

    async def _main(self) -> None:
        load = self.load
        self.result["load1_at_start"] = os.getloadavg()[0]
        progress(f"{load.hosts} generated hosts: starting a three-member etcd")
        self.rig = EtcdRig(self.workdir / "etcd", load.etcd_args).start()
        self.watch = HostKeyWatch(self.rig.members[0].endpoint, load.prefix).start()
        self.sampler = Sampler(self._pids).start()
        gen = EtcdLoad(load, [m.endpoint for m in self.rig.members])
        ready = asyncio.Event()
        self.mark("open")
        runner = asyncio.create_task(gen.run(ready=ready, measure=lambda: self._measure(gen)))
        await ready.wait()
        await runner

    async def _metrics(self) -> dict[str, Any]:
        assert self.rig is not None
        return await asyncio.to_thread(self.rig.metrics)

    async def _measure(self, gen: EtcdLoad) -> None:
        load = self.load
        assert self.rig is not None and self.watch is not None
        self.result["open_s"] = round(time.monotonic() - self.marks["open"], 1)
        met = await self._metrics()
        self.result["populate"] = {"keys": int(max((m.get("etcd_debugging_mvcc_keys_total", 0) for m in met.values()),
                                                   default=0)), "vms": load.hosts * load.vms_per_host}
        progress(f"{load.hosts} generated hosts up in {self.result['open_s']} s; "
                 f"{self.result['populate']['keys']} keys; keepalives only for {self.idle_s:.0f} s")
        gen.reset()
        m0, t0 = met, self.mark("idle")
        await asyncio.sleep(self.idle_s)
        m1, t1 = await self._metrics(), time.monotonic()
        self.result["idle"] = {**self._window("idle", t0, t1, m0, m1), **_generated(gen.figures(t1 - t0))}
        progress(f"idle: {self.result['idle']['keepalives_per_s']} keepalives/s, leader "
                 f"{self.result['idle']['leader_cpu_cores']} cores")
        gen.reset()
        churn = asyncio.create_task(gen.churn(load.churn_rate))
        m0, t0 = m1, self.mark("steady")
        status_runs = []
        for i in range(load.status_runs):
            at = t0 + load.steady_s * (i + 1) / (load.status_runs + 2)
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            status_runs.append(await asyncio.to_thread(time_status, load, self.rig.endpoints, bool(i % 2)))
            status_runs[-1]["parts"] = await asyncio.to_thread(time_status_parts, load, self.rig.endpoints)
            progress(f"virtlease status{' --json' if i % 2 else ''}: {status_runs[-1]['seconds']} s, "
                     f"{status_runs[-1]['rss_peak_mib']} MiB, exit {status_runs[-1]['exit']}")
        await asyncio.sleep(max(0.0, t0 + load.steady_s - time.monotonic()))
        churn.cancel()
        m1, t1 = await self._metrics(), time.monotonic()
        self.result["status"] = status_runs
        figures = gen.figures(t1 - t0)
        self.result["steady"] = {**self._window("steady", t0, t1, m0, m1), **_generated(figures),
                                 "attempts_per_s": round(figures["grant"].get("n", 0) / (t1 - t0), 2),
                                 "grant": {"generated.grant": figures["grant"]}}
        progress(f"steady: {self.result['steady']['keepalives_per_s']} keepalives/s, leader "
                 f"{self.result['steady']['leader_cpu_cores']} cores, txn p99 {figures['grant'].get('p99_ms')} ms")
        await self._expiry_storm(gen)
        self.result["etcd_stalls"] = etcd_stalls(self.workdir / "etcd")
        self.result["load1_at_end"] = os.getloadavg()[0]

    async def _expiry_storm(self, gen: EtcdLoad) -> None:
        """The die group's hosts stop refreshing at once: when does etcd free each of them?"""
        load = self.load
        assert self.watch is not None
        dead = list(range(load.counts()["die"]))
        if not dead:
            return
        m0 = await self._metrics()
        killed = self.mark("die")
        gen.stop_hosts(dead)
        ids = {load.host_id(i) for i in dead}
        missing = await asyncio.to_thread(self.watch.wait_for, ids, load.ttl * 3 + 10)
        t1 = time.monotonic()
        freed = sorted(round(t - killed, 3) for h, t in self.watch.deleted.items() if h in ids)
        self.result["die"] = {"hosts": len(dead), "freed_s": freed, "not_freed": sorted(missing),
                              "target_s": load.ttl + 2, "first_take_s": [], "all_taken_s": [],
                              **self._window("die", killed, t1, m0, await self._metrics())}
        progress(f"die: {len(dead)} generated hosts stopped refreshing; freed after "
                 f"{min(freed, default=0):.2f}-{max(freed, default=0):.2f} s")


def _generated(figures: dict[str, Any]) -> dict[str, Any]:
    """The generator's figures under the names the real run's report reads."""
    return {"keepalives_per_s": figures["keepalives_per_s"], "keepalive_rtt": figures["keepalive_rtt"],
            "probe_late": figures["generator_loop_late"], "keepalives_failed": figures["failed"], "lost": []}
