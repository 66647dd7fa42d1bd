"""The ``virtlease`` command: cluster-wide VM disk leases in etcd, from a shell.

::

    virtlease demo                      # the whole story on a throwaway local etcd
    virtlease etcd                      # a development etcd in the foreground
    virtlease --endpoints 10.0.0.1:2379 check
    virtlease --endpoints 10.0.0.1:2379 status [--json]
    virtlease --endpoints 10.0.0.1:2379 --host-id hv-07 hold --name web1 --disk /images/web1.qcow2

Global options map onto the etcd driver's configuration (see
``virtlease_etcd.config`` and ``deploy/virtlease.toml``).  Errors are one line
plus a hint and a documented exit code (``exitcodes``); ``--debug`` adds
logging and tracebacks.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Sequence

import click

from .exitcodes import ExitCode, describe, exit_code_for
from .output import error
from .settings import Settings

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Run:
    """What ``main`` needs to know after click returns or raises."""

    debug: bool = False


@click.group(context_settings=CONTEXT_SETTINGS)
@click.option("--endpoints", metavar="HOST:PORT[,...]",
              help="etcd client endpoints (driver key endpoints; env VIRTLEASE_ETCD_ENDPOINTS).")
@click.option("--prefix", metavar="/PATH", help="Key prefix in etcd (default /virtlease).")
@click.option("--host-id", metavar="NAME", help="This host's unique name in the cluster (default: hostname).")
@click.option("--ttl", type=click.IntRange(min=1), metavar="SECONDS",
              help="Session lease TTL: the failover time after a host dies (default 10).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="TOML configuration file (keys at top level or under [etcd]; env VIRTLEASE_CONFIG).")
@click.option("--debug", is_flag=True, help="Log the driver at debug level to stderr; show tracebacks on errors.")
@click.version_option(package_name="virtlease", prog_name="virtlease")
@click.pass_context
def cli(ctx: click.Context, endpoints: str | None, prefix: str | None, host_id: str | None,
        ttl: int | None, config_file: str | None, debug: bool) -> None:
    """Cluster-wide VM disk leases kept in etcd.

    Options given here override $VIRTLEASE_ETCD_* variables, which override the
    --config file.  Read commands take --json.
    """
    run = ctx.find_object(_Run)
    if run is not None:
        run.debug = debug
    # Without --debug the command reports outcomes itself (one line + hint); the driver's log
    # lines would only repeat them around that line.
    logging.basicConfig(level=logging.DEBUG if debug else logging.CRITICAL + 1,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    settings = Settings(endpoints=endpoints, prefix=prefix, host_id=host_id, ttl=ttl,
                        config_file=config_file, debug=debug)
    settings.apply_to_environ()
    ctx.obj = settings


def _register() -> None:
    from .check import check
    from .demo import demo
    from .etcd_server import etcd
    from .hold import hold
    from .status import status

    for command in (demo, status, hold, check, etcd):
        cli.add_command(command)


_register()


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run the command, map failures to one line and an exit code."""
    run = _Run()
    try:
        rv = cli.main(args=list(argv) if argv is not None else None, prog_name="virtlease",
                      standalone_mode=False, obj=run)
        code = int(rv) if isinstance(rv, int) else ExitCode.OK
    except click.exceptions.Exit as exc:  # pragma: no cover - click returns it in non-standalone mode
        code = exc.exit_code
    except (Exception, KeyboardInterrupt) as exc:
        if run.debug:
            traceback.print_exc()
        line, hint = describe(exc)
        error(line, hint)
        code = exit_code_for(exc)
    sys.exit(int(code))
