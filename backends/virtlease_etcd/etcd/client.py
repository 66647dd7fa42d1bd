"""The etcd connection: raw requests with per-call deadlines, errors mapped,
transient failures retried with tenacity — never past a deadline.

Built directly on etcd's gRPC stubs (the protobufs python-etcd3 ships): each
call carries its own deadline, the transaction's header revision (the
fencing token) is kept, endpoints fail over on the session's clock
(``virtlease_etcd.clock``), and every gRPC error is translated in one place.
Every deadline here is a time on that clock.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from etcd3 import etcdrpc
from tenacity import Retrying, retry_if_exception_type, wait_random_exponential

from virtlease.errors import BackendUnavailableError, ConfigError, TransactionTooLargeError
from virtlease_etcd.clock import SYSTEM, Clock
from virtlease_etcd.config import EtcdConfig

from .endpoints import Endpoint, request_op
from .errors import HINTS, TRANSIENT_CODES, connect_problem
from .errors import LeaseNotFound as LeaseNotFound
from .errors import PermissionDenied as PermissionDenied
from .errors import ReplyTooLarge as ReplyTooLarge
from .errors import RevisionCompacted as RevisionCompacted
from .errors import TransientError as TransientError
from .tlsfiles import check_tls_files

log = logging.getLogger(__name__)
T = TypeVar("T")
_PERM_TYPES = {0: "READ", 1: "WRITE", 2: "READWRITE"}

class EtcdClient:
    """One connection to an etcd cluster (every member), shared by a host session.

    Each request goes to the member in use, with its own deadline; a member
    that fails transiently is skipped for ``ENDPOINT_RETRY`` seconds and the
    next one is used.  Every gRPC error becomes one of this module's errors
    in one place (``_call``)."""

    def __init__(self, cfg: EtcdConfig, clock: Clock = SYSTEM) -> None:
        """ConfigError if the TLS files cannot serve (``tlsfiles``); connects lazily.  ``clock``: what
        every deadline given to this client is a time on (the session's)."""
        self.cfg = cfg
        self.clock = clock
        creds = None
        if cfg.tls:
            check_tls_files(cfg)
            creds = grpc.ssl_channel_credentials(
                _read(cfg.ca_cert), _read(cfg.cert_key), _read(cfg.cert_cert))
        self._endpoints = [Endpoint(ep, creds, clock) for ep in cfg.endpoints]
        self._current = random.randrange(len(self._endpoints))
        self._lock = threading.Lock()
        self._metadata: tuple[tuple[str, str], ...] = ()
        self.cluster_id: int | None = None
        self.answered = False
        """True once any member answered a request: from then on a failed connection is an
        outage to ride out (retried until the deadline); before, one that every member refuses
        for a known reason (``errors.ConnectProblem``) is a configuration to report at once."""
        if cfg.user is not None:
            self._authenticate()

    def close(self) -> None:
        for ep in self._endpoints:
            ep.channel.close()

    # -- plumbing ----------------------------------------------------------

    @property
    def endpoint_in_use(self) -> str:
        """``host:port`` of the member requests go to now."""
        return self._endpoints[self._current].netloc

    def _pick(self) -> Endpoint:
        """The member in use, or the next one that has not failed in the last ``ENDPOINT_RETRY``
        seconds; if every one has (an election, a member killed: each failed once within a
        second), the one that failed longest ago: it is asked again rather than nobody until a
        mark runs out, as etcd's own client keeps trying."""
        with self._lock:
            n = len(self._endpoints)
            for i in range(n):
                index = (self._current + i) % n
                if not self._endpoints[index].failed():
                    self._current = index
                    return self._endpoints[index]
            self._current = min(range(n), key=lambda k: self._endpoints[k].failed_at or 0.0)
            return self._endpoints[self._current]

    def _authenticate(self, seconds: float | None = None) -> None:
        """Get an auth token, retrying transient failures (a loaded member can take seconds to
        answer a TLS handshake) for ``seconds`` (default the acquire deadline).  ConfigError if
        etcd refuses the user or password."""
        request = etcdrpc.AuthenticateRequest(name=self.cfg.user, password=self.cfg.password)

        def attempt(timeout: float) -> Any:
            ep = self._pick()
            try:
                return ep.auth.Authenticate(request, timeout)
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION):
                    raise ConfigError(f"user/password: etcd at {ep.netloc} refused to authenticate user "
                                      f"{self.cfg.user}: {exc.details()}",
                                      hint="check user and password (deploy/etcd/rbac.sh creates the users)"
                                      ) from None
                raise self._translate(ep, exc, write=False) from exc

        seconds = self.cfg.deadline if seconds is None else seconds
        resp = self.retrying(attempt, deadline=self.clock.now() + seconds)
        self.answered = True
        self._metadata = (("token", resp.token),)

    def _call(self, request: Callable[[Endpoint, tuple[tuple[str, str], ...]], T], *, write: bool) -> T:
        """Send one request to the member in use; the one place gRPC errors
        are translated.  An expired auth token is renewed once (simple tokens
        expire; a long hold must not fail on it)."""
        for renewed in (False, True):
            ep = self._pick()
            try:
                result = request(ep, self._metadata)
            except grpc.RpcError as exc:
                details = exc.details() or exc.code().name
                if not renewed and self.cfg.user is not None and "auth token" in details:
                    log.info("etcd auth token expired (%s); authenticating again", details)
                    self._authenticate(self.cfg.request_timeout)
                    continue
                raise self._translate(ep, exc, write=write) from exc
            ep.problem = None
            self.answered = True
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _translate(self, ep: Endpoint, exc: grpc.RpcError, *, write: bool) -> Exception:
        code = exc.code()
        details = exc.details() or code.name
        problem = connect_problem(details, ep.netloc, self.cfg)
        if code in TRANSIENT_CODES or problem is not None:
            ep.fail()
            ep.problem = problem
            return TransientError(f"etcd {problem.text}" if problem else f"etcd {ep.netloc}: {details}",
                                  ambiguous=write)
        if "lease not found" in details:
            return LeaseNotFound(details)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
            return ReplyTooLarge(f"etcd {ep.netloc}: {details}")
        if code is grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
            return RevisionCompacted(f"etcd {ep.netloc}: {details}")
        if "too many operations" in details:
            return TransactionTooLargeError(
                f"etcd refused the transaction: {details}; raise the cluster's --max-txn-ops "
                "or split the domain's resources"
            )
        if "user name is empty" in details:
            return PermissionDenied("etcd refused the request: authentication is on and no user was given "
                                    "(set user/password, or a client certificate whose CN is an etcd user)")
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            return PermissionDenied(f"etcd refused the request: {details}")
        return BackendUnavailableError(f"etcd error {code.name}: {details}")

    def _header(self, header: Any) -> None:
        if self.cluster_id is None and header is not None and header.cluster_id:
            self.cluster_id = int(header.cluster_id)

    # -- requests (one attempt each) -----------------------------------------

    def txn(self, compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any] = (),
            *, timeout: float) -> Any:
        """One transaction; returns etcd's TxnResponse (``succeeded``,
        ``header.revision``, ``responses``)."""
        request = etcdrpc.TxnRequest(compare=[c.build_message() for c in compare],
                                     success=[request_op(op) for op in success],
                                     failure=[request_op(op) for op in failure])
        resp = self._call(lambda ep, md: ep.kv.Txn(request, timeout, metadata=md),
                          write=bool(success) or bool(failure))
        self._header(resp.header)
        return resp

    def get_range(self, key: str, range_end: str | None = None, *, timeout: float,
                  serializable: bool = False) -> tuple[list[Any], int]:
        """KeyValues in [key, range_end) (or the one key), and the revision read.  ``serializable``:
        the member's local copy, without a quorum round (may lag: for hints only)."""
        request = etcdrpc.RangeRequest(key=key.encode(), range_end=(range_end or "").encode(),
                                       serializable=serializable)
        resp = self._call(lambda ep, md: ep.kv.Range(request, timeout, metadata=md), write=False)
        self._header(resp.header)
        return list(resp.kvs), int(resp.header.revision)

    def get_page(self, key: str | bytes, range_end: str, *, limit: int, revision: int,
                 timeout: float) -> tuple[list[Any], int, bool]:
        """At most ``limit`` KeyValues in [key, range_end) as of ``revision`` (0: the newest),
        the revision read and whether more follow.  ReplyTooLarge when the page is more than
        gRPC accepts; RevisionCompacted when ``revision`` is gone."""
        request = etcdrpc.RangeRequest(key=key if isinstance(key, bytes) else key.encode(),
                                       range_end=range_end.encode(), limit=limit, revision=revision)
        resp = self._call(lambda ep, md: ep.kv.Range(request, timeout, metadata=md), write=False)
        self._header(resp.header)
        return list(resp.kvs), int(resp.header.revision), bool(resp.more)

    def watch_deleted(self, key: str, *, stop: Callable[[], bool]) -> Iterator[bool]:
        """Watch one key: yields True once it is deleted (or is already gone),
        False on other events.  Ends (cancelling the stream) when ``stop()``
        turns true; raises on a broken stream (the caller re-watches)."""
        kvs, revision = self.get_range(key, timeout=self.cfg.request_timeout)
        if not kvs:
            yield True
            return
        create = etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=key.encode(), start_revision=revision + 1))
        done = threading.Event()

        def requests() -> Iterator[Any]:
            yield create
            done.wait()

        ep = self._pick()
        call = ep.watch.Watch(requests(), metadata=self._metadata)

        def cancel_when_stopped() -> None:
            while not done.wait(0.25):
                if stop():
                    call.cancel()
                    return

        threading.Thread(target=cancel_when_stopped, daemon=True, name="virtlease-watch-stop").start()
        try:
            for resp in call:
                if resp.compact_revision:
                    kvs, _ = self.get_range(key, timeout=self.cfg.request_timeout)
                    yield not kvs
                    return
                yield any(ev.type == ev.DELETE for ev in resp.events)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.CANCELLED and stop():
                return
            raise self._translate(ep, exc, write=False) from exc
        finally:
            done.set()

    def lease_grant(self, ttl: int, *, timeout: float) -> tuple[int, int]:
        request = etcdrpc.LeaseGrantRequest(TTL=ttl, ID=0)
        resp = self._call(lambda ep, md: ep.lease.LeaseGrant(request, timeout, metadata=md), write=True)
        if resp.error:
            raise BackendUnavailableError(f"etcd refused a lease: {resp.error}")
        self._header(resp.header)
        return int(resp.ID), int(resp.TTL)

    def lease_keepalive(self, lease_id: int, *, timeout: float) -> int:
        """Refresh the lease once; return the new TTL (0: the lease is gone)."""
        request = etcdrpc.LeaseKeepAliveRequest(ID=lease_id)

        def keepalive(ep: Endpoint, md: tuple[tuple[str, str], ...]) -> int:
            for resp in ep.lease.LeaseKeepAlive(iter([request]), timeout, metadata=md):
                return int(resp.TTL)
            raise TransientError("keepalive stream closed without a reply", ambiguous=False)

        return self._call(keepalive, write=False)

    def lease_ttl(self, lease_id: int, *, timeout: float) -> int:
        """Remaining TTL of a lease; -1 if it does not exist."""
        request = etcdrpc.LeaseTimeToLiveRequest(ID=lease_id, keys=False)
        resp = self._call(lambda ep, md: ep.lease.LeaseTimeToLive(request, timeout, metadata=md), write=False)
        return int(resp.TTL)

    def lease_revoke(self, lease_id: int, *, timeout: float) -> None:
        request = etcdrpc.LeaseRevokeRequest(ID=lease_id)
        try:
            self._call(lambda ep, md: ep.lease.LeaseRevoke(request, timeout, metadata=md), write=True)
        except LeaseNotFound:
            return

    def alarms(self, *, timeout: float) -> list[str]:
        """The cluster's raised alarms (``NOSPACE on member 8e9e05c52164694d``); needs no permission."""
        request = etcdrpc.AlarmRequest(action=etcdrpc.AlarmRequest.GET)
        resp = self._call(lambda ep, md: ep.maintenance.Alarm(request, timeout, metadata=md), write=False)
        return [f"{etcdrpc.AlarmType.Name(a.alarm)} on member {a.memberID:x}" for a in resp.alarms]

    def user_permissions(self, user: str, *, timeout: float) -> dict[str, list[tuple[str, str, str]]]:
        """The roles of ``user`` (etcd lets a user read its own) and each role's permissions as
        ``(READ|WRITE|READWRITE, key, range_end)``; PermissionDenied for another user's."""
        resp = self._call(lambda ep, md: ep.auth.UserGet(etcdrpc.AuthUserGetRequest(name=user), timeout,
                                                         metadata=md), write=False)
        roles: dict[str, list[tuple[str, str, str]]] = {}
        for role in resp.roles:
            request = etcdrpc.AuthRoleGetRequest(role=role)
            got = self._call(functools.partial(_role_get, request, timeout), write=False)
            roles[role] = [(_PERM_TYPES.get(p.permType, str(p.permType)), p.key.decode(errors="replace"),
                            p.range_end.decode(errors="replace")) for p in got.perm]
        return roles

    def status(self, *, timeout: float) -> Any:
        return self._call(lambda ep, md: ep.maintenance.Status(etcdrpc.StatusRequest(), timeout, metadata=md),
                          write=False)

    # -- retries -------------------------------------------------------------

    def attempt_timeout(self, deadline: float) -> float:
        left = deadline - self.clock.now()
        if left <= 0:
            raise self._unreachable("did not answer before the deadline")
        return min(self.cfg.request_timeout, left)

    def hopeless(self) -> bool:
        """No member ever answered and every one failed to connect for a known reason (refused,
        a name that does not resolve, no route, TLS, not etcd): retrying cannot help."""
        return not self.answered and all(ep.problem is not None and ep.problem.definite for ep in self._endpoints)

    def _unreachable(self, what: str, cause: Exception | None = None) -> BackendUnavailableError:
        """The error once the deadline passed (or ``hopeless``): the connect problems seen (a
        refused connection, a TLS refusal) rather than only "no answer"."""
        problems = [ep.problem for ep in self._endpoints if ep.problem is not None]
        if problems:
            texts = sorted({p.text for p in problems})
            hints = list(dict.fromkeys(HINTS[p.kind] for p in sorted(problems, key=lambda p: p.text)))
            return BackendUnavailableError(f"etcd at {','.join(self.cfg.endpoints)} {what}: " + "; ".join(texts),
                                           hint="; ".join(hints))
        return BackendUnavailableError(
            f"etcd at {','.join(self.cfg.endpoints)} {what}" + (f": {cause}" if cause else ""),
            hint="check the etcd cluster's health (virtlease check) and this host's network")

    def retrying(self, fn: Callable[[float], T], *, deadline: float,
                 on_ambiguous: Callable[[TransientError], T | None] | None = None) -> T:
        """Call ``fn(timeout)`` until it succeeds, retrying transient errors
        with jittered exponential backoff, never past ``deadline``
        (on ``self.clock``).  After an ambiguous failure ``on_ambiguous`` may resolve
        the outcome (returning a result) before the next attempt."""
        def stop(state: Any) -> bool:
            return self.clock.now() >= deadline - 0.01

        def attempt() -> T:
            try:
                return fn(self.attempt_timeout(deadline))
            except TransientError as exc:
                if self.hopeless() and not (exc.ambiguous and on_ambiguous is not None):
                    raise self._unreachable("cannot be reached") from exc
                if exc.ambiguous and on_ambiguous is not None:
                    log.info("outcome unknown (%s); reading back", exc)
                    resolved = self._resolve(on_ambiguous, exc, deadline)
                    if resolved is not None:
                        return resolved
                raise

        retryer = Retrying(stop=stop, wait=wait_random_exponential(multiplier=0.05, max=1.0), sleep=self.clock.sleep,
                           retry=retry_if_exception_type(TransientError), reraise=True)
        try:
            return retryer(attempt)
        except TransientError as exc:
            raise self._unreachable("unreachable until the deadline", exc) from exc

    def _resolve(self, on_ambiguous: Callable[[TransientError], T | None], exc: TransientError,
                 deadline: float) -> T | None:
        """Keep trying to read back the outcome until the deadline."""
        while True:
            try:
                return on_ambiguous(exc)
            except TransientError:
                if self.clock.now() + 0.1 >= deadline:
                    raise
                self.clock.sleep(0.1)


def _role_get(request: Any, timeout: float, ep: Endpoint, md: tuple[tuple[str, str], ...]) -> Any:
    return ep.auth.RoleGet(request, timeout, metadata=md)


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as fh:
        return fh.read()
