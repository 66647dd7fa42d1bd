"""The watchdog armed by the lease: a host whose agent stops is reset before etcd can expire it.

sanlock's guarantee, on virtlease's lease (docs/DESIGN.md §11).  The process that holds the
host's session (the agent; any driver user with ``watchdog_device`` set) owns the watchdog
device and

* **arms** it (opens it: that starts the timer) before any grant is sent and while any owner
  of the session holds anything -- so no QEMU can start, or run, on this host's leases without
  it -- and while a lost session still has a killed QEMU that did not exit;
* **pets** it only while ``now + timeout <= fence_at + margin/2`` on the fence clock: the
  session's fence deadline, plus the half margin the guard waits for a silent agent.  If the
  agent stops (frozen, killed, stuck) the pets stop with it, and the watchdog resets the host
  by that deadline, strictly before etcd can expire the lease (``fence_at + margin/2 =
  valid_until - margin/2``).  While keepalives succeed the deadline keeps moving and the pets
  never pause (``config.watchdog_plan`` refuses a timeout for which they would);
* **disarms** it (magic close) once nothing needs it: no owner holds anything and no grant is
  in flight, or the session was lost and every QEMU it killed has exited -- an agent cut off
  from etcd kills its VMs at the fence deadline and, once they are gone, is not reset (as
  sanlock, which resets only when the processes on a lost lease cannot be killed).  With a
  ``nowayout`` driver it never disarms: it keeps petting instead.

A process that exits without disarming (crash, ``SIGUSR2`` hand-over) leaves the timer
running: the next agent must arm it within the timeout, or the host resets.  One
:class:`LeaseWatchdog` per device per process (:func:`open_watchdog`), following the driver's
current session (a renewed session replaces a lost one).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from virtlease.errors import ConfigError
from virtlease_etcd.clock import SYSTEM, Clock
from virtlease_etcd.config import EtcdConfig, WatchdogPlan
from virtlease_etcd.fence.errors import FencingError
from virtlease_etcd.fence.watchdog import Watchdog, WatchdogError, describe

if TYPE_CHECKING:
    from .hostsession import HostSession

log = logging.getLogger(__name__)


class LeaseWatchdog:
    """One watchdog device, petted by the rule of the module docstring."""

    def __init__(self, device: str, plan: WatchdogPlan, *, host: str, clock: Clock = SYSTEM) -> None:
        """``clock``: the fence clock the sessions it follows read their deadlines on."""
        self.clock = clock
        self.device = device
        self.plan = plan
        self.host = host
        self._dog: Watchdog | None = None
        self._session: HostSession | None = None
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._grant_until = 0.0
        self._closed = False
        self._withholding = False
        self.users = 0
        self.nowayout = describe(device).nowayout is True
        self.last_pet: float | None = None
        """``clock.now()`` of the last pet (None: never)."""
        self.pets = 0
        self.withheld = 0
        """Pet ticks skipped because the rule forbade a pet while armed."""
        self.error: str | None = None
        """Why the device could not be armed last time, None once it was."""
        self._thread = threading.Thread(target=self._loop, name=f"virtlease-watchdog-{host}", daemon=True)
        self._thread.start()

    # -- what the session and the driver call --------------------------------------------

    @property
    def armed(self) -> bool:
        return self._dog is not None and self._dog.open

    def follow(self, session: HostSession) -> None:
        """Obey ``session``'s fence deadline from now on (a new or renewed session)."""
        with self._cond:
            self._session = session
            session.watchdog = self
            self._cond.notify_all()

    def arm_for_grant(self, session: HostSession) -> None:
        """Before a grant is sent: make sure the watchdog is armed and may be petted, and keep
        it armed until the grant is done.  FencingError (nothing is sent) otherwise."""
        with self._cond:
            self._arm()
            self._grant_until = self.clock.now() + session.cfg.deadline + session.cfg.request_timeout
            if not self._may_pet(session, self.clock.now()):
                raise FencingError(
                    f"host {self.host}: watchdog {self.device} may not be petted now (its {self.plan.timeout} s "
                    f"would run past the fence deadline); nothing was granted, retry once a keepalive succeeded")
            self._pet()

    def close(self) -> None:
        """Stop the thread; disarm unless a lost session still has a killed QEMU running."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            if self._dog is not None:
                if self._needed(self.clock.now()):
                    log.error("host %s: closing the watchdog while it still guards: left running", self.host)
                    self._dog.abandon()
                else:
                    self._disarm()
        self._thread.join(timeout=5)

    def abandon(self) -> None:
        """Hand-over: stop the thread and close without disarming (the next agent arms it)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            if self._dog is not None:
                self._dog.abandon()
                self._dog = None

    # -- the rule ------------------------------------------------------------------------

    def deadline(self, session: HostSession) -> float:
        """The watchdog's fence deadline: the latest moment the host may be reset."""
        return session.fence_at + session.cfg.margin / 2

    def _may_pet(self, session: HostSession, now: float) -> bool:
        return session.lost is None and not session.closed and now + self.plan.timeout <= self.deadline(session)

    def _needed(self, now: float) -> bool:
        """Does anything on this host run on the session's leases, unfenced?"""
        session = self._session
        if session is None:
            return False
        if session.lost is not None:
            return session.revocation.blocked() is True  # a killed QEMU has not exited (stuck I/O)
        if now < self._grant_until:
            return True
        return any(o.active for o in session.owners.all())

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                self._tick(self.clock.now())
                self._cond.wait(self.plan.pet_every)

    def _tick(self, now: float) -> None:
        session = self._session
        needed = self._needed(now)
        if needed and not self.armed:
            try:
                self._arm()  # e.g. a restarted agent re-adopted running QEMUs: the timer may run
            except FencingError as exc:
                log.error("%s", exc)
                return
        if not self.armed:
            return
        if session is not None and self._may_pet(session, now):
            self._pet()
        elif needed:
            self.withheld += 1
            if not self._withholding:
                self._withholding = True
                left = (self.last_pet or now) + self.plan.timeout - now
                log.error("host %s: not petting watchdog %s: %s; the host resets in %.1f s unless a keepalive "
                          "succeeds first", self.host, self.device,
                          "the session is lost and a killed QEMU has not exited" if session and session.lost
                          else "its timeout would run past the fence deadline", left)
        elif self.nowayout:
            self._pet()  # cannot be stopped: keep it fed while nothing needs it
        else:
            self._disarm()

    # -- the device ----------------------------------------------------------------------

    def _arm(self) -> None:
        if self.armed:
            return
        try:
            dog = Watchdog(self.device, self.plan.timeout)
        except WatchdogError as exc:
            self.error = str(exc)
            raise FencingError(f"host {self.host}: {exc}; this host grants nothing while watchdog_device is "
                               "set and cannot be armed (fix the device, or unset watchdog_device)") from None
        if dog.timeout > self.plan.timeout:
            dog.disarm()
            self.error = f"the driver took a {dog.timeout} s timeout for the {self.plan.timeout} s asked"
            raise FencingError(f"host {self.host}: watchdog {self.device}: {self.error}: longer than the lease "
                               f"allows (at most {self.plan.max_timeout} s); set watchdog_timeout to a value "
                               "the device takes")
        self._dog = dog
        self.error = None
        self.last_pet = self.clock.now()
        log.info("host %s: armed watchdog %s (%s), timeout %d s, petted every %.2f s while the lease allows",
                 self.host, self.device, dog.info.identity or "?", dog.timeout, self.plan.pet_every)

    def _pet(self) -> None:
        assert self._dog is not None
        try:
            self._dog.keepalive()
        except WatchdogError as exc:
            log.error("host %s: %s", self.host, exc)
            return
        self.last_pet = self.clock.now()
        self.pets += 1
        if self._withholding:
            log.warning("host %s: petting watchdog %s again", self.host, self.device)
            self._withholding = False

    def _disarm(self) -> None:
        if self._dog is None:
            return
        if self._dog.disarm():
            log.info("host %s: disarmed watchdog %s (nothing on this host needs it)", self.host, self.device)
        else:
            log.warning("host %s: watchdog %s is nowayout: it keeps running after the close", self.host, self.device)
        self._dog = None


