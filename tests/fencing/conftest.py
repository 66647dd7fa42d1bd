"""The fencing lab (``virtlease_lab.fencing``): one nested guest, shared by the test modules.

The guest boots Debian's stock kernel under QEMU with this machine's root over 9p (see
``lab/virtlease_lab/fencing/``); its hosts reach the session's etcd (a process on this
machine's loopback) at ``10.0.2.2:PORT``.  Modules share the running guest (a boot costs ~10 s
under TCG); a module that ends it (the watchdog's last run powers it off) leaves the next one a
fresh boot.  Without root or the lab's tools the tests skip with the reason; in CI
(``VIRTLEASE_REQUIRE_SYSTEM_TESTS=1``) such a skip fails the run.
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


class Guests:
    """The running lab guest, booted on first use and again once it has gone."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.guest: LabGuest | None = None

    def get(self) -> LabGuest:
        if self.guest is not None and self.guest.proc.poll() is None:
            return self.guest
        if self.guest is not None:
            self.guest.close()
        started = time.monotonic()
        image = build()
        self.guest = LabGuest(self.factory.mktemp("fencing-lab"), image)
        print(f"\nlab guest ready in {time.monotonic() - started:.1f} s (kernel {image.version}; "
              f"logs in {self.guest.workdir})")
        return self.guest


@pytest.fixture(scope="package")
def guests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guests]:
    why = missing_requirements()
    if why is not None:
        pytest.skip(why)
    pool = Guests(tmp_path_factory)
    try:
        yield pool
    finally:
        if pool.guest is not None:
            pool.guest.close()


@pytest.fixture(scope="module")
def lab(guests: Guests) -> LabGuest:
    """The lab guest for this module: the running one, or a fresh boot."""
    return guests.get()


@pytest.fixture
def lab_prefix() -> str:
    return f"/vlfence/{uuid.uuid4().hex[:12]}"
