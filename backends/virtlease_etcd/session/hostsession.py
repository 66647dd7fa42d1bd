"""A host's session: one etcd lease, kept alive, fenced before it can expire.

Every key this host holds is attached to the session's single lease, so
keepalive traffic is one refresh per TTL/3 whatever the number of disks.

Clock assumption (the safety argument rests on it): each keepalive is timed
from when it was *sent*, on this host's fence clock (``virtlease_etcd.clock``:
CLOCK_BOOTTIME, which never steps and counts while the machine is suspended).
etcd starts the renewed TTL when it *receives* the request, which is later, so
``valid_until = sent + TTL`` is never after etcd's own expiry as long as the
two clocks advance at about the same rate (drift well below ``margin``).  At
``valid_until - margin`` without a newer successful keepalive the session is
lost: listeners run the failure actions (kill/stop the VMs) *before* etcd
can expire the lease and hand a disk to another host.  A leader change only
extends leases, which is on the safe side.

A process that is itself paused (SIGSTOP, a frozen VM host) cannot fence in
time; fencing tokens (the grant revision, see ``keyspace``) let storage
reject its late writes.

See docs/DESIGN.md §5 (The safety model).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from virtlease.errors import BackendUnavailableError, LeaseLostError
from virtlease_etcd.clock import SYSTEM, Clock
from virtlease_etcd.config import EtcdConfig
from virtlease_etcd.etcd.client import EtcdClient, LeaseNotFound, TransientError
from virtlease_etcd.model import keyspace as ks

from . import fencing, hostrecord
from .owners import Owner, Owners
from .storagefence import StorageFence

if TYPE_CHECKING:
    from .watchdog import LeaseWatchdog

log = logging.getLogger(__name__)

LostListener = Callable[[str], None]


class HostSession:
    """One host's etcd lease and its keepalive/fence threads."""

    def __init__(self, cfg: EtcdConfig, clock: Clock = SYSTEM) -> None:
        """``clock`` is what every fence, keepalive and deadline time is read from, here and
        in the session's etcd client (``virtlease_etcd.clock``; a fake one in tests)."""
        self.cfg = cfg
        self.clock = clock
        self.keys = ks.Keys(cfg.prefix)
        self.client = EtcdClient(cfg, clock)
        self.lease_id = 0
        self.ttl = cfg.ttl
        self.session_id = secrets.token_hex(8)
        self._valid_until = 0.0
        self._lost: str | None = None
        self._lost_at: float | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._listeners: list[LostListener] = []
        self._threads: list[threading.Thread] = []
        self.revocation = fencing.RevocationGate()
        self.keepalives_sent = 0
        self.owners = Owners()
        self.storage = StorageFence(self, cfg) if cfg.scsi_pr_luns else None
        """Persistent-reservation fencing of the grants (``scsi_pr_luns``), None when off."""
        self.watchdog: LeaseWatchdog | None = None
        """The watchdog armed by this session's lease (the driver's ``LeaseWatchdog.follow``)."""

    # -- life cycle ----------------------------------------------------------

    def start(self) -> HostSession:
        """Grant the lease and register the host; raises ConfigError if the
        host_id already has a live session elsewhere."""
        deadline = self.clock.now() + self.cfg.deadline

        def grant(timeout: float) -> tuple[float, int, int]:
            sent = self.clock.now()
            lease_id, ttl = self.client.lease_grant(self.cfg.ttl, timeout=timeout)
            return sent, lease_id, ttl

        sent, self.lease_id, self.ttl = self.client.retrying(grant, deadline=deadline)
        self._valid_until = sent + self.ttl
        try:
            hostrecord.register(self, deadline=deadline)
        except BaseException:
            self._revoke_quietly()
            raise
        return self.run(valid_until=sent + self.ttl)

    def run(self, *, valid_until: float) -> HostSession:
        """Start the watch, keepalive and fence threads on ``self.lease_id``, valid until
        ``valid_until`` (on ``self.clock``).  ``start`` calls it; ``reattach`` calls it on an
        adopted lease."""
        self._valid_until = valid_until
        self._watch_host_key(self.keys.host(self.cfg.host_id))
        for target, name in ((self._keepalive_loop, "keepalive"), (self._fence_loop, "fence")):
            thread = threading.Thread(target=target, name=f"virtlease-{name}-{self.cfg.host_id}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("session for host %s: lease %x, ttl %ss, fence margin %.1fs",
                 self.cfg.host_id, self.lease_id, self.ttl, self.cfg.margin)
        return self

    def _watch_host_key(self, host_key: str) -> None:
        """Learn at once when our host key goes (the lease revoked from outside,
        ``etcdctl lease revoke``, or the key deleted by hand): the records are
        gone too, so another host may be granted our disks now.  Only speeds
        up detection; the fence deadline does not depend on it."""
        thread = threading.Thread(target=self._watch_loop, args=(host_key,), daemon=True,
                                  name=f"virtlease-watch-{self.cfg.host_id}")
        thread.start()
        self._threads.append(thread)

    def _watch_loop(self, host_key: str) -> None:
        while not self._stopped():
            try:
                for gone in self.client.watch_deleted(host_key, stop=self._stopped):
                    if gone:  # our own close() revokes the lease too: then it is no news
                        if not self._closed:
                            self.lease_gone("the host key was deleted in etcd (lease revoked from outside?)")
                        return
            except Exception as exc:  # reconnect; the keepalive covers the gap
                log.debug("host %s: host key watch interrupted (%s); re-watching", self.cfg.host_id, exc)
            with self._cond:
                if not self._stopped():
                    self._cond.wait(0.5)

    def lease_gone(self, why: str) -> None:
        """etcd says our lease no longer exists: fence now (another host may
        already hold our disks), and make every later call fail."""
        self._mark_lost(f"etcd lease {self.lease_id:x} is gone: {why}")

    def close(self) -> None:
        """Stop refreshing and revoke the lease: every key of the session goes."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._lost is None:
            self._revoke_quietly()
        for thread in self._threads:
            thread.join(timeout=self.cfg.request_timeout + 1)
        self.client.close()

    def _revoke_quietly(self) -> None:
        if not self.lease_id:
            return
        try:
            self.client.lease_revoke(self.lease_id, timeout=self.cfg.request_timeout)
        except Exception as exc:
            log.warning("could not revoke lease %x (it will expire in %ss): %s", self.lease_id, self.ttl, exc)

    # -- state -----------------------------------------------------------------

    @property
    def fence_at(self) -> float:
        """The time (``self.clock.now()``) at which the session fences itself."""
        return self._valid_until - self.cfg.margin

    @property
    def closed(self) -> bool:
        """True once ``close`` was called."""
        return self._closed

    @property
    def lost(self) -> str | None:
        """Why the session was lost, or None while it is valid."""
        return self._lost

    @property
    def lost_at(self) -> float | None:
        return self._lost_at

    def add_listener(self, listener: LostListener) -> None:
        with self._cond:
            self._listeners.append(listener)

    def remove_listener(self, listener: LostListener) -> None:
        with self._cond:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def check(self) -> None:
        """Raise LeaseLostError unless the session is valid right now."""
        if self._lost is None and self.clock.now() >= self.fence_at and not self._closed:
            self._mark_lost("no successful keepalive before the fence deadline")
        if self._lost is not None:
            raise LeaseLostError(
                f"host {self.cfg.host_id}: session lease {self.lease_id:x} lost ({self._lost}); "
                "its domains were fenced. Load the driver again for a new session"
            )
        if self._closed:
            raise LeaseLostError(f"host {self.cfg.host_id}: session closed")

    def before_grant(self) -> None:
        """Before a grant or claim is sent: the watchdog, if configured, is armed and may be
        petted (FencingError otherwise: nothing is sent)."""
        if self.watchdog is not None:
            self.watchdog.arm_for_grant(self)

    def secure_storage(self, paths: Sequence[str]) -> None:
        """Before a grant on the disks at ``paths`` is reported: their fenced LUNs carry this
        session's key and a reservation, and no dead session's key (``StorageFence.secure``)."""
        if self.storage is not None and paths:
            self.storage.secure(paths)

    def deadline(self, seconds: float | None = None) -> float:
        """A deadline (on ``self.clock``) for an operation: ``seconds`` from now (default
        the configured acquire timeout), never past the fence deadline."""
        return min(self.clock.now() + (self.cfg.deadline if seconds is None else seconds), self.fence_at)

    def refresh(self) -> bool:
        """Send one keepalive now, outside the keepalive thread's rhythm, and extend the fence
        deadline by it (timed from when it was sent, as every keepalive).  The agent does this
        before it hands over to its successor, so the successor gets a whole ``ttl - margin``,
        not as little as two thirds of it.  False if it did not renew (the keepalive thread
        and the fence clock go on as ever)."""
        sent = self.clock.now()
        timeout = min(self.cfg.request_timeout, self.fence_at - sent)
        if timeout <= 0 or self._stopped():
            return False
        try:
            ttl = self.client.lease_keepalive(self.lease_id, timeout=timeout)
        except (TransientError, BackendUnavailableError, LeaseNotFound) as exc:
            log.warning("host %s: keepalive before the handover failed (%s)", self.cfg.host_id, exc)
            return False
        if ttl <= 0:
            return False  # the keepalive thread finds out too, and declares the session lost
        with self._cond:
            if sent + ttl > self._valid_until:
                self._valid_until = sent + ttl
            self._cond.notify_all()
        return True

    # -- threads ---------------------------------------------------------------

    def _stopped(self) -> bool:
        """Closed or lost: another thread may set either at any time."""
        return self._closed or self._lost is not None

    def _keepalive_loop(self) -> None:
        interval = self.ttl / 3
        next_at = self.clock.now() + interval
        while True:
            with self._cond:
                while not self._closed and self._lost is None and self.clock.now() < next_at:
                    self._cond.wait(next_at - self.clock.now())
                if self._closed or self._lost is not None:
                    return
            sent = self.clock.now()
            try:
                timeout = min(self.cfg.request_timeout, self.fence_at - sent)
                if timeout <= 0:
                    return  # the fence thread takes it from here
                self.keepalives_sent += 1
                ttl = self.client.lease_keepalive(self.lease_id, timeout=timeout)
            except (TransientError, BackendUnavailableError) as exc:
                if self._stopped():  # lost or closed while the request was out
                    return
                log.warning("host %s: keepalive failed (%s); %.1fs to fence", self.cfg.host_id, exc,
                            self.fence_at - self.clock.now())
                next_at = self.clock.now() + min(0.25, interval)
                continue
            except LeaseNotFound:
                ttl = 0
            except Exception:  # never let the keepalive thread die silently
                log.exception("host %s: keepalive error", self.cfg.host_id)
                next_at = self.clock.now() + min(0.25, interval)
                continue
            if ttl <= 0:
                self._mark_lost("etcd reports the lease expired or revoked")
                return
            with self._cond:
                if sent + ttl > self._valid_until:
                    self._valid_until = sent + ttl
                self._cond.notify_all()
            next_at = sent + interval

    def _fence_loop(self) -> None:
        with self._cond:
            while not self._closed and self._lost is None:
                left = self.fence_at - self.clock.now()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._closed or self._lost is not None:
                return
        self._mark_lost(f"no successful keepalive for {self.ttl - self.cfg.margin:.1f}s "
                        f"(fenced {self.cfg.margin:.1f}s before the lease could expire)")

    def _mark_lost(self, reason: str) -> None:
        with self._cond:
            if self._lost is not None:
                return
            self._lost = reason
            self._lost_at = self.clock.now()
            listeners = list(self._listeners)
            self._cond.notify_all()
        log.error("host %s: session lost: %s", self.cfg.host_id, reason)
        for owner in self.owners.all():  # fence first: nothing may delay the failure actions
            self.fence(owner, reason)
        for listener in listeners:
            try:
                listener(reason)
            except Exception:
                log.exception("host %s: lease-lost listener failed", self.cfg.host_id)
        threading.Thread(target=self._revoke_after_fence, name=f"virtlease-revoke-{self.cfg.host_id}",
                         daemon=True).start()

    def fence(self, owner: Owner, reason: str) -> None:
        """Run the owner's failure action now (``fencing.fence``)."""
        fencing.fence(owner, reason, self.revocation)

    def _revoke_after_fence(self) -> None:
        """After fencing, if etcd is reachable again before the lease expires
        (a leader change can extend it well past the TTL), revoke it so the
        host's disks — including any grant whose reply never arrived — are
        free at once.  Never earlier than the lease would have expired by our
        own clock, and only once every killed VM has exited (a process stuck
        in storage I/O dies only when that I/O completes)."""
        with self._cond:
            not_before = self._valid_until
        until = self.clock.now() + 2 * self.ttl + 5
        while self.clock.now() < until and not self._closed:
            blocked = self.revocation.blocked()  # a late grant may still be fenced meanwhile
            if blocked is None:
                return
            if blocked or self.clock.now() < not_before:
                self.clock.sleep(0.1)
                continue
            try:
                self.client.lease_revoke(self.lease_id, timeout=min(self.cfg.request_timeout, 1.0))
                log.info("host %s: revoked fenced lease %x", self.cfg.host_id, self.lease_id)
                return
            except Exception as exc:
                log.debug("host %s: revoke after fence failed (%s); retrying", self.cfg.host_id, exc)
                self.clock.sleep(0.5)
