"""``virtlease hold``: take a domain's disks and keep them until told to stop.

The building block for scripts, hooks and tests: it opens a host session,
acquires every ``--disk`` and ``--lease`` in one transaction, prints one
line (with the fencing tokens) and flushes, then holds until SIGTERM or
SIGINT, releases and exits 0.  If the session is lost while holding, the
failure action has already run on ``--pid`` (poweroff kills it): it exits 5.

``hold`` is as safe as the agent for the process it holds for: with ``--pid``
(and a failure action other than ignore) it starts a guard process
(``session/guard.py``) before it acquires and keeps it armed with the fence
deadline, so that if ``hold`` itself dies (``kill -9``, OOM) the process is
stopped before etcd can expire the lease and give the disks to another host.
A ``--disk`` whose ``:MODE`` is not a mode, a path that does not exist
(unless ``--allow-missing``) and a directory are refused: each would lock
something other than the disk meant, and leave that disk unprotected.

See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import threading
import uuid as uuidlib
from dataclasses import dataclass
from types import FrameType
from typing import Any

import click

import virtlease as v
from virtlease.cli.exitcodes import CommandFailed, ExitCode, describe_busy, exit_codes_help
from virtlease.cli.output import err, print_line, warn
from virtlease_etcd.session.failure import GUARD_SIGNALS
from virtlease_etcd.session.guard import Guard, start_time

from .options import Settings, etcd_command
from .storage import host_only_disks

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


def parse_disk(value: str, *, allow_missing: bool = False) -> Wanted:
    """``PATH[:shared|:readonly|:exclusive]`` -> a DISK resource (absolute path).

    A suffix after the last ``:`` must be a mode, unless the whole value names an existing
    file (a path with a colon in it).  The path must exist (``allow_missing``: it may not yet)
    and must not be a directory."""
    path, sep, mode = value.rpartition(":")
    if not sep or (mode not in _MODES and os.path.lexists(value)):
        path, mode = value, ""
    elif mode not in _MODES:
        raise click.BadParameter(
            f"{value!r}: unknown mode {mode!r} after the last ':' (one of {', '.join(m for m in _MODES if m)}); "
            "nothing was locked", param_hint="--disk")
    if not os.path.isabs(path):
        raise click.BadParameter(f"{path!r} is not an absolute path", param_hint="--disk")
    try:
        if stat.S_ISDIR(os.stat(path).st_mode):
            raise click.BadParameter(f"{path} is a directory, not a disk image or block device", param_hint="--disk")
    except FileNotFoundError:
        if not allow_missing:
            raise click.BadParameter(
                f"{path} does not exist (a typo would lock another name and leave the disk unprotected); "
                "give --allow-missing to lock a disk that is not created yet", param_hint="--disk") from None
    except OSError as exc:
        raise click.BadParameter(f"{path}: {exc.strerror}", param_hint="--disk") from None
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


def busy_summary(exc: v.ResourceBusyError, name: str, uuid: str, host: str) -> dict[str, Any]:
    """``hold --json``'s line when a resource is busy: the holders, as status names them."""
    return {"held": False, "busy": True, "host": host, "domain": name, "uuid": uuid,
            "error": f"busy: {describe_busy(exc.conflicts)}", "hint": exc.hint,
            "conflicts": [dataclasses.asdict(h) for h in exc.conflicts]}


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
@click.option("--allow-missing", is_flag=True,
              help="Lock a --disk path that does not exist yet (refused otherwise: a typo would lock another name).")
@click.option("--pid", type=click.IntRange(min=1), metavar="PID",
              help="The VM's process: the failure action acts on it if the lease is lost, and a guard "
                   "process stops it before the lease can expire if hold itself dies (kill -9).")
@click.option("--action", type=click.Choice(sorted(_ACTIONS)), default="default", show_default=True,
              help="Failure action on --pid if the lease is lost (default: the driver's default_action).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the held line as a JSON object (busy: a JSON object naming the holders, exit 3).")
