"""Prometheus metrics of the agent (``--metrics ADDR``), on a private registry.

=========================================  =======  ==========================================
``virtlease_agent_session_state``          enum     ``valid`` / ``lost`` (the host's etcd session)
``virtlease_agent_fence_deadline_seconds`` gauge    seconds until the session fences itself
``virtlease_agent_keepalive_rtt_seconds``  hist.    round trip of each lease keepalive
``virtlease_agent_requests_total``         counter  ACQUIRE/RELEASE by ``op`` and ``result``
                                                    (granted, resumed, claimed, released, ...;
                                                    refusals: busy, unavailable, lost, state,
                                                    error)
``virtlease_agent_owners``                 gauge    QEMUs tracked (running) by this agent
``virtlease_agent_held_disks``             gauge    records held on this host's lease
=========================================  =======  ==========================================

and, when configured, the watchdog's (last pet, armed, pets) and storage fencing's
(``fencemetrics``).

Values are read when scraped (nothing is updated on the lock path except one counter
increment).  The keepalive RTT is measured by timing the session client's
``lease_keepalive`` (the agent wraps that one method of its own session's client).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, start_http_server

from . import fencemetrics
from .tracking import OwnerTracker

log = logging.getLogger(__name__)


def parse_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``:PORT`` (loopback) -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--metrics {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:9477")
    return host.strip("[]") or "127.0.0.1", int(port)


class Metrics:
    """The registry and the HTTP endpoint of one agent."""

    def __init__(self, backend: OwnerTracker) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        session = backend.driver.session
        self.state = Enum("virtlease_agent_session_state", "The host's etcd session",
                          states=["valid", "lost"], registry=r)
        fence = Gauge("virtlease_agent_fence_deadline_seconds",
                      "Seconds until the session fences itself without a successful keepalive", registry=r)
        fence.set_function(lambda: session.fence_at - session.clock())
        self.rtt = Histogram("virtlease_agent_keepalive_rtt_seconds", "Lease keepalive round trip",
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5), registry=r)
        self.requests = Counter("virtlease_agent_requests", "ACQUIRE/RELEASE by op and result",
                                ["op", "result"], registry=r)
        Gauge("virtlease_agent_owners", "QEMUs tracked by this agent",
              registry=r).set_function(lambda: len(backend.owners()))
        Gauge("virtlease_agent_held_disks", "Records held on this host's lease", registry=r).set_function(
            lambda: sum(len(o.held) for o in session.owners.all()))
        backend.count = lambda op, result: self.requests.labels(op, result).inc()
        fencemetrics.register(r, backend.driver)  # watchdog and storage fencing, when configured
        self._session = session
        self._time_keepalive(session.client)
        self._server: Any = None

    def _time_keepalive(self, client: Any) -> None:
        inner: Callable[..., int] = client.lease_keepalive

        @functools.wraps(inner)
        def timed(*args: Any, **kwargs: Any) -> int:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.rtt.observe(time.perf_counter() - t0)

        client.lease_keepalive = timed

    def collect_state(self) -> None:
        self.state.state("lost" if self._session.lost is not None else "valid")

    def serve(self, addr: str) -> Metrics:
        host, port = parse_addr(addr)
        registry = self.registry

        class _Live:  # refresh the session state on every scrape
            def collect(_self) -> Any:
                self.collect_state()
                return registry.collect()

        self._server, _thread = start_http_server(port, host, registry=_Live())
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def start_metrics(addr: str, backend: OwnerTracker) -> Metrics:
    return Metrics(backend).serve(addr)
