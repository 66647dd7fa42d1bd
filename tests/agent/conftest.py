"""Fixtures for the agent tests (the harness itself is virtlease_lab.lockdharness)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from virtlease_lab.lockdharness import RecordingBackend, ServerThread, Vector, load_vectors


@pytest.fixture(scope="session")
def vectors() -> list[Vector]:
    return load_vectors(Path(__file__).parent / "data" / "lockd-capture-vectors.txt")


@pytest.fixture
def sock_dir(tmp_path: Path) -> Path:
    """A root-owned 0700 directory for the socket."""
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def start_agent(sock_dir: Path) -> Iterator[Callable[..., ServerThread]]:
    """start_agent(backend, **server_kwargs) -> a running ServerThread; stopped at teardown."""
    started: list[ServerThread] = []

    def start(backend: Any, **kwargs: Any) -> ServerThread:
        st = ServerThread(sock_dir / "virtlockd-sock", backend, **kwargs)
        started.append(st)
        return st

    yield start
    for st in started:
        if st.thread.is_alive():
            st.stop()


@pytest.fixture
def backend() -> RecordingBackend:
    return RecordingBackend()


@pytest.fixture
def agent(start_agent: Callable[..., ServerThread], backend: RecordingBackend) -> ServerThread:
    """A running server over ``backend``."""
    return start_agent(backend)