@etcd_command
def hold(settings: Settings, name: str, uuid_: str | None, disks: tuple[str, ...], leases: tuple[str, ...],
         allow_missing: bool, pid: int | None, action: str, as_json: bool) -> None:
    """Acquire a domain's disks and leases; hold them until SIGTERM/SIGINT.

    Prints one line when held (with the fencing tokens) and flushes it, so a
    script can wait for it. On SIGTERM or SIGINT it releases and exits 0. If
    the resources are busy it names the holder and exits 3. With --pid, if
    hold is killed the process is stopped (its --action; not with ignore)
    before the lease can expire; without --pid nothing stops whatever uses
    the disks then.
    """
    wanted = [parse_disk(d, allow_missing=allow_missing) for d in disks] + [parse_lease(x) for x in leases]
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


class _Guarded:
    """The guard of ``hold --pid``: armed with the session's fence deadline every 0.1 s from a
    thread while the session lives (idle once it is lost: the driver's fence acted already)."""

    def __init__(self, plugin: v.Plugin, pid: int, sig: int, who: str) -> None:
        start = start_time(pid)
        if start is None:
            raise CommandFailed(f"--pid {pid}: no such process", code=ExitCode.BAD_INPUT)
        self.plugin = plugin
        self.owner = {"pid": pid, "start": start, "sig": sig, "who": who}
        try:
            self.guard = Guard.spawn()
            self.push()
        except (OSError, RuntimeError, ValueError) as exc:
            raise CommandFailed(f"cannot start the guard process for pid {pid} ({exc}); nothing was acquired",
                                code=ExitCode.FAILED) from exc
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="virtlease-hold-guard", daemon=True)
        self._thread.start()

    def push(self) -> None:
        session = self.plugin.driver.session
        live = session.lost is None
        self.guard.send(session.fence_at if live else None, session.cfg.margin / 2, [self.owner] if live else [])

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.push()
            except (OSError, ValueError):
                err.print("virtlease hold: the guard process is gone; starting a new one")
                self.guard = Guard.spawn()

    def end(self, name: str) -> None:
        """hold ends.  Nothing left on a live lease (released, nothing acquired, or the session
        lost and fenced): the guard exits without signalling.  Still holding (a release etcd did
        not answer): it stays armed on its own and stops the process at the fence deadline."""
        self._stop.set()
        self._thread.join(2)
        session = self.plugin.driver.session
        if session.lost is None and any(o.active for o in session.owners.all()):
            err.print(f"virtlease hold: domain {name} still holds its disks (the release did not reach etcd); "
                      f"pid {self.owner['pid']} is stopped at the fence deadline unless released by then")
            self.guard.abandon()
        else:
            self.guard.disarm()


def _hold(settings: Settings, name: str, domain_uuid: str, wanted: list[Wanted], pid: int | None,
          action: v.FailureAction, as_json: bool, stopper: _Stopper) -> None:
    plugin = v.load_driver("etcd", config=settings.driver_config(on_lease_lost=stopper.on_lost),
                           capabilities=v.Capability.RESOURCES)
    host = plugin.driver.host_id
    resolved = action if action is not v.FailureAction.DEFAULT else plugin.driver.cfg.default_action
    sig = GUARD_SIGNALS.get(resolved)
    guarded = None
    try:
        if pid is not None and sig is not None:  # armed before the acquire: pid never runs unguarded
            guarded = _Guarded(plugin, pid, int(sig), f"domain {name} ({domain_uuid}) pid {pid}")
        obj = plugin.new_object(uuid=domain_uuid, name=name, pid=pid)
        try:
            for w in wanted:
                obj.add_resource(w.type, w.name, flags=w.flags, params=w.params)
            try:
                obj.acquire(action=action)
            except v.ResourceBusyError as exc:
                if as_json:  # the script reading stdout gets JSON either way; stderr keeps the one line
                    print_line(json.dumps(busy_summary(exc, name, domain_uuid, host), sort_keys=True))
                raise
            for found in host_only_disks(plugin.driver.cfg, [w.name for w in wanted if w.type is v.ResourceType.DISK
                                                             and not w.flags & v.ResourceFlags.READONLY]):
                warn(f"disk {found.path} has no cluster-wide identity: held as path://{found.path}, this host's "
                     "path only; a host reaching it by another path is not excluded (set identity_map for its "
                     "storage, or strict_identity to refuse such disks)")
            summary = held_summary(obj, wanted, host, plugin.driver.session.lease_id)
            print_line(json.dumps(summary, sort_keys=True) if as_json else held_line(summary))
            stopper.wait()
            if stopper.lost is not None:
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
        if guarded is not None:
            guarded.end(name)
        plugin.unload()
