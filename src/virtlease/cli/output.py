"""How the command prints: rich tables for people, JSON for programs.

``stdout`` carries results (tables, JSON, the ``hold`` line); ``stderr``
carries errors, hints and progress, so ``virtlease status --json | jq`` and
scripts reading ``hold``'s line never see decoration.  Generic helpers
only; a backend's tables live with its commands.

See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.text import Text


def _width(stream: Any) -> int | None:
    """Let rich size a terminal; give pipes and files room for the tables (rich's default is 80)."""
    if os.environ.get("COLUMNS") or (hasattr(stream, "isatty") and stream.isatty()):
        return None
    return 160


out = Console(highlight=False, soft_wrap=False, width=_width(sys.stdout))
"""Results (stdout)."""
err = Console(stderr=True, highlight=False, soft_wrap=True, width=_width(sys.stderr))
"""Errors, hints and progress (stderr)."""


def print_json(data: Any) -> None:
    """Results as JSON on stdout (plain: no colour, no wrapping)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def print_line(text: str) -> None:
    """One plain line on stdout, flushed at once (for scripts that wait for it)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def error(line: str, hint: str | None = None) -> None:
    """The one-line error report (and its hint) on stderr."""
    err.print(Text.assemble(("virtlease: error: ", "bold red"), line))
    if hint:
        err.print(Text.assemble(("hint: ", "yellow"), hint))


def warn(line: str) -> None:
    """A one-line warning on stderr."""
    err.print(Text.assemble(("virtlease: warning: ", "yellow"), line))


def ago(epoch: float, now: float, *, short: bool = False) -> str:
    """``12:03:04 (5s ago)`` for an epoch time seen at epoch time ``now`` (``short``: ``5s ago``);
    ``-`` for none."""
    if not epoch:
        return "-"
    delta = max(0.0, now - epoch)
    if delta < 120:
        rel = f"{delta:.0f}s ago"
    elif delta < 7200:
        rel = f"{delta / 60:.0f}m ago"
    elif delta < 172800:
        rel = f"{delta / 3600:.0f}h ago"
    else:
        rel = f"{delta / 86400:.0f}d ago"
    return rel if short else f"{time.strftime('%H:%M:%S', time.localtime(epoch))} ({rel})"
