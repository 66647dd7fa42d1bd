"""Exit codes of the ``virtlease`` command and the one-line error report.

Every failure ends as one line on stderr (``virtlease: error: ...``), a
``hint:`` line when there is something to do about it, and an exit code a
script can branch on.  A traceback is printed only with ``--debug``.

Generic: the mapping knows only the core's ``VirtleaseError`` classes (and
click's); a backend's commands add their own hints by setting ``hint`` on
the error or raising ``CommandFailed`` with an explicit code.

See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import click

from virtlease.errors import (
    BackendUnavailableError,
    ConfigError,
    Holder,
    LeaseLostError,
    ResourceBusyError,
    ValidationError,
    VirtleaseError,
)


class ExitCode(enum.IntEnum):
    """What a ``virtlease`` process's exit status means."""

    OK = 0
    FAILED = 1
    """Anything else went wrong (an unhealthy ``check``, a stale state...)."""
    BAD_INPUT = 2
    """Bad arguments or configuration (also click's usage errors)."""
    BUSY = 3
    """A resource is held by another domain; the holder is printed."""
    UNREACHABLE = 4
    """The backend (e.g. etcd) could not be reached before the deadline."""
    LEASE_LOST = 5
    """The host's session lease was lost while holding (the VM was fenced)."""
    INTERRUPTED = 130
    """Interrupted (Ctrl-C) before the command finished."""


def exit_codes_help(backend: str = "the backend") -> str:
    """The exit-code paragraph for a command's ``--help`` epilog, naming its backend
    (``\\b`` keeps click from rewrapping it)."""
    return f"""\b
Exit codes:
  0  success
  1  other failure (unhealthy cluster, stale state, ...)
  2  bad arguments or configuration
  3  busy: a resource is held by another domain (the holder is printed)
  4  {backend} unreachable before the deadline
  5  the session lease was lost while holding (the VM pid was fenced)
  130 interrupted"""


EXIT_CODES_HELP = exit_codes_help()
"""The generic exit-code paragraph."""


class CommandFailed(VirtleaseError):
    """A command-level failure with an explicit exit code."""

    def __init__(self, message: str, *, code: ExitCode = ExitCode.FAILED, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code an exception ends the process with."""
    if isinstance(exc, CommandFailed):
        return exc.code
    if isinstance(exc, click.UsageError | ValidationError | ConfigError):
        return ExitCode.BAD_INPUT
    if isinstance(exc, ResourceBusyError):
        return ExitCode.BUSY
    if isinstance(exc, BackendUnavailableError):
        return ExitCode.UNREACHABLE
    if isinstance(exc, LeaseLostError):
        return ExitCode.LEASE_LOST
    if isinstance(exc, KeyboardInterrupt | click.Abort):
        return ExitCode.INTERRUPTED
    return ExitCode.FAILED


def one_line(text: str) -> str:
    """Fold a multi-line message into one line."""
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    if len(parts) > 1 and parts[0].endswith(":"):
        return parts[0] + " " + "; ".join(parts[1:])
    return "; ".join(parts)


def describe_busy(conflicts: Sequence[Holder]) -> str:
    """One line naming every holder: ``/d1, /d2 held exclusive by domain web1 (uuid) on host a (token 7)``."""
    groups: dict[tuple[str, str, str, str, str | None], list[Holder]] = {}
    for h in conflicts:
        groups.setdefault((h.host, h.domain_name, h.domain_uuid, h.mode, h.handoff_to), []).append(h)
    pieces = []
    for (host, name, uuid, mode, handoff_to), holders in groups.items():
        tokens = sorted({h.token for h in holders})
        text = (f"{', '.join(h.shown for h in holders)} held {mode} by domain {name} ({uuid}) "
                f"on host {host} (token {', '.join(map(str, tokens))})")
        if handoff_to:
            text += f", being migrated to host {handoff_to}"
        pieces.append(text)
    return "; ".join(pieces)


def describe(exc: BaseException) -> tuple[str, str | None]:
    """The error line and the hint for an exception."""
    if isinstance(exc, ResourceBusyError):
        return f"busy: {describe_busy(exc.conflicts)}", exc.hint
    if isinstance(exc, click.UsageError):
        command = exc.ctx.command_path if exc.ctx is not None else "virtlease"
        return one_line(exc.format_message()), f"see '{command} --help'"
    if isinstance(exc, click.ClickException):
        return one_line(exc.format_message()), None
    if isinstance(exc, VirtleaseError):
        hint = exc.hint
        if hint is None and isinstance(exc, ConfigError):
            hint = "see the command's --help for its settings"
        if hint is None and isinstance(exc, BackendUnavailableError):
            hint = "is the backend running and reachable? run again with --debug for details"
        return one_line(str(exc)), hint
    if isinstance(exc, KeyboardInterrupt | click.Abort):
        return "interrupted", None
    if isinstance(exc, FileNotFoundError | PermissionError | OSError):
        return one_line(str(exc)), None
    return f"internal error: {type(exc).__name__}: {one_line(str(exc))}", "run again with --debug for a traceback"
