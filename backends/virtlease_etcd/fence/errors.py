"""The lock-operation error for a fence that could not be put in place."""

from __future__ import annotations

from virtlease.errors import LockError


class FencingError(LockError):
    """Storage fencing or the watchdog could not be put in place for a grant: nothing is
    granted (the message names the LUN or device, the holder of a key, and what to do)."""
