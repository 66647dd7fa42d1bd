"""The etcd connection: raw requests with per-call deadlines, errors mapped,
transient failures retried with tenacity — never past a deadline.

Built on python-etcd3's ``MultiEndpointEtcd3Client`` for channels, TLS,
auth and endpoint failover; requests go to its gRPC stubs directly so each
call carries its own deadline and the transaction's header revision (the
fencing token) is not lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import etcd3
import grpc
from etcd3 import etcdrpc
from etcd3.client import Endpoint, MultiEndpointEtcd3Client
from tenacity import Retrying, retry_if_exception_type, wait_random_exponential

from virtlease.errors import BackendUnavailableError, ConfigError, TransactionTooLargeError

from .config import EtcdConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}


class TransientError(Exception):
    """A request that may be retried.  ``ambiguous``: a write may have been
    applied even though no reply arrived."""

    def __init__(self, message: str, *, ambiguous: bool) -> None:
        super().__init__(message)
        self.ambiguous = ambiguous


class LeaseNotFound(Exception):
    """etcd says the lease is gone (expired or revoked)."""


class PermissionDenied(ConfigError):
    """etcd auth refused the request (user, role or RBAC prefix)."""


_CHANNEL_OPTIONS = [
    # gRPC's default reconnect backoff grows to 120 s: a member back after an outage
    # would stay unused for minutes while the fence deadline runs
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class _MonotonicEndpoint(Endpoint):
    """An endpoint whose failure mark uses the monotonic clock: python-etcd3's
    uses the wall clock, so a clock step back kept every endpoint that had
    failed once blacklisted — and a healthy host fenced itself."""

    def _mkchannel(self, opts: dict[str, Any] | None) -> grpc.Channel:
        if self.secure:
            return grpc.secure_channel(self.netloc, self.credentials, options=_CHANNEL_OPTIONS)
        return grpc.insecure_channel(self.netloc, options=_CHANNEL_OPTIONS)

    def fail(self) -> None:
        self.in_use = False
        self.last_failed = time.monotonic()

    def use(self) -> grpc.Channel:
        if self.is_failed():
            raise ValueError("Trying to use a failed node")
        self.in_use = True
        self.last_failed = 0.0
        return self.channel

    def is_failed(self) -> bool:
        return bool(self.last_failed) and time.monotonic() - self.last_failed < self.time_retry


class EtcdClient:
    """One connection to an etcd cluster, shared by a host session."""

    def __init__(self, cfg: EtcdConfig) -> None:
        self.cfg = cfg
        creds = None
        if cfg.tls:
            creds = MultiEndpointEtcd3Client.get_secure_creds(cfg.ca_cert, cfg.cert_key, cfg.cert_cert)
        endpoints = []
        for ep in cfg.endpoints:
            host, _, port = ep.rpartition(":")
            endpoints.append(_MonotonicEndpoint(host, int(port), secure=cfg.tls, creds=creds, time_retry=1.0))
        try:
            self.raw = MultiEndpointEtcd3Client(
                endpoints=endpoints, timeout=cfg.request_timeout,
                user=cfg.user, password=cfg.password, failover=True,
            )
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                        grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION):
                raise ConfigError(f"user/password: etcd refused authentication: {exc.details()}") from None
            raise BackendUnavailableError(
                f"cannot reach etcd at {','.join(cfg.endpoints)} to authenticate: {exc.details()}"
            ) from None
        self.cluster_id: int | None = None

    def close(self) -> None:
        self.raw.close()

    # -- plumbing ----------------------------------------------------------

    def _kw(self) -> dict[str, Any]:
        return {"credentials": self.raw.call_credentials, "metadata": self.raw.metadata}

    def _stub(self, name: str) -> Any:
        try:
            return getattr(self.raw, name)
        except etcd3.exceptions.NoServerAvailableError as exc:
            raise TransientError("no etcd endpoint available", ambiguous=False) from exc
        except ValueError as exc:  # python-etcd3: 'Trying to use a failed node'
            raise TransientError(str(exc), ambiguous=False) from exc

    def _channel(self) -> grpc.Channel:
        try:
            return self.raw.channel
        except etcd3.exceptions.NoServerAvailableError as exc:
            raise TransientError("no etcd endpoint available", ambiguous=False) from exc
        except ValueError as exc:
            raise TransientError(str(exc), ambiguous=False) from exc

    def _fail(self, exc: grpc.RpcError, *, write: bool) -> Exception:
        code = exc.code()
        details = exc.details() or code.name
        if code in _TRANSIENT:
            try:
                self.raw.endpoint_in_use.fail()
                self.raw._clear_old_stubs()
            except Exception:  # pragma: no cover - best effort
                pass
            return TransientError(f"etcd {self.raw._current_endpoint_label}: {details}", ambiguous=write)
        if "lease not found" in details:
            return LeaseNotFound(details)
        if "too many operations" in details:
            return TransactionTooLargeError(
                f"etcd refused the transaction: {details}; raise the cluster's --max-txn-ops "
                "or split the domain's resources"
            )
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
        request = etcdrpc.TxnRequest(
            compare=[c.build_message() for c in compare],
            success=self.raw._ops_to_requests(list(success)),
            failure=self.raw._ops_to_requests(list(failure)),
        )
        try:
            resp = self._stub("kvstub").Txn(request, timeout, **self._kw())
        except grpc.RpcError as exc:
            raise self._fail(exc, write=bool(success) or bool(failure)) from exc
        self._header(resp.header)
        return resp

    def get_range(self, key: str, range_end: str | None = None, *, timeout: float) -> tuple[list[Any], int]:
        """KeyValues in [key, range_end) (or the one key), and the revision read."""
        request = self.raw._build_get_range_request(key, range_end)
        try:
            resp = self._stub("kvstub").Range(request, timeout, **self._kw())
        except grpc.RpcError as exc:
            raise self._fail(exc, write=False) from exc
        self._header(resp.header)
        return list(resp.kvs), int(resp.header.revision)

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

        try:
            call = etcdrpc.WatchStub(self._channel()).Watch(requests(), **self._kw())
        except grpc.RpcError as exc:
            raise self._fail(exc, write=False) from exc

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
            raise self._fail(exc, write=False) from exc
        finally:
            done.set()

    def lease_grant(self, ttl: int, *, timeout: float) -> tuple[int, int]:
        request = etcdrpc.LeaseGrantRequest(TTL=ttl, ID=0)
        try:
            resp = self._stub("leasestub").LeaseGrant(request, timeout, **self._kw())
        except grpc.RpcError as exc:
            raise self._fail(exc, write=True) from exc
        if resp.error:
            raise BackendUnavailableError(f"etcd refused a lease: {resp.error}")
        self._header(resp.header)
        return int(resp.ID), int(resp.TTL)

    def lease_keepalive(self, lease_id: int, *, timeout: float) -> int:
        """Refresh the lease once; return the new TTL (0: the lease is gone)."""
        request = etcdrpc.LeaseKeepAliveRequest(ID=lease_id)
        try:
            for resp in self._stub("leasestub").LeaseKeepAlive(iter([request]), timeout, **self._kw()):
                return int(resp.TTL)
        except grpc.RpcError as exc:
            raise self._fail(exc, write=False) from exc
        raise TransientError("keepalive stream closed without a reply", ambiguous=False)

    def lease_ttl(self, lease_id: int, *, timeout: float) -> int:
        """Remaining TTL of a lease; -1 if it does not exist."""
        request = etcdrpc.LeaseTimeToLiveRequest(ID=lease_id, keys=False)
        try:
            resp = self._stub("leasestub").LeaseTimeToLive(request, timeout, **self._kw())
        except grpc.RpcError as exc:
            raise self._fail(exc, write=False) from exc
        return int(resp.TTL)

    def lease_revoke(self, lease_id: int, *, timeout: float) -> None:
        request = etcdrpc.LeaseRevokeRequest(ID=lease_id)
        try:
            self._stub("leasestub").LeaseRevoke(request, timeout, **self._kw())
        except grpc.RpcError as exc:
            err = self._fail(exc, write=True)
            if isinstance(err, LeaseNotFound):
                return
            raise err from exc

    def status(self, *, timeout: float) -> Any:
        try:
            return self._stub("maintenancestub").Status(etcdrpc.StatusRequest(), timeout, **self._kw())
        except grpc.RpcError as exc:
            raise self._fail(exc, write=False) from exc

    # -- retries -------------------------------------------------------------

    def attempt_timeout(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BackendUnavailableError(
                f"etcd at {','.join(self.cfg.endpoints)} did not answer before the deadline"
            )
        return min(self.cfg.request_timeout, left)

    def retrying(self, fn: Callable[[float], T], *, deadline: float,
                 on_ambiguous: Callable[[TransientError], T | None] | None = None) -> T:
        """Call ``fn(timeout)`` until it succeeds, retrying transient errors
        with jittered exponential backoff, never past ``deadline``
        (monotonic).  After an ambiguous failure ``on_ambiguous`` may resolve
        the outcome (returning a result) before the next attempt."""
        def stop(state: Any) -> bool:
            return time.monotonic() >= deadline - 0.01

        def attempt() -> T:
            try:
                return fn(self.attempt_timeout(deadline))
            except TransientError as exc:
                if exc.ambiguous and on_ambiguous is not None:
                    log.info("outcome unknown (%s); reading back", exc)
                    resolved = self._resolve(on_ambiguous, exc, deadline)
                    if resolved is not None:
                        return resolved
                raise

        retryer = Retrying(stop=stop, wait=wait_random_exponential(multiplier=0.05, max=1.0),
                           retry=retry_if_exception_type(TransientError), reraise=True)
        try:
            return retryer(attempt)
        except TransientError as exc:
            raise BackendUnavailableError(
                f"etcd at {','.join(self.cfg.endpoints)} unreachable until the deadline: {exc}",
                hint="check the etcd cluster's health (virtlease check) and this host's network",
            ) from exc

    def _resolve(self, on_ambiguous: Callable[[TransientError], T | None], exc: TransientError,
                 deadline: float) -> T | None:
        """Keep trying to read back the outcome until the deadline."""
        while True:
            try:
                return on_ambiguous(exc)
            except TransientError:
                if time.monotonic() + 0.1 >= deadline:
                    raise
                time.sleep(0.1)
