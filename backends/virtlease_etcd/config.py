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
    scsi_pr_luns: tuple[str, ...] = ()
    """Storage fencing (docs/DESIGN.md §11): the SCSI LUNs to fence with persistent
    reservations keyed by this host's lease -- WWIDs as ``/sys/block/sdX/device/wwid`` or
    ``multipath -ll`` spell them (``naa.6001405...``, ``36001405...``), or ``*`` for every
    SCSI LUN a locked disk lives on.  Empty: off."""
    scsi_pr_preempt_abort: bool = True
    """Fence with PREEMPT AND ABORT (the victim's queued commands are aborted too); false for
    targets that do not implement it (then PREEMPT)."""
    scsi_pr_timeout: float = 10.0
    """Deadline of one persistent-reservation command, seconds."""
    watchdog_device: str | None = None
    """A watchdog device (``/dev/watchdog``) this host's session arms while it protects VMs
    and pets only while the lease allows (docs/DESIGN.md §11).  None: off."""
    watchdog_timeout: int | None = None
    """The watchdog's timeout, whole seconds; default the largest the TTL and fence margin
    allow (``watchdog_plan``), at most 60."""

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

    @property
    def watchdog(self) -> WatchdogPlan | None:
        """The watchdog arithmetic of this configuration, None without a watchdog."""
        if self.watchdog_device is None:
            return None
        return watchdog_plan(self.ttl, self.margin, self.watchdog_timeout)


def pet_interval(timeout: float, margin: float) -> float:
    """How often the watchdog is petted: often enough that a pet resumes within half the
    fence margin (after a fence), and several times per timeout."""
    return round(min(1.0, timeout / 4, margin / 4), 3)


@dataclass(frozen=True)
class WatchdogPlan:
    """The watchdog arithmetic (docs/DESIGN.md §11).  Times after the send of the last
    successful keepalive ``s``: the lease is valid until ``s + ttl`` by this host's clock (etcd
    expires it no earlier); the host fences at ``s + fence_at``; the guard of a silent agent at
    ``s + deadline``; the watchdog is petted only while ``now + timeout <= s + deadline``, so a
    host whose agent stops is reset by ``s + deadline``, ``lead`` before anyone may take over."""

    ttl: int
    margin: float
    timeout: int
    pet_every: float
    keepalive_every: float
    fence_at: float
    deadline: float
    """The latest reset: the fence deadline of the watchdog (``ttl - margin/2``)."""
    takeover: float
    """The earliest another host can be granted the disks (etcd's expiry: ``ttl``)."""
    max_timeout: int
    """The largest timeout that never pauses the pets on a healthy host."""

    @property
    def lead(self) -> float:
        return round(self.takeover - self.deadline, 3)

    @property
    def fits(self) -> bool:
        return 1 <= self.timeout <= self.max_timeout


def watchdog_plan(ttl: int, margin: float, timeout: int | None = None) -> WatchdogPlan:
    """The arithmetic for ``ttl``, ``margin`` and a watchdog ``timeout`` (default: the
    largest that fits, at most 60 s).  A healthy host renews every ``ttl/3``: just before a
    renewal ``deadline - now`` is ``2ttl/3 - margin/2``, and the pets must not pause then, so
    ``timeout + pet interval <= 2ttl/3 - margin/2``."""
    room = 2 * ttl / 3 - margin / 2
    best = 0
    for candidate in range(1, 61):
        if candidate + pet_interval(candidate, margin) <= room + 1e-9:
            best = candidate
    chosen = best if timeout is None else timeout
    return WatchdogPlan(ttl=ttl, margin=margin, timeout=chosen, pet_every=pet_interval(max(chosen, 1), margin),
                        keepalive_every=round(ttl / 3, 3), fence_at=round(ttl - margin, 3),
                        deadline=round(ttl - margin / 2, 3),
                        takeover=float(ttl), max_timeout=best)


_FLOATS = {"fence_margin", "request_timeout", "acquire_timeout", "scsi_pr_timeout"}
_INTS = {"ttl", "max_txn_ops", "watchdog_timeout"}
_STRS = {"prefix", "host_id", "ca_cert", "cert_cert", "cert_key", "user", "password", "watchdog_device"}
_CALLABLES = {"on_lease_lost", "restart_callback"}
_MAPS = {"identity_map", "server_aliases"}
_BOOLS = {"strict_identity", "legacy_path_keys", "scsi_pr_preempt_abort"}
_LISTS = {"scsi_pr_luns"}
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


def _parse_list(key: str, value: Any) -> tuple[str, ...]:
    """A list (TOML/dict) or ``a,b`` (environment) of non-empty strings."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    return tuple(i.strip() for i in items if i.strip())


def _coerce(key: str, value: Any) -> Any:
    if value is None:
        return None
    if key in _LISTS:
        return _parse_list(key, value)
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
    _validate_fencing(cfg)


def _validate_fencing(cfg: EtcdConfig) -> None:
    if cfg.scsi_pr_timeout <= 0:
        raise ConfigError("scsi_pr_timeout: must be > 0")
    for wwid in cfg.scsi_pr_luns:
        if wwid != "*" and any(c in wwid for c in "/\t\r\n\x00"):
            raise ConfigError(f"scsi_pr_luns: {wwid!r} is not a WWID (naa.6001405..., as "
                              "/sys/block/sdX/device/wwid says) or '*'")
    plan = cfg.watchdog
    if plan is None:
        if cfg.watchdog_timeout is not None:
            raise ConfigError("watchdog_timeout: set watchdog_device too (e.g. /dev/watchdog)")
        return
    if not cfg.watchdog_device or not cfg.watchdog_device.startswith("/"):
        raise ConfigError(f"watchdog_device: {cfg.watchdog_device!r} must be an absolute path (/dev/watchdog)")
    if plan.max_timeout < 1:
        raise ConfigError(f"watchdog_device: TTL {cfg.ttl} s with fence margin {cfg.margin:g} s leaves no room for a "
                          f"watchdog of at least 1 s (needs 1 s + the pet interval <= 2/3 TTL - margin/2 = "
                          f"{2 * cfg.ttl / 3 - cfg.margin / 2:.2f} s); raise ttl")
    if not plan.fits:
        raise ConfigError(f"watchdog_timeout: {plan.timeout} s does not fit TTL {cfg.ttl} s with fence margin "
                          f"{cfg.margin:g} s: a healthy host's pets would pause before each keepalive and the "
                          f"watchdog could reset it (needs timeout + pet interval {plan.pet_every:g} s <= 2/3 TTL "
                          f"- margin/2 = {2 * cfg.ttl / 3 - cfg.margin / 2:.2f} s); use at most "
                          f"{plan.max_timeout} s, or raise ttl")


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
