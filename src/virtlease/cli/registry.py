"""Backend commands, found through the ``virtlease.commands`` entry-point group.

The core's ``virtlease`` group knows no backend: every entry point in the
group names a click command or group (``status = "virtlease_etcd.cli:status"``
in a package's ``[project.entry-points."virtlease.commands"]``) and is added
under the entry point's name.  A plugin that fails to import, or names
something that is not a click command, costs one warning line on stderr,
never the whole command.

Backend options may be written before the command name, as in
``virtlease --endpoints X status``: the frame moves every leading option it
does not own itself to just after the command name, where that command's
own options parse it (``PluginGroup.parse_args``).  The frame thus never
names a backend option.

See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib import metadata

import click

GROUP = "virtlease.commands"
"""The entry-point group backends register their commands in."""


def load_commands(group: str = GROUP, *, warn: Callable[[str], None] | None = None,
                  entry_points: Iterable[metadata.EntryPoint] | None = None) -> dict[str, click.Command]:
    """Every command the entry points of ``group`` name, by entry-point name.

    A broken entry point is reported through ``warn`` (one line) and skipped;
    of two with the same name the first (in name, then value order) wins.
    """
    eps = metadata.entry_points(group=group) if entry_points is None else entry_points
    commands: dict[str, click.Command] = {}
    for ep in sorted(eps, key=lambda e: (e.name, e.value)):
        problem: str | None = None
        try:
            obj = ep.load()
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
        else:
            if not isinstance(obj, click.Command):
                problem = f"{type(obj).__name__} is not a click command"
            elif ep.name in commands:
                problem = "a command of that name is already registered"
        if problem is not None:
            if warn is not None:
                warn(f"command plugin {ep.name!r} ({ep.value}) not loaded: {problem}")
            continue
        commands[ep.name] = obj
    return commands


class PluginGroup(click.Group):
    """A click group whose subcommands come from the entry points (loaded on first use)."""

    def __init__(self, *args: object, entry_point_group: str = GROUP,
                 warn: Callable[[str], None] | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.entry_point_group = entry_point_group
        self._warn = warn
        self._loaded = False

    def load_plugins(self) -> None:
        """Add the entry points' commands (once); commands added by hand stay."""
        if self._loaded:
            return
        self._loaded = True
        for name, command in load_commands(self.entry_point_group, warn=self._warn).items():
            self.commands.setdefault(name, command)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_plugins()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self.load_plugins()
        return super().get_command(ctx, cmd_name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        self.load_plugins()
        return super().parse_args(ctx, self.hoist_options(ctx, args))

    def hoist_options(self, ctx: click.Context, args: list[str]) -> list[str]:
        """``[--opt V] NAME rest`` -> ``NAME --opt V rest`` for the options before
        the command name that this group does not have itself."""
        own: dict[str, bool] = {}  # option string -> takes a value
        for param in self.get_params(ctx):
            if isinstance(param, click.Option):
                for opt in (*param.opts, *param.secondary_opts):
                    own[opt] = not (param.is_flag or param.count)
        takes_value: dict[str, bool] = {}
        for command in self.commands.values():
            for param in command.params:
                if isinstance(param, click.Option):
                    for opt in (*param.opts, *param.secondary_opts):
                        takes_value[opt] = not (param.is_flag or param.count)
        kept: list[str] = []
        hoisted: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--" or not arg.startswith("-") or arg == "-":
                break
            name = arg.split("=", 1)[0]
            target = kept if name in own else hoisted
            target.append(arg)
            has_value = own.get(name, takes_value.get(name, False))
            if "=" not in arg and has_value and i + 1 < len(args):
                target.append(args[i + 1])
                i += 1
            i += 1
        if not hoisted or i >= len(args) or args[i] not in self.commands:
            return args  # nothing to move, or no command follows: let click report it
        return [*kept, args[i], *hoisted, *args[i + 1:]]
