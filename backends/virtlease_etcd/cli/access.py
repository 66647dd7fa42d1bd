"""``virtlease check``'s permission rows: who this host is to etcd, and whether that user may
do under the prefix what its mode needs.

A host needs readwrite on ``<prefix>/`` (deploy/etcd/rbac.sh: role ``virtlease``); a monitoring
user needs read on it (role ``virtlease-monitor``; ``check --read-only``).  The rows say which
etcd user the request ran as (``user``, or the client certificate's CN, which etcd takes as the
user with client-certificate auth), the roles etcd reports for it (a user may read its own),
and on a refusal the prefix and the role it needs -- separate from the endpoints' health, which
needs no permission (``probes``).

See docs/DESIGN.md §5.1 (credentials).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from etcd3 import transactions as tx

from virtlease.errors import BackendUnavailableError
from virtlease_etcd.config import EtcdConfig
from virtlease_etcd.etcd.client import EtcdClient, PermissionDenied, TransientError
from virtlease_etcd.etcd.tlsfiles import ClientCertificate
from virtlease_etcd.model import keyspace as ks

from .probes import FAIL, INFO, OK, WARN, Report

RBAC = "deploy/etcd/rbac.sh"
HOST_ROLE, MONITOR_ROLE = "virtlease", "virtlease-monitor"


@dataclass(frozen=True)
class Identity:
    """The etcd user requests run as, and what etcd says it may do."""

    user: str | None
    """``user``, else the client certificate's CN (None: neither)."""
    roles: dict[str, list[tuple[str, str, str]]] | None = None
    """Role -> ``(READ|WRITE|READWRITE, key, range_end)``; None when etcd did not say."""

    def describe(self) -> str:
        if self.user is None:
            return "no etcd user (no user/password and no client certificate)"
        if self.roles is None:
            return f"etcd user {self.user} (etcd lists no roles for it: authentication off?)"
        if not self.roles:
            return f"etcd user {self.user} (no roles)"
        held = "; ".join(f"role {role}: " + (", ".join(_perm(p) for p in perms) or "no permissions")
                         for role, perms in sorted(self.roles.items()))
        return f"etcd user {self.user} ({held})"


def _perm(perm: tuple[str, str, str]) -> str:
    kind, key, end = perm
    if end and end == ks.range_end(key):
        return f"{kind.lower()} on prefix {key}"
    if not end:
        return f"{kind.lower()} on key {key}"
    return f"{kind.lower()} on [{key}, {end})"


def identify(client: EtcdClient, cfg: EtcdConfig, cert: ClientCertificate | None) -> Identity:
    """The user and, when etcd tells a user its own roles (auth on), those roles."""
    user = cfg.user or (cert.common_name if cert is not None else None)
    if user is None:
        return Identity(None)
    try:
        return Identity(user, client.user_permissions(user, timeout=cfg.request_timeout))
    except (PermissionDenied, TransientError, BackendUnavailableError):
        return Identity(user)  # auth off (no such user), or not allowed: the probes still tell


def needs(cfg: EtcdConfig, *, read_only: bool) -> str:
    """What the mode needs, in the words of rbac.sh."""
    prefix = cfg.prefix + "/"
    if read_only:
        return (f"read on prefix {prefix} ({RBAC} role {MONITOR_ROLE}, with VIRTLEASE_PREFIX={prefix})")
    return (f"readwrite on prefix {prefix} ({RBAC} role {HOST_ROLE}, with VIRTLEASE_PREFIX={prefix}); "
            "a monitoring user runs 'check --read-only'")


def check_access(report: Report, client: EtcdClient, cfg: EtcdConfig, identity: Identity, *,
                 read_only: bool) -> bool:
    """The permission row(s); True if the prefix can be read (the contents check may run)."""
    report.add("etcd user", INFO, identity.describe())
    if read_only:
        return _check_read(report, client, cfg, identity)
    return _check_write(report, client, cfg, identity)


def _denied(report: Report, cfg: EtcdConfig, identity: Identity, what: str, read_only: bool,
            exc: PermissionDenied) -> None:
    report.add("permission", FAIL, f"{identity.describe()} cannot {what} under {cfg.prefix}/ ({exc}): it needs "
               + needs(cfg, read_only=read_only))


def _check_read(report: Report, client: EtcdClient, cfg: EtcdConfig, identity: Identity) -> bool:
    try:
        client.get_range(f"{cfg.prefix}/check-probe", timeout=cfg.request_timeout)
    except PermissionDenied as exc:
        _denied(report, cfg, identity, "read", True, exc)
        return False
    except (TransientError, BackendUnavailableError) as exc:
        report.add("permission", FAIL, f"read probe under {cfg.prefix}/ failed: {exc}")
        return False
    report.add("permission", OK, f"read under {cfg.prefix}/ works: what monitoring needs (read-only check: "
               "write permission not tested)")
    return True


def _check_write(report: Report, client: EtcdClient, cfg: EtcdConfig, identity: Identity) -> bool:
    key = f"{cfg.prefix}/check-probe/{cfg.host_id}.{secrets.token_hex(4)}"
    lease_id = 0
    readable = False
    try:
        client.get_range(key, timeout=cfg.request_timeout)
        readable = True
        lease_id, granted = client.lease_grant(cfg.ttl, timeout=cfg.request_timeout)
        client.txn([], [tx.Put(key, b"virtlease check probe", lease=lease_id)], timeout=cfg.request_timeout)
        kvs, _ = client.get_range(key, timeout=cfg.request_timeout)
        client.txn([], [tx.Delete(key)], timeout=cfg.request_timeout)
        left, _ = client.get_range(key, timeout=cfg.request_timeout)
        if not kvs or left:
            report.add("permission", FAIL, f"probe {key} was not written and deleted as expected")
        else:
            report.add("permission", OK, f"lease grant, put, read and delete under {cfg.prefix}/ work: what a "
                       "host needs")
        if granted != cfg.ttl:
            report.add("lease ttl", FAIL, f"etcd granted TTL {granted}s for a requested {cfg.ttl}s: its minimum "
                       "lease TTL (1.5x election timeout) is above the configured TTL; raise ttl")
    except PermissionDenied as exc:
        _denied(report, cfg, identity, "write" if readable else "read", False, exc)
    except (TransientError, BackendUnavailableError) as exc:
        report.add("permission", FAIL, f"probe write under {cfg.prefix}/ failed: {exc}")
    finally:
        if lease_id:
            try:
                client.lease_revoke(lease_id, timeout=cfg.request_timeout)
            except Exception as exc:
                report.add("permission", WARN, f"could not revoke probe lease {lease_id:x} "
                           f"(it expires in {cfg.ttl}s): {exc}")
    return readable
