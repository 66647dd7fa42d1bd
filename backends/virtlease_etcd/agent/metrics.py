"""Prometheus metrics of the agent (``--metrics ADDR``), on a private registry.

``virtlease_agent_session_state``          enum     ``valid`` / ``lost`` (the host's etcd session)
``virtlease_agent_fence_deadline_seconds`` gauge    seconds until the session fences itself
``virtlease_agent_keepalive_rtt_seconds``  hist.    round trip of each lease keepalive
``virtlease_agent_requests_total``         counter  ACQUIRE/RELEASE by ``op`` and ``result``
                                                    (granted, resumed, claimed, released, ...;
                                                    refusals: busy, unavailable, lost, state,
                                                    error)
``virtlease_agent_owners``                 gauge    QEMUs tracked (running) by this agent
``virtlease_agent_held_disks``             gauge    disks held on this host's lease (each
                                                    locked under one or more keys)
=========================================  =======  ==========================================
=======
==================================================  =========  =======================================
``virtlease_build_info{version,python,...}``        info       1; the versions running (virtlease,
                                                               Python, python3-etcd3, grpcio)
``virtlease_agent_session_state{state}``            gauge      1 for the state the host's etcd session
                                                               is in (``valid`` / ``lost``), 0 for the
                                                               other
``virtlease_agent_session_losses_total``            counter    sessions lost (each fenced every domain
                                                               it held): alert on any increase, a
                                                               gauge that flips back misses a short one
``virtlease_agent_fenced_domains_total``            counter    domains whose failure action ran
``virtlease_agent_ttl_seconds``                     gauge      the session lease's TTL (as granted)
``virtlease_agent_fence_margin_seconds``            gauge      how long before the lease can expire the
                                                               host fences itself
``virtlease_agent_fence_deadline_seconds``          gauge      seconds until the session fences itself
                                                               without a successful keepalive
``virtlease_agent_keepalive_rtt_seconds``           histogram  round trip of each lease keepalive
``virtlease_agent_acquire_seconds{result}``         histogram  ACQUIRE calls, reply included: ``ok`` or
                                                               ``refused``
``virtlease_agent_requests_total{op,result}``       counter    ACQUIRE/RELEASE by ``op`` and ``result``
                                                               (granted, resumed, claimed, released,
                                                               ...; refusals: busy, unavailable, lost,
                                                               state, error)
``virtlease_agent_etcd_endpoint_up{endpoint}``      gauge      1 when the member answered its last
                                                               status probe with a leader, else 0
``virtlease_agent_etcd_endpoint_rtt_seconds``       gauge      that probe's round trip (``{endpoint}``)
``virtlease_agent_owners``                          gauge      QEMUs tracked (running) by this agent
``virtlease_agent_held_disks``                      gauge      disks held on this host's lease (each
                                                               locked under one or more keys)
==================================================  =========  =======================================

and, when configured, the watchdog's (armed, last pet, pets) and storage fencing's metrics
(``fencemetrics``).

What a caller may rely on: gauges are read when scraped, from the session in place then (a lost
session is replaced by a new one at the next ACQUIRE); the only work on the lock path is a
counter increment and the ACQUIRE timing; a loss is counted once, when it happens (a listener on
every session the agent opens), whether or not a scrape saw it.  The endpoints are probed every
``probe_interval`` seconds by a thread of their own (one ``Status`` call each, on a connection of
its own to that member), never on a scrape.  The keepalive RTT is measured by timing the
session client's ``lease_keepalive`` (the agent wraps that one method of each session's client).
Alert rules over these: ``deploy/prometheus/virtlease.rules.yml``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import platform
import threading
import weakref
from collections.abc import Callable, Coroutine
from importlib import metadata
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

import virtlease
from virtlease_etcd.clock import Clock
from virtlease_etcd.etcd.client import EtcdClient
from virtlease_etcd.session.hostsession import HostSession

from . import fencemetrics
from .backend import EtcdLockBackend

log = logging.getLogger(__name__)

SESSION_STATES = ("valid", "lost")
LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)


def parse_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``:PORT`` (loopback) -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--metrics {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:9477")
    return host.strip("[]") or "127.0.0.1", int(port)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """The registry, the HTTP endpoint and the endpoint prober of one agent."""

    def __init__(self, backend: EtcdLockBackend, *, probe_interval: float = 5.0) -> None:
        self.backend = backend
        self.probe_interval = probe_interval
        self.registry = r = CollectorRegistry()
        Info("virtlease_build", "The versions this agent runs", registry=r).info({
            "version": virtlease.__version__, "python": platform.python_version(),
            "etcd3": _version("python3-etcd3"), "grpcio": _version("grpcio")})
        self.state = Gauge("virtlease_agent_session_state", "The host's etcd session: 1 for its state",
                           ["state"], registry=r)
        self.losses = Counter("virtlease_agent_session_losses", "Sessions lost (each fenced its domains)",
                              registry=r)
        self.fenced = Counter("virtlease_agent_fenced_domains", "Domains whose failure action ran", registry=r)
        Gauge("virtlease_agent_ttl_seconds", "The session lease's TTL", registry=r).set_function(
            lambda: self.session.ttl)
        Gauge("virtlease_agent_fence_margin_seconds", "Seconds before the lease can expire that the host fences",
              registry=r).set_function(lambda: self.session.cfg.margin)
        Gauge("virtlease_agent_fence_deadline_seconds",
              "Seconds until the session fences itself without a successful keepalive", registry=r).set_function(
            lambda: self.session.fence_at - self.session.clock.now())
        self.rtt = Histogram("virtlease_agent_keepalive_rtt_seconds", "Lease keepalive round trip",
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=r)
        self.acquire = Histogram("virtlease_agent_acquire_seconds", "ACQUIRE calls, reply included",
                                 ["result"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("virtlease_agent_requests", "ACQUIRE/RELEASE by op and result",
                                ["op", "result"], registry=r)
        self.endpoint_up = Gauge("virtlease_agent_etcd_endpoint_up", "The member answered its last probe with a leader",
                                 ["endpoint"], registry=r)
        self.endpoint_rtt = Gauge("virtlease_agent_etcd_endpoint_rtt_seconds", "Round trip of the last probe",
                                  ["endpoint"], registry=r)
        Gauge("virtlease_agent_owners", "QEMUs tracked by this agent",
              registry=r).set_function(lambda: len(backend.owners()))
        Gauge("virtlease_agent_held_disks", "Disks held on this host's lease", registry=r).set_function(
            lambda: sum(1 for o in self.session.owners.all() for h in o.held.values() if h.rid.legacy_of is None))
        for state in SESSION_STATES:
            self.state.labels(state)
        self._watched: HostSession | None = None
        self._counted: weakref.WeakSet[HostSession] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._count_inner = backend.count
        backend.count = self._count
        fencemetrics.register(r, backend.driver)  # watchdog and storage fencing, when configured
        self._time_acquire()
        self._watch(backend.driver.session)
        self._server: Any = None
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None

    @property
    def session(self) -> HostSession:
        return self.backend.driver.session

    # ---------------------------------------------------------------- sessions
    def _watch(self, session: HostSession) -> None:
        """Count ``session``'s loss when it happens and time its keepalives (once per session)."""
        with self._lock:
            if session is self._watched:
                return
            previous, self._watched = self._watched, session
        if previous is not None and previous.lost is not None:
            self._lost(previous)  # lost and replaced before its listener could run (not expected)
        session.add_listener(lambda _why: self._lost(session))
        if session.lost is not None:
            self._lost(session)
        self._time_keepalive(session.client, session.clock)

    def _lost(self, session: HostSession) -> None:
        with self._lock:
            if session in self._counted:
                return
            self._counted.add(session)
        self.losses.inc()
        self.fenced.inc(len(session.owners.all()))

    def _count(self, op: str, result: str) -> None:
        self.requests.labels(op, result).inc()
        self._count_inner(op, result)
        if op == "renew" and result == "renewed":
            self._watch(self.session)

    def _time_keepalive(self, client: Any, clock: Clock) -> None:
        inner: Callable[..., int] = client.lease_keepalive

        @functools.wraps(inner)
        def timed(*args: Any, **kwargs: Any) -> int:
            t0 = clock.now()
            try:
                return inner(*args, **kwargs)
            finally:
                self.rtt.observe(clock.now() - t0)

        client.lease_keepalive = timed

    def _time_acquire(self) -> None:
        inner: Callable[..., Coroutine[Any, Any, None]] = self.backend.acquire

        @functools.wraps(inner)
        async def timed(*args: Any, **kwargs: Any) -> None:
            clock = self.session.clock
            t0 = clock.now()
            result = "refused"
            try:
                await inner(*args, **kwargs)
                result = "ok"
            finally:
                self.acquire.labels(result).observe(clock.now() - t0)

        self.backend.acquire = timed  # type: ignore[method-assign]

    def collect_state(self) -> None:
        session = self.session
        self._watch(session)
        current = "lost" if session.lost is not None else "valid"
        for state in SESSION_STATES:
            self.state.labels(state).set(1 if state == current else 0)

    # --------------------------------------------------------------- endpoints
    def _probe_loop(self) -> None:
        cfg = self.session.cfg
        clients: dict[str, EtcdClient] = {}
        try:
            while not self._stop.is_set():
                for endpoint in cfg.endpoints:
                    up, rtt = 0.0, float("nan")
                    try:
                        client = clients.get(endpoint)
                        if client is None:
                            client = clients[endpoint] = EtcdClient(dataclasses.replace(cfg, endpoints=(endpoint,)))
                        t0 = client.clock.now()
                        status = client.status(timeout=cfg.request_timeout)
                        rtt = client.clock.now() - t0
                        up = 1.0 if status.leader else 0.0
                    except Exception as exc:  # down, refused, TLS...: the gauge says it
                        log.debug("etcd endpoint %s: probe failed: %s", endpoint, exc)
                    self.endpoint_up.labels(endpoint).set(up)
                    self.endpoint_rtt.labels(endpoint).set(rtt)
                self._stop.wait(self.probe_interval)
        finally:
            for client in clients.values():
                client.close()

    # -------------------------------------------------------------------- HTTP
    def serve(self, addr: str) -> Metrics:
        host, port = parse_addr(addr)
        registry = self.registry

        class _Live:  # refresh the session state on every scrape
            def collect(_self) -> Any:
                self.collect_state()
                return registry.collect()

        self._server, _thread = start_http_server(port, host, registry=_Live())
        self._prober = threading.Thread(target=self._probe_loop, name="virtlease-metrics-probe", daemon=True)
        self._prober.start()
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def start_metrics(addr: str, backend: EtcdLockBackend) -> Metrics:
    return Metrics(backend).serve(addr)
