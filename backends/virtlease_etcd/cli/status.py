"""``virtlease status``: hosts, held resources and handoffs, read-only.

Reads the prefix with a plain etcd connection: no host session, no lease, so
it can run anywhere, any number of times, without joining the cluster.  A
thousand hosts hold some 40,000 records: big sections print as plain text
(``tables.print_status``) and big JSON on one line (the indented form is made
by the json module's pure-Python encoder, 2x slower).

See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

import json
import sys

import click

from virtlease.cli.output import out, print_json

from .options import Settings, etcd_client, etcd_command, fetch_status
from .tables import PLAIN_ROWS, print_status


@click.command()
@click.option("--json", "as_json", is_flag=True,
              help=f"Print ClusterStatus.as_dict() as JSON (on one line past {PLAIN_ROWS} resources).")
@etcd_command
def status(settings: Settings, as_json: bool) -> None:
    """Show live hosts (TTL left), held resources (mode, holder host and domain,
    fencing token, since) and migrations in flight."""
    cfg = settings.load()
    with etcd_client(cfg) as client:
        st = fetch_status(client, cfg)
    if as_json:
        if len(st.resources) > PLAIN_ROWS:
            sys.stdout.write(json.dumps(st.as_dict(), sort_keys=True, separators=(",", ":"), default=str) + "\n")
            sys.stdout.flush()
        else:
            print_json(st.as_dict())
        return
    out.print(f"[bold]virtlease[/] status of prefix {cfg.prefix} at {','.join(cfg.endpoints)} "
              f"(etcd revision {st.revision})")
    print_status(st, out)
