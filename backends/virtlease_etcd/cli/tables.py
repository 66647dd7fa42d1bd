"""The tables of ``virtlease status`` (and the demo's final picture), from a ``ClusterStatus``.

Each section is built once as rows of cells (:func:`status_sections`) and shown as a rich
table (:func:`status_tables`), or, by :func:`print_status`, as plain aligned text when it has
more than ``PLAIN_ROWS`` rows: rich lays a table out cell by cell (about 7 s for 4,000 rows on
a loaded 2-core machine; minutes for the 40,000 disks of a thousand hosts), plain text takes
milliseconds.

See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from virtlease.cli.output import ago
from virtlease_etcd.ops.status import ClusterStatus

PLAIN_ROWS = 200
"""Sections with more rows than this are printed as plain text by ``print_status``."""

Cell = str | Text


@dataclass
class Section:
    """One section of the status: a heading, columns, rows, and what to say when empty."""

    title: str
    columns: tuple[str, ...]
    empty: str
    rows: list[list[Cell]] = field(default_factory=list)
    no_wrap: tuple[str, ...] = ()
    style: str | None = None

    def table(self) -> RenderableType:
        """A bold heading over a rich table, or over a dim "none" line when there are no rows."""
        heading = Text(self.title, style="bold")
        if not self.rows:
            return Group(heading, Text(f"  {self.empty}", style="dim"))
        table = Table()
        for col in self.columns:
            table.add_column(col, no_wrap=col in self.no_wrap, style=self.style)
        for row in self.rows:
            table.add_row(*row)
        return Group(heading, table)

    def plain(self) -> str:
        """The heading and the rows as aligned plain text (a multi-line cell joined by ", ")."""
        cells = [[c if type(c) is str and "\n" not in c else _plain(c) for c in row] for row in self.rows]
        columns = list(zip(*cells, strict=True)) or [() for _ in self.columns]
        widths = [max(len(col), *map(len, column)) for col, column in zip(self.columns, columns, strict=True)]
        line = "  ".join(f"{{:<{w}}}" for w in widths).format
        lines = [self.title, line(*self.columns).rstrip(), *(line(*r).rstrip() for r in cells)]
        return "\n".join(lines) + "\n"


def _plain(cell: Cell) -> str:
    text = cell.plain if isinstance(cell, Text) else cell
    return text.replace("\n", ", ")


def status_sections(status: ClusterStatus, *, title_suffix: str = "") -> list[Section]:
    """The sections of ``virtlease status``: hosts, held resources, handoffs, registered domains, problems."""
    now = time.time()
    hosts = Section(f"Hosts{title_suffix}", ("host", "alive", "TTL left", "pid", "lease", "session since"),
                    "no live host sessions")
    for h in sorted(status.hosts, key=lambda h: h.host):
        alive = Text("yes", style="green") if h.ttl_left > 0 else Text("no (expired)", style="red")
        hosts.rows.append([h.host, alive, f"{h.ttl_left}s" if h.ttl_left >= 0 else "-",
                           str(h.pid or "-"), f"{h.lease:x}", ago(h.started, now)])

    held = Section(f"Held resources{title_suffix}", ("resource", "mode", "host", "domain", "uuid", "token", "since"),
                   "nothing held", no_wrap=("token", "mode"))
    for r in sorted(status.resources, key=lambda r: (r.host, r.domain_name, r.resource)):
        mode = r.mode if r.kind == "disk" else f"{r.mode} lease"
        host: Cell = r.host
        if r.handoff_to:
            host = Text(r.host)
            host.append(f" → {r.handoff_to}", style="yellow")
        held.rows.append([r.resource, mode, host, r.domain_name, r.domain_uuid, str(r.token), ago(r.since, now)])

    hand = Section(f"Handoffs in flight{title_suffix}", ("domain", "uuid", "from", "to", "resources", "claimed",
                                                          "since"), "none")
    for m in status.handoffs:
        hand.rows.append([m.domain_name, m.domain_uuid, m.from_host, m.to_host, "\n".join(m.resources),
                          "yes" if m.claimed else "not yet", ago(m.since, now)])
    sections = [hosts, held, hand]
    if status.domains:
        doms = Section(f"Registered domains{title_suffix}", ("domain", "uuid", "host", "pid", "since"), "none")
        for d in sorted(status.domains, key=lambda d: (d.host, d.domain_name)):
            doms.rows.append([d.domain_name, d.domain_uuid, d.host, str(d.pid or "-"), ago(d.since, now)])
        sections.append(doms)
    if status.problems:
        prob = Section("Foreign keys under the prefix (not virtlease records of this format)", ("problem",),
                       "none", style="red")
        prob.rows += [[p] for p in status.problems]
        sections.append(prob)
    return sections


def status_tables(status: ClusterStatus, *, title_suffix: str = "") -> list[RenderableType]:
    """Every section as a rich table (the demo's picture: a few rows)."""
    return [s.table() for s in status_sections(status, title_suffix=title_suffix)]


def print_status(status: ClusterStatus, console: Console) -> None:
    """Every section on ``console``: a rich table, or plain text past ``PLAIN_ROWS`` rows."""
    for section in status_sections(status):
        if len(section.rows) > PLAIN_ROWS:
            console.file.write(section.plain())
            console.file.flush()
        else:
            console.print(section.table())
