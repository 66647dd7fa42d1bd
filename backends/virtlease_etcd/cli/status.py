"""``virtlease status``: hosts, held resources and handoffs, read-only.

Reads the prefix with a plain etcd connection: no host session, no lease, so
it can run anywhere, any number of times, without joining the cluster.  The
default layout fits an 80-column terminal, ``--wide`` shows every column
(``tables``); ``--host`` and ``--domain`` keep the rows of some hosts or
domains, in the tables and in ``--json`` alike.  A thousand hosts hold some
40,000 records: big sections print as plain text (``tables.print_status``) and
big JSON on one line (the indented form is made by the json module's
pure-Python encoder, 2x slower).

See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from virtlease.cli.output import out, print_json
from virtlease_etcd.ops.status import ClusterStatus

from .fencing import fencing_status, fencing_table
from .options import Settings, etcd_client, etcd_command, fetch_status
from .tables import PLAIN_ROWS, print_status


def only(status: ClusterStatus, hosts: tuple[str, ...], domains: tuple[str, ...]) -> ClusterStatus:
    """``status`` with only the rows of ``hosts`` (host ids) and ``domains`` (names or UUIDs);
    an empty tuple keeps every row.  A handoff counts for both its hosts; with ``domains`` the
    host rows are those of the hosts the domains are on."""
    def host_ok(*names: str) -> bool:
        return not hosts or any(n in hosts for n in names)

    def domain_ok(name: str, uuid: str) -> bool:
        return not domains or name in domains or uuid in domains

    kept = dataclasses.replace(
        status,
        resources=[r for r in status.resources if host_ok(r.host) and domain_ok(r.domain_name, r.domain_uuid)],
        handoffs=[m for m in status.handoffs
                  if host_ok(m.from_host, m.to_host) and domain_ok(m.domain_name, m.domain_uuid)],
        domains=[d for d in status.domains if host_ok(d.host) and domain_ok(d.domain_name, d.domain_uuid)],
    )
    # with --domain, the hosts that domain is on (holds, is registered, migrates from or to)
    on = ({r.host for r in kept.resources} | {d.host for d in kept.domains}
          | {h for m in kept.handoffs for h in (m.from_host, m.to_host)})
    kept.hosts = [h for h in status.hosts if host_ok(h.host) and (not domains or h.host in on)]
    return kept


@click.command()
@click.option("--json", "as_json", is_flag=True,
              help=f"Print ClusterStatus.as_dict() as JSON (on one line past {PLAIN_ROWS} resources).")
@click.option("--wide", is_flag=True, help="Every column (domain UUIDs, record leases), one line per row.")
@click.option("--host", "hosts", multiple=True, metavar="HOST_ID", help="Only this host's rows (repeatable).")
@click.option("--domain", "domains", multiple=True, metavar="NAME|UUID",
              help="Only this domain's rows, by name or UUID (repeatable).")
@etcd_command
def status(settings: Settings, as_json: bool, wide: bool, hosts: tuple[str, ...], domains: tuple[str, ...]) -> None:
    """Show live hosts (TTL left), held resources (mode, holder host and domain,
    fencing token, since) and migrations in flight; with scsi_pr_luns set, the keys
    registered on each fenced LUN this host sees.

    The default layout fits an 80-column terminal; --wide shows every column."""
    cfg = settings.load()
    with etcd_client(cfg) as client:
        full = fetch_status(client, cfg)
    fenced = fencing_status(cfg, full)  # every live host names its keys, whatever is shown
    st = only(full, hosts, domains)
    if as_json:
        data = {**st.as_dict(), **({"fencing": fenced} if fenced else {})}
        if len(st.resources) > PLAIN_ROWS:
            sys.stdout.write(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str) + "\n")
            sys.stdout.flush()
        else:
            print_json(data)
        return
    shown = [f"host {', '.join(hosts)}"] if hosts else []
    shown += [f"domain {', '.join(domains)}"] if domains else []
    out.print(f"[bold]virtlease[/] status of prefix {cfg.prefix} at {','.join(cfg.endpoints)} "
              f"(etcd revision {st.revision})" + (f", only {'; '.join(shown)}" if shown else ""))
    print_status(st, out, wide=wide)
    if fenced:
        out.print(fencing_table(fenced))
