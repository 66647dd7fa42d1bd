"""One host session per (cluster, prefix, host) in a process.

Every driver instance of one host shares that host's lease (docs/DESIGN.md §5.1):
the session is reference counted here, and a second driver that asks for other
session settings (TTL, margin, timeouts, credentials) is refused rather than
silently given the first one's.  A driver loaded with ``adopted_session`` (the
agent after a restart, ``reattach``) brings its running session instead of
opening one; the later drivers of that host share it like any other.
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
    prefix and host_id.  A lost session is replaced by a new one.  With
    ``cfg.adopted_session`` that running session becomes the host's (see
    ``adopt``)."""
    if cfg.adopted_session is not None:
        return adopt(cfg, cfg.adopted_session)
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


def adopt(cfg: EtcdConfig, session: object) -> HostSession:
    """Make the running ``session`` (one ``reattach.adopt_session`` returned) the process's
    session for ``cfg``'s host, with one reference (the driver that brought it); later
    ``open_session`` calls with the same settings share it.  ConfigError if it is not a
    session of that host with those settings, or this process already has a live one."""
    if not isinstance(session, HostSession):
        raise ConfigError(f"adopted_session: {type(session).__name__} is not a host session "
                          "(give the one session.reattach.adopt_session returned)")
    key = _key(cfg)
    if _key(session.cfg) != key:
        raise ConfigError(f"adopted_session: it is host {session.cfg.host_id}'s session under "
                          f"{session.cfg.prefix}, not host {cfg.host_id}'s under {cfg.prefix}")
    check_same_session(session.cfg, cfg)
    with _sessions_lock:
        entry = _sessions.get(key)
        if entry is not None and entry[0].lost is None:
            raise ConfigError(f"adopted_session: host {cfg.host_id} already has a live session in this "
                              "process; a second one would be refused by etcd")
        session.check()  # LeaseLostError if it was lost since the adoption
        _sessions[key] = (session, 1)
        return session
