"""One nemesis "host": a separate process running an etcd driver instance.

Started by ``nemesis.py`` as ``python host_worker.py``, its configuration the first
line on stdin (the harness wire, ``virtlease_etcd.devtools.jsonwire``).  It

* loads the etcd driver with its own ``host_id`` (through the harness's TCP
  proxies), retrying while the previous incarnation's lease is still alive;
* runs ``workers`` threads that acquire a random subset of the disks, start a
  "VM" (a real ``sleep`` child whose pid is given to ``new_object``, with
  FailureAction.POWEROFF), write to the shared storage model while holding,
  then release (sometimes resuming with the release state) or get migrated;
* answers migration commands from the harness on stdin (one JSON per line,
  one reply per line on stdout, matched by ``seq``);
* appends every fact the checker needs to an events file (JSON lines, one
  ``os.write`` each, so a ``kill -9`` loses nothing already recorded);
* publishes every state its workers get to the run's gossip file and runs
  one misbehaving caller thread that misuses them (``misuse.py``), if the
  harness enabled it.

``free()`` does not release (holds belong to the domain on the host, as in
libvirt): every path that may still hold something calls ``release()``
first (``Host.drop``).

All times are ``virtlease_etcd.clock.now()`` (CLOCK_BOOTTIME, the driver's fence clock): every
process on the machine shares it, so host, harness and storage times compare directly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
import uuid as uuidlib
from typing import Any

from misuse import Gossip, Misuser

import virtlease as v
from virtlease_etcd import clock
from virtlease_etcd.devtools.jsonwire import Replier

mono = clock.now


class Events:
    """Append-only JSON-lines log of this host incarnation."""

    def __init__(self, path: str, host: str, inc: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.host = host
        self.inc = inc

    def __call__(self, ev: str, /, **kw: Any) -> None:
        # positional-only: the records themselves have a "kind" field (violation, misuse)
        rec = {"ev": ev, "t": kw.pop("t", None) or mono(), "host": self.host, "inc": self.inc, **kw}
        os.write(self.fd, (json.dumps(rec) + "\n").encode())


class Storage:
    """Client of the storage model: one connection per thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.local = threading.local()

    def write(self, **req: Any) -> tuple[bool, str]:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.path)
            conn = self.local.conn = (sock, sock.makefile("rwb"))
        _sock, fh = conn
        fh.write((json.dumps(req) + "\n").encode())
        fh.flush()
        line = fh.readline()
        if not line:
            raise ConnectionError("storage closed the connection")
        reply = json.loads(line)
        return bool(reply["ok"]), str(reply.get("why", ""))


class Holding:
    """A VM of this host and its lock object."""

    def __init__(self, obj: v.LockObject, uuid: str, name: str, disks: list[str],
                 vm: subprocess.Popen[bytes], host: Host) -> None:
        self.obj = obj
        self.uuid = uuid
        self.name = name
        self.disks = disks
        self.vm = vm
        self.tokens: dict[str, int] = {}
        self.iid: str | None = None
        self.dead = threading.Event()
        self.dead_at = 0.0
        self.park_req = False
        self.preparing = False
        self.parked = threading.Event()
        self.resume = threading.Event()
        self.abandon = False
        self.busy = threading.Lock()  # held by the migrating main thread
        self.host = host
        threading.Thread(target=self._wait_vm, daemon=True).start()

    def _wait_vm(self) -> None:
        self.vm.wait()
        self.dead_at = mono()
        self.dead.set()
        self.host.ev("vm_dead", obj=self.uuid, pid=self.vm.pid, t=self.dead_at)

    def kill_vm(self) -> None:
        if self.vm.poll() is None:
            try:
                self.vm.kill()
            except ProcessLookupError:
                pass
        self.dead.wait(5)


