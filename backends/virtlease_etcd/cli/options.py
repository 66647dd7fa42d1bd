"""The etcd commands' shared options and how they become driver configuration.

``etcd_command`` gives a command ``--endpoints``, ``--prefix``, ``--host-id``,
``--ttl`` and ``--config`` and passes their values to it as a ``Settings``.
They may also be written before the command name (``virtlease --endpoints X
status``): the core's frame moves them after it.

Precedence, highest first (``load_config``): these options, then
``$VIRTLEASE_ETCD_<KEY>``, then the TOML file (``--config`` or
``$VIRTLEASE_CONFIG``), then the driver's defaults.  Options travel as the
explicit config dict; nothing here writes the process environment.

See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from virtlease.cli import Run
from virtlease.errors import BackendUnavailableError, ConfigError
from virtlease_etcd import clock
from virtlease_etcd.config import MIN_TTL, EtcdConfig, load_config
from virtlease_etcd.etcd.client import EtcdClient, PermissionDenied
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.ops.status import ClusterStatus, read_status

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

PERMISSION_HINT = ("check user/password or the client certificate, and that the etcd "
                   "role grants read-write on the prefix (deploy/etcd/rbac.sh)")
CONFIG_HINT = "see 'virtlease COMMAND --help' and deploy/virtlease.toml for every setting"
UNREACHABLE_HINT = "is etcd running there? check --endpoints and the network ('virtlease check')"


@dataclass
class Settings:
    """What the etcd options said (None: not given on the command line)."""

    endpoints: str | None = None
    prefix: str | None = None
    host_id: str | None = None
    ttl: int | None = None
    config_file: str | None = None
    debug: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys a command adds (e.g. ``on_lease_lost``)."""

    def given(self) -> dict[str, Any]:
        """The driver config keys set on the command line."""
        raw = {"endpoints": self.endpoints, "prefix": self.prefix, "host_id": self.host_id, "ttl": self.ttl}
        return {k: v for k, v in raw.items() if v is not None}

    def driver_config(self, **overrides: Any) -> dict[str, Any]:
        """The config dict for ``load_driver("etcd", config=...)``: explicit, so it beats the environment."""
        cfg: dict[str, Any] = dict(self.given())
        if self.config_file is not None:
            cfg["config_file"] = self.config_file
        cfg.update(self.extra)
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        return cfg

    def load(self, **overrides: Any) -> EtcdConfig:
        """The validated configuration (raises ConfigError naming the key)."""
        return load_config(self.driver_config(**overrides))


@contextlib.contextmanager
def etcd_hints() -> Iterator[None]:
    """Add the etcd-specific hint to a core error that has none, and re-raise it."""
    try:
        yield
    except (ConfigError, BackendUnavailableError) as exc:
        if exc.hint is None:
            exc.hint = (PERMISSION_HINT if isinstance(exc, PermissionDenied)
                        else UNREACHABLE_HINT if isinstance(exc, BackendUnavailableError) else CONFIG_HINT)
        raise


def etcd_command(fn: F) -> F:
    """Add the shared etcd options to a click callback; it gets a ``Settings`` first."""

    @functools.wraps(fn)
    def wrapper(*args: Any, endpoints: str | None, prefix: str | None, host_id: str | None, ttl: int | None,
                config_file: str | None, **kwargs: Any) -> Any:
        run = click.get_current_context().find_object(Run)
        settings = Settings(endpoints=endpoints, prefix=prefix, host_id=host_id, ttl=ttl,
                            config_file=config_file, debug=bool(run is not None and run.debug))
        with etcd_hints():
            return fn(settings, *args, **kwargs)

    options = [
        click.option("--endpoints", metavar="HOST:PORT[,...]",
                     help="etcd client endpoints (driver key endpoints; env VIRTLEASE_ETCD_ENDPOINTS)."),
        click.option("--prefix", metavar="/PATH", help="Key prefix in etcd (default /virtlease)."),
        click.option("--host-id", metavar="NAME", help="This host's unique name in the cluster (default: hostname)."),
        click.option("--ttl", type=click.IntRange(min=MIN_TTL), metavar="SECONDS",
                     help=f"Session lease TTL: the failover time after a host dies (default 10, at least "
                          f"{MIN_TTL}; below 5 only for tests: 'check' warns)."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False), metavar="FILE",
                     help="TOML configuration file (keys at top level or under [etcd]; env VIRTLEASE_CONFIG)."),
    ]
    decorated: Any = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return decorated  # type: ignore[no-any-return]


@contextlib.contextmanager
def etcd_client(cfg: EtcdConfig) -> Iterator[EtcdClient]:
    """A plain etcd connection for read-only commands: no session, no lease."""
    client = EtcdClient(cfg)
    try:
        yield client
    finally:
        client.close()


def with_retries(client: EtcdClient, fn: Callable[[float], T], *, seconds: float) -> T:
    """Run ``fn(timeout)`` with the client's retries for at most ``seconds``;
    BackendUnavailableError if etcd does not answer in time."""
    return client.retrying(fn, deadline=clock.now() + seconds)


def fetch_status(client: EtcdClient, cfg: EtcdConfig) -> ClusterStatus:
    """The cluster status under ``cfg.prefix`` (one read per key family)."""
    keys = ks.Keys(cfg.prefix)
    return with_retries(client, lambda t: read_status(client, keys, timeout=t),
                        seconds=max(cfg.request_timeout * 2, 4.0))
