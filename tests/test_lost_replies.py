"""Lost requests and replies are resolved by reading back, never by guessing (docs/DESIGN.md
section 5, rule 5), against a real etcd.

The fault is injected at the client boundary: the host's next matching transaction is *not
sent* and the call fails as ambiguous (a timeout: etcd may or may not have applied it), after
the test lets another host act in between.  Each test pins a wrong guess that would leave two
writers, or a release reported done while the records stay.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import etcd3
import pytest
from etcd3 import transactions as tx

import virtlease as v
from virtlease_etcd.etcd.client import TransientError
from virtlease_lab.drivers import new_uuid
from virtlease_lab.etcdserver import dump

D = v.ResourceType.DISK
MakeDriver = Callable[..., v.Plugin]


@pytest.fixture
def make_driver(local_drivers: MakeDriver) -> MakeDriver:
    return local_drivers


@pytest.fixture
def kv(kv_process: etcd3.Etcd3Client) -> etcd3.Etcd3Client:
    return kv_process


def vm(plugin: v.Plugin, disks: list[str], *, name: str = "vm", uuid: str | None = None,
       flags: v.NewFlags = v.NewFlags(0)) -> v.LockObject:
    obj = plugin.new_object(uuid=uuid or new_uuid(), name=name, flags=flags)
    for d in disks:
        obj.add_resource(D, d)
    return obj


def holders(kv: etcd3.Etcd3Client, prefix: str) -> dict[str, bytes]:
    return {key: value for key, (value, _rev, _lease) in dump(kv, prefix).items() if "/res/" in key}


Ops = Sequence[Any]


class Lost:
    """The requests :func:`lose_requests` dropped; ``stop()`` sends every later one."""

    def __init__(self) -> None:
        self.count = 0
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


def lose_requests(plugin: v.Plugin, match: Callable[[Ops, Ops], bool], *, meanwhile: Callable[[], None] = lambda: None,
                  times: int = 1) -> Lost:
    """The next ``times`` transactions of ``plugin``'s host for which ``match(compare, success)``
    holds are not sent: ``meanwhile`` runs (once, at the first), then the call fails as ambiguous."""
    client = plugin.driver.session.client
    real: Callable[..., Any] = client.txn
    lost = Lost()

    def txn(compare: Ops, success: Ops, failure: Ops = (), *, timeout: float) -> Any:
        if not lost.stopped and lost.count < times and match(list(compare), list(success)):
            if not lost.count:
                meanwhile()
            lost.count += 1
            raise TransientError("request lost by the test (timeout)", ambiguous=True)
        return real(compare, success, failure, timeout=timeout)

    client.txn = txn
    return lost


def puts(_compare: Ops, success: Ops) -> bool:
    return any(isinstance(op, tx.Put) for op in success)


def deletes(_compare: Ops, success: Ops) -> bool:
    return any(isinstance(op, tx.Delete) for op in success)


def test_a_lost_grant_never_takes_another_hosts_record_for_its_own(make_driver: MakeDriver, kv: etcd3.Etcd3Client,
                                                                    prefix: str) -> None:
    """The grant request is lost; meanwhile host B is granted the disk.  The read-back finds B's
    record at the key ours would have had, and the retry meets it: neither is ours (the bytes
    differ), so the acquire is refused naming B -- never reported granted."""
    a, b = make_driver("host-a"), make_driver("host-b")
    mine = vm(a, ["/srv/lost-grant.img"], name="mine")
    lost = lose_requests(a, puts, meanwhile=lambda: vm(b, ["/srv/lost-grant.img"], name="theirs").acquire())
    with pytest.raises(v.ResourceBusyError, match="theirs"):
        mine.acquire()
    assert lost.count == 1
    assert mine.held() == []
    (record,) = holders(kv, prefix).values()
    assert b'"theirs"' in record and b'"host-b"' in record


def test_a_release_whose_request_was_lost_still_deletes_the_records(make_driver: MakeDriver, kv: etcd3.Etcd3Client,
                                                                    prefix: str) -> None:
    """The release's delete is lost: the read-back finds our records still there (same token),
    so the delete is sent again -- not reported done while the records stay."""
    a, b = make_driver("host-a"), make_driver("host-b")
    obj = vm(a, ["/srv/lost-rel-1.img", "/srv/lost-rel-2.img"])
    obj.acquire()
    lost = lose_requests(a, deletes)
    obj.release()
    assert lost.count == 1
    assert holders(kv, prefix) == {}
    vm(b, ["/srv/lost-rel-1.img", "/srv/lost-rel-2.img"]).acquire()  # really free


def test_a_release_etcd_never_answered_keeps_the_records_for_the_next_one(make_driver: MakeDriver,
                                                                        kv: etcd3.Etcd3Client, prefix: str) -> None:
    """No delete reaches etcd before the release's deadline: the release fails, and the domain
    still counts the records as held (they are still in etcd, on its lease); the next release,
    once etcd answers, deletes them."""
    a = make_driver("host-a", acquire_timeout=1.0, request_timeout=0.3)
    uuid = new_uuid()
    obj = vm(a, ["/srv/unanswered.img"], uuid=uuid)
    obj.acquire()
    lost = lose_requests(a, deletes, times=1000)
    with pytest.raises(v.BackendUnavailableError):
        obj.release()
    assert lost.count
    lost.stop()
    assert [h.name for h in obj.held()] == ["/srv/unanswered.img"], "the records were forgotten, not deleted"
    vm(a, ["/srv/unanswered.img"], uuid=uuid).release()  # a fresh object of the domain, as libvirt retries
    assert holders(kv, prefix) == {}


def test_withdrawing_a_grant_of_unknown_outcome_never_deletes_another_hosts_record(
        make_driver: MakeDriver, kv: etcd3.Etcd3Client, prefix: str) -> None:
    """Every grant request is lost until the deadline: the acquire fails and its records are
    withdrawn in the background (it might have committed).  Host B holds the disk: the
    withdrawal compares our bytes and leaves B's record alone."""
    b = make_driver("host-b")
    vm(b, ["/srv/withdraw.img"], name="theirs").acquire()
    before = holders(kv, prefix)
    a = make_driver("host-a", acquire_timeout=1.0, request_timeout=0.3)
    lost = lose_requests(a, puts, times=1000)
    with pytest.raises(v.BackendUnavailableError):
        vm(a, ["/srv/withdraw.img"], name="mine").acquire()
    assert lost.count, "no grant request was sent"
    until = time.monotonic() + 10
    while any(t.name == "virtlease-withdraw" and t.is_alive() for t in threading.enumerate()):
        assert time.monotonic() < until, "the withdrawal never finished"
        time.sleep(0.05)
    assert holders(kv, prefix) == before


def test_a_lost_cancel_after_the_destination_claimed_is_no_cancel(make_driver: MakeDriver, kv: etcd3.Etcd3Client,
                                                                  prefix: str) -> None:
    """The source's cancel request is lost while the destination claims.  The read-back finds the
    marker gone (a claim deletes it too) and the records rewritten: the cancel did not happen,
    the source is told the destination holds the domain and keeps nothing in its books."""
    a, b = make_driver("host-a"), make_driver("host-b")
    disks = ["/srv/lost-cancel-1.img", "/srv/lost-cancel-2.img"]
    src = vm(a, disks, name="web1")
    src.acquire()
    state = src.prepare_migrate("host-b")
    dst = vm(b, disks, name="web1", uuid=src.uuid, flags=v.NewFlags.MIGRATE)
    lost = lose_requests(a, deletes, meanwhile=lambda: dst.acquire(state))
    with pytest.raises(v.StaleStateError, match="already claimed"):
        src.complete_migrate_out(cancel=True)
    assert lost.count == 1
    assert src.held() == []
    assert {h.name for h in dst.held()} == set(disks)
    assert all(b'"host-b"' in record for record in holders(kv, prefix).values())
