"""The global options of ``virtlease`` and how they become driver configuration.

Precedence, lowest first: the etcd driver's defaults, the TOML file
(``--config`` or ``$VIRTLEASE_CONFIG``), ``$VIRTLEASE_ETCD_<KEY>``, then the
command-line options.  The driver's own ``load_config`` lets the environment
override the dict it is given, so a key set on the command line is removed
from this process's environment (and so from its children's) — the option
wins, as a user expects of a command line.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from virtlease_etcd import keyspace as ks
from virtlease_etcd.client import EtcdClient
from virtlease_etcd.config import ENV_PREFIX, EtcdConfig, load_config
from virtlease_etcd.status import ClusterStatus, read_status

T = TypeVar("T")


@dataclass
class Settings:
    """What the global options said (None: not given on the command line)."""

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

    def apply_to_environ(self, environ: dict[str, str] | os._Environ[str] | None = None) -> None:
        """Drop ``VIRTLEASE_ETCD_<KEY>`` for every key given as an option, so the option wins."""
        env = os.environ if environ is None else environ
        for key in self.given():
            env.pop(ENV_PREFIX + key.upper(), None)

    def driver_config(self, **overrides: Any) -> dict[str, Any]:
        """The config dict for ``load_driver("etcd", config=...)``."""
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
    return client.retrying(fn, deadline=time.monotonic() + seconds)


def fetch_status(client: EtcdClient, cfg: EtcdConfig) -> ClusterStatus:
    """The cluster status under ``cfg.prefix`` (one read per key family)."""
    keys = ks.Keys(cfg.prefix)
    return with_retries(client, lambda t: read_status(client, keys, timeout=t),
                        seconds=max(cfg.request_timeout * 2, 4.0))
