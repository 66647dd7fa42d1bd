"""The fencing lab (``virtlease_lab.fencing``): a nested guest per test module.

The guest boots Debian's stock kernel under QEMU with this machine's root over 9p (see
``lab/virtlease_lab/fencing/``); its hosts reach the session's etcd (a process on this
machine's loopback) at ``10.0.2.2:PORT``.  Without root or the lab's tools the tests skip with
the reason; in CI (``VIRTLEASE_REQUIRE_SYSTEM_TESTS=1``) such a skip fails the run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from virtlease_lab.fencing.guest import LabGuest
from virtlease_lab.fencing.image import build, missing_requirements


def guest_endpoint(endpoints: str) -> str:
    """This machine's loopback etcd as the guest reaches it (QEMU user networking)."""
    host, _, port = endpoints.split(",")[0].rpartition(":")
    assert host in ("127.0.0.1", "localhost"), endpoints
    return f"10.0.2.2:{port}"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabGuest]:
    """One booted lab guest for the module (about 10 s under TCG, plus a first kernel fetch)."""
    why = missing_requirements()
    if why is not None:
        pytest.skip(why)
    started = time.monotonic()
    image = build()
    guest = LabGuest(tmp_path_factory.mktemp("fencing-lab"), image)
    print(f"\nlab guest ready in {time.monotonic() - started:.1f} s (kernel {image.version}; logs in {guest.workdir})")
    try:
        yield guest
    finally:
        guest.close()


@pytest.fixture
def lab_prefix() -> str:
    return f"/vlfence/{uuid.uuid4().hex[:12]}"
