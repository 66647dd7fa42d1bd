"""Every write of the driver goes through ``run``: one transaction, retried, lease-checked, read back.

``run`` sends one transaction with retries until a deadline (never past the session's fence
deadline).  A lost reply is resolved with a read-back (``written``, ``deleted``) before any
retry, so a retry never conflicts with our own write (docs/DESIGN.md §5, rule 5); etcd saying
our lease is gone fences the session at once (``lease_checked``).  A grant whose outcome stays
unknown is withdrawn in the background (``withdraw_in_background``).  The session's own host
record (``hostrecord``) and every lock operation (``ops/``) use it; ``ops/transactions`` builds
what they send.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from etcd3 import transactions as tx

from virtlease_etcd.etcd.client import LeaseNotFound, TransientError

if TYPE_CHECKING:
    from .hostsession import HostSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What one transaction did: from etcd's reply, or found by a read-back
    after the reply was lost (then there are no responses and no revision)."""

    succeeded: bool
    revision: int = 0
    """The reply's header revision (the fencing token of what it wrote); 0 from a read-back."""
    responses: Sequence[Any] = ()
    """The reply's response ops, in request order (the failure branch's gets, say)."""
    revisions: Mapping[str, int] = field(default_factory=dict)
    """From a read-back: the mod revision of each key found written."""
    read_back: bool = False

    @classmethod
    def of(cls, reply: Any) -> Outcome:
        """From etcd's TxnResponse."""
        return cls(bool(reply.succeeded), int(reply.header.revision), list(reply.responses))

    @classmethod
    def found(cls, revisions: Mapping[str, int] | None = None, *, succeeded: bool = True) -> Outcome:
        """From a read-back: did the lost transaction take effect."""
        return cls(succeeded, revisions=dict(revisions or {}), read_back=True)


ReadBack = Callable[[float], "Outcome | None"]
"""Given a timeout, return the outcome of a transaction whose reply was
lost, or None if it did not commit (then it is retried)."""


def run(session: HostSession, compare: list[Any], success: list[Any], failure: list[Any], *,
        deadline: float, read_back: ReadBack | None = None) -> Outcome:
    """Send one transaction with retries until ``deadline`` (never past the
    session's fence deadline).  A lost reply is resolved with ``read_back``
    before any retry, so a retry never conflicts with our own write."""
    client = session.client

    def attempt(timeout: float) -> Outcome:
        session.check()
        return Outcome.of(lease_checked(session, lambda: client.txn(compare, success, failure, timeout=timeout)))

    def resolve(exc: TransientError) -> Outcome | None:
        assert read_back is not None
        outcome = read_back(client.attempt_timeout(deadline))
        if outcome is not None:
            log.info("lost reply (%s) resolved by read-back: the transaction had committed", exc)
        return outcome

    started = session.clock.now()
    result: Outcome = client.retrying(attempt, deadline=min(deadline, session.fence_at),
                             on_ambiguous=resolve if read_back is not None else None)
    log.debug("txn of %d ops took %.1f ms", len(success), (session.clock.now() - started) * 1000)
    return result


T = TypeVar("T")


def lease_checked(session: HostSession, request: Callable[[], T]) -> T:
    """Run one request; if etcd says our lease does not exist (revoked from
    outside, or expired), the session is lost: fence now and raise
    LeaseLostError instead of the backend's internal error."""
    try:
        return request()
    except LeaseNotFound as exc:
        session.lease_gone(f"a request was refused: {exc}")
        session.check()
        raise  # pragma: no cover - check() raised


def written(session: HostSession, records: list[tuple[str, bytes]]) -> ReadBack:
    """Read-back for a write: committed iff every record is there, byte-equal."""
    def read(timeout: float) -> Outcome | None:
        found: dict[str, int] = {}
        for key, value in records:
            kvs, _ = session.client.get_range(key, timeout=timeout)
            if kvs and kvs[0].value == value:
                found[key] = int(kvs[0].mod_revision)
        if len(found) == len(records):
            return Outcome.found(found)
        if found:  # an atomic txn cannot half-commit: never guess, retry the read
            raise TransientError(f"read-back saw {len(found)}/{len(records)} records", ambiguous=True)
        return None
    return read


def deleted(session: HostSession, records: list[tuple[str, int]]) -> ReadBack:
    """Read-back for a delete: committed iff none of our (key, token) is left."""
    def read(timeout: float) -> Outcome | None:
        for key, token in records:
            kvs, _ = session.client.get_range(key, timeout=timeout)
            if kvs and int(kvs[0].mod_revision) == token:
                return None
        return Outcome.found()
    return read


def withdraw_in_background(session: HostSession, records: list[tuple[str, bytes]]) -> None:
    """Delete our records if a grant whose outcome we never learned did
    commit: one transaction comparing every value byte for byte (a record we
    wrote carries a unique grant id, so nobody else's is touched).  Retried
    until it is known done or the session ends; if the session is lost, its
    lease revocation or expiry removes them anyway."""
    def work() -> None:
        compare = [tx.Value(key) == value for key, value in records]
        delete = [tx.Delete(key) for key, _ in records]
        while session.lost is None and not session.closed:
            try:
                resp = session.client.txn(compare, delete, [], timeout=session.cfg.request_timeout)
            except Exception as exc:
                log.debug("withdrawing an uncertain grant: %s; retrying", exc)
                session.clock.sleep(0.5)
                continue
            if resp.succeeded:
                log.warning("an acquire reported as failed had committed; withdrew %d record(s)", len(records))
            return

    threading.Thread(target=work, name="virtlease-withdraw", daemon=True).start()
