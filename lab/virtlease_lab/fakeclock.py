"""A fake clock for tests: every fence, keepalive and deadline time of a session comes from its
``Clock`` (``virtlease_etcd.clock``), so a session built on this one only sees time pass when the
test moves it (or when something sleeps on it)."""

from __future__ import annotations

from virtlease_etcd.clock import Clock


class FakeClock(Clock):
    """A clock that moves only when told to (or when something sleeps on it)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.at = now
        self.slept: list[float] = []

    def now(self) -> float:
        return self.at

    def wall(self) -> float:
        return 1_700_000_000.0 + self.at

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(max(0.0, seconds))

    def advance(self, seconds: float) -> None:
        self.at += seconds
