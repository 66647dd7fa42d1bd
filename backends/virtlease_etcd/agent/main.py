"""The agent's run: serve libvirt's ``lockd`` plugin on the virtlockd socket, leases in etcd.

``command`` is its command line (``virtlease agent``, ``virtlease-agent``, ``python -m
virtlease_etcd.agent``)::

    virtlease-agent --endpoints 10.0.0.1:2379 --host-id hv-07 \\
        [--socket /run/libvirt/virtlockd-sock] [--metrics 127.0.0.1:9477] [--state-dir /run/virtlease] \\
        [--prefix /virtlease] [--ttl 10] [--config /etc/virtlease/virtlease.toml] \\
        [--failure-action poweroff|pause|ignore] [--reserve-grace 2] [--kill-grace 5] [--log-level info]

The etcd settings are the driver's (``VIRTLEASE_ETCD_*`` environment variables and
``VIRTLEASE_CONFIG`` apply as everywhere); options given here override the file.  Logs are one
line per event on stderr (``ts=... level=... logger=... msg="..."``).

Socket activation: started by a service manager with ``LISTEN_FDS`` (systemd's
``virtlockd.socket`` through the package's drop-in for ``virtlockd.service``, or
``systemd-socket-activate``), the agent serves the passed socket bound to ``--socket`` and
neither creates nor removes it (``sockets.take_activation``); other passed sockets (virtlockd's
admin socket) get their connections closed at once.

Signals -- the trade-off (docs/DESIGN.md section 9).  While any domain holds or reserves a lease
through this agent, exiting would end the host's etcd session: its lease expires after the TTL
and the disks become free to other hosts *while the QEMUs here still run*.  Fencing them (killing
every VM) on a stop request turns a routine ``systemctl stop`` into an outage.  So:

* SIGTERM / SIGINT: with nothing held, exit 0 at once.  Otherwise **refuse to exit**: log every
  domain still holding and keep serving; exit by itself once the last owner is gone.
* SIGUSR2 (upgrade, ``restart``): hand over -- exit 75 leaving the lease unrevoked, the state
  file written and the guard armed.  A new agent started before the fence deadline continues
  the session and re-adopts the running QEMUs; otherwise the guard stops them first.
* SIGKILL / a crash: as a handover, without the last state-file write (it is written on every
  owner change anyway).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import virtlease
from virtlease.errors import VirtleaseError
from virtlease_etcd.config import load_config
from virtlease_etcd.etcd.tlsfiles import check_tls_files

from .backend import EtcdLockBackend
from .metrics import start_metrics
from .restart import Continuity, Prior, prepare
from .runfile import DEFAULT_STATE_DIR, ensure_dir
from .server import LockdServer
from .sockets import Activation, AgentSetupError, check_socket_dir, remove_stale_socket, take_activation
from .startup import StartingBackend, open_driver

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/libvirt/virtlockd-sock"
HANDOVER_EXIT = 75
"""Exit status after a SIGUSR2 handover (the unit restarts the agent on any exit)."""


class LineFormatter(logging.Formatter):
    """``ts=<iso> level=<level> logger=<name> msg=<json string>`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        msg = record.getMessage()
        if record.exc_info:
            msg += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return f"ts={ts} level={record.levelname.lower()} logger={record.name} msg={json.dumps(msg)}"


@dataclass
class AgentOptions:
    """What ``virtlease agent`` serves, besides the etcd settings."""

    socket: str = DEFAULT_SOCKET
    metrics: str | None = None
    state_dir: str = DEFAULT_STATE_DIR
    reserve_grace: float = 2.0
    kill_grace: float = 5.0
    log_level: str = "info"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


async def serve(opts: AgentOptions, config: dict[str, Any], activation: Activation | None = None) -> int:
    """Listen at once (on the socket the service manager passed when ``activation`` is given),
    open the etcd session in the background (``startup``: ACQUIREs wait for it, then are refused
    as 'etcd unreachable'), then serve until a stop request finds no owner holding anything (or a
    handover)."""
    stop, handover = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def hand_over() -> None:
        handover.set()
        stop.set()

    loop.add_signal_handler(signal.SIGUSR2, hand_over)
    cfg = load_config(config)
    gate = StartingBackend(wait=cfg.deadline)
    server = LockdServer(opts.socket, gate, sock=activation.lockd if activation else None)
    await server.start()
    refusers = [await asyncio.start_unix_server(_refuse(label), sock=sock)
                for label, sock in (activation.others if activation else [])]
    prepared: list[Prior | None] = []

    def load() -> virtlease.Plugin:
        if not prepared:  # once: continue a previous agent's session, or wait it out
            prepared.append(prepare(cfg, opts.state_dir))
        prior = prepared[0]  # its continued session, if any, is the driver's (etcd's WithLease)
        return virtlease.load_driver("etcd", config={**config, "adopted_session": prior and prior.session},
                                     capabilities=virtlease.Capability.RESOURCES)

    opening = loop.create_task(open_driver(load, gate, endpoints=",".join(cfg.endpoints)))
    waiting = loop.create_task(stop.wait())
    await asyncio.wait({opening, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if not opening.done():  # stopped before etcd answered: nothing is held, nothing to hand over
        opening.cancel()
        waiting.cancel()
        for refuser in refusers:
            refuser.close()
        await server.close()
        log.info("stop requested before the etcd session opened: exiting")
        return HANDOVER_EXIT if handover.is_set() else 0
    waiting.cancel()
    try:
        plugin = opening.result()
    except BaseException:
        await server.close()
        raise
    try:
        return await _serve(opts, plugin, prepared[0], server, gate, stop, handover)
    finally:
        for refuser in refusers:
            refuser.close()
        try:
            plugin.unload()
        except VirtleaseError as exc:
            log.error("unload: %s", exc)


async def _serve(opts: AgentOptions, plugin: virtlease.Plugin, prior: Prior | None, server: LockdServer,
                 gate: StartingBackend, stop: asyncio.Event, handover: asyncio.Event) -> int:
    backend = EtcdLockBackend(plugin.driver, reserve_grace=opts.reserve_grace, kill_grace=opts.kill_grace)
    continuity = Continuity(backend, opts.state_dir)
    await continuity.start(prior)  # the guard armed before any lease can be granted
    metrics = None
    if opts.metrics:
        try:
            metrics = start_metrics(opts.metrics, backend)
        except OSError as exc:  # no metrics is no reason to leave the VMs unprotected
            log.error("cannot serve metrics on %s: %s; going on without them", opts.metrics, exc)
    await gate.switch(backend, server.connections)
    log.info("virtlease agent serving %s for host %s (virtlease %s)", opts.socket, plugin.driver.host_id,
             virtlease.__version__)
    try:
        while True:
            await stop.wait()
            stop.clear()
            if handover.is_set():
                continuity.handover()
                logging.shutdown()
                os._exit(HANDOVER_EXIT)  # no unload: the lease must outlive this process
            busy = backend.busy_owners()
            if not busy:
                log.info("stop requested and no domain holds a lease: exiting")
                return 0
            log.error("REFUSING TO EXIT: %d domain(s) hold leases through this agent; exiting would let "
                      "their disks be taken by other hosts while they run. Stop or migrate them first, "
                      "or hand over to a new agent (SIGUSR2, see deploy/OPERATIONS.md); the agent exits "
                      "by itself once none is left. Holding: %s", len(busy), "; ".join(busy))
            while backend.busy_owners() and not stop.is_set():
                with_timeout = asyncio.create_task(stop.wait())
                await asyncio.wait({with_timeout}, timeout=1.0)
                with_timeout.cancel()
            if not backend.busy_owners() and not stop.is_set():
                log.info("the last domain released its leases: exiting as requested")
                return 0
    finally:
        if backend.busy_owners():  # only on an error: keep the guard armed, do not kill what the lifelines guard
            continuity.leave(busy=True)
            logging.shutdown()
            os._exit(1)
        await server.close()
        await backend.close()
        continuity.leave(busy=False)
        if metrics is not None:
            metrics.close()


def _refuse(label: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A connection handler that closes at once: for the sockets the service manager passes
    besides the lockd one (virtlockd's admin socket), so that their clients are not left hanging."""

    async def close_at_once(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        log.info("closing a connection to %s: the virtlease agent serves no admin protocol", label)
        writer.close()

    return close_at_once


def run_agent(opts: AgentOptions, config: dict[str, Any]) -> int:
    """Check the configuration, then serve (``serve``: the socket at once, the session when etcd
    answers).  Exit 2 on a configuration or setup error, which no retry could fix."""
    setup_logging(opts.log_level)
    try:  # before touching a previous agent's lease: refuse if one still serves the socket
        activation = take_activation(opts.socket)
        if activation is None:  # no socket activation: the agent makes the socket itself
            check_socket_dir(Path(opts.socket).parent)
            asyncio.run(remove_stale_socket(Path(opts.socket)))
    except AgentSetupError as exc:
        log.error("cannot serve %s: %s", opts.socket, exc)
        return 2
    try:
        cfg = load_config(config)
        check_tls_files(cfg)
        ensure_dir(opts.state_dir)
    except (VirtleaseError, OSError) as exc:
        log.error("cannot start the etcd driver: %s", exc)
        return 2
    try:
        return asyncio.run(serve(opts, config, activation))
    except AgentSetupError as exc:
        log.error("cannot serve %s: %s", opts.socket, exc)
        return 2
    except (VirtleaseError, OSError) as exc:
        log.error("cannot start the etcd driver: %s", exc)
        return 2


if __name__ == "__main__":  # the entry point is the package (command.py parses the options)
    sys.exit("virtlease_etcd.agent.main is not a command: run `virtlease agent`, `virtlease-agent` "
             "or `python -m virtlease_etcd.agent`")
