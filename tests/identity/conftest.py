"""Fixtures of the identity tests (the storage helpers are in virtlease_lab.storage)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from virtlease_lab.storage import sshd as sshd_server


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """An sshd on a free loopback port: (port, the user's key)."""
    with sshd_server(tmp_path) as found:
        yield found
