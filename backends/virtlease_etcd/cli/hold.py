"""``virtlease hold``: take a domain's disks and keep them until told to stop.

The building block for scripts, hooks and tests: it opens a host session,
acquires every ``--disk`` and ``--lease`` in one transaction, prints one
line (with the fencing tokens) and flushes, then holds until SIGTERM or
SIGINT, releases and exits 0.  If the session is lost while holding, the
failure action has already run on ``--pid`` (poweroff kills it): it exits 5.

See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import uuid as uuidlib
from dataclasses import dataclass
from types import FrameType
from typing import Any

import click

import virtlease as v
from virtlease.cli.exitcodes import CommandFailed, ExitCode, exit_codes_help
from virtlease.cli.output import err, print_line

from .options import Settings, etcd_command

_MODES = {"": v.ResourceFlags(0), "exclusive": v.ResourceFlags(0), "shared": v.ResourceFlags.SHARED,
          "readonly": v.ResourceFlags.READONLY}
_ACTIONS = {"default": v.FailureAction.DEFAULT, "poweroff": v.FailureAction.POWEROFF,
            "pause": v.FailureAction.PAUSE, "ignore": v.FailureAction.IGNORE}
UUID_NAMESPACE = uuidlib.UUID("6f0b6c3e-2b1a-4f57-9a52-8f3d2c1e7a10")
"""Namespace of the uuid derived from --name when --uuid is not given."""


@dataclass(frozen=True)
class Wanted:
    """One resource asked for on the command line."""

    type: v.ResourceType
    name: str
    flags: v.ResourceFlags
    params: dict[str, Any]

    @property
    def label(self) -> str:
        if self.type is v.ResourceType.LEASE:
            return f"{self.params['lockspace']}:{self.name}"
        return self.name


def parse_disk(value: str) -> Wanted:
    """``PATH[:shared|:readonly|:exclusive]`` -> a DISK resource (absolute path)."""
    path, sep, mode = value.rpartition(":")
    if not sep or mode not in _MODES:
        path, mode = value, ""
    if not os.path.isabs(path):
        raise click.BadParameter(f"{path!r} is not an absolute path", param_hint="--disk")
    return Wanted(v.ResourceType.DISK, path, _MODES[mode], {})


def parse_lease(value: str) -> Wanted:
    """``LOCKSPACE:KEY[:shared]`` -> a LEASE resource."""
    body, mode = value, ""
    if value.endswith(":shared"):
        body, mode = value[: -len(":shared")], "shared"
    lockspace, sep, key = body.partition(":")
    if not sep or not lockspace or not key:
        raise click.BadParameter(f"{value!r} is not LOCKSPACE:KEY", param_hint="--lease")
    if "/" in lockspace:
        raise click.BadParameter(f"lockspace {lockspace!r} must not contain '/'", param_hint="--lease")
    return Wanted(v.ResourceType.LEASE, key, _MODES[mode], {"lockspace": lockspace})


def _domain_uuid(given: str | None, name: str) -> str:
    if given is None:
        return str(uuidlib.uuid5(UUID_NAMESPACE, name))
    try:
        return str(uuidlib.UUID(given))
    except ValueError:
        raise click.BadParameter(f"{given!r} is not a UUID", param_hint="--uuid") from None


def held_summary(obj: v.LockObject, wanted: list[Wanted], host: str, lease: int) -> dict[str, Any]:
    """What is held, with tokens (``LockObject.held()``; the state string stays opaque)."""
    resources: list[dict[str, Any]] = [
        {"resource": h.identity, "kind": h.type.name.lower(), "mode": h.mode, "token": h.token} for h in obj.held()
    ]
    for w in wanted:
        if w.flags & v.ResourceFlags.READONLY:
            resources.append({"resource": w.label, "kind": w.type.name.lower(), "mode": "readonly (not locked)",
                              "token": None})
    return {"held": True, "host": host, "domain": obj.name, "uuid": obj.uuid, "lease": f"{lease:x}",
            "pid": obj.spec.pid, "holder_pid": os.getpid(), "resources": resources}


def held_line(summary: dict[str, Any]) -> str:
    parts = []
    for r in summary["resources"]:
        token = f" token {r['token']}" if r["token"] is not None else ""
        parts.append(f"{r['resource']} {r['mode']}{token}")
    return (f"held: domain {summary['domain']} ({summary['uuid']}) on host {summary['host']}, "
            f"lease {summary['lease']}: {'; '.join(parts)}")


@click.command(epilog=exit_codes_help("etcd"))
@click.option("--name", required=True, help="Domain (VM) name.")
@click.option("--uuid", "uuid_", metavar="UUID",
              help="Domain UUID (default: derived from --name, the same on every host).")
@click.option("--disk", "disks", multiple=True, metavar="PATH[:shared|:readonly]",
              help="A disk to lock, repeatable. Exclusive unless :shared; :readonly is not locked.")
@click.option("--lease", "leases", multiple=True, metavar="LOCKSPACE:KEY",
              help="A named lease to take (exclusive; append :shared for shared), repeatable.")
@click.option("--pid", type=click.IntRange(min=1), metavar="PID",
              help="The VM's process: the failure action acts on it if the lease is lost.")
@click.option("--action", type=click.Choice(sorted(_ACTIONS)), default="default", show_default=True,
              help="Failure action on --pid if the lease is lost (default: the driver's default_action).")
@click.option("--json", "as_json", is_flag=True, help="Print the held line as a JSON object.")
@etcd_command
def hold(settings: Settings, name: str, uuid_: str | None, disks: tuple[str, ...], leases: tuple[str, ...],
         pid: int | None, action: str, as_json: bool) -> None:
    """Acquire a domain's disks and leases; hold them until SIGTERM/SIGINT.

    Prints one line when held (with the fencing tokens) and flushes it, so a
    script can wait for it. On SIGTERM or SIGINT it releases and exits 0. If
    the resources are busy it names the holder and exits 3.
    """
    wanted = [parse_disk(d) for d in disks] + [parse_lease(x) for x in leases]
    if not wanted:
        raise click.UsageError("give at least one --disk or --lease")
    domain_uuid = _domain_uuid(uuid_, name)

    stopper = _Stopper()
    previous = {sig: signal.signal(sig, stopper.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _hold(settings, name, domain_uuid, wanted, pid, _ACTIONS[action], as_json, stopper)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Stopper:
    """Why ``hold`` should stop: a signal, or the session lost (set from the driver's thread)."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        self.signal: str | None = None
        self.lost: str | None = None

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signal = signal.Signals(signum).name
        self.wake.set()

    def on_lost(self, reason: str) -> None:
        self.lost = reason
        self.wake.set()

    def wait(self) -> None:
        while self.signal is None and self.lost is None:
            self.wake.wait(0.5)


def _hold(settings: Settings, name: str, domain_uuid: str, wanted: list[Wanted], pid: int | None,
          action: v.FailureAction, as_json: bool, stopper: _Stopper) -> None:
    plugin = v.load_driver("etcd", config=settings.driver_config(on_lease_lost=stopper.on_lost),
                           capabilities=v.Capability.RESOURCES)
    host = plugin.driver.host_id
    try:
        obj = plugin.new_object(uuid=domain_uuid, name=name, pid=pid)
        try:
            for w in wanted:
                obj.add_resource(w.type, w.name, flags=w.flags, params=w.params)
            obj.acquire(action=action)
            summary = held_summary(obj, wanted, host, plugin.driver.session.lease_id)
            print_line(json.dumps(summary, sort_keys=True) if as_json else held_line(summary))
            stopper.wait()
            if stopper.lost is not None:
                resolved = action if action is not v.FailureAction.DEFAULT else plugin.driver.cfg.default_action
                what = {v.FailureAction.IGNORE: "was left running (action ignore)",
                        v.FailureAction.PAUSE: "was stopped (SIGSTOP)"}.get(resolved, "was killed (SIGKILL)")
                raise CommandFailed(
                    f"host {host}: session lease lost while holding domain {name}: {stopper.lost}",
                    code=ExitCode.LEASE_LOST,
                    hint=(f"pid {pid} {what}; " if pid else "")
                    + "check etcd health (virtlease check) and this host's network, then acquire again")
            obj.release()
            err.print(f"released: domain {name} ({domain_uuid}) on host {host} ({stopper.signal})")
        finally:
            obj.free()
    finally:
        plugin.unload()
