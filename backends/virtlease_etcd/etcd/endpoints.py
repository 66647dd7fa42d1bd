"""One etcd member's gRPC channel and stubs, and etcd3 transaction ops as protobufs.

``client.EtcdClient`` holds one ``Endpoint`` per member and fails over between them on the
fence clock, ``clock.now`` (docs/DESIGN.md §5).
"""

from __future__ import annotations

from typing import Any

import grpc
from etcd3 import etcdrpc
from etcd3 import transactions as tx

from virtlease_etcd import clock

from .errors import ConnectProblem

_CHANNEL_OPTIONS = [
    # gRPC's default reconnect backoff grows to 120 s: a member back after an outage
    # would stay unused for minutes while the fence deadline runs
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # a connection of its own per channel: a shared one (gRPC's default, per target) hands a new
    # client the failure an older client's connection saw before the member came back
    ("grpc.use_local_subchannel_pool", 1),
]
ENDPOINT_RETRY = 1.0
"""Seconds a failed endpoint is skipped before it is tried again (``clock.now``)."""


class Endpoint:
    """One etcd member: its channel and stubs, and when it last failed.

    The failure mark uses the fence clock (never steps): python-etcd3's endpoints use
    the wall clock, so a step back of the clock kept every endpoint that had
    failed once blacklisted for as long as the step — and a healthy host
    fenced itself."""

    def __init__(self, netloc: str, creds: grpc.ChannelCredentials | None) -> None:
        self.netloc = netloc
        if creds is not None:
            self.channel = grpc.secure_channel(netloc, creds, options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(netloc, options=_CHANNEL_OPTIONS)
        self.kv = etcdrpc.KVStub(self.channel)
        self.lease = etcdrpc.LeaseStub(self.channel)
        self.watch = etcdrpc.WatchStub(self.channel)
        self.maintenance = etcdrpc.MaintenanceStub(self.channel)
        self.auth = etcdrpc.AuthStub(self.channel)
        self.failed_at = 0.0
        self.problem: ConnectProblem | None = None
        """Why connecting failed last, when gRPC said (refused, TLS, ...); None once it answers."""

    def failed(self) -> bool:
        return bool(self.failed_at) and clock.now() - self.failed_at < ENDPOINT_RETRY

    def fail(self) -> None:
        self.failed_at = clock.now()


def request_op(op: Any) -> Any:
    """An etcd3.transactions Put/Get/Delete as the RequestOp etcd takes."""
    key = op.key.encode() if isinstance(op.key, str) else op.key
    end = op.range_end.encode() if isinstance(getattr(op, "range_end", None), str) else getattr(op, "range_end", None)
    if isinstance(op, tx.Put):
        value = op.value.encode() if isinstance(op.value, str) else op.value
        lease = int(getattr(op.lease, "id", op.lease) or 0)
        return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=key, value=value, lease=lease))
    if isinstance(op, tx.Get):
        return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key, range_end=end or b""))
    if isinstance(op, tx.Delete):
        return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key, range_end=end or b""))
    raise TypeError(f"not a transaction operation: {op!r}")