class Host:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.host_id: str = cfg["host_id"]
        self.ev = Events(cfg["events"], self.host_id, cfg["inc"])
        self.storage = Storage(cfg["storage"])
        self.disks: list[str] = cfg["disks"]
        self.rng = random.Random(cfg["seed"])
        self.stopping = threading.Event()
        self.cond = threading.Condition()
        self.plugin: v.Plugin | None = None
        self.lease = 0
        self.lost_flag = threading.Event()
        self.holdings: dict[str, Holding] = {}
        self.hlock = threading.Lock()
        self.migrating: dict[int, Holding] = {}
        self.gossip = Gossip(cfg["gossip"], self.host_id, cfg["inc"]) if cfg.get("gossip") else None

    def publish(self, h: Holding, src: str, state: str, dest: str | None = None) -> None:
        """Tell the misbehaving callers about a state (it is evidence only)."""
        if self.gossip is not None:
            self.gossip.publish(src, state, h.uuid, h.name, h.disks, dest)

    # -- session -------------------------------------------------------------------

    def driver_config(self) -> dict[str, Any]:
        return {
            "endpoints": self.cfg["endpoints"], "prefix": self.cfg["prefix"], "host_id": self.host_id,
            "ttl": self.cfg["ttl"], "on_lease_lost": self._on_lost,
        }

    def _on_lost(self, reason: str) -> None:
        session = self.plugin.driver.session if self.plugin is not None else None
        # the fence margin lets the checker tell when the lease could first have expired
        self.ev("lost", reason=reason, lease=self.lease, t=(session and session.lost_at) or mono(),
                margin=session.cfg.margin if session is not None else None)
        self.lost_flag.set()

    def connect(self) -> None:
        attempts = 0
        while not self.stopping.is_set():
            attempts += 1
            try:
                plugin = v.load_driver("etcd", config=self.driver_config(),
                                       capabilities=v.Capability.RESOURCES | v.Capability.MIGRATE
                                       | v.Capability.USES_STATE)
            except (v.ConfigError, v.PluginError, v.BackendUnavailableError) as exc:
                if attempts % 10 == 1:
                    self.ev("session_retry", error=type(exc).__name__, message=str(exc)[:200])
                time.sleep(0.3)
                continue
            with self.cond:
                self.plugin = plugin
                self.lease = plugin.driver.session.lease_id
                self.lost_flag.clear()
                self.cond.notify_all()
            self.ev("session", lease=self.lease, attempts=attempts)
            return

    def session_loop(self) -> None:
        """Replace a lost session by a new one (same host_id)."""
        while not self.stopping.is_set():
            if not self.lost_flag.wait(0.5):
                continue
            with self.cond:
                old, self.plugin = self.plugin, None
            if old is not None:
                threading.Thread(target=self._unload_later, args=(old,), daemon=True).start()
            self.connect()

    def _unload_later(self, plugin: v.Plugin) -> None:
        for _ in range(200):
            try:
                plugin.unload()
                return
            except v.PluginBusyError:
                time.sleep(0.2)

    def current(self) -> v.Plugin | None:
        with self.cond:
            while self.plugin is None and not self.stopping.is_set():
                self.cond.wait(0.5)
            return self.plugin

    # -- intervals -------------------------------------------------------------------

    def open_interval(self, h: Holding, via: str) -> None:
        h.iid = uuidlib.uuid4().hex[:12]
        self.ev("grant", iid=h.iid, obj=h.uuid, disks=h.tokens, via=via, lease=self.lease, pid=h.vm.pid)

    def close_interval(self, h: Holding, reason: str, t: float | None = None) -> None:
        if h.iid is not None:
            t = t or mono()
            if h.dead.is_set() and h.dead_at < t:
                t, reason = h.dead_at, f"vm_dead (then {reason})"
            self.ev("end", iid=h.iid, obj=h.uuid, reason=reason, t=t)
            h.iid = None

    def spawn_vm(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["sleep", "100000"], stdin=subprocess.DEVNULL)

    def confirm(self, h: Holding, via: str) -> bool:
        """After a successful acquire: learn the tokens (``held()``) and open
        the write interval.  If the session is already lost (inquire), the
        failure action must have run: check the VM died."""
        try:
            state = h.obj.inquire()
            h.tokens = {r.name: r.token for r in h.obj.held()}
        except v.LeaseLostError as exc:
            self.ev("grant_after_loss", obj=h.uuid, via=via, message=str(exc)[:200])
            if not h.dead.wait(1.0):
                self.ev("violation", kind="vm_survived_loss", obj=h.uuid, pid=h.vm.pid,
                        detail=f"{via} returned success but the session was lost and the VM still runs")
            return False
        self.open_interval(h, via)
        self.publish(h, "inquire", state)
        # register the new token with storage at once (a fencing write)
        return self.write_all(h) == "ok"

    def write_all(self, h: Holding) -> str:
        for disk in h.disks:
            t = mono()
            if h.dead.is_set():
                self.close_interval(h, "vm_dead", t=h.dead_at)
                return "dead"
            ok, why = self.storage.write(disk=disk, host=self.host_id, inc=self.cfg["inc"], obj=h.uuid,
                                         iid=h.iid, token=h.tokens[disk], t=t)
            if not ok:
                self.close_interval(h, "stale", t=mono())
                self.ev("rejected", obj=h.uuid, disk=disk, token=h.tokens[disk], why=why)
                return "stale"
        return "ok"

    def hold(self, h: Holding, duration: float) -> str:
        """Write while holding; returns done|dead|stale|abandoned|stopping."""
        end_at = mono() + duration
        while True:
            if h.park_req:
                self.close_interval(h, "migrate_park")
                h.parked.set()
                while not h.resume.wait(0.5):
                    if not h.park_req and not h.preparing:
                        break  # the harness gave up waiting before we parked
                h.resume.clear()
                h.preparing = False
                h.park_req = False
                h.parked.clear()
                if h.abandon:
                    return "abandoned"
                if h.dead.is_set():
                    return "dead"
                self.open_interval(h, "migrate_cancelled")
            if mono() >= end_at or self.stopping.is_set():
                return "done"
            res = self.write_all(h)
            if res != "ok":
                return res
            time.sleep(self.rng.uniform(0.05, 0.12))

    # -- the worker loop ---------------------------------------------------------------

    def finish(self, h: Holding) -> None:
        """Release (sometimes resume with the release state and hold again),
        free, stop the VM."""
        try:
            while True:
                with h.busy, self.hlock:
                    self.holdings.pop(h.uuid, None)
                if h.dead.is_set() or h.abandon:
                    break
                self.close_interval(h, "release")
                state = h.obj.release()
                self.ev("released", obj=h.uuid)
                self.publish(h, "release", state)
                if self.stopping.is_set() or self.rng.random() >= 0.25:
                    break
                time.sleep(self.rng.uniform(0.0, 0.4))
                try:
                    h.obj.acquire(state, action=v.FailureAction.POWEROFF)
                except (v.StaleStateError, v.ResourceBusyError) as exc:
                    self.ev("resume_refused", obj=h.uuid, error=type(exc).__name__)
                    break
                if not self.confirm(h, "resume"):
                    break
                with self.hlock:
                    self.holdings[h.uuid] = h
                result = self.hold(h, self.rng.uniform(0.2, 1.0))
                if result != "done":
                    self.close_interval(h, result)
                    break
        except v.VirtleaseError as exc:
            self.ev("release_failed", obj=h.uuid, error=type(exc).__name__, message=str(exc)[:200])
        except Exception as exc:
            self.ev("unexpected_error", obj=h.uuid, error=type(exc).__name__, message=str(exc)[:300],
                    where="release")
        finally:
            self.close_interval(h, "end")
            self.drop(h)

    def worker(self, n: int) -> None:
        while not self.stopping.is_set():
            plugin = self.current()
            if plugin is None:
                return
            disks = sorted(self.rng.sample(self.disks, self.rng.randint(1, min(3, len(self.disks)))))
            uuid = str(uuidlib.uuid4())
            vm = self.spawn_vm()
            name = f"{self.host_id}-w{n}-{uuid[:6]}"
            try:
                obj = plugin.new_object(uuid=uuid, name=name, pid=vm.pid)
            except v.VirtleaseError:
                vm.kill()
                vm.wait()
                time.sleep(0.2)
                continue
            h = Holding(obj, uuid, name, disks, vm, self)
            for d in disks:
                obj.add_resource(v.ResourceType.DISK, d)
            self.ev("acquire_call", obj=uuid, disks=disks)
            try:
                obj.acquire(action=v.FailureAction.POWEROFF)
            except v.ResourceBusyError:
                self.ev("busy", obj=uuid)
                self.drop(h)
                time.sleep(self.rng.uniform(0.02, 0.25))
                continue
            except v.VirtleaseError as exc:
                self.ev("acquire_failed", obj=uuid, error=type(exc).__name__, message=str(exc)[:300])
                self.drop(h)
                time.sleep(self.rng.uniform(0.1, 0.4))
                continue
            except Exception as exc:  # a non-VirtleaseError escaping the public API is a bug
                self.ev("unexpected_error", obj=uuid, error=type(exc).__name__, message=str(exc)[:300],
                        where="acquire")
                self.drop(h)
                time.sleep(0.3)
                continue
            with self.hlock:
                self.holdings[uuid] = h
            if not self.confirm(h, "acquire"):
                self.finish(h)
                continue
            result = self.hold(h, self.rng.uniform(0.2, 1.5))
            if result == "done":
                self.finish(h)
            else:
                self.close_interval(h, result)
                self.drop(h)
            time.sleep(self.rng.uniform(0.0, 0.2))

    def release_held(self, obj: v.LockObject, where: str) -> None:
        """Release what ``obj`` still holds (``free()`` does not)."""
        try:
            if not obj.held():
                return
            obj.release()
        except v.VirtleaseError as exc:
            self.ev("release_failed", obj=obj.uuid, error=type(exc).__name__, message=str(exc)[:200],
                    where=where)
            return
        self.ev("released", obj=obj.uuid, where=where)

    def drop(self, h: Holding) -> None:
        with self.hlock:
            self.holdings.pop(h.uuid, None)
        self.release_held(h.obj, "drop")
        try:
            h.obj.free()
        except v.VirtleaseError:
            pass
        except Exception as exc:
            self.ev("unexpected_error", obj=h.uuid, error=type(exc).__name__, message=str(exc)[:300],
                    where="free")
        h.kill_vm()

    def adopted(self, h: Holding) -> None:
        """A VM migrated in: write a while, then release."""
        result = self.hold(h, self.rng.uniform(0.3, 1.5))
        if result == "done":
            self.finish(h)
        else:
            self.close_interval(h, result)
            self.drop(h)

    # -- migration commands (main thread) ------------------------------------------------

    def migrate_out(self, cmd: dict[str, Any]) -> dict[str, Any]:
        with self.hlock:
            cands = [h for h in self.holdings.values() if h.iid is not None and not h.park_req]
        if not cands:
            return {"ok": False, "error": "nothing held"}
        h = self.rng.choice(cands)
        if not h.busy.acquire(timeout=0.5):
            return {"ok": False, "error": "busy"}
        try:
            if h.uuid not in self.holdings or h.iid is None:
                return {"ok": False, "error": "gone"}
            h.park_req = True
            if not h.parked.wait(3.0):
                h.park_req = False
                return {"ok": False, "error": "writer did not park"}
            h.preparing = True
        finally:
            h.busy.release()
        try:
            state = h.obj.prepare_migrate(cmd["dest"])
        except Exception as exc:
            self.ev("prepare_failed", obj=h.uuid, error=type(exc).__name__, message=str(exc)[:200])
            h.resume.set()
            return {"ok": False, "error": type(exc).__name__, "message": str(exc)[:300]}
        self.ev("prepared", obj=h.uuid, dest=cmd["dest"])
        self.publish(h, "prepare", state, dest=cmd["dest"])
        self.migrating[cmd["mid"]] = h
        return {"ok": True, "state": state, "uuid": h.uuid, "name": h.name, "disks": h.disks}

    def complete_out(self, cmd: dict[str, Any]) -> dict[str, Any]:
        h = self.migrating.pop(cmd["mid"], None)
        if h is None:
            return {"ok": False, "error": "unknown migration"}
        cancel = bool(cmd["cancel"])
        try:
            h.obj.complete_migrate_out(cancel=cancel)
        except Exception as exc:
            self.ev("complete_out_failed", obj=h.uuid, cancel=cancel, error=type(exc).__name__,
                    message=str(exc)[:300])
            h.abandon = True
            h.resume.set()
            return {"ok": False, "error": type(exc).__name__, "message": str(exc)[:300]}
        self.ev("completed_out", obj=h.uuid, cancel=cancel)
        h.abandon = not cancel
        h.resume.set()
        return {"ok": True}

    def migrate_in(self, cmd: dict[str, Any]) -> dict[str, Any]:
        plugin = self.plugin
        if plugin is None:
            return {"ok": False, "error": "no session"}
        vm = self.spawn_vm()
        try:
            obj = plugin.new_object(uuid=cmd["uuid"], name=cmd["name"], pid=vm.pid, flags=v.NewFlags.MIGRATE)
        except v.VirtleaseError as exc:
            vm.kill()
            vm.wait()
            return {"ok": False, "error": type(exc).__name__, "message": str(exc)[:300]}
        h = Holding(obj, cmd["uuid"], cmd["name"], list(cmd["disks"]), vm, self)
        for d in h.disks:
            obj.add_resource(v.ResourceType.DISK, d)
        self.ev("claim_call", obj=h.uuid, disks=h.disks)
        try:
            obj.acquire(cmd["state"], action=v.FailureAction.POWEROFF)
        except Exception as exc:
            if not isinstance(exc, v.VirtleaseError):
                self.ev("unexpected_error", obj=h.uuid, error=type(exc).__name__, message=str(exc)[:300],
                        where="claim")
            self.ev("claim_failed", obj=h.uuid, error=type(exc).__name__, message=str(exc)[:300])
            self.drop(h)
            return {"ok": False, "error": type(exc).__name__, "message": str(exc)[:300]}
        with self.hlock:
            self.holdings[h.uuid] = h
        if not self.confirm(h, "claim"):
            self.close_interval(h, "end")
            self.drop(h)
            return {"ok": True, "note": "claimed but lost at once"}
        try:
            obj.complete_migrate_in(cancel=False)
        except v.VirtleaseError as exc:
            self.ev("complete_in_failed", obj=h.uuid, error=type(exc).__name__, message=str(exc)[:200])
        threading.Thread(target=self.adopted, args=(h,), daemon=True).start()
        return {"ok": True}

    # -- stop ------------------------------------------------------------------------------

    def shutdown(self, threads: list[threading.Thread]) -> None:
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        for h in list(self.migrating.values()):
            h.abandon = True
            h.resume.set()
        for t in threads:
            t.join(timeout=10)
        deadline = mono() + 10
        while self.holdings and mono() < deadline:
            time.sleep(0.1)
        plugin = self.plugin
        if plugin is not None:
            for obj in plugin.objects:
                self.release_held(obj, "shutdown")
                try:
                    obj.free()
                except v.VirtleaseError:
                    pass
            try:
                plugin.unload()
            except v.VirtleaseError as exc:
                self.ev("unload_failed", message=str(exc)[:200])
        self.ev("stopped")


