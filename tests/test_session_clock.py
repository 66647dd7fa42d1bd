"""The session's fence arithmetic on a fake clock: no etcd, no real TTL waits.

``HostSession`` reads every fence and keepalive time from its injectable
``clock`` (``virtlease_etcd.clock``) and hands that clock to its etcd client,
whose retries, backoff and deadlines use it too, and so does the grant path's
fence check.  Here the clock only moves when the test (or a fake etcd reply,
a retry's backoff or a fake condition wait) moves it, so the deadlines are
exact numbers.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace, TracebackType
from typing import Any
from unittest import mock

import pytest

from virtlease.abi import FailureAction, ObjectSpec, ObjectType
from virtlease.errors import BackendUnavailableError, LeaseLostError
from virtlease_etcd.clock import FENCE_CLOCK, SYSTEM
from virtlease_etcd.config import EtcdConfig, load_config
from virtlease_etcd.etcd.client import EtcdClient, TransientError
from virtlease_etcd.ops.disks import DiskNames
from virtlease_etcd.ops.domain import Domain, GrantResult
from virtlease_etcd.session.hostsession import HostSession
from virtlease_etcd.session.owners import Policy
from virtlease_lab.fakeclock import FakeClock


class FakeCond:
    """A condition whose ``wait(t)`` lets ``t`` seconds pass on the fake clock at once."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self._lock = threading.RLock()

    def __enter__(self) -> FakeCond:
        self._lock.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        self.clock.advance(max(0.0, timeout or 0.0))
        return False

    def notify_all(self) -> None:
        pass


class FakeClient(EtcdClient):
    """The real client (its retries, deadlines and backoff on the session's clock) with the
    few requests the session makes answered here; each reply takes ``delay`` seconds."""

    def __init__(self, cfg: EtcdConfig, clock: FakeClock, *, delay: float, replies: list[int]) -> None:
        super().__init__(cfg, clock)
        self.fake = clock
        self.delay = delay
        self.replies = list(replies)
        self.sent: list[float] = []
        self.session: HostSession | None = None
        self.store: dict[str, bytes] = {}
        self.txns = 0
        self.lose_replies = 0

    def lease_grant(self, ttl: int, *, timeout: float) -> tuple[int, int]:
        self.fake.advance(self.delay)
        return 0xABC, ttl

    def txn(self, compare: Any, success: Any, failure: Any = (), *, timeout: float) -> Any:
        self.txns += 1
        for put in success:
            self.store[put.key] = put.value
        if self.lose_replies:
            self.lose_replies -= 1
            raise TransientError("reply lost", ambiguous=True)
        return SimpleNamespace(succeeded=True, header=SimpleNamespace(revision=1), responses=[])

    def get_range(self, key: str, range_end: str | None = None, *, timeout: float,
                  serializable: bool = False) -> tuple[list[Any], int]:
        value = self.store.get(key)
        return ([] if value is None else [SimpleNamespace(value=value, mod_revision=1)]), 1

    def lease_keepalive(self, lease_id: int, *, timeout: float) -> int:
        self.sent.append(self.fake.now())
        self.fake.advance(self.delay)
        ttl = self.replies.pop(0)
        if not self.replies and self.session is not None:
            self.session._closed = True  # the loop ends after applying this reply
        return ttl

    def lease_revoke(self, lease_id: int, *, timeout: float) -> None:
        pass


TTL = 10
MARGIN = 2.0


def make_session(*, delay: float = 0.0, replies: list[int] | None = None,
                 start: float = 1000.0) -> tuple[HostSession, FakeClock, FakeClient]:
    clock = FakeClock(start)
    cfg = load_config({"endpoints": "127.0.0.1:1", "host_id": "clock-host", "ttl": TTL,
                       "fence_margin": MARGIN}, environ={})
    session = HostSession(cfg, clock=clock)
    session.client.close()
    client = FakeClient(cfg, clock, delay=delay, replies=replies or [])
    client.session = session
    session.client = client
    session._cond = FakeCond(clock)  # type: ignore[assignment]
    return session, clock, client


def test_grant_is_timed_from_its_send_time() -> None:
    session, clock, _client = make_session(delay=1.5)
    session._watch_host_key = lambda host_key: None  # type: ignore[method-assign]
    session._keepalive_loop = lambda: None  # type: ignore[method-assign]
    session._fence_loop = lambda: None  # type: ignore[method-assign]
    sent = clock.now()
    session.start()
    assert clock.now() == sent + 1.5
    assert session._valid_until == sent + TTL
    assert session.fence_at == sent + TTL - MARGIN


def test_a_lost_host_record_reply_is_read_back_not_resent() -> None:
    session, _clock, client = make_session()
    session._watch_host_key = lambda host_key: None  # type: ignore[method-assign]
    session._keepalive_loop = lambda: None  # type: ignore[method-assign]
    session._fence_loop = lambda: None  # type: ignore[method-assign]
    client.lose_replies = 1
    session.start()
    assert client.txns == 1  # the read-back found the record: no second put
    assert list(client.store) == [session.keys.host("clock-host")]


