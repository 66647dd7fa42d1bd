"""The one clock every fence time, keepalive and deadline of the driver is read from.

``CLOCK_BOOTTIME``: like ``CLOCK_MONOTONIC`` it never jumps with the wall clock, and unlike it
it keeps counting while the machine is suspended.  A host that sleeps through its fence
deadline must wake up *past* it: with ``CLOCK_MONOTONIC`` the suspended time would not count,
the session would believe it still had that much time left, and its VMs would run on while
etcd has already expired the lease and handed their disks to another host (docs/DESIGN.md §5).

Every module takes its time from :func:`now`; the agent's guard (a separate standard-library
process) reads the same clock id, :data:`CLOCK_ID`, since the deadlines it is told are on it.
"""

from __future__ import annotations

import time

CLOCK_ID = time.CLOCK_BOOTTIME


def now() -> float:
    """Seconds on the fence clock (CLOCK_BOOTTIME): only differences mean anything."""
    return time.clock_gettime(CLOCK_ID)
