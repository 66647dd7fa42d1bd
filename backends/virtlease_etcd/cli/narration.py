"""The demo's narration: a timeline of who did what, and Ctrl-C held off while it cleans up.

See docs/DESIGN.md §10 (the demo runs real host processes and a real etcd).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from rich.text import Text

from virtlease.cli.output import out
from virtlease_etcd.clock import SYSTEM

_ACTOR_STYLE = {"etcd": "magenta", "host-a": "cyan", "host-b": "green", "status": "blue", "cleanup": "dim",
                "demo": "bold"}


class Timeline:
    """Narration: one line per event, stamped with the seconds since the start."""

    def __init__(self) -> None:
        self.t0 = SYSTEM.now()

    def elapsed(self) -> float:
        return SYSTEM.now() - self.t0

    def say(self, actor: str, text: str | Text, style: str | None = None) -> None:
        """Print one event; long text wraps under itself, not under the stamp."""
        body = text if isinstance(text, Text) else Text(text, style=style or "")
        head = Text.assemble((f"[{self.elapsed():6.2f}s] ", "dim"), (f"{actor:<8} ", _ACTOR_STYLE.get(actor, "")))
        indent = len(head.plain)
        lines = body.wrap(out, max(40, out.width - indent))
        for i, line in enumerate(lines):
            line.rstrip()
            out.print(Text.assemble(head if i == 0 else " " * indent, line))


class Interrupts:
    """SIGTERM and SIGINT become KeyboardInterrupt, so the clean-up always runs — but
    never inside ``deferred()``, where a child is started and recorded for clean-up
    (an interrupt between the fork and the bookkeeping would leak the child)."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False

    def handler(self, _signum: int, _frame: FrameType | None) -> None:
        if self.depth:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending:
                self.pending = False
                raise KeyboardInterrupt


def tokens(reply: dict[str, Any]) -> str:
    return ", ".join(f"{Path(t['resource']).name} token {t['token']}" for t in reply["tokens"])


def token_set(reply: dict[str, Any]) -> str:
    return "/".join(str(t) for t in sorted({t["token"] for t in reply["tokens"]}))