_BY_DEVICE: dict[str, LeaseWatchdog] = {}
_BY_DEVICE_LOCK = threading.Lock()


def open_watchdog(cfg: EtcdConfig) -> LeaseWatchdog | None:
    """The process's :class:`LeaseWatchdog` for ``cfg.watchdog_device`` (shared, counted), or
    None when none is configured.  ConfigError if another host's session already owns it."""
    plan = cfg.watchdog
    if plan is None or cfg.watchdog_device is None:
        return None
    with _BY_DEVICE_LOCK:
        dog = _BY_DEVICE.get(cfg.watchdog_device)
        if dog is None or dog._closed:
            dog = _BY_DEVICE[cfg.watchdog_device] = LeaseWatchdog(cfg.watchdog_device, plan, host=cfg.host_id)
        elif dog.host != cfg.host_id or dog.plan != plan:
            raise ConfigError(f"watchdog_device: {cfg.watchdog_device} is already armed by host {dog.host}'s session "
                              f"in this process (timeout {dog.plan.timeout} s); one watchdog serves one host")
        dog.users += 1
        return dog


def close_watchdog(dog: LeaseWatchdog) -> None:
    """Drop one user; the last one closes it (disarming it when nothing needs it)."""
    with _BY_DEVICE_LOCK:
        dog.users -= 1
        if dog.users > 0:
            return
        if _BY_DEVICE.get(dog.device) is dog:
            del _BY_DEVICE[dog.device]
    dog.close()
