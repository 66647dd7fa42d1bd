"""The ``virtlease`` command: one command, subcommands from the backends.

::

    virtlease demo                      # the whole story on a throwaway local etcd
    virtlease etcd                      # a development etcd in the foreground
    virtlease --endpoints 10.0.0.1:2379 check
    virtlease --endpoints 10.0.0.1:2379 status [--json]
    virtlease --endpoints 10.0.0.1:2379 --host-id hv-07 hold --name web1 --disk /images/web1.qcow2

The frame here is generic: the click group, ``--debug``, ``--version``, the
output helpers (``output``) and the mapping of every failure to one line, a
hint and a documented exit code (``exitcodes``).  The subcommands come from
the ``virtlease.commands`` entry-point group (``registry``): the etcd
backend registers ``status``, ``check``, ``hold``, ``demo`` and ``etcd``,
with their own options (``--endpoints``, ``--prefix``, ...), which may also
be written before the command name.

See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Sequence

import click

from .._version import __version__
from .exitcodes import ExitCode, describe, exit_code_for
from .output import error, warn
from .registry import PluginGroup

DEBUG_ENV = "VIRTLEASE_DEBUG"
"""``--debug`` as an environment variable.  ``main`` sets it when ``--debug`` is given, before
any backend is imported: a backend whose libraries fix their logging at import (gRPC's C
core) reads it then."""

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Run:
    """What the frame knows about this run (``ctx.find_object(Run)`` in a command)."""

    debug: bool = False


@click.group(cls=PluginGroup, context_settings=CONTEXT_SETTINGS, warn=warn)
@click.option("--debug", is_flag=True, envvar=DEBUG_ENV,
              help=f"Log at debug level to stderr (the backends' own libraries too); show tracebacks on "
                   f"errors. Env {DEBUG_ENV}=1.")
@click.version_option(version=__version__, prog_name="virtlease")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Cluster-wide VM disk leases.

    The commands come from the installed backends; each takes --help.
    Backend options (e.g. --endpoints) may come before the command name.
    Read commands take --json.
    """
    run = ctx.find_object(Run)
    if run is None:
        run = ctx.ensure_object(Run)
    run.debug = debug
    # Without --debug the command reports outcomes itself (one line + hint); the drivers' log
    # lines would only repeat them around that line.
    logging.basicConfig(level=logging.DEBUG if debug else logging.CRITICAL + 1,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run the command, map failures to one line and an exit code."""
    run = Run()
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args[: args.index("--") if "--" in args else len(args)]:
        os.environ[DEBUG_ENV] = "1"
    try:
        rv = cli.main(args=args, prog_name="virtlease",
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
