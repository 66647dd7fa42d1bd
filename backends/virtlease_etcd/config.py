"""Configuration of the etcd driver: a dict, a TOML file, environment overrides.

Precedence, highest first: explicit arguments (the dict passed to
``load_driver``, which is where command-line options go), then environment
variables ``VIRTLEASE_ETCD_<KEY>`` (e.g. ``VIRTLEASE_ETCD_ENDPOINTS``,
``VIRTLEASE_ETCD_TTL``), then ``config_file`` (TOML; keys at top level or
under ``[etcd]``), then the defaults.  ``VIRTLEASE_CONFIG`` names a TOML file
when no ``config_file`` is given.  A key given as ``None`` counts as not given.
"""

from __future__ import annotations

import difflib
import os
import socket
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from virtlease.abi import FailureAction
from virtlease.errors import ConfigError

ENV_PREFIX = "VIRTLEASE_ETCD_"
MIN_TTL = 2


@dataclass(frozen=True)
class EtcdConfig:
    """Every setting of the etcd driver, validated."""

    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    """``host:port`` of each etcd member; requests fail over between them."""
    prefix: str = "/virtlease"
    """Key prefix; every key virtlease writes lives under it."""
    host_id: str = field(default_factory=socket.gethostname)
    """This host's name in the cluster; must be unique per host."""
    ttl: int = 10
    """Session lease TTL in seconds (>= 2): the failover time after a crash."""
    fence_margin: float | None = None
    """Seconds before the lease could expire at which the host fences
    itself; default max(0.5, ttl/5)."""
    request_timeout: float = 2.0
    """Deadline of one etcd request, seconds."""
    acquire_timeout: float | None = None
    """Overall deadline of acquire/release with retries; default ttl."""
    max_txn_ops: int = 128
    """The cluster's --max-txn-ops (etcd's default is 128)."""
    ca_cert: str | None = None
    cert_cert: str | None = None
    cert_key: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr, log or traceback
    default_action: FailureAction = FailureAction.POWEROFF
    """What FailureAction.DEFAULT means: poweroff, pause or ignore."""
    on_lease_lost: Callable[[str], None] | None = None
    """Called (with a reason) once when the session is lost."""
    restart_callback: Callable[[Any], None] | None = None
    """Needed for FailureAction.RESTART: called with the ObjectSpec."""
    adopted_session: Any = field(default=None, repr=False, compare=False)
    """A running host session to continue instead of opening a new one (etcd's
    ``WithLease``): the one ``session.reattach.adopt_session`` returned after a
    restart.  The driver uses it from the load on; only a program can pass it."""
    identity_map: Mapping[str, str] = field(default_factory=dict)
    """Disk names: absolute path prefix -> identity prefix, e.g.
    ``{"/mnt/pool": "san://pool1"}``; the longest matching prefix wins over
    the automatic name, and names a file whose directory can carry no id."""
    server_aliases: Mapping[str, str] = field(default_factory=dict)
    """Network storage server name or address -> the canonical server name,
    e.g. ``{"10.0.0.5": "filer1"}`` (one name per server in identities)."""
    strict_identity: bool = True
    """Refuse a disk that exists and has no cluster-wide identity (a file whose
    directory can carry no id, a block device without a stable name); off:
    lock it under this host's name for it only."""
    legacy_path_keys: bool = True
    """Also lock each disk under the path key of the release before the
    previous one (mixed clusters): a third key per file disk, so
    ``max_txn_ops // 6`` disks per transaction instead of ``// 4``."""

    @property
    def margin(self) -> float:
        if self.fence_margin is not None:
            return self.fence_margin
        return max(0.5, self.ttl / 5)

    @property
    def deadline(self) -> float:
        return self.acquire_timeout if self.acquire_timeout is not None else float(self.ttl)

    @property
    def tls(self) -> bool:
        return self.ca_cert is not None


_FLOATS = {"fence_margin", "request_timeout", "acquire_timeout"}
_INTS = {"ttl", "max_txn_ops"}
_STRS = {"prefix", "host_id", "ca_cert", "cert_cert", "cert_key", "user", "password"}
_CALLABLES = {"on_lease_lost", "restart_callback"}
_MAPS = {"identity_map", "server_aliases"}
_BOOLS = {"strict_identity", "legacy_path_keys"}
KNOWN_KEYS = {f.name for f in fields(EtcdConfig)} | {"config_file"}
PROGRAM_ONLY = _CALLABLES | {"adopted_session", "config_file"}
"""Keys only a program's config dict can give (callables, a running session, the file's own
name): never in a file or the environment, and never offered as a suggestion."""
SETTINGS = sorted(KNOWN_KEYS - PROGRAM_ONLY)
"""What a file, the environment or a command line may set (deploy/virtlease.toml documents each)."""


