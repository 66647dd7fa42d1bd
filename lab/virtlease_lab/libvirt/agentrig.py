"""The rig with the virtlease agent on both hosts, over a three-member etcd.

Each host's agent reaches every etcd member through its own relay (``virtlease_lab.relay``), so one
host can be cut off from etcd (:meth:`AgentRig.cut`) while the other keeps it.  Helpers read
who holds what from etcd, retry a start until the disk is free, and restart a killed agent the
way systemd's ``Restart=always`` would.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from virtlease.errors import VirtleaseError
from virtlease_etcd.config import load_config
from virtlease_etcd.devtools.embedded import EmbeddedEtcd
from virtlease_etcd.etcd.client import EtcdClient
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.ops.status import HeldInfo, read_status
from virtlease_lab.libvirt.rig import HOSTS, Rig, RigError
from virtlease_lab.relay import Relay
from virtlease_lab.waiting import wait_for

HERE = Path(__file__).resolve().parent
PORTS = (23790, 23791, 23792)  # the members, as each host's agent sees them (127.0.0.1 in its namespace)
TTL = 5


@dataclass
class AgentRig:
    """``rig`` with agents; ``etcd`` the cluster; ``relays[host]`` that host's links to it;
    ``observer`` the tests' own client of it (thread-safe: the samplers share it)."""

    rig: Rig
    etcd: EmbeddedEtcd
    relays: dict[str, list[Relay]]
    prefix: str
    observer: EtcdClient
    ttl: int = TTL
    logs: list[Path] = field(default_factory=list)

    def cut(self, host: str) -> None:
        """Cut ``host`` off from every etcd member (bytes dropped, nothing closed)."""
        if host not in self.relays:
            raise RigError(f"host {host} reaches etcd without relays (agent_rig(relays=False)): it cannot be cut off")
        for relay in self.relays[host]:
            relay.blackhole()

    def heal(self, host: str) -> None:
        """Reconnect ``host``: the connections the cut broke are closed (TCP would have timed
        them out), new ones relayed."""
        for relay in self.relays[host]:
            relay.heal(reset=True)

    def holders(self, *domains: str) -> list[HeldInfo]:
        """The records of ``domains`` (all if none named) under the rig's prefix, from etcd."""
        held = read_status(self.observer, ks.Keys(self.prefix), timeout=5).resources
        return [h for h in held if not domains or h.domain_name in domains]

    def start_once_free(self, host: str, name: str, since: float, within: float,
                        pause: float = 0.1) -> tuple[float, float]:
        """``virsh start`` until it works; fail if it still does not ``within`` seconds after
        ``since`` (monotonic).  Returns the seconds from ``since`` to the beginning and to the
        end of the attempt that worked: the grant came between the two."""
        while True:
            tried = time.monotonic()
            cp, _ = self.rig.start(host, name, check=False)
            if cp.returncode == 0:
                return tried - since, time.monotonic() - since
            assert time.monotonic() - since < within, \
                f"{name} still refused on {host} {time.monotonic() - since:.2f} s later: {cp.stderr}"
            time.sleep(pause)

    def restart_agent(self, host: str) -> Path:
        """Start a new agent in ``host``'s namespaces (after the old one was killed), as
        systemd's ``Restart=always`` would; return the path of its log."""
        return self.start_lock_daemon(host, self.rig._lock_command(self.rig.hosts[host]))

    def start_lock_daemon(self, host: str, command: Sequence[str]) -> Path:
        """Serve ``host``'s virtlockd socket with ``command`` (the agent, or stock virtlockd)
        once the previous daemon's socket is dead; return the path of its log."""
        h = self.rig.hosts[host]
        wait_for(lambda: not serving(h.lockd_socket), 5.0, what="the old lock daemon's socket to go dead",
                 error=RigError)
        log_path = h.root / "log" / f"lockdaemon-restarted-{len(self.logs)}.log"
        self.logs.append(log_path)
        with open(log_path, "ab") as log:
            new = subprocess.Popen(["nsenter", "-t", str(h.pid("subreaper")), "-m", "-n", "-u", "--", *command],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        (h.run / "lockdaemon.pid").write_text(f"{new.pid}\n")
        wait_for(lambda: serving(h.lockd_socket) or new.poll() is not None, 20.0, what="the new lock daemon",
                 error=RigError)
        assert new.poll() is None, log_path.read_text()
        return log_path


@dataclass
class Intruder:
    """A domain a :class:`Watch` keeps starting, and what came of it."""

    host: str
    name: str
    tries: int = 0
    ran: list[float] = field(default_factory=list)
    """Monotonic instants of the starts that worked (the domain was destroyed right after)."""
    refusals: list[str] = field(default_factory=list)
    """virsh's stderr of every refused start."""


class Watch:
    """While entered: read etcd every ~5 ms (who holds each disk of ``domains``) and keep
    starting each intruder (``intruder`` = (host, domain), and every one of ``intruders``): a
    start that works is recorded and the domain destroyed.  Leaving lingers ``linger`` s, then
    stops them all."""

    def __init__(self, env: AgentRig, domains: Sequence[str], intruder: tuple[str, str] | None = None,
                 linger: float = 0.5, intruders: Sequence[tuple[str, str]] = ()) -> None:
        self.env, self.domains, self.linger = env, tuple(domains), linger
        self.intruders = [Intruder(h, n) for h, n in ([intruder] if intruder else []) + list(intruders)]
        self.samples: list[frozenset[HeldInfo]] = []
        """Per sample: the records read."""
        self.sample_times: list[float] = []
        """Per sample: the monotonic instant its read began (the records were committed by then
        or later)."""
        self.read_errors = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sample, daemon=True)]
        self._threads += [threading.Thread(target=self._intrude, args=(i,), daemon=True) for i in self.intruders]

    @property
    def intruder_ran(self) -> list[float]:
        """The first intruder's starts that worked."""
        return self.intruders[0].ran

    @property
    def intruder_tries(self) -> int:
        return self.intruders[0].tries

    @property
    def refusals(self) -> list[str]:
        return self.intruders[0].refusals

    def __enter__(self) -> Watch:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(self.linger)
        self._stop.set()
        for t in self._threads:
            t.join(30)

    @property
    def two_holders(self) -> list[dict[str, set[tuple[str, str, str]]]]:
        """The samples in which some disk had two holders, one of them exclusive: two domains
        holding it, on one host or on two; each as disk -> its holders (host, domain, mode) (a
        disk's identity key and its legacy path key are one holder)."""
        out = []
        for sample in self.samples:
            held: dict[str, set[tuple[str, str, str]]] = {}
            for h in sample:
                held.setdefault(h.resource.split(" (")[0], set()).add((h.host, h.domain_name, h.mode))
            if any(len(hs) > 1 and any(m == ks.EXCLUSIVE for *_, m in hs) for hs in held.values()):
                out.append(held)
        return out

    def _sample(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                found = self.env.holders(*self.domains, *(i.name for i in self.intruders))
            except VirtleaseError:  # etcd unavailable for a moment (a leader killed): sample on
                self.read_errors += 1
                continue
            self.samples.append(frozenset(found))
            self.sample_times.append(began)
            time.sleep(0.005)

    def _intrude(self, who: Intruder) -> None:
        while not self._stop.is_set():
            cp, _ = self.env.rig.start(who.host, who.name, check=False)
            who.tries += 1
            if cp.returncode != 0:
                who.refusals.append(cp.stderr)
            else:
                who.ran.append(time.monotonic())
                self.env.rig.virsh(who.host, "destroy", who.name, check=False)


class DeathWatch:
    """The monotonic instant process ``pid`` exited (``dead_at``), from a pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.dead_at: float | None = None
        self._fd = os.pidfd_open(pid)
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        try:
            select.select([self._fd], [], [])
            self.dead_at = time.monotonic()
        finally:
            os.close(self._fd)

    def wait(self, timeout: float) -> float | None:
        self._thread.join(timeout)
        return self.dead_at


def serving(path: Path) -> bool:
    """Whether something accepts connections on UNIX socket ``path``."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


@contextlib.contextmanager
def agent_rig(workdir: Path, *, reserve_grace: float = 2.0, agent: Sequence[str] = (),
              ttl: int = TTL, relays: bool = True) -> Iterator[AgentRig]:
    """Bring up a three-member etcd, the relays and the rig with an agent per host; take all down.

    ``agent``: the program that runs each host's agent, before the agent's options (``{host}`` is
    the host's name, as in ``Rig.lock_daemon``); by default this checkout's agent.  Without
    ``relays`` each agent talks to the members straight, from the test's network namespace, as a
    real host's agent talks to etcd over its network (the benchmarks: two relays per round trip
    are the rig's, not the agent's); then no host can be :meth:`AgentRig.cut` off."""
    short = Path(tempfile.mkdtemp(prefix="vl-relay-", dir="/tmp"))  # UNIX socket paths must be short
    prefix = f"/vltest/{uuid.uuid4().hex[:12]}"
    relays_of: dict[str, list[Relay]] = {}
    (workdir / "etcd").mkdir(parents=True, exist_ok=True)
    with EmbeddedEtcd(size=3, workdir=str(workdir / "etcd")) as etcd:
        try:
            if relays:
                for host in HOSTS:
                    relays_of[host] = [Relay.unix_to_tcp(str(short / f"{host}{i}.sock"), "127.0.0.1",
                                                         m.client_port) for i, m in enumerate(etcd.members)]
                links = ",".join(f"{short}/{{host}}{i}.sock@{port}" for i, port in enumerate(PORTS))
                ports: tuple[int, ...] = PORTS
            else:  # the agent joins this process's network namespace and dials the members itself
                links = f"netns=/proc/{os.getpid()}/ns/net"
                ports = tuple(m.client_port for m in etcd.members)
            command = [sys.executable, "-P", str(HERE / "agent_in_host.py"), links,
                       *(["--exec", str(len(agent)), *agent] if agent else []),
                       "--socket", "{socket}", "--endpoints", ",".join(f"127.0.0.1:{p}" for p in ports),
                       "--host-id", "host{host}", "--prefix", prefix, "--ttl", str(ttl),
                       "--reserve-grace", str(reserve_grace)]
            observer = EtcdClient(load_config({"endpoints": etcd.endpoints, "host_id": "observer"}, environ={}))
            try:
                with Rig(workdir / "rig", lock_daemon=command) as r:
                    yield AgentRig(r, etcd, relays_of, prefix, observer, ttl)
            finally:
                observer.close()
        finally:
            for relay in (x for rs in relays_of.values() for x in rs):
                relay.close()
            shutil.rmtree(short, ignore_errors=True)
