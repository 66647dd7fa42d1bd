"""virtlease(8) is generated from the command's own help (``python -m virtlease.cli.manpage``):
every registered command in it with its help and options, valid roff, the same bytes twice."""

from __future__ import annotations

import re

import pytest

from virtlease.cli import cli
from virtlease.cli.manpage import render, roff_escape
from virtlease.cli.registry import load_commands

MACROS = {".TH", ".SH", ".SS", ".PP", ".TP", ".nf", ".fi", ".br"}


def test_every_command_with_its_help_and_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    page = render()
    assert page == render(), "not reproducible"
    assert page.startswith('.TH VIRTLEASE 8 "2023-11-14" "virtlease ')
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "EXIT STATUS", "FILES"):
        assert f".SH {section}\n" in page
    commands = load_commands()
    assert {"agent", "check", "hold", "status", "switch-from-virtlockd"} <= set(commands)
    for name, command in commands.items():
        assert f".SS\n\\fBvirtlease {roff_escape(name)}\\fR" in page, name
        first = (command.help or "").strip().splitlines()[0]
        assert roff_escape(" ".join(first.split())) in page, name
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--") and not getattr(param, "hidden", False):
                    assert roff_escape(opt) in page, (name, opt)
    assert roff_escape((cli.help or "").strip().splitlines()[0]) in page


def test_every_line_is_valid_on_its_own() -> None:
    for line in render(date="2026-01-01").splitlines():
        if line.startswith((".", "'")):
            assert line.split()[0] in MACROS, line
        else:  # text: every hyphen escaped (a bare one may print as a dash and breaks copy-paste)
            assert not re.search(r"(?<!\\)-", line), line
