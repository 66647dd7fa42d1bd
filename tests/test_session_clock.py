"""The session's fence arithmetic on a fake clock: no etcd, no real TTL waits.

``HostSession`` reads every fence and keepalive time from its injectable
``clock``; here that clock only moves when the test (or a fake etcd reply
or a fake condition wait) moves it, so the deadlines are exact numbers.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace, TracebackType
from typing import Any
from unittest import mock

import pytest

from virtlease.errors import LeaseLostError
from virtlease_etcd.config import load_config
from virtlease_etcd.session.hostsession import HostSession


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


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


class FakeClient:
    """The few EtcdClient calls the session makes; each reply takes ``delay`` seconds."""

    def __init__(self, clock: FakeClock, *, delay: float, replies: list[int]) -> None:
        self.clock = clock
        self.delay = delay
        self.replies = list(replies)
        self.sent: list[float] = []
        self.session: HostSession | None = None
        self.raw = mock.MagicMock()  # raw.transactions builds the compare/put/get ops

    def retrying(self, fn: Any, *, deadline: float, on_ambiguous: Any = None) -> Any:
        return fn(1.0)

    def lease_grant(self, ttl: int, *, timeout: float) -> tuple[int, int]:
        self.clock.advance(self.delay)
        return 0xABC, ttl

    def txn(self, *_args: Any, timeout: float) -> Any:
        return SimpleNamespace(succeeded=True)

    def lease_keepalive(self, lease_id: int, *, timeout: float) -> int:
        self.sent.append(self.clock())
        self.clock.advance(self.delay)
        ttl = self.replies.pop(0)
        if not self.replies and self.session is not None:
            self.session._closed = True  # the loop ends after applying this reply
        return ttl

    def lease_revoke(self, lease_id: int, *, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass


TTL = 10
MARGIN = 2.0


def make_session(*, delay: float = 0.0, replies: list[int] | None = None) -> tuple[HostSession, FakeClock,
                                                                                    FakeClient]:
    clock = FakeClock()
    cfg = load_config({"endpoints": "127.0.0.1:1", "host_id": "clock-host", "ttl": TTL,
                       "fence_margin": MARGIN}, environ={})
    session = HostSession(cfg, clock=clock)
    session.client.close()
    client = FakeClient(clock, delay=delay, replies=replies or [])
    client.session = session
    session.client = client  # type: ignore[assignment]
    session._cond = FakeCond(clock)  # type: ignore[assignment]
    return session, clock, client


def test_grant_is_timed_from_its_send_time() -> None:
    session, clock, _client = make_session(delay=1.5)
    session._watch_host_key = lambda key: None  # type: ignore[method-assign]
    session._keepalive_loop = lambda: None  # type: ignore[method-assign]
    session._fence_loop = lambda: None  # type: ignore[method-assign]
    sent = clock()
    session.start()
    assert clock() == sent + 1.5
    assert session._valid_until == sent + TTL
    assert session.fence_at == sent + TTL - MARGIN


def test_check_marks_lost_at_the_fence_deadline() -> None:
    session, clock, _client = make_session()
    session._valid_until = clock() + TTL
    try:
        assert session.fence_at == clock() + TTL - MARGIN
        clock.now = session.fence_at - 0.001
        session.check()
        assert session.lost is None
        clock.now = session.fence_at
        with pytest.raises(LeaseLostError, match="fence deadline"):
            session.check()
        assert session.lost is not None
        assert session.lost_at == session.fence_at
    finally:
        session._closed = True  # ends the revoke-after-fence thread


def test_deadline_never_passes_the_fence() -> None:
    session, clock, _client = make_session()
    session._valid_until = clock() + TTL
    assert session.deadline(1.0) == clock() + 1.0
    assert session.deadline(60.0) == session.fence_at


def test_keepalive_extends_from_its_send_time_not_its_reply_time() -> None:
    session, clock, client = make_session(delay=1.5, replies=[TTL])
    start = clock()
    session._valid_until = start + TTL
    session._keepalive_loop()
    (sent,) = client.sent
    assert sent == start + TTL / 3  # sent after one keepalive interval
    assert clock() == sent + 1.5  # the reply came 1.5 s later ...
    assert session._valid_until == sent + TTL  # ... but validity counts from the send
    assert session.fence_at == sent + TTL - MARGIN


def test_a_longer_ttl_reply_extends_and_a_later_shorter_one_never_shrinks() -> None:
    session, clock, client = make_session(delay=0.5, replies=[3 * TTL, TTL])
    session._valid_until = clock() + TTL
    session._keepalive_loop()
    first, second = client.sent
    assert second < first + 3 * TTL - TTL  # the second reply alone would end validity earlier
    assert session._valid_until == first + 3 * TTL
    assert session.lost is None


def test_an_expired_lease_reply_marks_the_session_lost() -> None:
    session, clock, _client = make_session(replies=[0])
    session._valid_until = clock() + TTL
    try:
        session._keepalive_loop()
        assert session.lost is not None and "expired or revoked" in session.lost
    finally:
        session._closed = True


def test_one_fence_clock_counts_through_suspend() -> None:
    """Every fence time is on CLOCK_BOOTTIME (it keeps counting while the machine is
    suspended), in the session, the etcd client's deadlines and the agent's guard alike."""
    import time

    from virtlease_etcd import clock
    from virtlease_etcd.session import guard

    assert clock.CLOCK_ID == time.CLOCK_BOOTTIME
    assert guard.CLOCK_ID == clock.CLOCK_ID  # the guard imports nothing of ours: it must agree
    cfg = load_config({"host_id": "h", "ttl": TTL, "fence_margin": MARGIN})
    with mock.patch("virtlease_etcd.session.hostsession.EtcdClient"):
        assert HostSession(cfg)._clock is clock.now
