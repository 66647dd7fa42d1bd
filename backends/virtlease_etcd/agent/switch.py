"""``virtlease switch-from-virtlockd``: make this host's virtlockd socket served by the agent.

One command for the switch deploy/OPERATIONS.md describes, on a host where the package is
installed and ``/etc/virtlease/virtlease.toml`` configured.  In order, stopping at the first
refusal (each one line, naming what to do), with nothing changed before the step that refused:

1. refuse unless root, and unless no domain runs on the host (libvirt's
   ``/run/libvirt/qemu/<name>.pid`` files with a live process): virtlockd's locks and the
   agent's leases know nothing of each other;
2. refuse unless ``virtlease --config FILE check`` passes (warnings are shown, not fatal): the
   agent will read exactly that file;
3. ``lock_manager = "lockd"`` in ``/etc/libvirt/qemu.conf`` and the direct-mode settings in
   ``/etc/libvirt/qemu-lockd.conf`` (each file's original kept once as ``*.virtlease-orig``);
4. the package's drop-in linked as ``/etc/systemd/system/virtlockd.service.d/virtlease.conf``
   (a relative link into ``/usr/share/virtlease``, so that upgrades change it);
5. with systemd running: ``daemon-reload``, restart ``virtlockd.service`` (virtlockd.socket stays;
   the next connection starts the agent, which takes the socket from systemd) and the QEMU
   daemon (``virtqemud`` or ``libvirtd``, whichever is active), then one connection to the
   socket to check the agent serves it.

``--back`` undoes step 4 and 5 (virtlockd serves the socket again; libvirt keeps using lockd),
refused while domains hold leases through an agent here (``holding``).  ``--dry-run`` says what
would change and changes nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from virtlease.cli.exitcodes import CommandFailed, ExitCode

from .holding import UnreadableState, holding
from .runfile import DEFAULT_STATE_DIR

DROPIN = Path("/etc/systemd/system/virtlockd.service.d/virtlease.conf")
PACKAGED_DROPIN = Path("/usr/share/virtlease/systemd/virtlockd.service.d/virtlease.conf")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
LOCKD_CONF = Path("/etc/libvirt/qemu-lockd.conf")
DOMAIN_PIDS = Path("/run/libvirt/qemu")
SOCKET = Path("/run/libvirt/virtlockd-sock")
DEFAULT_CONFIG = "/etc/virtlease/virtlease.toml"
SETTINGS = {
    QEMU_CONF: {"lock_manager": '"lockd"'},
    LOCKD_CONF: {"auto_disk_leases": "1", "require_lease_for_disks": "1"},
}
"""The libvirt settings the agent needs, per file."""
INDIRECT = ("file_lockspace_dir", "lvm_lockspace_dir", "scsi_lockspace_dir")
"""qemu-lockd.conf settings that would make libvirt lock hashed names instead of disk paths."""


@dataclass(frozen=True)
class Domain:
    name: str
    pid: int


def running_domains(pid_dir: Path = DOMAIN_PIDS) -> list[Domain]:
    """The domains whose QEMU runs, from libvirt's pid files (no libvirtd needed)."""
    found = []
    for path in sorted(pid_dir.glob("*.pid")) if pid_dir.is_dir() else []:
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if Path(f"/proc/{pid}").exists():
            found.append(Domain(path.stem, pid))
    return found


def set_options(text: str, settings: dict[str, str], comment_out: tuple[str, ...] = ()) -> str:
    """``text`` of a libvirt .conf file with each ``key = value`` of ``settings`` set (an active
    line replaced, else a commented-out one, else appended) and the ``comment_out`` keys
    commented out.  Everything else is left as it was."""
    lines = text.splitlines()
    for key, value in settings.items():
        active = [i for i, line in enumerate(lines) if re.match(rf"\s*{key}\s*=", line)]
        commented = [i for i, line in enumerate(lines) if re.match(rf"\s*#\s*{key}\s*=", line)]
        wanted = f"{key} = {value}"
        if active:
            for i in active[1:]:
                lines[i] = "#" + lines[i]
            lines[active[0]] = wanted
        elif commented:
            lines.insert(commented[-1] + 1, wanted)
        else:
            lines += ["", "# set by virtlease switch-from-virtlockd", wanted]
    for key in comment_out:
        lines = ["#" + line if re.match(rf"\s*{key}\s*=", line) else line for line in lines]
    return "\n".join(lines) + "\n"


def _say(text: str) -> None:
    click.echo(f"virtlease: {text}")


def _systemd() -> bool:
    return Path("/run/systemd/system").is_dir()


def _systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True)


def _must(cp: subprocess.CompletedProcess[str], what: str) -> None:
    if cp.returncode != 0:
        raise CommandFailed(f"{what} failed: {(cp.stderr or cp.stdout).strip()}",
                            hint="see journalctl -u virtlockd.service; 'virtlease switch-from-virtlockd --back' "
                                 "returns to virtlockd")


def _rewrite(path: Path, settings: dict[str, str], comment_out: tuple[str, ...], dry_run: bool) -> bool:
    old = path.read_text() if path.exists() else ""
    new = set_options(old, settings, comment_out)
    if new == old:
        return False
    if not dry_run:
        backup = path.with_name(path.name + ".virtlease-orig")
        if path.exists() and not backup.exists():
            shutil.copy2(path, backup)
        tmp = path.with_name(path.name + ".virtlease-tmp")
        tmp.write_text(new)
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    return True


def _check_config(config: str) -> None:
    cp = subprocess.run([sys.executable, "-m", "virtlease.cli", "--config", config, "check"],
                        capture_output=True, text=True)
    sys.stdout.write(cp.stdout)
    if cp.returncode != 0:
        last = (cp.stderr.strip() or cp.stdout.strip() or "no output").splitlines()[-1]
        raise CommandFailed(f"virtlease --config {config} check does not pass ({last}); nothing changed",
                            code=ExitCode.FAILED, hint=f"fix {config}, then run this again")


