"""Timing, latency summaries, concurrent throughput loops, memory and progress lines
(percentiles: the lab's ``virtlease_lab.stats``)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from virtlease_lab.stats import percentile

_T0 = time.monotonic()


def progress(message: str) -> None:
    """One progress line on stderr, stamped with the run's elapsed time."""
    elapsed = time.monotonic() - _T0
    print(f"[{int(elapsed // 60):02d}:{elapsed % 60:04.1f}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Latency:
    """Latency summary in milliseconds."""

    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        return cls(n=len(seconds), p50_ms=percentile(seconds, 50) * 1000,
                   p99_ms=percentile(seconds, 99) * 1000, mean_ms=sum(seconds) / max(1, len(seconds)) * 1000)

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def time_calls(fn: Callable[[], object], *, max_n: int, budget: float, min_n: int = 10,
               warmup: int = 3) -> list[float]:
    """Call ``fn`` up to ``max_n`` times (at least ``min_n``) or until
    ``budget`` seconds have passed; return each call's duration."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    end = time.monotonic() + budget
    while len(samples) < max_n and (len(samples) < min_n or time.monotonic() < end):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


class Worker(Protocol):
    def op(self) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Throughput:
    callers: int
    ops: int
    seconds: float
    errors: int

    @property
    def per_second(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"callers": self.callers, "ops": self.ops, "seconds": round(self.seconds, 3),
                "errors": self.errors, "per_second": round(self.per_second, 1)}


def run_concurrent(workers: Sequence[Worker], duration: float) -> Throughput:
    """Each worker loops ``op()`` in its own thread for ``duration`` seconds
    after a common start; count completed ops."""
    counts = [0] * len(workers)
    errors = [0] * len(workers)
    barrier = threading.Barrier(len(workers) + 1)
    stop = threading.Event()

    def loop(i: int, worker: Worker) -> None:
        barrier.wait()
        while not stop.is_set():
            try:
                worker.op()
            except Exception as exc:  # counted, and the first one is shown
                errors[i] += 1
                if errors[i] == 1:
                    progress(f"  worker {i}: {type(exc).__name__}: {str(exc)[:200]}")
                time.sleep(0.01)
                continue
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i, w), daemon=True) for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start  # includes each worker's last op
    return Throughput(callers=len(workers), ops=sum(counts), seconds=elapsed, errors=sum(errors))


def proc_status_kib(field: str = "VmRSS") -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM...)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0
