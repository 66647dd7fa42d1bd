"""``virtlease-agent``: serve libvirt's ``lockd`` plugin on the virtlockd socket, leases in etcd.

Usage::

    virtlease-agent --endpoints 10.0.0.1:2379 --host-id hv-07 \\
        [--socket /run/libvirt/virtlockd-sock] [--prefix /virtlease] [--ttl 10] \\
        [--config /etc/virtlease.toml] [--failure-action poweroff|pause|ignore] \\
        [--reserve-grace 2] [--kill-grace 5] [--log-level info]

The etcd settings are the driver's (``VIRTLEASE_ETCD_*`` environment variables and
``VIRTLEASE_CONFIG`` apply as everywhere); options given here override the file.  Logs are one
line per event on stderr (``ts=... level=... logger=... msg="..."``).

SIGTERM / SIGINT -- the trade-off.  While any domain holds or reserves a lease through this
agent, exiting would end the host's etcd session: its lease expires after the TTL and the disks
become free to other hosts *while the QEMUs here still run* -- silently dropping their
protection.  The alternative, fencing them (killing every VM) on a stop request, turns a routine
``systemctl stop`` into an outage.  So the agent **refuses to exit while owners hold leases**:
it logs loudly (every domain still holding) and keeps serving, and exits by itself as soon as
the last owner is gone (its VMs stopped or migrated away).  A second signal logs again.  The
cost: a stop request can wait indefinitely, and a SIGKILL (OOM, a service manager's final
kill) still leaves running VMs unprotected after the TTL; a guard process that fences from
outside is for a later landing.  With no owner holding anything it exits at once (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import virtlease
from virtlease.errors import VirtleaseError

from .backend import EtcdLockBackend
from .server import AgentSetupError, LockdServer

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/libvirt/virtlockd-sock"


class LineFormatter(logging.Formatter):
    """``ts=<iso> level=<level> logger=<name> msg=<json string>`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        msg = record.getMessage()
        if record.exc_info:
            msg += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return f"ts={ts} level={record.levelname.lower()} logger={record.name} msg={json.dumps(msg)}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="virtlease-agent", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"lockd socket to serve (default {DEFAULT_SOCKET})")
    p.add_argument("--endpoints", help="etcd host:port[,host:port...] (env VIRTLEASE_ETCD_ENDPOINTS)")
    p.add_argument("--host-id", help="this host's unique name (default: hostname)")
    p.add_argument("--prefix", help="etcd key prefix (default /virtlease)")
    p.add_argument("--ttl", type=int, help="session lease TTL, seconds (default 10)")
    p.add_argument("--config", help="TOML file with the etcd settings (env VIRTLEASE_CONFIG)")
    p.add_argument("--failure-action", choices=["poweroff", "pause", "ignore"],
                   help="what to do to the VMs when this host's lease is lost (default poweroff)")
    p.add_argument("--reserve-grace", type=float, default=2.0,
                   help="seconds a released (paused/migrated) domain's disks stay reserved after its QEMU "
                        "exits, for the destination to claim them (default 2)")
    p.add_argument("--kill-grace", type=float, default=5.0,
                   help="seconds between SIGTERM and SIGKILL of a QEMU whose lock connection closed (default 5)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def driver_config(args: argparse.Namespace) -> dict[str, Any]:
    """The etcd driver configuration the options ask for (unset options are left to file/env)."""
    cfg: dict[str, Any] = {}
    for opt, key in (("endpoints", "endpoints"), ("host_id", "host_id"), ("prefix", "prefix"),
                     ("ttl", "ttl"), ("config", "config_file"), ("failure_action", "default_action")):
        value = getattr(args, opt)
        if value is not None:
            cfg[key] = value
    return cfg


async def serve(args: argparse.Namespace, plugin: virtlease.Plugin) -> int:
    """Serve until a stop request finds no owner holding anything."""
    backend = EtcdLockBackend(plugin.driver, reserve_grace=args.reserve_grace, kill_grace=args.kill_grace)
    server = LockdServer(args.socket, backend)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    log.info("virtlease agent serving %s for host %s", args.socket, plugin.driver.host_id)
    try:
        while True:
            await stop.wait()
            stop.clear()
            busy = backend.busy_owners()
            if not busy:
                log.info("stop requested and no domain holds a lease: exiting")
                return 0
            log.error("REFUSING TO EXIT: %d domain(s) hold leases through this agent; exiting would let "
                      "their disks be taken by other hosts while they run. Stop or migrate them first; "
                      "the agent exits by itself once none is left. Holding: %s", len(busy), "; ".join(busy))
            while backend.busy_owners() and not stop.is_set():
                with_timeout = asyncio.create_task(stop.wait())
                await asyncio.wait({with_timeout}, timeout=1.0)
                with_timeout.cancel()
            if not backend.busy_owners():
                log.info("the last domain released its leases: exiting as requested")
                return 0
    finally:
        await server.close()
        await backend.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``virtlease-agent``."""
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler], force=True)
    try:
        plugin = virtlease.load_driver("etcd", config=driver_config(args),
                                       capabilities=virtlease.Capability.RESOURCES)
    except VirtleaseError as exc:
        log.error("cannot start the etcd driver: %s", exc)
        return 2
    try:
        return asyncio.run(serve(args, plugin))
    except AgentSetupError as exc:
        log.error("cannot serve %s: %s", args.socket, exc)
        return 2
    finally:
        try:
            plugin.unload()
        except VirtleaseError as exc:
            log.error("unload: %s", exc)


if __name__ == "__main__":
    sys.exit(main())
