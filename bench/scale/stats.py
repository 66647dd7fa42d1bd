"""Latency histograms that many processes fill and one merges.

Log-spaced buckets (2% wide) from 10 us to 100 s: percentiles are read to within the
bucket width, and a histogram travels as a sparse ``{bucket: count}`` dict, whatever the
number of samples.  ``min``/``max`` are kept exactly.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from typing import Any

_LOW = 1e-5
_RATIO = 1.02
_LOG = math.log(_RATIO)


class Histogram:
    """Seconds, bucketed; ``add`` is cheap enough for every keepalive of a thousand hosts."""

    __slots__ = ("buckets", "max", "min", "n", "total")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.n = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, seconds: float) -> None:
        b = 0 if seconds <= _LOW else int(math.log(seconds / _LOW) / _LOG) + 1
        self.buckets[b] = self.buckets.get(b, 0) + 1
        self.n += 1
        self.total += seconds
        self.min = min(self.min, seconds)
        self.max = max(self.max, seconds)

    def merge(self, other: Histogram) -> Histogram:
        for b, c in other.buckets.items():
            self.buckets[b] = self.buckets.get(b, 0) + c
        self.n += other.n
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) in seconds: the upper edge of its bucket, clamped to the
        exact min and max; NaN when empty."""
        if not self.n:
            return math.nan
        rank = q * self.n
        seen = 0
        for b in sorted(self.buckets):
            seen += self.buckets[b]
            if seen >= rank:
                edge = _LOW * _RATIO ** b
                return min(max(edge, self.min), self.max)
        return self.max

    def summary_ms(self) -> dict[str, Any]:
        """n, p50, p99, max and mean in milliseconds."""
        if not self.n:
            return {"n": 0}
        return {"n": self.n, "p50_ms": round(self.quantile(0.5) * 1000, 3),
                "p99_ms": round(self.quantile(0.99) * 1000, 3), "max_ms": round(self.max * 1000, 3),
                "mean_ms": round(self.total / self.n * 1000, 3)}

    def to_json(self) -> dict[str, Any]:
        return {"b": {str(k): v for k, v in self.buckets.items()}, "n": self.n, "t": self.total,
                "lo": self.min if self.n else None, "hi": self.max if self.n else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        h = cls()
        h.buckets = {int(k): int(v) for k, v in data["b"].items()}
        h.n = int(data["n"])
        h.total = float(data["t"])
        if h.n:
            h.min, h.max = float(data["lo"]), float(data["hi"])
        return h

    @classmethod
    def merged(cls, parts: Iterable[Histogram]) -> Histogram:
        out = cls()
        for p in parts:
            out.merge(p)
        return out


class Histograms:
    """Named histograms (``keepalive.rtt``, ``grant.driver``...) of one process, filled by
    many threads."""

    def __init__(self) -> None:
        self.by_name: dict[str, Histogram] = {}
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            h = self.by_name.get(name)
            if h is None:
                h = self.by_name[name] = Histogram()
            h.add(seconds)

    def to_json(self, reset: bool = False) -> dict[str, Any]:
        """Every histogram as JSON; ``reset`` starts them all afresh (one phase's figures)."""
        with self._lock:
            out = {k: v.to_json() for k, v in self.by_name.items()}
            if reset:
                self.by_name = {}
        return out

    @staticmethod
    def merge_json(parts: Iterable[dict[str, Any]]) -> dict[str, Histogram]:
        out: dict[str, Histogram] = {}
        for part in parts:
            for name, data in part.items():
                out.setdefault(name, Histogram()).merge(Histogram.from_json(data))
        return out