def test_check_marks_lost_at_the_fence_deadline() -> None:
    session, clock, _client = make_session()
    session._valid_until = clock.now() + TTL
    try:
        assert session.fence_at == clock.now() + TTL - MARGIN
        clock.at = session.fence_at - 0.001
        session.check()
        assert session.lost is None
        clock.at = session.fence_at
        with pytest.raises(LeaseLostError, match="fence deadline"):
            session.check()
        assert session.lost is not None
        assert session.lost_at == session.fence_at
    finally:
        session._closed = True  # ends the revoke-after-fence thread


def test_deadline_never_passes_the_fence() -> None:
    session, clock, _client = make_session()
    session._valid_until = clock.now() + TTL
    assert session.deadline(1.0) == clock.now() + 1.0
    assert session.deadline(60.0) == session.fence_at


def test_keepalive_extends_from_its_send_time_not_its_reply_time() -> None:
    session, clock, client = make_session(delay=1.5, replies=[TTL])
    start = clock.now()
    session._valid_until = start + TTL
    session._keepalive_loop()
    (sent,) = client.sent
    assert sent == start + TTL / 3  # sent after one keepalive interval
    assert clock.now() == sent + 1.5  # the reply came 1.5 s later ...
    assert session._valid_until == sent + TTL  # ... but validity counts from the send
    assert session.fence_at == sent + TTL - MARGIN


def test_a_longer_ttl_reply_extends_and_a_later_shorter_one_never_shrinks() -> None:
    session, clock, client = make_session(delay=0.5, replies=[3 * TTL, TTL])
    session._valid_until = clock.now() + TTL
    session._keepalive_loop()
    first, second = client.sent
    assert second < first + 3 * TTL - TTL  # the second reply alone would end validity earlier
    assert session._valid_until == first + 3 * TTL
    assert session.lost is None


def test_an_expired_lease_reply_marks_the_session_lost() -> None:
    session, clock, _client = make_session(replies=[0])
    session._valid_until = clock.now() + TTL
    try:
        session._keepalive_loop()
        assert session.lost is not None and "expired or revoked" in session.lost
    finally:
        session._closed = True


# The fake clock starts at 10 s, far behind the machine's own monotonic clock (its uptime): a
# module that read the real clock instead of the session's would see every deadline long gone.
EARLY = 10.0


def test_retries_back_off_on_the_session_clock_until_its_deadline() -> None:
    session, clock, client = make_session(start=EARLY)
    deadline = clock.now() + 5.0
    attempts: list[tuple[float, float]] = []

    def unreachable(timeout: float) -> None:
        attempts.append((clock.now(), timeout))
        raise TransientError("no answer", ambiguous=False)

    with pytest.raises(BackendUnavailableError, match="the deadline"):
        client.retrying(unreachable, deadline=deadline)
    assert len(attempts) > 3 and clock.slept  # backed off by sleeping on the session's clock
    assert all(0 < timeout <= session.cfg.request_timeout for _at, timeout in attempts)
    assert attempts[-1][0] < deadline <= clock.now() + 0.01


def test_the_grant_path_checks_the_fence_on_the_session_clock() -> None:
    session, clock, _client = make_session(start=EARLY)
    session._valid_until = clock.now() + TTL
    fenced: list[str] = []
    session.fence = lambda owner, reason: fenced.append(reason)  # type: ignore[method-assign]
    spec = ObjectSpec(ObjectType.DOMAIN, "6b0c1c6a-56e7-4f2b-9d26-0f1d8b1a4f00", "web1")
    domain = Domain(session, session.cfg, Policy(FailureAction.POWEROFF), spec, DiskNames(session.cfg))
    owner = domain.owner()
    try:
        clock.at = session.fence_at - 0.001
        domain.commit(owner, GrantResult(True, (), {}))
        assert fenced == [] and session.lost is None
        clock.at = session.fence_at
        with pytest.raises(LeaseLostError):
            domain.commit(owner, GrantResult(True, (), {}))
        assert fenced and session.lost is not None
    finally:
        session._closed = True


def test_one_fence_clock_counts_through_suspend() -> None:
    """Every fence time is on CLOCK_BOOTTIME (it keeps counting while the machine is
    suspended): the session's clock, hence its etcd client's deadlines and the guard's (told
    the clock's id)."""
    assert FENCE_CLOCK == time.CLOCK_BOOTTIME and SYSTEM.clock_id == FENCE_CLOCK
    cfg = load_config({"host_id": "h", "ttl": TTL, "fence_margin": MARGIN})
    with mock.patch("virtlease_etcd.session.hostsession.EtcdClient"):
        assert HostSession(cfg).clock is SYSTEM
