"""The etcd client's errors, and what a failed connection means in one line.

``client.EtcdClient._translate`` is the one place gRPC errors become these; the table below
turns gRPC's connection details into a sentence an operator can act on, one kind each:
refused (nothing listens), a name that does not resolve, no route, a TLS refusal, something
that is not etcd (docs/DESIGN.md §5.1; tested in tests/test_connect_errors.py and
tests/security/test_tls.py).  Authentication and RBAC refusals are ``ConfigError`` /
``PermissionDenied``.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from virtlease.errors import ConfigError
from virtlease_etcd.config import EtcdConfig

from .tlsfiles import describe_certificate

__all__ = ["HINTS", "TRANSIENT_CODES", "ConnectProblem", "LeaseNotFound", "PermissionDenied", "ReplyTooLarge",
           "RevisionCompacted", "TransientError", "connect_problem"]

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


@dataclass(frozen=True)
class ConnectProblem:
    """Why a connection to one member could not be made, in one line an operator can act on."""

    text: str
    """``<host:port> refused the connection: ...``: names the endpoint and what it means."""
    kind: str
    """``refused``, ``name``, ``route``, ``tls`` or ``not etcd``: each has its own hint (``HINTS``)."""
    definite: bool = True
    """gRPC said so (refused, no route, a TLS alert...), rather than a guess from a closed socket:
    a client no member ever answered gives up at once when every member's problem is definite."""


HINTS = {
    "refused": "is etcd running there, and is that port its client port (2379 by default)? "
               "'virtlease check' shows each member",
    "name": "check the host names in endpoints (DNS or /etc/hosts on this host)",
    "route": "check this host's network: addresses and routes to the etcd members",
    "tls": "fix the TLS settings (ca_cert, cert_cert, cert_key) or the endpoint names; "
           "'virtlease check' shows each member",
    "not etcd": "check the ports in endpoints: each must be an etcd member's client port",
}
"""What to do next, by ``ConnectProblem.kind``."""

_CLIENT_CERT_REFUSED = "refused this host's client certificate"
"""Completed with what this host knows of its certificate (``_client_certificate``)."""

_PROBLEMS = (
    # (what gRPC's details contain, kind, what it means) -- BoringSSL's names for TLS, as grpcio reports them
    ("CERTIFICATE_REQUIRED", "tls", "refused the connection: it requires a client certificate and none was given "
                                    "(set cert_cert and cert_key)"),
    ("ALERT_CERTIFICATE_EXPIRED", "tls", "refused this host's client certificate: it has expired (cert_cert)"),
    ("ALERT_BAD_CERTIFICATE", "tls", _CLIENT_CERT_REFUSED),
    # etcd built with an older Go (Debian's 3.4) checks the client certificate after the TLS 1.3
    # handshake and drops the connection: gRPC only sees the stream break
    ("Unwrap failed (TSI_DATA_CORRUPTED)", "tls", _CLIENT_CERT_REFUSED),
    ("ALERT_UNKNOWN_CA", "tls", "refused this host's client certificate: not signed by the CA etcd trusts "
                                "(cert_cert)"),
    ("certificate has expired", "tls", "has a server certificate that has expired"),
    ("CERTIFICATE_VERIFY_FAILED", "tls", "has a server certificate not signed by ca_cert"),
    ("Hostname Verification Check failed", "tls", "has a server certificate that does not name this endpoint "
                                                  "(use a host name or address from its subject alternative names)"),
    ("WRONG_VERSION_NUMBER", "tls", "does not speak TLS on this port (remove ca_cert, or use its TLS port)"),
    ("Connection refused", "refused", ": connection refused (nothing listens on that port)"),
    ("Could not contact DNS servers", "name", "is a name this host cannot resolve: no DNS server answers"),
    ("Domain name not found", "name", "is a name that does not resolve"),
    ("hostname lookup error", "name", "is a name that does not resolve"),
    ("No route to host", "route", "is unreachable: no route to that host"),
    ("Network is unreachable", "route", "is unreachable: no route to that network from this host"),
    ("Failed parsing HTTP/2", "not etcd", "answered, but not with gRPC (HTTP/1 or another protocol): not an etcd "
                                          "client port"),
    ("Received http2 header with status", "not etcd", "answered, but not as etcd (an HTTP error status): not an "
                                                      "etcd client port"),
)


def connect_problem(details: str, netloc: str, cfg: EtcdConfig) -> ConnectProblem | None:
    """What a failed connection means, when gRPC's details say (None: they do not)."""
    for needle, kind, meaning in _PROBLEMS:
        if needle in details and (kind != "tls" or cfg.tls):
            if meaning is _CLIENT_CERT_REFUSED:
                meaning += _client_certificate(cfg)
            return ConnectProblem(f"{netloc}{meaning}" if meaning.startswith(":") else f"{netloc} {meaning}", kind)
    if not cfg.tls and "Socket closed" in details:
        return ConnectProblem(f"{netloc} closed the connection at once: does etcd require TLS there? "
                              "(set ca_cert)", "tls", definite=False)  # or a proxy, a member going down
    return None


def _client_certificate(cfg: EtcdConfig) -> str:
    """Why etcd may have refused ours, from what this host can see of it."""
    if cfg.cert_cert is None:
        return ": none was given (set cert_cert and cert_key)"
    cert = describe_certificate(cfg.cert_cert)
    if cert.expired:
        return f": it has expired (cert_cert {cfg.cert_cert})"
    return f": not signed by the CA etcd trusts, or revoked (cert_cert {cfg.cert_cert})"
