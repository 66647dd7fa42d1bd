"""Percentiles and summaries of measured samples: the one implementation tests, benchmarks and
the nemesis report with."""

from __future__ import annotations

from collections.abc import Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0..100) of ``samples`` (NaN when there are none);
    the same as ``statistics.quantiles(method="inclusive")``."""
    if not samples:
        return float("nan")
    data = sorted(samples)
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def summary(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """n, min, p50, p99 and max of ``values`` times ``scale``."""
    return {"n": len(values), "min": min(values) * scale, "p50": percentile(values, 50) * scale,
            "p99": percentile(values, 99) * scale, "max": max(values) * scale}
