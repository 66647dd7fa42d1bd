"""One host session per (cluster, prefix, host) in a process.

Every driver instance of one host shares that host's lease (docs/DESIGN.md §5.1):
the session is reference counted here, and a second driver that asks for other
session settings (TTL, margin, timeouts, credentials) is refused rather than
silently given the first one's.
"""

from __future__ import annotations

import threading

from virtlease.errors import ConfigError
from virtlease_etcd.config import EtcdConfig

from .hostsession import HostSession

_sessions: dict[tuple[tuple[str, ...], str, str], tuple[HostSession, int]] = {}
_sessions_lock = threading.Lock()

SESSION_KEYS = ("ttl", "margin", "request_timeout", "ca_cert", "cert_cert", "cert_key", "user", "password")
"""What the session owns: a second driver of the same host must ask for the same."""


def _key(cfg: EtcdConfig) -> tuple[tuple[str, ...], str, str]:
    return (cfg.endpoints, cfg.prefix, cfg.host_id)


def open_session(cfg: EtcdConfig) -> HostSession:
    """The process's session for this host, started on first use and shared
    (reference counted) by every driver instance with the same endpoints,
    prefix and host_id.  A lost session is replaced by a new one."""
    key = _key(cfg)
    with _sessions_lock:
        entry = _sessions.get(key)
        if entry is not None and entry[0].lost is None:
            check_same_session(entry[0].cfg, cfg)
            _sessions[key] = (entry[0], entry[1] + 1)
            return entry[0]
        session = HostSession(cfg).start()
        _sessions[key] = (session, 1)
        return session


def check_same_session(have: EtcdConfig, want: EtcdConfig) -> None:
    """Refuse ``want`` unless it asks for the session settings ``have`` runs with."""
    for key in SESSION_KEYS:
        if getattr(have, key) != getattr(want, key):
            shown = "***" if key == "password" else f"{getattr(have, key)!r} vs {getattr(want, key)!r}"
            raise ConfigError(
                f"{key}: host {want.host_id} already has a session in this process with other "
                f"settings ({shown}); every driver of one host shares its lease, so load it with "
                "the same ttl, fence_margin, timeouts and credentials")


def close_session(session: HostSession) -> None:
    """Drop one reference; the last one closes the session (revoking its lease)."""
    key = _key(session.cfg)
    with _sessions_lock:
        entry = _sessions.get(key)
        if entry is None or entry[0] is not session:
            session.close()
            return
        if entry[1] > 1:
            _sessions[key] = (session, entry[1] - 1)
            return
        del _sessions[key]
    session.close()


def install_session(session: HostSession) -> None:
    """Make a running ``session`` (one ``reattach`` adopted) the process's session for its
    host, so the next ``open_session`` of the same settings shares it.  ConfigError if this
    process already has a live session for that host."""
    key = _key(session.cfg)
    with _sessions_lock:
        entry = _sessions.get(key)
        if entry is not None and entry[0].lost is None:
            raise ConfigError(f"host {session.cfg.host_id}: this process already has a live session")
        _sessions[key] = (session, 0)
