"""``python -m virtlease.cli.manpage``: the ``virtlease`` manual page, made from the command's own help.

Everything in the page comes from the click commands as installed: the group's help, then one
subsection per registered subcommand (its usage line, help text, options and epilog, the same
words ``virtlease COMMAND --help`` prints), then the exit codes (``exitcodes.EXIT_CODES_HELP``).  Nothing is
written by hand, so the page cannot drift from the program.  ``make deb`` installs the output as
virtlease(8); ``--section`` and ``--date`` make the header, ``-o`` writes a file instead of stdout.

A caller may rely on: the output is plain roff with the ``man`` macros, every line of it is
valid on its own (no line starts with ``.`` or ``'`` unless it is a macro), and two runs over
the same installed commands give the same bytes (``--date`` or ``SOURCE_DATE_EPOCH`` pins the
date; otherwise today's).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import sys
from collections.abc import Iterator, Sequence

import click

from .._version import __version__
from . import cli
from .exitcodes import EXIT_CODES_HELP


def roff_escape(text: str) -> str:
    """Text for roff: backslashes and hyphens escaped, no line starting a request."""
    out = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").splitlines():
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def _paragraphs(help_text: str) -> Iterator[str]:
    """click's help text split into paragraphs (blank-line separated, ``\\b`` kept verbatim)."""
    for block in inspect.cleandoc(help_text).split("\n\n"):
        if block.strip():
            yield block


def _help_body(help_text: str | None) -> list[str]:
    lines: list[str] = []
    for block in _paragraphs(help_text or ""):
        if block.startswith("\b\n"):
            lines += [".PP", ".nf", roff_escape(block[2:]), ".fi"]
        else:
            lines += [".PP", roff_escape(" ".join(block.split()))]
    return lines


def _options(ctx: click.Context, command: click.Command) -> list[str]:
    lines: list[str] = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        lines += [".TP", f"\\fB{roff_escape(names)}\\fR", roff_escape(help_text or "")]
    return lines


def render(section: str = "8", date: str | None = None) -> str:
    """The whole page for the installed ``virtlease`` command and its subcommands."""
    if date is None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        day = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch
               else datetime.datetime.now(datetime.UTC))
        date = day.strftime("%Y-%m-%d")
    top = click.Context(cli, info_name="virtlease")
    out = [f'.TH VIRTLEASE {section} "{date}" "virtlease {__version__}" "virtlease"',
           ".SH NAME", "virtlease, virtlease\\-agent \\- cluster\\-wide disk leases for virtual machines, kept in etcd",
           ".SH SYNOPSIS",
           "\\fBvirtlease\\fR [\\fB\\-\\-debug\\fR] [\\fB\\-\\-version\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
           ".br", "\\fBvirtlease\\-agent\\fR [\\fIOPTIONS\\fR] (the same as \\fBvirtlease agent\\fR)",
           ".SH DESCRIPTION", *_help_body(cli.help), ".SH OPTIONS", *_options(top, cli), ".SH COMMANDS"]
    group = cli
    assert isinstance(group, click.Group)
    for name in group.list_commands(top):
        command = group.get_command(top, name)
        if command is None:
            continue
        ctx = click.Context(command, info_name=f"virtlease {name}", parent=top)
        usage = " ".join(command.collect_usage_pieces(ctx))
        out += [".SS", f"\\fBvirtlease {roff_escape(name)}\\fR {roff_escape(usage)}",
                *_help_body(command.help), *_options(ctx, command)]
        if command.epilog and command.epilog != EXIT_CODES_HELP:
            out += _help_body(command.epilog)
    out += [".SH EXIT STATUS"]
    for line in EXIT_CODES_HELP.splitlines()[2:]:  # after "\b" and "Exit codes:"
        code, _, meaning = line.strip().partition(" ")
        out += [".TP", f"\\fB{code}\\fR", roff_escape(meaning.strip())]
    out += [".SH FILES", ".TP", "\\fI/etc/virtlease/virtlease.toml\\fR",
            "The configuration (mode 0600; read when neither \\fB\\-\\-config\\fR nor "
            "\\fBVIRTLEASE_CONFIG\\fR names another).",
            ".TP", "\\fI/run/virtlease/\\fR", "The agent's state file, which a restarted agent continues from.",
            ".SH SEE ALSO", "\\fBvirtlockd\\fR(8), \\fBvirsh\\fR(1), \\fBetcd\\fR(1); "
            "/usr/share/doc/virtlease/OPERATIONS.md"]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtlease.cli.manpage", description=__doc__.split("\n")[0])
    parser.add_argument("--section", default="8")
    parser.add_argument("--date", help="YYYY-MM-DD (default: SOURCE_DATE_EPOCH, else today)")
    parser.add_argument("-o", "--output", help="write here instead of stdout")
    args = parser.parse_args(argv)
    page = render(args.section, args.date)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
