"""Reservations (handoff markers ``to="*"``) at driver level, real etcd: a released disk of a
live domain stays reserved for its UUID; the same UUID elsewhere claims it with a new token,
another domain is refused naming the reservation, the source resumes by cancelling it, and
releasing the owner (its QEMU gone) frees everything.  A reservation lists only the disks
released: after one disk of a running domain is released (a hot-unplug, a block-job pivot)
the others stay held, never claimable, and settling the release frees the released one."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from etcd3 import transactions as tx

import virtlease as v
from virtlease.abi import FailureAction, ResourceSpec, ResourceType
from virtlease.errors import BackendUnavailableError, ResourceBusyError, StaleStateError
from virtlease_etcd.etcd.errors import TransientError
from virtlease_etcd.ops import handoff
from virtlease_etcd.ops.lockd import LockdDomain
from virtlease_lab.drivers import EXPIRY_SLACK, domain, load
from virtlease_lab.etcdserver import EtcdServer, dump

ACT = FailureAction.DEFAULT


@pytest.fixture
def hosts(etcd_process: EtcdServer, prefix: str) -> Iterator[Callable[..., v.Plugin]]:
    plugins: list[v.Plugin] = []

    def make(host: str, **config: Any) -> v.Plugin:
        plugin = load(etcd_process.endpoints, prefix, host, **config)
        plugins.append(plugin)
        return plugin

    yield make
    for plugin in plugins:
        plugin.driver.release_all()
        plugin.unload()


def lockd(plugin: v.Plugin, uid: str, name: str) -> LockdDomain:
    """The agent's way into the driver, for one domain of ``plugin``'s host."""
    found: LockdDomain = plugin.driver.lockd(uid, name, None)
    return found


def disk(tmp_path: Path, name: str = "d1.img") -> ResourceSpec:
    return ResourceSpec(ResourceType.DISK, str(tmp_path / name))


def token(plugin: v.Plugin, uid: str, res: ResourceSpec) -> int:
    owner = plugin.driver.session.owners.peek(uid)
    assert owner is not None
    return int(owner.held[plugin.driver.names.primary(res).rid].token)


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


def test_a_reservation_claim_never_takes_a_handoff_to_another_host(hosts: Callable[[str], v.Plugin], tmp_path: Path,
                                                                    etcd_process: EtcdServer, prefix: str) -> None:
    """A migration's handoff names its destination: a third host, even for the same domain, cannot
    take it as if it were a reservation (the check is on the marker bytes the claim compares)."""
    a, _b, c = hosts("host-a"), hosts("host-b"), hosts("host-c")
    uid = str(uuid.uuid4())
    d1 = disk(tmp_path)
    lockd(a, uid, "web1").acquire(d1, ACT)
    handoff.prepare(domain(a, uid, "web1"), "host-b")
    owner_a = a.driver.session.owners.peek(uid)
    assert owner_a is not None and owner_a.handoff is not None
    before = dump(etcd_process.client(), prefix)
    dom_c = domain(c, uid, "web1")
    with pytest.raises(StaleStateError, match="from host host-a to host host-b"):
        handoff.claim_reservation(dom_c, dom_c.owner(), owner_a.handoff.key, owner_a.handoff.value)
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


def test_a_hotplug_beside_an_unplug_in_flight_keeps_the_unplugged_disk_reserved(
        hosts: Callable[[str], v.Plugin], tmp_path: Path) -> None:
    """An unplug (one disk RELEASEd, its connection still open) and a hotplug of another disk
    (ACQUIRE) cross: the hotplug is no resume, so the unplugged disk stays reserved and is freed
    when the unplug settles."""
    a, b = hosts("host-a"), hosts("host-b")
    uid, other = str(uuid.uuid4()), str(uuid.uuid4())
    d1, d2, d3 = disk(tmp_path, "d1.img"), disk(tmp_path, "d2.img"), disk(tmp_path, "d3.img")
    lockd(a, uid, "web1").acquire(d1, ACT)
    lockd(a, uid, "web1").acquire(d2, ACT)
    lockd(a, uid, "web1").release(d1)  # the unplug
    assert lockd(a, uid, "web1").acquire(d3, ACT) == "granted"  # the hotplug, meanwhile
    assert lockd(a, uid, "web1").reserved()
    assert lockd(a, uid, "web1").settle() == [d1.name]
    assert lockd(b, other, "db1").acquire(d1, ACT) == "granted"


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
    # the wait, then the refusal (the upper bound is slack for a loaded machine: 1.35 s was seen at load 40)
    assert RESERVATION_WAIT <= time.monotonic() - t0 < RESERVATION_WAIT + EXPIRY_SLACK
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
    # d2 came with d1's claim, or (its reservation committed after the claim) by a claim of its own
    assert lockd(b, uid, "web1").acquire(d2, ACT) in ("held", "claimed")


def _marker_reply_lost(plugin: v.Plugin) -> Callable[[], None]:
    """The next transaction that writes this host's handoff marker commits in etcd, but its reply
    is lost and etcd answers none of this host's requests until the caller's deadline has passed
    (its keepalives go on): the outcome stays unknown.  Returns what puts the client back."""
    client = plugin.driver.session.client
    real_txn, real_get = client.txn, client.get_range
    dark = threading.Event()

    def txn(compare: Any, success: Any, failure: Any = (), *, timeout: float) -> Any:
        if dark.is_set():
            raise TransientError("etcd does not answer (test)", ambiguous=False)
        resp = real_txn(compare, success, failure, timeout=timeout)
        if any(isinstance(op, tx.Put) and "/handoff/" in str(op.key) for op in success):
            dark.set()
            raise TransientError("the reply was lost (test)", ambiguous=True)
        return resp

    def get_range(*args: Any, **kwargs: Any) -> Any:
        if dark.is_set():
            raise TransientError("etcd does not answer (test)", ambiguous=False)
        return real_get(*args, **kwargs)

    client.txn, client.get_range = txn, get_range

    def restore() -> None:
        assert dark.is_set(), "no marker was written"
        client.txn, client.get_range = real_txn, real_get

    return restore


@pytest.mark.parametrize("lost", ["first release", "second release"])
def test_a_release_etcd_never_confirmed_leaves_no_claimable_disk_the_qemu_writes(
        hosts: Callable[..., v.Plugin], tmp_path: Path, etcd_process: EtcdServer, prefix: str, lost: str) -> None:
    """A RELEASE whose reservation committed in etcd but whose reply never came (etcd unreachable
    until the deadline, the session alive): the agent logs that the disk stays held, not reserved,
    and libvirt goes on -- a resume, or the disk attached again after an unplug, ACQUIREs it and
    the QEMU writes it.
    The reservation the owner did not know of must not let the same UUID on another host claim
    that disk then.  (Found by the nemesis: a pivot back onto an image whose release etcd never
    confirmed, while the twin claimed it; two writers.)"""
    a, b = hosts("host-a", acquire_timeout=1.0), hosts("host-b")
    uid = str(uuid.uuid4())
    d1, d2 = disk(tmp_path, "d1.img"), disk(tmp_path, "d2.img")
    lockd(a, uid, "web1").acquire(d1, ACT)
    lockd(a, uid, "web1").acquire(d2, ACT)
    if lost == "second release":  # a pause: d1 released, then d2's release is the one lost
        assert lockd(a, uid, "web1").release(d1) == "reserved"
    restore = _marker_reply_lost(a)
    with pytest.raises(BackendUnavailableError):
        lockd(a, uid, "web1").release(d2)
    restore()
    (marker,) = [k for k in dump(etcd_process.client(), prefix) if "/handoff/" in k]
    assert d2.name.encode() in etcd_process.client().get(marker)[0], "the reservation committed"
    # the QEMU writes d2 again on host A (resumed, or d2 attached again)
    assert lockd(a, uid, "web1").acquire(d2, ACT) in ("resumed", "held")
    with pytest.raises(ResourceBusyError) as exc:  # the same domain started on host B
        lockd(b, uid, "web1").acquire(d2, ACT)
    assert [(h.host, h.handoff_to) for h in exc.value.conflicts] == [("host-a", None)]
    # and the owner's view is right again: releasing everything leaves nothing behind
    lockd(a, uid, "web1").release_all()
    assert not [k for k in dump(etcd_process.client(), prefix) if "/handoff/" in k or "/res/" in k]



def _first_disk_claimed(hosts: Callable[..., v.Plugin], tmp_path: Path
                        ) -> tuple[v.Plugin, v.Plugin, str, ResourceSpec]:
    """Domain web1 holds d1 and d2 on host-a, pauses d1 (reserved), and host-b claims d1:
    (a, b, its UUID, d2), d2 still held on host-a."""
    a, b = hosts("host-a"), hosts("host-b")
    uid = str(uuid.uuid4())
    d1, d2 = disk(tmp_path, "d1.img"), disk(tmp_path, "d2.img")
    lockd(a, uid, "web1").acquire(d1, ACT)
    lockd(a, uid, "web1").acquire(d2, ACT)
    assert lockd(a, uid, "web1").release(d1) == "reserved"
    assert lockd(b, uid, "web1").acquire(d1, ACT) == "claimed"
    return a, b, uid, d2


def test_a_transient_etcd_error_while_a_release_finds_its_reservation_claimed_is_retried(
        hosts: Callable[..., v.Plugin], tmp_path: Path) -> None:
    """A pause whose second RELEASE finds the reservation claimed meanwhile (the same UUID took
    the first disk elsewhere) reads the marker back; a transient etcd error on that read is
    retried like every other request, never passed up as the etcd client's internal error (found
    by the nemesis: a TransientError escaped the agent path), and the disk is reserved anew."""
    a, _, uid, d2 = _first_disk_claimed(hosts, tmp_path)
    owner = a.driver.session.owners.peek(uid)
    assert owner is not None and owner.handoff is not None
    marker = owner.handoff.key
    client = a.driver.session.client
    real_txn, real_get = client.txn, client.get_range
    failed: list[str] = []

    def once(what: str) -> None:
        if not failed:
            failed.append(what)
            raise TransientError("etcd did not answer (test)", ambiguous=False)

    def txn(compare: Any, success: Any, failure: Any = (), *, timeout: float) -> Any:
        if success and all(isinstance(op, tx.Get) for op in success) and any(str(op.key) == marker
                                                                             for op in success):
            once("txn")
        return real_txn(compare, success, failure, timeout=timeout)

    def get_range(key: Any, *args: Any, **kwargs: Any) -> Any:
        if str(key) == marker:
            once("get_range")
        return real_get(key, *args, **kwargs)

    client.txn, client.get_range = txn, get_range
    try:
        assert lockd(a, uid, "web1").release(d2) == "reserved"
    finally:
        client.txn, client.get_range = real_txn, real_get
    assert failed, "the marker was not read back"
    assert [h.rid.readable for h in owner.held.values()] == [d2.name]
    assert owner.handoff is not None and owner.handoff.rids == frozenset(owner.held)


def test_a_destination_that_claimed_the_first_disks_waits_for_the_last_ones(hosts: Callable[[str], v.Plugin],
                                                                           tmp_path: Path) -> None:
    """The source's reservations commit one disk after another (the agent answers each pause
    RELEASE at once): the destination claims d1 while the source has not released d2 yet; when
    d2's RELEASE comes, the source reserves it anew (its first reservation is gone, claimed) and
    the destination, already holding d1, waits for that reservation and claims d2 too.  Before,
    the destination refused d2 at once (it waited only while it held nothing) and the source's
    release of d2 failed: the migration failed with d1 on the destination."""
    import threading

    a, b, uid, d2 = _first_disk_claimed(hosts, tmp_path)
    released: list[str] = []
    timer = threading.Timer(0.3, lambda: released.append(lockd(a, uid, "web1").release(d2)))
    timer.start()
    try:
        assert lockd(b, uid, "web1").acquire(d2, ACT) == "claimed"
    finally:
        timer.join()
    assert released == ["reserved"]
    owner = b.driver.session.owners.peek(uid)
    assert owner is not None and sum(1 for h in owner.held.values() if h.rid.legacy_of is None) == 2
