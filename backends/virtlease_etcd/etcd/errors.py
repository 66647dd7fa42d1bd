"""The etcd client's errors, and what a failed connection means in one line.

``client.EtcdClient._translate`` is the one place gRPC errors become these; the TLS
table below turns gRPC's handshake details into a sentence an operator can act on
(docs/DESIGN.md §5.1; tested in tests/security/test_tls.py).
"""

from __future__ import annotations

import grpc

from virtlease.errors import ConfigError
from virtlease_etcd.config import EtcdConfig

__all__ = ["TRANSIENT_CODES", "LeaseNotFound", "PermissionDenied", "ReplyTooLarge", "RevisionCompacted",
           "TransientError", "connect_problem"]

TRANSIENT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
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


class ReplyTooLarge(Exception):
    """etcd's reply was larger than gRPC accepts (4 MiB): ask for fewer keys."""


class RevisionCompacted(Exception):
    """A read at a revision etcd has compacted away: read again at a newer one."""


_TLS_PROBLEMS = (
    # (what gRPC's details contain, what it means) -- BoringSSL's names, as grpcio reports them
    ("CERTIFICATE_REQUIRED", "refused the connection: it requires a client certificate and none was given "
                             "(set cert_cert and cert_key)"),
    ("ALERT_CERTIFICATE_EXPIRED", "refused this host's client certificate: it has expired (cert_cert)"),
    ("ALERT_BAD_CERTIFICATE", "refused this host's client certificate: none given, not signed by the CA etcd "
                              "trusts, or expired (cert_cert, cert_key)"),
    ("ALERT_UNKNOWN_CA", "refused this host's client certificate: not signed by the CA etcd trusts (cert_cert)"),
    ("certificate has expired", "has a server certificate that has expired"),
    ("CERTIFICATE_VERIFY_FAILED", "has a server certificate not signed by ca_cert"),
    ("Hostname Verification Check failed", "has a server certificate that does not name this endpoint "
                                           "(use a host name or address from its subject alternative names)"),
    ("WRONG_VERSION_NUMBER", "does not speak TLS on this port (remove ca_cert, or use its TLS port)"),
)


def connect_problem(details: str, netloc: str, cfg: EtcdConfig) -> str | None:
    """One line for a connection gRPC could not make, when its details say why."""
    for needle, meaning in _TLS_PROBLEMS:
        if needle in details:
            return f"{netloc} {meaning}"
    if not cfg.tls and "Socket closed" in details:
        return f"{netloc} closed the connection at once: does etcd require TLS there? (set ca_cert)"
    return None
