"""The one clock of the etcd backend: every read of the time, and every sleep, goes through here.

Nothing else in ``src/`` or ``backends/`` reads the time (``time.monotonic``, ``time.time``,
``time.perf_counter``, ``time.sleep``, ...): ruff's banned-api rule (pyproject.toml) refuses it
outside this module.  A :class:`HostSession` takes a :class:`Clock` and hands it to its etcd
client; everything that works for the session -- keepalives, the fence deadline, request
deadlines, retries and their backoff, endpoint failover, the grant path's fence check -- reads
that one clock, so a test's fake clock moves all of them together (tests/test_session_clock.py).

Two kinds of time, never mixed:

* :meth:`Clock.now`: seconds on the **fence clock** (``FENCE_CLOCK``, ``CLOCK_BOOTTIME``).  Like
  ``CLOCK_MONOTONIC`` it never jumps with the wall clock; unlike it, it keeps counting while the
  machine is suspended.  A host that sleeps through its fence deadline must wake up *past* it:
  with ``CLOCK_MONOTONIC`` the suspended time would not count, the session would believe it
  still had that much time left, and its VMs would run on while etcd has already expired the
  lease and handed their disks to another host.  Every deadline and duration.  The safety argument rests on it (docs/DESIGN.md section 5): a
  keepalive is timed from when it was sent on this clock, and the fence deadline is read from it.
  The guard process (``session/guard.py``, standard library only) is told the clock's id
  and reads the same clock, so the deadlines it is sent mean the same there.
* :meth:`Clock.wall`: seconds since the epoch.  Only what people read (``since`` and ``started``
  in records, ages in ``virtlease status``) and the comparison with etcd's clock in
  ``virtlease check``; never a safety decision.
"""

from __future__ import annotations

import time
from typing import Final

FENCE_CLOCK: Final[int] = time.CLOCK_BOOTTIME
"""The clock every deadline is read from: the one line that chooses it."""


class Clock:
    """The system's clocks.  Subclass it to fake time in a test (override all three)."""

    clock_id: int = FENCE_CLOCK
    """The fence clock's id (``time.clock_gettime``), for processes that must read the same clock."""

    def now(self) -> float:
        """Seconds on the fence clock: compare only with other ``now()`` readings."""
        return time.clock_gettime(self.clock_id)

    def wall(self) -> float:
        """Seconds since the epoch (for people and for comparing with other hosts; may step)."""
        return time.time()

    def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass (nothing for zero or less)."""
        if seconds > 0:
            time.sleep(seconds)


SYSTEM: Final[Clock] = Clock()
"""The real clock: the default wherever a clock is not passed in."""
