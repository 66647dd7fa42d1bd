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
from virtlease.abi import FailureAction, ResourceSpec, ResourceType
from virtlease.errors import ResourceBusyError, StaleStateError
from virtlease_etcd.ops import grants, handoff
from virtlease_lab.drivers import domain, load
from virtlease_lab.etcdserver import EtcdServer, dump

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


def disk(tmp_path: Path, name: str = "d1.img") -> ResourceSpec:
    return ResourceSpec(ResourceType.DISK, str(tmp_path / name))


def token(plugin: v.Plugin, uid: str, res: ResourceSpec) -> int:
    owner = plugin.driver.session.owners.peek(uid)
    assert owner is not None
    return next(int(h.token) for h in owner.held.values() if h.rid.readable == res.name)


def test_reserved_disk_refuses_others_and_is_claimed_by_same_uuid(hosts: Callable[[str], v.Plugin],
                                                                 tmp_path: Path, etcd_process: EtcdServer,
                                                                 prefix: str) -> None:
    a, b = hosts("host-a"), hosts("host-b")
    uid, other = str(uuid.uuid4()), str(uuid.uuid4())
    d1, d2 = disk(tmp_path, "d1.img"), disk(tmp_path, "d2.img")
    assert grants.acquire_one(domain(a, uid, "web1"), d1, ACT) == "granted"
    assert grants.acquire_one(domain(a, uid, "web1"), d2, ACT) == "granted"
    t1 = token(a, uid, d1)
    assert grants.release_one(domain(a, uid, "web1"), d1) == "reserved"
    assert grants.release_one(domain(a, uid, "web1"), d2) == "reserved"  # the pause releases every disk
    assert grants.release_one(domain(a, uid, "web1"), d1) == "already"
    with pytest.raises(ResourceBusyError) as exc:
        grants.acquire_one(domain(b, other, "db1"), d1, ACT)
    (holder,) = exc.value.conflicts
    assert (holder.host, holder.domain_name, holder.handoff_to) == ("host-a", "web1", handoff.RESERVED)
    with pytest.raises(ResourceBusyError):  # the reservation holds on host A too
        grants.acquire_one(domain(a, other, "db1"), d1, ACT)
    # the same UUID on host B takes over both disks at the first ACQUIRE
    assert grants.acquire_one(domain(b, uid, "web1"), d1, ACT) == "claimed"
    assert token(b, uid, d1) > t1
    assert grants.acquire_one(domain(b, uid, "web1"), d2, ACT) == "held"
    keys = dump(etcd_process.client(), prefix)
    assert not [k for k in keys if "/handoff/" in k]
    # the source's QEMU exits: releasing its owner drops nothing of B's
    owner_a = a.driver.session.owners.peek(uid)
    assert owner_a is not None
    grants.release_owner(domain(a, uid, "web1"), owner_a)
    assert dump(etcd_process.client(), prefix) == keys


def test_source_resume_cancels_its_reservation(hosts: Callable[[str], v.Plugin], tmp_path: Path) -> None:
    a, b = hosts("host-a"), hosts("host-b")
    uid = str(uuid.uuid4())
    d1 = disk(tmp_path)
    grants.acquire_one(domain(a, uid, "web1"), d1, ACT)
    t1 = token(a, uid, d1)
    grants.release_one(domain(a, uid, "web1"), d1)
    assert grants.acquire_one(domain(a, uid, "web1"), d1, ACT) == "resumed"
    assert token(a, uid, d1) == t1
    owner = a.driver.session.owners.peek(uid)
    assert owner is not None and owner.handoff is None
    with pytest.raises(ResourceBusyError) as exc:  # held, not reserved: not claimable by B
        grants.acquire_one(domain(b, uid, "web1"), d1, ACT)
    assert exc.value.conflicts[0].handoff_to is None


def test_unclaimed_reservation_is_freed_with_its_owner(hosts: Callable[[str], v.Plugin], tmp_path: Path) -> None:
    a, b = hosts("host-a"), hosts("host-b")
    uid = str(uuid.uuid4())
    d1 = disk(tmp_path)
    grants.acquire_one(domain(a, uid, "web1"), d1, ACT)
    grants.release_one(domain(a, uid, "web1"), d1)
    owner = a.driver.session.owners.peek(uid)
    assert owner is not None
    grants.release_owner(domain(a, uid, "web1"), owner)
    assert grants.acquire_one(domain(b, str(uuid.uuid4()), "db1"), d1, ACT) == "granted"


