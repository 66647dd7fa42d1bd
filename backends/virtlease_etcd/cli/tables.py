"""The tables of ``virtlease status`` (and the demo's final picture), from a ``ClusterStatus``.

See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from virtlease.cli.output import ago
from virtlease_etcd.clock import SYSTEM
from virtlease_etcd.ops.status import ClusterStatus


def _section(title: str, table: Table | None, empty: str) -> RenderableType:
    """A bold heading over a table, or over a dim "none" line when there are no rows."""
    heading = Text(title, style="bold")
    if table is None or not table.row_count:
        return Group(heading, Text(f"  {empty}", style="dim"))
    return Group(heading, table)


def status_tables(status: ClusterStatus, *, title_suffix: str = "") -> list[RenderableType]:
    """The sections of ``virtlease status``: hosts, held resources, handoffs, registered domains, problems."""
    now = SYSTEM.wall()
    hosts = Table()
    for col in ("host", "alive", "TTL left", "pid", "lease", "session since"):
        hosts.add_column(col)
    for h in sorted(status.hosts, key=lambda h: h.host):
        alive = Text("yes", style="green") if h.ttl_left > 0 else Text("no (expired)", style="red")
        hosts.add_row(h.host, alive, f"{h.ttl_left}s" if h.ttl_left >= 0 else "-",
                      str(h.pid or "-"), f"{h.lease:x}", ago(h.started, now))

    held = Table()
    for col in ("resource", "mode", "host", "domain", "uuid", "token", "since"):
        held.add_column(col, no_wrap=col in ("token", "mode"))
    for r in sorted(status.resources, key=lambda r: (r.host, r.domain_name, r.resource)):
        mode = r.mode if r.kind == "disk" else f"{r.mode} lease"
        host = Text(r.host)
        if r.handoff_to:
            host.append(f" → {r.handoff_to}", style="yellow")
        held.add_row(r.resource, mode, host, r.domain_name, r.domain_uuid, str(r.token), ago(r.since, now))

    hand = Table()
    for col in ("domain", "uuid", "from", "to", "resources", "claimed", "since"):
        hand.add_column(col)
    for m in status.handoffs:
        hand.add_row(m.domain_name, m.domain_uuid, m.from_host, m.to_host, "\n".join(m.resources),
                     "yes" if m.claimed else "not yet", ago(m.since, now))
    sections = [
        _section(f"Hosts{title_suffix}", hosts, "no live host sessions"),
        _section(f"Held resources{title_suffix}", held, "nothing held"),
        _section(f"Handoffs in flight{title_suffix}", hand, "none"),
    ]
    if status.domains:
        doms = Table()
        for col in ("domain", "uuid", "host", "pid", "since"):
            doms.add_column(col)
        for d in sorted(status.domains, key=lambda d: (d.host, d.domain_name)):
            doms.add_row(d.domain_name, d.domain_uuid, d.host, str(d.pid or "-"), ago(d.since, now))
        sections.append(_section(f"Registered domains{title_suffix}", doms, "none"))
    if status.problems:
        prob = Table()
        prob.add_column("problem", style="red")
        for p in status.problems:
            prob.add_row(p)
        sections.append(_section("Foreign keys under the prefix (not virtlease records of this format)", prob,
                                 "none"))
    return sections
