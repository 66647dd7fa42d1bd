"""The ``libvirt`` marker and the two-host rig fixtures (stock virtlockd, or the agent).

Tests marked ``libvirt`` need root, libvirt and QEMU (``deploy/libvirt/install.sh``);
without them they are skipped with a one-line reason.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from virtlease_lab.libvirt.agentrig import AgentRig, agent_rig
from virtlease_lab.libvirt.rig import Rig, missing_requirements


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker (pyproject's marker list belongs to others)."""
    config.addinivalue_line("markers", "libvirt: needs root, libvirt and QEMU; runs two libvirt hosts")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the libvirt tests, with the reason, where the rig cannot run."""
    why = missing_requirements()
    if why is None:
        return
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "libvirt" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """Hosts A and B with stock virtlockd, up for the module; down (and verified clean) after it."""
    r = Rig(tmp_path_factory.mktemp("libvirt-rig"), lock_daemon="virtlockd")
    with r:
        yield r


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentRig]:
    """Hosts A and B with the virtlease agent over a three-member etcd, up for the module."""
    with agent_rig(tmp_path_factory.mktemp("agent")) as a:
        yield a


@pytest.fixture
def hosts(rig: Rig) -> Iterator[Rig]:
    """The module's rig, with every domain destroyed and undefined after the test."""
    yield rig
    rig.reset()
