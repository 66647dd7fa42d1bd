"""The TLS files of the configuration, loaded once the way the handshake will use them.

gRPC reports a client certificate whose key does not match, or a file that holds no PEM
at all, only as a connection that never comes up (and, before ``grpclog``, as dozens of
"Invalid private key" lines): every request then waits for its deadline and ends as
"unreachable".  Loading the files with the standard library first turns each such mistake
into one ``ConfigError`` naming the setting and the file, before any connection is tried.

See docs/DESIGN.md §5.1 (credentials).
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass

from virtlease.errors import ConfigError
from virtlease_etcd.config import EtcdConfig


@dataclass(frozen=True)
class ClientCertificate:
    """What the client certificate says (for ``virtlease check``)."""

    path: str
    common_name: str | None
    """The subject's CN: with etcd's client-cert-auth, the etcd user name."""
    not_after: float | None
    """Epoch seconds at which it expires (None: not readable)."""

    @property
    def expired(self) -> bool:
        return self.not_after is not None and self.not_after < time.time()


_HINT = ("deploy/etcd/make-certs.sh writes each NAME.crt next to its NAME.key and ca.crt; "
         "'virtlease check' loads them the same way")


def _no_password() -> bytes:
    return b""  # an encrypted key fails to load instead of prompting on the terminal


def check_tls_files(cfg: EtcdConfig) -> ClientCertificate | None:
    """Load ``ca_cert``, ``cert_cert`` and ``cert_key``; ConfigError naming the setting and the
    file if one cannot serve (not PEM, an encrypted key, a key that is not the certificate's).
    Returns the client certificate's facts, None without one (or without TLS)."""
    if cfg.ca_cert is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=cfg.ca_cert)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"ca_cert: {cfg.ca_cert} holds no PEM certificate ({_reason(exc)}): give the "
                          "certificate of the CA that signed the etcd members' certificates",
                          hint=_HINT) from None
    if cfg.cert_cert is None or cfg.cert_key is None:
        return None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cfg.cert_cert)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cert_cert: {cfg.cert_cert} holds no PEM certificate ({_reason(exc)})",
                          hint=_HINT) from None
    try:
        context.load_cert_chain(cfg.cert_cert, cfg.cert_key, password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"cert_key: {cfg.cert_key} is not the private key of cert_cert {cfg.cert_cert} "
                              "(they do not match): give the key that certificate was issued with",
                              hint=_HINT) from None
        raise ConfigError(f"cert_key: {cfg.cert_key} is not an unencrypted PEM private key ({_reason(exc)})",
                          hint=_HINT) from None
    except OSError as exc:
        raise ConfigError(f"cert_key: cannot read {cfg.cert_key}: {exc.strerror}", hint=_HINT) from None
    return describe_certificate(cfg.cert_cert)


def _reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or getattr(exc, "strerror", None) or exc)


def describe_certificate(path: str) -> ClientCertificate:
    """The certificate's CN and expiry, through the ssl module's own PEM decoder (None where it
    cannot tell: the names are a convenience for messages, never a check)."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    try:
        info = decode(path) if decode is not None else {}
    except (ssl.SSLError, OSError, ValueError):
        info = {}
    cn = next((value for rdn in info.get("subject", ()) for key, value in rdn if key == "commonName"), None)
    not_after = None
    if info.get("notAfter"):
        try:
            not_after = float(ssl.cert_time_to_seconds(info["notAfter"]))
        except ValueError:
            not_after = None
    return ClientCertificate(path, cn, not_after)
