"""Parsing ``/proc/<pid>/mountinfo`` and finding the mount that holds a path.

The format is the kernel's (``Documentation/filesystems/proc.rst``, section
3.5)::

    36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    (1)(2)(3)   (4)   (5)      (6)      (7)   (8) (9)   (10)         (11)

mount id, parent id, ``major:minor`` of the super block, root of the mount
within its file system, mount point (relative to the process root), mount
options, zero or more optional fields, a ``-`` separator, file system type,
source and super block options.  Fields 4, 5 and 10 escape space, tab,
newline and backslash as three-digit octal (``\\040``).

A caller may rely on: :func:`parse_mountinfo` never raising on malformed
lines (it skips and logs them), returning entries in file order, and
unescaped fields (paths are ``str`` decoded with ``os.fsdecode``);
:func:`find_mount` taking an already resolved absolute path and returning
the mount a lookup of that path really walks into (overmounts hide what is
under them), or ``None`` for an empty table.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

_OCTAL = re.compile(rb"\\([0-7]{3})")


def unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` is a space); bytes stay bytes."""
    raw = field.encode("utf-8", "surrogateescape")
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), raw))


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo, unescaped."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    options: tuple[str, ...]
    optional: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    @property
    def dev(self) -> str:
        """``major:minor`` of the super block, as sysfs spells it."""
        return f"{self.major}:{self.minor}"

    def super_option(self, name: str) -> str | None:
        """The value of super block option ``name`` (``""`` for a flag), or ``None``."""
        for option in self.super_options:
            key, sep, value = option.partition("=")
            if key == name:
                return value if sep else ""
        return None


def parse_line(line: str) -> MountEntry | None:
    """One mountinfo line, or ``None`` (logged) when it does not have the format."""
    fields = line.split(" ")
    try:
        sep = fields.index("-", 6)
        major, minor = fields[2].split(":")
        return MountEntry(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            major=int(major),
            minor=int(minor),
            root=unescape(fields[3]),
            mount_point=unescape(fields[4]),
            options=tuple(fields[5].split(",")),
            optional=tuple(fields[6:sep]),
            fstype=fields[sep + 1],
            source=unescape(fields[sep + 2]),
            super_options=tuple(unescape(fields[sep + 3]).split(",")) if len(fields) > sep + 3 else (),
        )
    except (ValueError, IndexError):
        log.debug("mountinfo: skipping malformed line %r", line)
        return None


def parse_mountinfo(text: str) -> tuple[MountEntry, ...]:
    """Every well-formed entry of a mountinfo text, in file order."""
    entries = (parse_line(line) for line in text.splitlines() if line.strip())
    return tuple(entry for entry in entries if entry is not None)


def _depth_below(mount_point: str, path: str) -> int | None:
    """Number of components of ``mount_point`` if it is ``path`` or an ancestor of it."""
    if mount_point == "/":
        return 0
    if path == mount_point or path.startswith(mount_point + "/"):
        return mount_point.count("/")
    return None


class MountTable:
    """A parsed mountinfo with the lookups the resolver needs."""

    def __init__(self, entries: Sequence[MountEntry]) -> None:
        self.entries = tuple(entries)
        self._children: dict[int, list[MountEntry]] = {}
        ids = {entry.mount_id for entry in self.entries}
        self.mount_points = frozenset(entry.mount_point for entry in self.entries)
        for entry in self.entries:
            self._children.setdefault(entry.parent_id, []).append(entry)
        # Roots: "/" mounts whose parent is not listed (outside our root).
        self._roots = [e for e in self.entries if e.mount_point == "/" and e.parent_id not in ids]

    @staticmethod
    def _shallowest(candidates: Sequence[MountEntry], path: str) -> MountEntry | None:
        """The first mount a walk down ``path`` meets; the last listed wins a tie."""
        best: MountEntry | None = None
        best_depth = -1
        for entry in candidates:
            depth = _depth_below(entry.mount_point, path)
            if depth is not None and (best is None or depth <= best_depth):
                best, best_depth = entry, depth
        return best

    def find(self, path: str) -> MountEntry | None:
        """The mount holding the absolute, resolved ``path``.

        Walks the mount tree from the root: at each mount the child met first
        on the way down (the shallowest mount point that is a prefix of
        ``path``; stacked mounts on one point are children of each other)
        is entered.  So a mount hidden by a later one on a parent directory is
        never chosen.  Without a usable tree (samples without parents) the
        longest mount point prefix wins, the last entry on a tie.
        """
        current = self._shallowest(self._roots, path)
        if current is None:
            return self._longest_prefix(path)
        seen = {current.mount_id}
        while True:
            child = self._shallowest(self._children.get(current.mount_id, ()), path)
            if child is None or child.mount_id in seen:
                return current
            seen.add(child.mount_id)
            current = child

    def _longest_prefix(self, path: str) -> MountEntry | None:
        best: MountEntry | None = None
        best_depth = -1
        for entry in self.entries:
            depth = _depth_below(entry.mount_point, path)
            if depth is not None and depth >= best_depth:
                best, best_depth = entry, depth
        return best

    def by_dev(self, dev: str) -> list[MountEntry]:
        """Every mount of the super block ``major:minor``."""
        return [entry for entry in self.entries if entry.dev == dev]


def find_mount(entries: Sequence[MountEntry], path: str) -> MountEntry | None:
    """The mount holding the resolved absolute ``path`` (see :meth:`MountTable.find`)."""
    return MountTable(entries).find(path)
