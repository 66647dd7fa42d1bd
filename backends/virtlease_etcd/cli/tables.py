"""The tables of ``virtlease status`` (and the demo's final picture), from a ``ClusterStatus``.

Two layouts.  The default fits an 80-column terminal: few columns, the holder (host over
domain) and what it holds (mode, token, since) stacked in narrow cells, and the resource in the
widest one; nothing is cut: a long path, host or domain folds onto the next line of its cell.
``wide`` is every column (the domain UUIDs, the lease of each record) on one line per row, at
the table's natural width, for a wide terminal or a file.  Lease ids are hex everywhere, as
etcdctl and the agent's log print them.

A disk locked under a ``path://`` identity (this host's real path: no cluster-wide identity,
``strict_identity`` off) is marked "this host only", with a note under the table saying what
that means and what to configure.

See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

import time

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from virtlease.cli.output import ago
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.ops.status import ClusterStatus, HeldInfo

HOST_ONLY_NOTE = ("path:// = locked by this host's path only (no cluster-wide identity: tmpfs, overlay, a local "
                  "file system without a UUID...): a host that reaches the same file by another path is not "
                  "excluded. Give its storage an identity_map entry, or keep strict_identity on to refuse such "
                  "disks (README, 'Disk identity')")


def lease_id(lease: int) -> str:
    """A lease id as every virtlease output prints it: lower-case hex, as etcdctl does."""
    return f"{lease:x}"


def host_only(r: HeldInfo) -> bool:
    """Whether ``r`` is a disk locked under this host's path only (``path://``)."""
    return r.kind == "disk" and ks.host_only(r.identity)


def resource_text(r: HeldInfo) -> str:
    """The resource as a person reads it, ``[path://, this host only]`` added for a host-only disk."""
    return f"{r.resource} [{ks.HOST_ONLY}]" if host_only(r) else r.resource


def _section(title: str, table: Table | None, empty: str, note: str | None = None) -> RenderableType:
    """A bold heading over a table, or over a dim "none" line when there are no rows."""
    heading = Text(title, style="bold")
    if table is None or not table.row_count:
        return Group(heading, Text(f"  {empty}", style="dim"))
    if note:
        return Group(heading, table, Text(note, style="yellow"))
    return Group(heading, table)


def _table(*columns: str, wide: bool, fill: str | None = None) -> Table:
    """A table whose cells fold (never cut); in the default layout ``fill`` takes the width left."""
    table = Table(expand=not wide and fill is not None, show_lines=not wide)
    for col in columns:
        table.add_column(col, overflow="fold", ratio=1 if (col == fill and not wide) else None,
                         max_width=None if wide or col == fill else 24)
    return table


def status_tables(status: ClusterStatus, *, title_suffix: str = "", wide: bool = False) -> list[RenderableType]:
    """The sections of ``virtlease status``: hosts, held resources, handoffs, registered domains, problems."""
    now = time.time()
    hosts = _table(*(("host", "alive", "TTL left", "pid", "lease", "session since") if wide
                     else ("host", "session", "pid", "lease")), wide=wide)
    for h in sorted(status.hosts, key=lambda h: h.host):
        alive = Text("yes", style="green") if h.ttl_left > 0 else Text("no (expired)", style="red")
        ttl = f"{h.ttl_left}s" if h.ttl_left >= 0 else "-"
        if wide:
            hosts.add_row(h.host, alive, ttl, str(h.pid or "-"), lease_id(h.lease), ago(h.started, now))
        else:
            session = Text.assemble(alive, f", {ttl} left\nsince {ago(h.started, now, short=True)}")
            hosts.add_row(h.host, session, str(h.pid or "-"), lease_id(h.lease))

    held = _table(*(("resource", "mode", "host", "domain", "uuid", "token", "since", "lease") if wide
                    else ("holder", "mode", "resource")), wide=wide, fill="resource")
    for r in sorted(status.resources, key=lambda r: (r.host, r.domain_name, r.resource)):
        mode = r.mode if r.kind == "disk" else f"{r.mode} lease"
        host = Text(r.host)
        if r.handoff_to:
            host.append(f" → {r.handoff_to}", style="yellow")
        resource = Text(resource_text(r), style="yellow" if host_only(r) else "")
        if wide:
            held.add_row(resource, mode, host, r.domain_name, r.domain_uuid, str(r.token), ago(r.since, now),
                         lease_id(r.lease))
        else:
            held.add_row(Text.assemble(host, "\n", r.domain_name),
                         f"{mode}\ntoken {r.token}\n{ago(r.since, now, short=True)}", resource)

    hand = _table(*(("domain", "uuid", "from", "to", "resources", "claimed", "since") if wide
                    else ("domain", "from → to", "resources", "claimed")), wide=wide, fill="resources")
    for m in status.handoffs:
        if wide:
            hand.add_row(m.domain_name, m.domain_uuid, m.from_host, m.to_host, "\n".join(m.resources),
                         "yes" if m.claimed else "not yet", ago(m.since, now))
        else:
            hand.add_row(m.domain_name, f"{m.from_host}\n→ {m.to_host}", "\n".join(m.resources),
                         "yes" if m.claimed else "not yet")
    note = HOST_ONLY_NOTE if any(host_only(r) for r in status.resources) else None
    sections = [
        _section(f"Hosts{title_suffix}", hosts, "no live host sessions"),
        _section(f"Held resources{title_suffix}", held, "nothing held", note),
        _section(f"Handoffs in flight{title_suffix}", hand, "none"),
    ]
    if status.domains:
        doms = _table(*(("domain", "uuid", "host", "pid", "since") if wide else ("domain", "host", "pid", "since")),
                      wide=wide)
        for d in sorted(status.domains, key=lambda d: (d.host, d.domain_name)):
            cells = (d.domain_name, d.domain_uuid) if wide else (d.domain_name,)
            doms.add_row(*cells, d.host, str(d.pid or "-"), ago(d.since, now))
        sections.append(_section(f"Registered domains{title_suffix}", doms, "none"))
    if status.problems:
        prob = Table()
        prob.add_column("problem", style="red", overflow="fold")
        for p in status.problems:
            prob.add_row(p)
        sections.append(_section("Foreign keys under the prefix (not virtlease records of this format)", prob,
                                 "none"))
    return sections
