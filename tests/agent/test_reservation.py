"""Reservations (handoff markers ``to="*"``) at driver level, real etcd: a released disk of a
live domain stays reserved for its UUID; the same UUID elsewhere claims it with a new token,
another domain is refused naming the reservation, the source resumes by cancelling it, and
releasing the owner (its QEMU gone) frees everything.  A reservation lists only the disks
released: after one disk of a running domain is released (a hot-unplug, a block-job pivot)
the others stay held, never claimable, and settling the release frees the released one."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import virtlease as v
from agent.etcd_agent import domain, load
from conftest import EtcdServer, dump
from virtlease.abi import FailureAction, ResourceSpec, ResourceType
from virtlease.errors import ResourceBusyError, StaleStateError
from virtlease_etcd.ops import handoff
from virtlease_etcd.ops.lockd import LockdDomain

ACT = FailureAction.DEFAULT


@pytest.fixture
def hosts(etcd_process: EtcdServer, prefix: str) -> Iterator[Callable[[str], v.Plugin]]:
    plugins: list[v.Plugin] = []

    def make(host: str) -> v.Plugin:
        plugin = load(etcd_process.endpoints, prefix, host)
        plugins.append(plugin)
        return plugin

    yield make
    for plugin in plugins:
        plugin.driver.release_all()
        plugin.unload()


def lockd(plugin: v.Plugin, uid: str, name: str) -> LockdDomain:
    """The agent's way into the driver, for one domain of ``plugin``'s host."""
    return plugin.driver.lockd(uid, name, None)


def disk(tmp_path: Path, name: str = "d1.img") -> ResourceSpec:
    return ResourceSpec(ResourceType.DISK, str(tmp_path / name))


def token(plugin: v.Plugin, uid: str, res: ResourceSpec) -> int:
    owner = plugin.driver.session.owners.peek(uid)
    assert owner is not None
    return next(h.token for h in owner.held.values() if h.rid.readable == res.name)


def test_reserved_disk_refuses_others_and_is_claimed_by_same_uuid(hosts: Callable[[str], v.Plugin],
                                                                 tmp_path: Path, etcd_process: EtcdServer,
                                                                 prefix: str) -> None:
    a, b = hosts("host-a"), hosts("host-b")
    uid, other = str(uuid.uuid4()), str(uuid.uuid4())
    d1, d2 = disk(tmp_path, "d1.img"), disk(tmp_path, "d2.img")
    assert lockd(a, uid, "web1").acquire(d1, ACT) == "granted"
    assert lockd(a, uid, "web1").acquire(d2, ACT) == "granted"
    t1 = token(a, uid, d1)
    assert lockd(a, uid, "web1").release(d1) == "reserved"
    assert lockd(a, uid, "web1").release(d2) == "reserved"  # the pause releases every disk
    assert lockd(a, uid, "web1").release(d1) == "already"
    with pytest.raises(ResourceBusyError) as exc:
        lockd(b, other, "db1").acquire(d1, ACT)
    (holder,) = exc.value.conflicts
    assert (holder.host, holder.domain_name, holder.handoff_to) == ("host-a", "web1", handoff.RESERVED)
    with pytest.raises(ResourceBusyError):  # the reservation holds on host A too
        lockd(a, other, "db1").acquire(d1, ACT)
    # the same UUID on host B takes over both disks at the first ACQUIRE
    assert lockd(b, uid, "web1").acquire(d1, ACT) == "claimed"
    assert token(b, uid, d1) > t1
    assert lockd(b, uid, "web1").acquire(d2, ACT) == "held"
    keys = dump(etcd_process.client(), prefix)
    assert not [k for k in keys if "/handoff/" in k]
    # the source's QEMU exits: releasing its owner drops nothing of B's
    lockd(a, uid, "web1").release_all()
    assert dump(etcd_process.client(), prefix) == keys


def test_source_resume_cancels_its_reservation(hosts: Callable[[str], v.Plugin], tmp_path: Path) -> None:
    a, b = hosts("host-a"), hosts("host-b")
    uid = str(uuid.uuid4())
    d1 = disk(tmp_path)
    lockd(a, uid, "web1").acquire(d1, ACT)
    t1 = token(a, uid, d1)
    lockd(a, uid, "web1").release(d1)
    assert lockd(a, uid, "web1").acquire(d1, ACT) == "resumed"
    assert token(a, uid, d1) == t1
    owner = a.driver.session.owners.peek(uid)
    assert owner is not None and owner.handoff is None
    with pytest.raises(ResourceBusyError) as exc:  # held, not reserved: not claimable by B
        lockd(b, uid, "web1").acquire(d1, ACT)
    assert exc.value.conflicts[0].handoff_to is None


def test_unclaimed_reservation_is_freed_with_its_owner(hosts: Callable[[str], v.Plugin], tmp_path: Path) -> None:
    a, b = hosts("host-a"), hosts("host-b")
    uid = str(uuid.uuid4())
    d1 = disk(tmp_path)
    lockd(a, uid, "web1").acquire(d1, ACT)
    lockd(a, uid, "web1").release(d1)
    lockd(a, uid, "web1").release_all()
    assert lockd(b, str(uuid.uuid4()), "db1").acquire(d1, ACT) == "granted"


def test_claim_checks_the_marker_bytes(hosts: Callable[[str], v.Plugin], tmp_path: Path,
                                       etcd_process: EtcdServer, prefix: str) -> None:
    a, b = hosts("host-a"), hosts("host-b")
    uid, other = str(uuid.uuid4()), str(uuid.uuid4())
    d1 = disk(tmp_path)
    lockd(a, uid, "web1").acquire(d1, ACT)
    lockd(a, uid, "web1").release(d1)
    owner_a = a.driver.session.owners.peek(uid)
    assert owner_a is not None and owner_a.handoff is not None
    key, raw = owner_a.handoff.key, owner_a.handoff.value
    before = dump(etcd_process.client(), prefix)
    dom_b = domain(b, other, "db1")
    with pytest.raises(StaleStateError, match="it is for domain web1"):
        handoff.claim_reservation(dom_b, dom_b.owner(), key, raw)
    dom_b2 = domain(b, uid, "web1")
    with pytest.raises(StaleStateError, match="changed meanwhile"):  # bytes not as in etcd
        handoff.claim_reservation(dom_b2, dom_b2.owner(), key, raw.replace(b'"since":', b'"since": '))
    assert dump(etcd_process.client(), prefix) == before


def test_releasing_one_disk_reserves_only_that_disk(hosts: Callable[[str], v.Plugin], tmp_path: Path,
                                                    etcd_process: EtcdServer, prefix: str) -> None:
    """The unplug of one disk of a running domain: the same UUID started on another host (the
    domain defined on two hosts) must not take the disks the first QEMU still writes."""
    a, b = hosts("host-a"), hosts("host-b")
    uid = str(uuid.uuid4())
    d1, d2 = disk(tmp_path, "d1.img"), disk(tmp_path, "d2.img")
    lockd(a, uid, "web1").acquire(d1, ACT)
    lockd(a, uid, "web1").acquire(d2, ACT)
    t2 = token(a, uid, d2)
    assert lockd(a, uid, "web1").release(d2) == "reserved"  # d2 hot-unplugged on A
    with pytest.raises(ResourceBusyError) as exc:  # the double start on B: d1 is still A's, held
        lockd(b, uid, "web1").acquire(d1, ACT)
    assert [(h.host, h.handoff_to) for h in exc.value.conflicts] == [("host-a", None)]
    owner_a = a.driver.session.owners.peek(uid)
    assert owner_a is not None and owner_a.handoff is not None
    assert {owner_a.held[r].rid.readable for r in owner_a.handoff.rids} == {d2.name}
    assert token(a, uid, d1) and token(a, uid, d2) == t2


def test_a_claim_takes_only_the_released_disks(hosts: Callable[[str], v.Plugin], tmp_path: Path) -> None:
    a, b = hosts("host-a"), hosts("host-b")
    uid = str(uuid.uuid4())
    d1, d2 = disk(tmp_path, "d1.img"), disk(tmp_path, "d2.img")
    lockd(a, uid, "web1").acquire(d1, ACT)
    lockd(a, uid, "web1").acquire(d2, ACT)
    lockd(a, uid, "web1").release(d2)
    assert lockd(b, uid, "web1").acquire(d2, ACT) == "claimed"  # what A no longer uses
    with pytest.raises(ResourceBusyError):
        lockd(b, uid, "web1").acquire(d1, ACT)
    # A settles its release: d2 was claimed meanwhile, so nothing is freed and A forgets it; d1 stays A's
    assert lockd(a, uid, "web1").settle() == []
    owner_a = a.driver.session.owners.peek(uid)
    assert owner_a is not None and owner_a.handoff is None
    assert [h.rid.readable for h in owner_a.held.values()] == [d1.name]


def test_settling_frees_an_unplugged_disk_and_keeps_a_paused_domains(
        hosts: Callable[[str], v.Plugin], tmp_path: Path, etcd_process: EtcdServer, prefix: str) -> None:
    a, b = hosts("host-a"), hosts("host-b")
    uid, other = str(uuid.uuid4()), str(uuid.uuid4())
    d1, d2 = disk(tmp_path, "d1.img"), disk(tmp_path, "d2.img")
    lockd(a, uid, "web1").acquire(d1, ACT)
    lockd(a, uid, "web1").acquire(d2, ACT)
    lockd(a, uid, "web1").release(d2)
    assert lockd(a, uid, "web1").settle() == [d2.name]
    assert lockd(b, other, "db1").acquire(d2, ACT) == "granted"  # free at once
    keys = dump(etcd_process.client(), prefix)
    assert not [k for k in keys if "/handoff/" in k]
    # a pause releases every disk: settling keeps the reservation until the QEMU exits
    lockd(a, uid, "web1").release(d1)
    assert lockd(a, uid, "web1").settle() == []
    with pytest.raises(ResourceBusyError) as exc:
        lockd(b, other, "db1").acquire(d1, ACT)
    assert exc.value.conflicts[0].handoff_to == handoff.RESERVED
    assert lockd(a, uid, "web1").acquire(d1, ACT) == "resumed"


def test_lockd_calls_are_checked_by_the_cores_validation(hosts: Callable[[str], v.Plugin]) -> None:
    """The agent's way into the driver runs the same checks as a lock object; the one exemption
    (an indirect-mode lockspace is a directory path) is checked as an absolute path."""
    from virtlease.errors import ValidationError
    from virtlease_etcd.ops.lockd import lockd_resource

    a = hosts("host-a")
    for uid, name, pid in (("not-a-uuid", "web1", None), (str(uuid.uuid4()), "", None),
                           (str(uuid.uuid4()), "web\x001", None), (str(uuid.uuid4()), "web1", 0)):
        with pytest.raises(ValidationError):
            a.driver.lockd(uid, name, pid)
    for lockspace, name in (("", "relative/disk.img"), ("", "/disk\x00.img"), ("relative/dir", "ab" * 32),
                            ("/var/lib/libvirt/lockd/files", "")):
        with pytest.raises(ValidationError):
            lockd_resource(lockspace, name)
    lease = lockd_resource("/var/lib/libvirt/lockd/files", "ab" * 32, shared=True)
    assert (lease.type, lease.params, lease.shared) == (ResourceType.LEASE, {"lockspace": "/var/lib/libvirt/lockd/files"},
                                                        True)


def test_a_destination_waits_for_the_sources_reservation_then_claims(hosts: Callable[[str], v.Plugin],
                                                                      tmp_path: Path) -> None:
    """The agent answers a pause RELEASE before its reservation commits; a migration's destination
    that asks first waits for it (up to RESERVATION_WAIT) and claims it.  The same domain asking
    while the source keeps the disk held (no reservation coming) is refused after the wait."""
    import threading
    import time

    from virtlease_etcd.ops.lockd import RESERVATION_WAIT

    a, b = hosts("host-a"), hosts("host-b")
    uid = str(uuid.uuid4())
    d1, d2 = disk(tmp_path, "d1.img"), disk(tmp_path, "d2.img")
    lockd(a, uid, "web1").acquire(d1, ACT)
    lockd(a, uid, "web1").acquire(d2, ACT)
    t0 = time.monotonic()
    with pytest.raises(ResourceBusyError) as exc:  # the twin: A keeps both disks, nothing to wait for
        lockd(b, uid, "web1").acquire(d1, ACT)
    assert RESERVATION_WAIT <= time.monotonic() - t0 < RESERVATION_WAIT + 1.0
    assert exc.value.conflicts[0].host == "host-a"

    def pause() -> None:
        lockd(a, uid, "web1").release(d1)
        lockd(a, uid, "web1").release(d2)

    timer = threading.Timer(0.3, pause)
    timer.start()
    t0 = time.monotonic()
    try:
        assert lockd(b, uid, "web1").acquire(d1, ACT) == "claimed"
    finally:
        timer.join()
    assert 0.25 < time.monotonic() - t0 < RESERVATION_WAIT
    assert lockd(b, uid, "web1").acquire(d2, ACT) == "held"