def _parse_action(value: Any) -> FailureAction:
    if isinstance(value, FailureAction):
        action = value
    elif isinstance(value, str) and value.upper() in FailureAction.__members__:
        action = FailureAction[value.upper()]
    else:
        raise ConfigError(f"default_action: {value!r} is not one of poweroff, pause, ignore")
    if action in (FailureAction.DEFAULT, FailureAction.RESTART):
        raise ConfigError(f"default_action: {action.name.lower()} cannot be the default; "
                          "use poweroff, pause or ignore")
    return action


def _parse_endpoints(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value or [])
    out: list[str] = []
    for raw in items:
        ep = str(raw).strip()
        for scheme in ("http://", "https://"):
            if ep.startswith(scheme):
                ep = ep[len(scheme):]
        if not ep:
            continue
        host, sep, port = ep.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"endpoints: {raw!r} is not host:port")
        out.append(ep)
    if not out:
        raise ConfigError("endpoints: at least one host:port is required")
    return tuple(out)


def _parse_map(key: str, value: Any) -> dict[str, str]:
    """A table (TOML/dict) or ``a=b,c=d`` (environment) of strings."""
    if isinstance(value, str):
        pairs = []
        for item in value.split(","):
            if not item.strip():
                continue
            name, sep, target = item.partition("=")
            if not sep:
                raise ConfigError(f"{key}: {item.strip()!r} is not name=value (entries are comma-separated)")
            pairs.append((name.strip(), target.strip()))
        value = dict(pairs)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a table of strings, got {value!r}")
    out: dict[str, str] = {}
    for name, target in value.items():
        if not isinstance(name, str) or not isinstance(target, str) or not name or not target:
            raise ConfigError(f"{key}: {name!r} = {target!r}: names and values must be non-empty strings")
        out[name] = target
    return out


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.strip().lower() in ("true", "yes", "on", "1")
    raise ConfigError(f"{key}: {value!r} is not a boolean (true or false)")


