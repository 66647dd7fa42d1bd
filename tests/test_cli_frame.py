"""The core's ``virtlease`` frame: it knows no backend.

Subcommands come from the ``virtlease.commands`` entry points; a broken
plugin is one warning line; backend options may precede the command name;
the frame never writes the environment; and every module of the core
imports with the etcd backend made unimportable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import metadata

import click
import pytest
from click.testing import CliRunner

import virtlease.cli as vcli
from virtlease.cli.registry import GROUP, PluginGroup, load_commands


def _ep(name: str, value: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name=name, value=value, group=GROUP)


def test_the_etcd_backend_registers_its_commands() -> None:
    names = {ep.name for ep in metadata.entry_points(group=GROUP)}
    assert {"status", "check", "hold", "demo", "etcd"} <= names
    assert {"status", "check", "hold", "demo", "etcd"} <= set(vcli.cli.list_commands(click.Context(vcli.cli)))


def test_a_broken_plugin_is_one_warning_and_the_rest_still_load() -> None:
    warnings: list[str] = []
    commands = load_commands(warn=warnings.append, entry_points=[
        _ep("status", "virtlease_etcd.cli:status"),
        _ep("gone", "virtlease_no_such_module:command"),
        _ep("notacommand", "os:sep"),
        _ep("status", "virtlease_etcd.cli:status"),  # a second distribution registering the same name
    ])
    assert set(commands) == {"status"} and commands["status"].name == "status"
    assert len(warnings) == 3 and all("\n" not in w for w in warnings)
    assert any("'gone'" in w and "ModuleNotFoundError" in w for w in warnings)
    assert any("'notacommand'" in w and "not a click command" in w for w in warnings)
    assert any("already registered" in w for w in warnings)


def test_the_frame_runs_with_a_broken_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    @click.command()
    def hello() -> None:
        click.echo("hello")

    fake = [_ep("broken", "virtlease_no_such_module:command"), _ep("hello", f"{__name__}:HELLO")]
    monkeypatch.setattr(metadata, "entry_points", lambda group: fake if group == GROUP else [])
    monkeypatch.setitem(globals(), "HELLO", hello)
    warned: list[str] = []
    group = PluginGroup("virtlease", warn=warned.append)
    result = CliRunner().invoke(group, ["hello"])
    assert result.exit_code == 0 and result.output == "hello\n"
    assert len(warned) == 1 and "'broken'" in warned[0]


def test_backend_options_before_the_command_name_move_after_it() -> None:
    ctx = click.Context(vcli.cli)
    group = vcli.cli
    assert isinstance(group, PluginGroup)
    group.load_plugins()
    hoist = group.hoist_options
    assert hoist(ctx, ["--debug", "--endpoints", "h:1", "--ttl=5", "status", "--json"]) == \
        ["--debug", "status", "--endpoints", "h:1", "--ttl=5", "--json"]
    # A value that looks like a command name is taken as the option's value.
    assert hoist(ctx, ["--host-id", "status", "hold", "--name", "x"]) == \
        ["hold", "--host-id", "status", "--name", "x"]
    # Nothing to move, or no command after the options: unchanged (click reports the error).
    assert hoist(ctx, ["status", "--json"]) == ["status", "--json"]
    assert hoist(ctx, ["--endpoints", "h:1"]) == ["--endpoints", "h:1"]
    assert hoist(ctx, ["--endpoints", "h:1", "frobnicate"]) == ["--endpoints", "h:1", "frobnicate"]


def test_the_command_never_writes_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIRTLEASE_ETCD_TTL", "5")
    monkeypatch.setenv("VIRTLEASE_ETCD_PREFIX", "/from-env")
    before = dict(os.environ)
    with pytest.raises(SystemExit) as exc:
        vcli.main(["--prefix", "/given", "--endpoints", "127.0.0.1:1", "--ttl", "1", "status"])
    assert exc.value.code == 2  # ttl 1 (the option, not the environment's 5) is refused
    assert dict(os.environ) == before


BLOCKED_IMPORT = textwrap.dedent("""
    import importlib, pkgutil, sys

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name == "virtlease_etcd" or name.startswith("virtlease_etcd."):
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, Blocker())
    import virtlease
    names = ["virtlease"] + [m.name for m in pkgutil.walk_packages(virtlease.__path__, "virtlease.")
                             if not m.name.endswith("__main__")]
    for name in names:
        importlib.import_module(name)
    assert not [m for m in sys.modules if m.startswith("virtlease_etcd")]
    print(len(names))
""")


def test_every_core_module_imports_without_the_etcd_backend() -> None:
    result = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 10