def main() -> None:
    wire = Replier()
    cfg = wire.config()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    host = Host(cfg)
    host.ev("start", pid=os.getpid())
    host.connect()
    wire.send({"ok": True, "ready": True, "pid": os.getpid(), "lease": host.lease})
    threads = [threading.Thread(target=host.session_loop, daemon=True)]
    threads += [threading.Thread(target=host.worker, args=(i,), daemon=True) for i in range(cfg["workers"])]
    if cfg.get("misuse") and host.gossip is not None:
        threads.append(threading.Thread(target=Misuser(host, Holding, host.gossip).loop, daemon=True))
    for t in threads:
        t.start()
    for cmd in wire.commands():
        op = cmd.get("op")
        try:
            if op == "migrate_out":
                res = host.migrate_out(cmd)
            elif op == "complete_out":
                res = host.complete_out(cmd)
            elif op == "migrate_in":
                res = host.migrate_in(cmd)
            elif op == "exit":
                host.shutdown(threads[1:])
                wire.send({"ok": True}, cmd.get("seq"))
                break
            else:
                res = {"ok": False, "error": f"unknown op {op}"}
        except Exception as exc:
            res = {"ok": False, "error": type(exc).__name__, "message": str(exc)[:300]}
        wire.send(res, cmd.get("seq"))
    os._exit(0)


if __name__ == "__main__":
    main()
