"""The tables of ``virtlease status`` (and the demo's final picture), from a ``ClusterStatus``.

Two layouts.  The default fits an 80-column terminal: few columns, the holder (host over
domain) and what it holds (mode, token, since) stacked in narrow cells, and the resource in the
widest one; nothing is cut: a long path, host or domain folds onto the next line of its cell.
``wide`` is every column (the domain UUIDs, the lease of each record) on one line per row, at
the table's natural width, for a wide terminal or a file.  Lease ids are hex everywhere, as
etcdctl and the agent's log print them.

Each section is built once as rows of cells (:func:`status_sections`) and shown as a rich
table (:func:`status_tables`), or, by :func:`print_status`, as plain aligned text -- every
column, one line per row -- when it has more than ``PLAIN_ROWS`` rows: rich lays a table out
cell by cell (about 7 s for 4,000 rows on a loaded 2-core machine; minutes for the 40,000
disks of a thousand hosts), plain text takes milliseconds.

A disk locked under a ``path://`` identity (this host's real path: no cluster-wide identity,
``strict_identity`` off) is marked "this host only", with a note under the table saying what
that means and what to configure.

See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from virtlease.cli.output import ago
from virtlease_etcd.clock import SYSTEM
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.ops.status import ClusterStatus, HeldInfo

PLAIN_ROWS = 200
"""Sections with more rows than this are printed as plain text by ``print_status``."""

Cell = str | Text

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


@dataclass
class Section:
    """One section of the status: a heading, columns, rows, what to say when empty, and a note
    under the table.  ``fill``: the column that takes the width left in the default layout."""

    title: str
    columns: tuple[str, ...]
    empty: str
    rows: list[list[Cell]] = field(default_factory=list)
    note: str | None = None
    fill: str | None = None
    style: str | None = None

    def table(self, *, wide: bool = False) -> RenderableType:
        """A bold heading over a rich table whose cells fold (never cut), or over a dim "none"
        line when there are no rows."""
        heading = Text(self.title, style="bold")
        if not self.rows:
            return Group(heading, Text(f"  {self.empty}", style="dim"))
        table = Table(expand=not wide and self.fill is not None, show_lines=not wide and len(self.columns) > 1)
        for col in self.columns:
            table.add_column(col, overflow="fold", style=self.style,
                             ratio=1 if (col == self.fill and not wide) else None,
                             max_width=None if wide or col == self.fill or len(self.columns) == 1 else 24)
        for row in self.rows:
            table.add_row(*row)
        if self.note:
            return Group(heading, table, Text(self.note, style="yellow"))
        return Group(heading, table)

    def plain(self) -> str:
        """The heading and the rows as aligned plain text (a multi-line cell joined by ", ")."""
        cells = [[c if type(c) is str and "\n" not in c else _plain(c) for c in row] for row in self.rows]
        columns = list(zip(*cells, strict=True)) or [() for _ in self.columns]
        widths = [max(len(col), *map(len, column)) for col, column in zip(self.columns, columns, strict=True)]
        line = "  ".join(f"{{:<{w}}}" for w in widths).format
        lines = [self.title, line(*self.columns).rstrip(), *(line(*r).rstrip() for r in cells)]
        if self.note:
            lines.append(self.note)
        return "\n".join(lines) + "\n"


def _plain(cell: Cell) -> str:
    text = cell.plain if isinstance(cell, Text) else cell
    return text.replace("\n", ", ")


def status_sections(status: ClusterStatus, *, title_suffix: str = "", wide: bool = False) -> list[Section]:
    """The sections of ``virtlease status``: hosts, held resources, handoffs, registered domains,
    problems; every column with ``wide``, the 80-column layout's otherwise."""
    now = SYSTEM.wall()
    hosts = Section(f"Hosts{title_suffix}", ("host", "alive", "TTL left", "pid", "lease", "session since") if wide
                    else ("host", "session", "pid", "lease"), "no live host sessions")
    for h in sorted(status.hosts, key=lambda h: h.host):
        alive = Text("yes", style="green") if h.ttl_left > 0 else Text("no (expired)", style="red")
        ttl = f"{h.ttl_left}s" if h.ttl_left >= 0 else "-"
        if wide:
            hosts.rows.append([h.host, alive, ttl, str(h.pid or "-"), lease_id(h.lease), ago(h.started, now)])
        else:
            session = Text.assemble(alive, f", {ttl} left\nsince {ago(h.started, now, short=True)}")
            hosts.rows.append([h.host, session, str(h.pid or "-"), lease_id(h.lease)])

    held = Section(f"Held resources{title_suffix}",
                   ("resource", "mode", "host", "domain", "uuid", "token", "since", "lease") if wide
                   else ("holder", "mode", "resource"), "nothing held", fill="resource",
                   note=HOST_ONLY_NOTE if any(host_only(r) for r in status.resources) else None)
    for r in sorted(status.resources, key=lambda r: (r.host, r.domain_name, r.resource)):
        mode = r.mode if r.kind == "disk" else f"{r.mode} lease"
        host: Cell = r.host
        if r.handoff_to:
            host = Text(r.host)
            host.append(f" → {r.handoff_to}", style="yellow")
        resource: Cell = Text(resource_text(r), style="yellow") if host_only(r) else r.resource
        if wide:
            held.rows.append([resource, mode, host, r.domain_name, r.domain_uuid, str(r.token), ago(r.since, now),
                              lease_id(r.lease)])
        else:
            held.rows.append([Text.assemble(host, "\n", r.domain_name),
                              f"{mode}\ntoken {r.token}\n{ago(r.since, now, short=True)}", resource])

    hand = Section(f"Handoffs in flight{title_suffix}",
                   ("domain", "uuid", "from", "to", "resources", "claimed", "since") if wide
                   else ("domain", "from → to", "resources", "claimed"), "none", fill="resources")
    for m in status.handoffs:
        claimed = "yes" if m.claimed else "not yet"
        if wide:
            hand.rows.append([m.domain_name, m.domain_uuid, m.from_host, m.to_host, "\n".join(m.resources),
                              claimed, ago(m.since, now)])
        else:
            hand.rows.append([m.domain_name, f"{m.from_host}\n→ {m.to_host}", "\n".join(m.resources), claimed])
    sections = [hosts, held, hand]
    if status.domains:
        doms = Section(f"Registered domains{title_suffix}", ("domain", "uuid", "host", "pid", "since") if wide
                       else ("domain", "host", "pid", "since"), "none")
        for d in sorted(status.domains, key=lambda d: (d.host, d.domain_name)):
            cells = [d.domain_name, d.domain_uuid] if wide else [d.domain_name]
            doms.rows.append([*cells, d.host, str(d.pid or "-"), ago(d.since, now)])
        sections.append(doms)
    if status.problems:
        prob = Section("Foreign keys under the prefix (not virtlease records of this format)", ("problem",),
                       "none", style="red")
        prob.rows += [[p] for p in status.problems]
        sections.append(prob)
    return sections


def status_tables(status: ClusterStatus, *, title_suffix: str = "", wide: bool = False) -> list[RenderableType]:
    """Every section as a rich table (the demo's picture, and the command's for a few rows)."""
    return [s.table(wide=wide) for s in status_sections(status, title_suffix=title_suffix, wide=wide)]


def print_status(status: ClusterStatus, console: Console, *, wide: bool = False) -> None:
    """Every section on ``console``: a rich table, or plain text (every column, one line per
    row) past ``PLAIN_ROWS`` rows.  ``wide``: the tables at their natural width, one line per row."""
    sections = status_sections(status, wide=wide)
    full: list[Section] | None = sections if wide else None  # the same sections, every column
    natural = Console(file=console.file, highlight=False, soft_wrap=False, width=100_000)
    for i, section in enumerate(sections):
        if len(section.rows) > PLAIN_ROWS:
            if full is None:
                full = status_sections(status, wide=True)
            console.file.write(full[i].plain())
            console.file.flush()
        elif wide:
            natural.print(section.table(wide=True))
        else:
            console.print(section.table())