def test_claim_checks_the_marker_bytes(hosts: Callable[[str], v.Plugin], tmp_path: Path,
                                       etcd_process: EtcdServer, prefix: str) -> None:
    a, b = hosts("host-a"), hosts("host-b")
    uid, other = str(uuid.uuid4()), str(uuid.uuid4())
    d1 = disk(tmp_path)
    grants.acquire_one(domain(a, uid, "web1"), d1, ACT)
    grants.release_one(domain(a, uid, "web1"), d1)
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
    grants.acquire_one(domain(a, uid, "web1"), d1, ACT)
    grants.acquire_one(domain(a, uid, "web1"), d2, ACT)
    t2 = token(a, uid, d2)
    assert grants.release_one(domain(a, uid, "web1"), d2) == "reserved"  # d2 hot-unplugged on A
    with pytest.raises(ResourceBusyError) as exc:  # the double start on B: d1 is still A's, held
        grants.acquire_one(domain(b, uid, "web1"), d1, ACT)
    assert [(h.host, h.handoff_to) for h in exc.value.conflicts] == [("host-a", None)]
    owner_a = a.driver.session.owners.peek(uid)
    assert owner_a is not None and owner_a.handoff is not None
    assert {owner_a.held[r].rid.readable for r in owner_a.handoff.rids} == {d2.name}
    assert token(a, uid, d1) and token(a, uid, d2) == t2


def test_a_claim_takes_only_the_released_disks(hosts: Callable[[str], v.Plugin], tmp_path: Path) -> None:
    a, b = hosts("host-a"), hosts("host-b")
    uid = str(uuid.uuid4())
    d1, d2 = disk(tmp_path, "d1.img"), disk(tmp_path, "d2.img")
    grants.acquire_one(domain(a, uid, "web1"), d1, ACT)
    grants.acquire_one(domain(a, uid, "web1"), d2, ACT)
    grants.release_one(domain(a, uid, "web1"), d2)
    assert grants.acquire_one(domain(b, uid, "web1"), d2, ACT) == "claimed"  # what A no longer uses
    with pytest.raises(ResourceBusyError):
        grants.acquire_one(domain(b, uid, "web1"), d1, ACT)
    # A settles its release: d2 was claimed meanwhile, so nothing is freed and A forgets it; d1 stays A's
    assert grants.settle_release(domain(a, uid, "web1")) == []
    owner_a = a.driver.session.owners.peek(uid)
    assert owner_a is not None and owner_a.handoff is None
    assert [h.rid.readable for h in owner_a.held.values()] == [d1.name]


def test_settling_frees_an_unplugged_disk_and_keeps_a_paused_domains(
        hosts: Callable[[str], v.Plugin], tmp_path: Path, etcd_process: EtcdServer, prefix: str) -> None:
    a, b = hosts("host-a"), hosts("host-b")
    uid, other = str(uuid.uuid4()), str(uuid.uuid4())
    d1, d2 = disk(tmp_path, "d1.img"), disk(tmp_path, "d2.img")
    grants.acquire_one(domain(a, uid, "web1"), d1, ACT)
    grants.acquire_one(domain(a, uid, "web1"), d2, ACT)
    grants.release_one(domain(a, uid, "web1"), d2)
    assert grants.settle_release(domain(a, uid, "web1")) == [d2.name]
    assert grants.acquire_one(domain(b, other, "db1"), d2, ACT) == "granted"  # free at once
    keys = dump(etcd_process.client(), prefix)
    assert not [k for k in keys if "/handoff/" in k]
    # a pause releases every disk: settling keeps the reservation until the QEMU exits
    grants.release_one(domain(a, uid, "web1"), d1)
    assert grants.settle_release(domain(a, uid, "web1")) == []
    with pytest.raises(ResourceBusyError) as exc:
        grants.acquire_one(domain(b, other, "db1"), d1, ACT)
    assert exc.value.conflicts[0].handoff_to == handoff.RESERVED
    assert grants.acquire_one(domain(a, uid, "web1"), d1, ACT) == "resumed"
