"""``virtlease status``: hosts, held resources and handoffs, read-only.

Reads the prefix with a plain etcd connection: no host session, no lease, so
it can run anywhere, any number of times, without joining the cluster.

See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

import click

from virtlease.cli.output import out, print_json

from .options import Settings, etcd_client, etcd_command, fetch_status
from .tables import print_status


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print ClusterStatus.as_dict() as JSON.")
@etcd_command
def status(settings: Settings, as_json: bool) -> None:
    """Show live hosts (TTL left), held resources (mode, holder host and domain,
    fencing token, since) and migrations in flight."""
    cfg = settings.load()
    with etcd_client(cfg) as client:
        st = fetch_status(client, cfg)
    if as_json:
        print_json(st.as_dict())
        return
    out.print(f"[bold]virtlease[/] status of prefix {cfg.prefix} at {','.join(cfg.endpoints)} "
              f"(etcd revision {st.revision})")
    print_status(st, out)