def _restart_agent() -> None:
    _must(_systemctl("daemon-reload"), "systemctl daemon-reload")
    _must(_systemctl("restart", "virtlockd.service"), "systemctl restart virtlockd.service")
    for daemon in ("virtqemud.service", "libvirtd.service"):
        if _systemctl("is-active", "--quiet", daemon).returncode == 0:
            _must(_systemctl("restart", daemon), f"systemctl restart {daemon}")
            _say(f"restarted {daemon} (lock_manager = lockd)")
            break


def _agent_answers(timeout: float = 30.0) -> bool:
    """Connect to the socket (systemd starts the agent) and wait for its state file."""
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(str(SOCKET))
        except OSError:
            time.sleep(0.2)
            continue
        main = _systemctl("show", "--value", "-p", "MainPID", "virtlockd.service").stdout.strip()
        if main.isdigit() and main != "0" and b"virtlease" in Path(f"/proc/{main}/cmdline").read_bytes():
            return True
        time.sleep(0.2)
    return False


def switch_to_agent(config: str, dry_run: bool) -> None:
    busy = running_domains()
    if busy:
        raise CommandFailed(
            f"refusing to switch: {len(busy)} domain(s) run on this host under virtlockd's locks, of which etcd "
            f"knows nothing ({', '.join(f'{d.name} (QEMU pid {d.pid})' for d in busy)}); nothing changed",
            hint="migrate them to a host already on the agent, or shut them down (virsh list), then run this again")
    _check_config(config)
    changed = [str(p) for p in SETTINGS if _rewrite(p, SETTINGS[p], INDIRECT if p == LOCKD_CONF else (), dry_run)]
    target = os.path.relpath(PACKAGED_DROPIN, DROPIN.parent)
    linked = DROPIN.is_symlink() and os.readlink(DROPIN) == target
    if not PACKAGED_DROPIN.exists():
        raise CommandFailed(f"{PACKAGED_DROPIN} is missing: the virtlease package is not installed completely",
                            hint="apt-get install --reinstall virtlease")
    if not linked and not dry_run:
        DROPIN.parent.mkdir(parents=True, exist_ok=True)
        if DROPIN.is_symlink() or DROPIN.exists():
            DROPIN.unlink()
        DROPIN.symlink_to(target)
    what = ", ".join([*changed, *([] if linked else [f"{DROPIN} -> {target}"])]) or "nothing (already switched)"
    if dry_run:
        _say(f"would change: {what}")
        return
    _say(f"changed: {what}")
    if not _systemd():
        _say("systemd is not running here: virtlockd.service runs the agent from the next time systemd starts it")
        return
    _restart_agent()
    if not _agent_answers():
        raise CommandFailed("virtlockd.service does not run the virtlease agent after the switch",
                            hint="see journalctl -u virtlockd.service; 'virtlease switch-from-virtlockd --back' "
                                 "returns to virtlockd")
    _say("the virtlease agent serves /run/libvirt/virtlockd-sock; libvirt's disk leases are in etcd now")


def switch_back(state_dir: str, dry_run: bool) -> None:
    try:
        held = holding(state_dir)
    except UnreadableState as exc:
        raise CommandFailed(f"refusing to switch back: {exc}") from None
    if held:
        raise CommandFailed(f"refusing to switch back: {'; '.join(map(str, held))} hold disk leases through the "
                            "agent; nothing changed", hint="stop or migrate them first (virsh list)")
    if not DROPIN.is_symlink() and not DROPIN.exists():
        _say("nothing to do: virtlockd.service runs virtlockd")
        return
    if dry_run:
        _say(f"would remove {DROPIN}")
        return
    DROPIN.unlink()
    with_dir = DROPIN.parent
    if with_dir.is_dir() and not any(with_dir.iterdir()):
        with_dir.rmdir()
    _say(f"removed {DROPIN}")
    if _systemd():
        _must(_systemctl("daemon-reload"), "systemctl daemon-reload")
        _must(_systemctl("restart", "virtlockd.service"), "systemctl restart virtlockd.service")
        _say("virtlockd serves /run/libvirt/virtlockd-sock again: disk locks are local to this host")


@click.command("switch-from-virtlockd")
@click.option("--config", default=DEFAULT_CONFIG, show_default=True, metavar="FILE",
              help="The configuration the agent will run with (checked first).")
@click.option("--back", is_flag=True, help="Return to virtlockd (refused while domains hold leases).")
@click.option("--dry-run", is_flag=True, help="Say what would change; change nothing.")
@click.option("--state-dir", default=DEFAULT_STATE_DIR, show_default=True, metavar="DIR", hidden=True)
def switch(config: str, back: bool, dry_run: bool, state_dir: str) -> None:
    """Make the virtlease agent serve libvirt's lockd plugin on this host, instead of virtlockd.

    Refused while any domain runs here, and unless 'virtlease --config FILE check' passes.
    Sets lock_manager = "lockd" (qemu.conf) and direct-mode leases (qemu-lockd.conf), links
    the package's drop-in for virtlockd.service (whose ExecStart becomes the agent; the
    socket stays virtlockd.socket's), restarts virtlockd.service and the QEMU daemon, and
    checks that the agent answers. --back returns to virtlockd."""
    if os.geteuid() != 0:
        raise CommandFailed("switch-from-virtlockd must run as root", code=ExitCode.BAD_INPUT)
    if back:
        switch_back(state_dir, dry_run)
    else:
        switch_to_agent(config, dry_run)
