"""The agent's per-owner strand: jobs in submission order, each continuing in the thread that
finished the one before, errors delivered to their own future only."""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from virtlease_etcd.agent.strand import Strand


def test_jobs_run_in_submission_order_one_at_a_time() -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        strand = Strand(pool)
        seen: list[int] = []
        running = threading.Semaphore(1)

        def job(i: int) -> int:
            assert running.acquire(blocking=False), "two jobs of one strand ran at once"
            time.sleep(0.001 if i % 3 else 0)
            seen.append(i)
            running.release()
            return i * i

        futures = [strand.submit(functools.partial(job, i)) for i in range(50)]
        assert [f.result(10) for f in futures] == [i * i for i in range(50)]
        assert seen == list(range(50))


def test_a_job_queued_behind_another_runs_in_the_thread_that_finished_it() -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        strand = Strand(pool)
        gate = threading.Event()
        first = strand.submit(lambda: (gate.wait(10), threading.get_ident())[1])
        second = strand.submit(threading.get_ident)
        gate.set()
        assert first.result(10) == second.result(10)


def test_a_failing_job_fails_its_own_future_and_the_next_still_runs() -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        strand = Strand(pool)

        def boom() -> None:
            raise RuntimeError("etcd said no")

        failed = strand.submit(boom)
        after = strand.submit(lambda: "ran")
        with pytest.raises(RuntimeError, match="etcd said no"):
            failed.result(10)
        assert after.result(10) == "ran"


def test_strands_of_two_owners_run_concurrently() -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        a, b = Strand(pool), Strand(pool)
        both = threading.Barrier(2, timeout=10)
        fa, fb = a.submit(both.wait), b.submit(both.wait)
        fa.result(10)
        fb.result(10)


def test_submit_after_the_pool_shut_down_raises_and_leaves_nothing_queued() -> None:
    pool = ThreadPoolExecutor(max_workers=1)
    strand = Strand(pool)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        strand.submit(lambda: None)
    assert not strand._jobs and not strand._running


def test_a_job_queued_while_the_pool_refuses_is_failed_not_left_waiting() -> None:
    """Another job queued between our start of a drain and the pool's refusal (a pool shut down
    meanwhile) gets an error at once instead of a future nobody ever completes."""
    others: list[Future[Any]] = []

    class Refusing(ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
            others.append(strand.submit(lambda: "never"))  # arrives while the drain is starting
            raise RuntimeError("cannot schedule new futures after shutdown")

    strand = Strand(Refusing(max_workers=1))
    with pytest.raises(RuntimeError, match="after shutdown"):
        strand.submit(lambda: None)
    (other,) = others
    with pytest.raises(RuntimeError, match="thread pool is shut down"):
        other.result(1)
    assert not strand._jobs and not strand._running