def _coerce(key: str, value: Any) -> Any:
    if value is None:
        return None
    if key in _MAPS:
        return _parse_map(key, value)
    if key in _BOOLS:
        return _parse_bool(key, value)
    try:
        if key == "endpoints":
            return _parse_endpoints(value)
        if key == "default_action":
            return _parse_action(value)
        if key in _INTS:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if key in _FLOATS:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if key in _STRS:
            if not isinstance(value, str):
                raise ValueError
            return value
        if key in _CALLABLES:
            if not callable(value):
                raise ValueError
            return value
        if key == "adopted_session" and isinstance(value, str | int | float | list | Mapping):
            raise ValueError  # a value a file or the environment could hold: never a session
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: invalid value {value!r}") from None
    return value


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
            mode = os.fstat(fh.fileno()).st_mode
    except FileNotFoundError:
        raise ConfigError(f"config_file: {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config_file: {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # found by tests/security/test_fuzz.py: tomllib raises it as is
        raise ConfigError(f"config_file: {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"config_file: cannot read {path}: {exc.strerror}") from None
    section = data.get("etcd", data)
    if not isinstance(section, dict):
        raise ConfigError(f"config_file: {path}: [etcd] must be a table")
    if section.get("password") and mode & 0o077:
        raise ConfigError(f"config_file: {path} holds a password but others can read it (mode "
                          f"{stat.S_IMODE(mode):04o}): chmod 600 {path}, or give the password in "
                          f"{ENV_PREFIX}PASSWORD instead")
    program_only = sorted(PROGRAM_ONLY & set(section))
    if program_only:
        raise ConfigError(f"config_file: {path}: {', '.join(program_only)} can only be given by a program "
                          "(load_driver's config dict), not in a file")
    return {k: v for k, v in section.items() if not isinstance(v, dict) or k in _MAPS}


def load_config(raw: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None) -> EtcdConfig:
    """Merge ``raw`` over the environment over the TOML file over the defaults
    into an EtcdConfig (see the module docstring); never reads anything but
    ``environ`` (default ``os.environ``) and the file, never writes either."""
    env = os.environ if environ is None else environ
    given = {k: v for k, v in (raw or {}).items() if v is not None}
    merged: dict[str, Any] = {}
    path = given.pop("config_file", None) or env.get("VIRTLEASE_CONFIG")
    if path:
        merged.update(_read_toml(str(path)))
    for key in KNOWN_KEYS - {"config_file"} - PROGRAM_ONLY:
        value = env.get(ENV_PREFIX + key.upper())
        if value is not None and value != "":
            merged[key] = value
    merged.update(given)
    unknown = set(merged) - KNOWN_KEYS
    if unknown:
        raise unknown_settings(unknown)
    values = {k: _coerce(k, v) for k, v in merged.items() if v is not None}
    cfg = EtcdConfig(**values)
    _validate(cfg)
    return cfg


def unknown_settings(keys: set[str]) -> ConfigError:
    """One line for unknown keys: the nearest valid setting for each, or the list of settings
    when none is near (program-only keys are neither suggested nor listed)."""
    parts, lost = [], False
    for key in sorted(keys):
        near = difflib.get_close_matches(key.lower().replace("-", "_"), SETTINGS, n=1, cutoff=0.6)
        parts.append(f"{key!r} (did you mean {near[0]!r}?)" if near else repr(key))
        lost = lost or not near
    return ConfigError(f"unknown setting{'s' if len(keys) > 1 else ''} {', '.join(parts)}"
                       + (f"; the settings are: {', '.join(SETTINGS)}" if lost else ""),
                       hint="deploy/virtlease.toml documents every setting")


def _validate(cfg: EtcdConfig) -> None:
    if cfg.ttl < MIN_TTL:
        raise ConfigError(f"ttl: {cfg.ttl}s is below the minimum of {MIN_TTL}s "
                          "(etcd cannot keep shorter leases reliably)")
    if not cfg.prefix.startswith("/") or cfg.prefix.endswith("/") or "\x00" in cfg.prefix:
        raise ConfigError(f"prefix: {cfg.prefix!r} must start with '/' and not end with '/'")
    if not cfg.host_id or any(c in cfg.host_id for c in "/ \t\r\n\x00"):
        raise ConfigError(f"host_id: {cfg.host_id!r} must be non-empty without '/' or whitespace")
    if not 0 < cfg.margin < cfg.ttl / 2:
        raise ConfigError(f"fence_margin: {cfg.margin}s must be > 0 and below ttl/2 ({cfg.ttl / 2}s)")
    if cfg.request_timeout <= 0:
        raise ConfigError("request_timeout: must be > 0")
    if cfg.deadline <= 0:
        raise ConfigError("acquire_timeout: must be > 0")
    if cfg.max_txn_ops < 4:
        raise ConfigError("max_txn_ops: must be >= 4")
    if (cfg.user is None) != (cfg.password is None):
        raise ConfigError("user/password: give both or neither")
    if cfg.user is not None and cfg.ca_cert is None:
        raise ConfigError("user/password: etcd sends auth tokens only over TLS; set ca_cert too")
    if (cfg.cert_cert is None) != (cfg.cert_key is None):
        raise ConfigError("cert_cert/cert_key: give both or neither")
    if cfg.cert_cert is not None and cfg.ca_cert is None:
        raise ConfigError("cert_cert: client certificates need ca_cert (TLS)")
    for key in ("ca_cert", "cert_cert", "cert_key"):
        path = getattr(cfg, key)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{key}: {path} does not exist")
    _validate_identity(cfg)


def _validate_identity(cfg: EtcdConfig) -> None:
    for prefix, target in cfg.identity_map.items():
        if not prefix.startswith("/") or "\x00" in prefix:
            raise ConfigError(f"identity_map: {prefix!r} must be an absolute path prefix (starting with '/')")
        scheme, sep, rest = target.partition("://")
        if not sep or not scheme or not rest.strip("/") or "\x00" in target:
            raise ConfigError(f"identity_map: {prefix!r} -> {target!r}: the identity prefix must look like "
                              "scheme://name (e.g. 'san://pool1'), the same on every host")
        if scheme == "path":
            raise ConfigError(f"identity_map: {prefix!r} -> {target!r}: path:// is the local fallback, "
                              "not a cluster-wide identity")
    for name, canonical in cfg.server_aliases.items():
        if any(c in name + canonical for c in "/ \t\r\n\x00"):
            raise ConfigError(f"server_aliases: {name!r} -> {canonical!r}: server names may not contain "
                              "'/' or whitespace")
