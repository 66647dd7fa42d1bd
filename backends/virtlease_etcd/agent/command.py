"""``virtlease agent`` (and its alias ``virtlease-agent``, ``python -m virtlease_etcd.agent``):
the command line of the agent.

The shared etcd options (``--endpoints``, ``--prefix``, ``--host-id``, ``--ttl``, ``--config``;
``cli.options``) plus the agent's own; ``main`` (the module) runs the agent and says what it
does with signals.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from virtlease_etcd.cli.options import Settings, etcd_command

from .main import DEFAULT_SOCKET, AgentOptions, run_agent
from .metrics import parse_addr
from .runfile import DEFAULT_STATE_DIR


@click.command()
@click.option("--socket", default=DEFAULT_SOCKET, show_default=True, metavar="PATH",
              help="The lockd socket to serve (libvirt's virtlockd socket).")
@click.option("--metrics", metavar="HOST:PORT", help="Serve Prometheus metrics there (e.g. 127.0.0.1:9477).")
@click.option("--state-dir", default=DEFAULT_STATE_DIR, show_default=True, metavar="DIR",
              help="Root-only directory of the state file a restarted agent continues from.")
@click.option("--failure-action", type=click.Choice(["poweroff", "pause", "ignore"]),
              help="What happens to the VMs when this host's lease is lost (default poweroff).")
@click.option("--reserve-grace", type=float, default=2.0, show_default=True, metavar="SECONDS",
              help="How long a released (paused/migrated) domain's disks stay reserved after its QEMU exits.")
@click.option("--kill-grace", type=float, default=5.0, show_default=True, metavar="SECONDS",
              help="SIGTERM to SIGKILL delay for a QEMU whose lock connection closed while it runs.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@etcd_command
def agent(settings: Settings, socket: str, metrics: str | None, state_dir: str, failure_action: str | None,
          reserve_grace: float, kill_grace: float, log_level: str) -> None:
    """Serve libvirt's lockd plugin on the virtlockd socket, with the leases in etcd.

    Replaces virtlockd (deploy/libvirt/). Refuses to exit on SIGTERM while domains hold leases;
    SIGUSR2 hands over to a new agent (upgrade) without dropping their protection."""
    if metrics is not None:
        try:
            parse_addr(metrics)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--metrics") from None
    opts = AgentOptions(socket=socket, metrics=metrics, state_dir=state_dir, reserve_grace=reserve_grace,
                        kill_grace=kill_grace, log_level=log_level)
    code = run_agent(opts, settings.driver_config(default_action=failure_action))
    if code:
        sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``virtlease-agent`` alias (same options as ``virtlease agent``)."""
    try:
        agent.main(args=list(argv) if argv is not None else None, prog_name="virtlease-agent",
                   standalone_mode=False)
    except SystemExit as exc:
        return int(exc.code or 0)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return 0
