"""Two independent libvirt hosts on one machine, driven by stock virsh.

Each host (``A`` and ``B``) is

* a network namespace joined to the other host's by a veth pair
  (10.77.0.1 and 10.77.0.2, addresses that exist only inside these namespaces);
* a private mount + UTS namespace (``unshare --mount --uts --propagation
  private``) with its own hostname, its own tmpfs ``/run`` and per-host
  ``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``, ``/var/log/libvirt``
  and ``/var/cache/libvirt`` bind-mounted from ``WORKDIR/hosts/H/`` (seeded from
  a pristine copy of the installed directories);
* a child subreaper (``subreaper.py``) as the first process, then virtlogd, the
  lock daemon that serves ``/run/libvirt/virtlockd-sock`` (stock virtlockd or
  any command, e.g. the virtlease agent later) and ``libvirtd --listen`` on the
  host's veth address, with a distinct ``host_uuid`` and its own migration ports.

The disk images live in ``WORKDIR/images`` (same path on both hosts); domains
are small TCG guests (64 MiB, no OS) whose emulator is the ``qemu-nolock``
wrapper, so that QEMU's own image lock never hides the lock manager.

The QEMU capabilities cache is kept in ``cache_dir`` between runs: the first
``up()`` on a machine probes QEMU (~15 s), later ones take about a second.

``down()`` leaves nothing behind: no namespace, process, mount or
``/run/libvirt`` directory, and ``/etc/libvirt`` exactly as it was; it raises
:class:`RigError` otherwise.  The rig's state is kept in ``WORKDIR/rig.json``
so that another process (``rig_cli.py down``) can take it down.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
HOSTS = ("A", "B")
IPS = {"A": "10.77.0.1", "B": "10.77.0.2"}
HOST_UUIDS = {"A": "11111111-1111-4111-8111-aaaaaaaaaaaa", "B": "22222222-2222-4222-8222-bbbbbbbbbbbb"}
MIGRATION_PORT_MIN = {"A": 49152, "B": 49200}
LIBVIRT_DIRS = {"etc": "/etc/libvirt", "lib": "/var/lib/libvirt", "cache": "/var/cache/libvirt",
                "log": "/var/log/libvirt"}
LOCKD_SOCKET = "/run/libvirt/virtlockd-sock"
STOCK_VIRTLOCKD = ("virtlockd", "-p", "/run/libvirt/virtlockd.pid")
REQUIRED_TOOLS = ("libvirtd", "virtlogd", "virtlockd", "virsh", "qemu-system-x86_64", "ip", "unshare")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "virtlease-libvirt-rig"

T = TypeVar("T")


class RigError(RuntimeError):
    """The rig could not be brought up, driven or taken down cleanly."""


def missing_requirements() -> str | None:
    """Return why the rig cannot run here (not root, a tool missing), or None when it can."""
    if os.geteuid() != 0:
        return "the libvirt rig needs root (namespaces, libvirtd)"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if missing:
        return f"libvirt rig tools missing: {' '.join(missing)} (run deploy/libvirt/install.sh)"
    return None


def wait_for(pred: Callable[[], T], timeout: float, interval: float = 0.02, what: str = "condition") -> T:
    """Poll ``pred`` until it returns a truthy value and return it; RigError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RigError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Stopwatch:
    """``with Stopwatch() as sw: ...``; then ``sw.elapsed`` in seconds (monotonic clock)."""

    start: float = 0.0
    elapsed: float = 0.0

    def __enter__(self) -> Stopwatch:
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.monotonic() - self.start


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """Call ``fn(*args, **kwargs)`` and return ``(result, seconds)``."""
    t0 = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - t0


def tree_digest(root: Path) -> str:
    """A digest of a directory tree: every entry's relative path, type, mode and content."""
    h = hashlib.sha256()
    if not root.exists():
        return "absent"
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath, name)
            st = p.lstat()
            h.update(f"{p.relative_to(root)}\0{st.st_mode:o}\0".encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie (a zombie of ours is reaped on the way)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _ns_id(pid: int, kind: str) -> str | None:
    """The namespace id (``net:[4026...]``) of ``pid``, or None when it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def _run(cmd: Sequence[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, raise RigError (with stderr) when it fails and ``check``."""
    cp = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and cp.returncode != 0:
        raise RigError(f"{shlex.join(cmd)} failed ({cp.returncode}): {cp.stderr.strip() or cp.stdout.strip()}")
    return cp


@dataclass
class Host:
    """One emulated host: its name, address and directories in the rig."""

    name: str
    root: Path
    netns: str
    veth: str

    @property
    def ip(self) -> str:
        """The host's address on the veth pair."""
        return IPS[self.name]

    @property
    def run(self) -> Path:
        """The host's ``/run/libvirt`` as seen from the root namespace."""
        return self.root / "run"

    @property
    def log(self) -> Path:
        """The host's ``/var/log/libvirt`` as seen from the root namespace."""
        return self.root / "log"

    @property
    def uri(self) -> str:
        """A libvirt URI reaching this host's libvirtd through its unix socket."""
        return f"qemu+unix:///system?socket={self.run}/libvirt-sock"

    @property
    def lockd_socket(self) -> Path:
        """The host's ``/run/libvirt/virtlockd-sock`` as seen from the root namespace."""
        return self.run / "virtlockd-sock"

    def pid(self, daemon: str) -> int | None:
        """The pid in ``/run/libvirt/<daemon>.pid`` (subreaper, libvirtd, virtlogd, lockdaemon)."""
        try:
            return int((self.run / f"{daemon}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


@dataclass
class Rig:
    """Two libvirt hosts A and B in ``workdir``; see the module docstring.

    ``lock_daemon`` is ``"virtlockd"`` (stock) or a command template started in
    each host's namespaces in place of virtlockd, with ``{host}``, ``{socket}``,
    ``{ip}``, ``{host_uuid}`` and ``{workdir}`` substituted; its stdout/stderr
    go to the host's ``/var/log/libvirt/lockdaemon.log``.  It must create
    ``/run/libvirt/virtlockd-sock`` within ``lock_daemon_timeout`` seconds.
    """

    workdir: Path
    lock_daemon: str | Sequence[str] = "virtlockd"
    cache_dir: Path = DEFAULT_CACHE
    lock_daemon_timeout: float = 20.0
    debug_lockd: bool = False
    hosts: dict[str, Host] = field(init=False)
    start_seconds: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.cache_dir = Path(self.cache_dir)
        tag = hashlib.sha256(str(self.workdir).encode()).hexdigest()[:5]
        self.hosts = {h: Host(h, self.workdir / "hosts" / h, f"vlr{tag}{h.lower()}", f"vlr{tag}{h.lower()}0")
                      for h in HOSTS}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ paths
    @property
    def images(self) -> Path:
        """The shared images directory (the same path on both hosts)."""
        return self.workdir / "images"

    @property
    def emulator(self) -> Path:
        """The ``qemu-nolock`` wrapper, at a stable path in the cache so the caps cache stays valid."""
        return self.cache_dir / "bin" / "qemu-nolock"

    @property
    def state_file(self) -> Path:
        """Where the running rig's state is kept (for ``down()`` from another process)."""
        return self.workdir / "rig.json"

    # --------------------------------------------------------------- lifecycle
    def __enter__(self) -> Rig:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self, timeout: float = 120.0) -> float:
        """Bring both hosts up; return the seconds it took (also in ``start_seconds``)."""
        why = missing_requirements()
        if why:
            raise RigError(why)
        if self.state_file.exists():
            self.down()
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.images.mkdir(exist_ok=True)
        seed = self._seed()
        self._install_emulator()
        state: dict[str, Any] = {
            "etc_digest": tree_digest(Path(LIBVIRT_DIRS["etc"])),
            "run_libvirt_existed": Path("/run/libvirt").exists(),
            "netns": [h.netns for h in self.hosts.values()],
            "ns": {},
        }
        self._save_state(state)
        hosts_file = self.workdir / "etc-hosts"
        hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{IPS[h]} host{h}\n" for h in HOSTS))
        self._network()
        try:
            for host in self.hosts.values():
                self._prepare_host(host, seed)
                state["ns"][host.name] = self._start_host(host, hosts_file)
                self._save_state(state)
            for host in self.hosts.values():
                self._wait_host(host, t0 + timeout)
        except BaseException as e:
            try:
                self.down()
            except RigError as cleanup:
                e.add_note(f"and cleaning up after it: {cleanup}")
            raise
        self.start_seconds = time.monotonic() - t0
        return self.start_seconds

    def down(self) -> None:
        """Take both hosts down and verify nothing is left; RigError listing what is."""
        state = self._load_state()
        problems: list[str] = []
        for host in self.hosts.values():
            if host.pid("libvirtd") and (host.run / "libvirt-sock").exists():
                self._destroy_all(host)
        self._save_caps()
        for host in self.hosts.values():
            for daemon in ("libvirtd", "lockdaemon", "virtlogd"):
                pid = host.pid(daemon)
                if pid and _pid_alive(pid):
                    self._stop_pid(pid)
            ns = state.get("ns", {}).get(host.name)
            for _ in range(5):  # what is left, the subreaper last (a start script may still be spawning)
                left = self._procs_in(ns["net"], ns["mnt"]) if ns else []
                if not left:
                    break
                sub = ns.get("subreaper") if ns else None
                for pid in sorted(left, key=lambda p: p == sub):
                    self._stop_pid(pid, grace=2.0)
            proc = self._procs.pop(host.name, None)
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        for netns in state.get("netns", [h.netns for h in self.hosts.values()]):
            _run(["ip", "netns", "del", netns], check=False)
        # --- verify
        for name, ns in state.get("ns", {}).items():
            left = self._procs_in(ns["net"], ns["mnt"])
            if left:
                problems.append(f"host {name}: processes still running: {left}")
        netns_left = set(_run(["ip", "netns", "list"], check=False).stdout.split()) & set(
            state.get("netns", []))
        if netns_left:
            problems.append(f"network namespaces left: {sorted(netns_left)}")
        mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if str(self.workdir) in line]
        if mounts:
            problems.append(f"mounts left in the root namespace: {mounts}")
        if not state.get("run_libvirt_existed", True) and Path("/run/libvirt").exists():
            problems.append("/run/libvirt exists in the root namespace")
        if state.get("etc_digest") and tree_digest(Path(LIBVIRT_DIRS["etc"])) != state["etc_digest"]:
            problems.append("/etc/libvirt CHANGED while the rig ran")
        self.state_file.unlink(missing_ok=True)
        if problems:
            raise RigError("rig down left things behind:\n  " + "\n  ".join(problems))

    def reset(self) -> None:
        """Destroy and undefine every domain on both hosts (between tests)."""
        for host in self.hosts.values():
            self._destroy_all(host)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per host: hostname, address, daemon pids and namespaces, host UUID and domains."""
        out: dict[str, dict[str, Any]] = {}
        for name, host in self.hosts.items():
            info: dict[str, Any] = {"ip": host.ip, "netns": host.netns}
            for daemon in ("subreaper", "virtlogd", "lockdaemon", "libvirtd"):
                pid = host.pid(daemon)
                alive = bool(pid and _pid_alive(pid))
                info[daemon] = {"pid": pid, "alive": alive,
                                "net": _ns_id(pid, "net") if alive and pid else None,
                                "mnt": _ns_id(pid, "mnt") if alive and pid else None}
            cp = self.virsh(name, "hostname", check=False)
            info["hostname"] = cp.stdout.strip() if cp.returncode == 0 else None
            caps = self.virsh(name, "capabilities", check=False).stdout
            m = re.search(r"<uuid>([^<]+)</uuid>", caps)
            info["host_uuid"] = m.group(1) if m else None
            info["domains"] = self.domains(name) if info["hostname"] else None
            out[name] = info
        return out

    # ------------------------------------------------------------------ virsh
    def virsh(self, host: str, *args: str, check: bool = True,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``virsh -q -c <host's unix URI> ARGS`` from the root namespace."""
        return _run(["virsh", "-q", "-c", self.hosts[host].uri, *args], check=check, timeout=timeout)

    def domains(self, host: str, all_: bool = True) -> list[str]:
        """Names of the host's domains (all, or only the running ones)."""
        cp = self.virsh(host, "list", "--name", *(["--all"] if all_ else []))
        return [n for n in cp.stdout.split() if n]

    def domstate(self, host: str, name: str) -> str:
        """``virsh domstate`` of a domain ('running', 'shut off', ...), or 'absent'."""
        cp = self.virsh(host, "domstate", name, check=False)
        return cp.stdout.strip() if cp.returncode == 0 else "absent"

    def image(self, name: str, size: int = 1 << 20) -> Path:
        """A raw image ``name`` in the shared images directory, created (sparse) if missing."""
        path = self.images / name
        if not path.exists():
            with open(path, "wb") as f:
                f.truncate(size)
        return path

    def define_domain(self, host: str, name: str, disks: Sequence[str | Path] = (),
                      shareable: bool = False, uuid: str | None = None, bus: str = "virtio") -> str:
        """Define a persistent 64 MiB TCG domain on ``host`` with ``disks`` (paths or image names).

        A bare name is taken from (and created in) the shared images directory.
        ``shareable`` marks every disk ``<shareable/>`` (a shared lease in lockd).  ``uuid``: the
        domain's UUID (the same UUID defined on both hosts is one domain libvirt could start
        twice); libvirt picks one when None.  ``bus``: ``virtio`` (vda, vdb, ...) or ``scsi``
        (sda, sdb, ... on a virtio-scsi controller: hot-unplugged at once, with no guest to ask).
        """
        disk_xml = [self.disk_xml(disk, self.target(bus, i), bus, shareable=shareable)
                    for i, disk in enumerate(disks)]
        controller = "    <controller type='scsi' model='virtio-scsi'/>\n" if bus == "scsi" else ""
        xml = DOMAIN_TEMPLATE.format(name=name, emulator=self.emulator, disks=controller + "".join(disk_xml),
                                     uuid=f"  <uuid>{uuid}</uuid>\n" if uuid else "")
        path = self.workdir / f"{name}.{host}.xml"
        path.write_text(xml)
        self.virsh(host, "define", str(path))
        return name

    @staticmethod
    def target(bus: str, index: int) -> str:
        """The target device name of the ``index``-th disk on ``bus``: vda, vdb... or sda, sdb..."""
        return ("sd" if bus == "scsi" else "vd") + chr(ord("a") + index)

    def disk_xml(self, disk: str | Path, target: str, bus: str = "virtio", *, shareable: bool = False,
                 fmt: str = "raw") -> str:
        """A ``<disk>`` element for ``disk`` (a path, or an image name in the shared directory)."""
        path = Path(disk) if os.sep in str(disk) else self.image(str(disk))
        return ("    <disk type='file' device='disk'>\n"
                f"      <driver name='qemu' type='{fmt}'/>\n"
                f"      <source file='{path}'/>\n"
                f"      <target dev='{target}' bus='{bus}'/>\n"
                + ("      <shareable/>\n" if shareable else "")
                + "    </disk>\n")

    def start(self, host: str, name: str, check: bool = True) -> tuple[subprocess.CompletedProcess[str], float]:
        """``virsh start`` a defined domain; return the result and its wall time in seconds."""
        return timed(self.virsh, host, "start", name, check=check)

    def qemu_pid(self, host: str, name: str) -> int | None:
        """The pid of the domain's QEMU on ``host`` (from libvirt's pid file), None when not running."""
        try:
            pid = int((self.hosts[host].run / "qemu" / f"{name}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _pid_alive(pid) else None

    def migrate(self, name: str, src: str, dst: str, *extra: str) -> float:
        """``virsh migrate --live --unsafe NAME`` from ``src`` to ``dst``; return the wall time in s."""
        _, seconds = timed(self.virsh, src, "migrate", "--live", "--unsafe", *extra, name,
                           self.hosts[dst].uri, timeout=120)
        return seconds

    def qmp_events(self, host: str, event: str, since: float = 0.0) -> list[float]:
        """QEMU's own timestamps (epoch seconds) of QMP ``event`` in the host's libvirtd log.

        Only events stamped at or after ``since`` (epoch seconds) are returned.
        Monitors are not told apart: migrate one domain at a time when using it.
        """
        log = self.hosts[host].log / "libvirtd.log"
        if not log.exists():
            return []
        out = []
        for m in re.finditer(r"QEMU_MONITOR_RECV_EVENT: mon=0x[0-9a-f]+ event=(\{.*\})",
                             log.read_text(errors="replace")):
            ev = json.loads(m.group(1))
            ts = ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
            if ev.get("event") == event and ts >= since:
                out.append(ts)
        return out

    @staticmethod
    def log_time(line: str) -> float:
        """The epoch time of a libvirt log line (``2026-12-03 08:30:00.570+0000: ...``)."""
        stamp = line.split(": ", 1)[0]
        return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f%z").timestamp()

    # -------------------------------------------------------------- internals
    def _save_state(self, state: dict[str, Any]) -> None:
        self.state_file.write_text(json.dumps(state, indent=1))

    def _load_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _seed(self) -> Path:
        """Pristine copies of the installed libvirt dirs, taken once per libvirt version."""
        version = _run(["libvirtd", "--version"]).stdout.split()[-1]
        seed = self.cache_dir / f"seed-{version}"
        if not (seed / ".complete").exists():
            shutil.rmtree(seed, ignore_errors=True)
            seed.mkdir(parents=True)
            for key, path in LIBVIRT_DIRS.items():
                shutil.copytree(path, seed / key, symlinks=True)
            (seed / ".complete").touch()
        return seed

    def _install_emulator(self) -> None:
        """Copy the wrapper into the cache only when it changed (its ctime keys the caps cache)."""
        src = (HERE / "qemu-nolock").read_bytes()
        dst = self.emulator
        if not dst.exists() or dst.read_bytes() != src:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src)
            dst.chmod(0o755)

    def _network(self) -> None:
        a, b = self.hosts["A"], self.hosts["B"]
        existing = set(_run(["ip", "netns", "list"], check=False).stdout.split())
        for h in (a, b):
            if h.netns in existing:
                _run(["ip", "netns", "del", h.netns])
            _run(["ip", "netns", "add", h.netns])
        _run(["ip", "link", "add", a.veth, "netns", a.netns, "type", "veth", "peer", "name", b.veth,
              "netns", b.netns])
        for h in (a, b):
            _run(["ip", "-n", h.netns, "addr", "add", f"{h.ip}/24", "dev", h.veth])
            _run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
            _run(["ip", "-n", h.netns, "link", "set", h.veth, "up"])

    def _prepare_host(self, host: Host, seed: Path) -> None:
        shutil.rmtree(host.root, ignore_errors=True)
        host.root.mkdir(parents=True)
        for key in LIBVIRT_DIRS:
            shutil.copytree(seed / key, host.root / key, symlinks=True)
        host.run.mkdir()
        caps = self.cache_dir / "capabilities"
        if caps.is_dir():
            shutil.copytree(caps, host.root / "cache" / "qemu" / "capabilities", dirs_exist_ok=True)
        etc = host.root / "etc"
        port = MIGRATION_PORT_MIN[host.name]
        _append(etc / "qemu.conf", f"""
lock_manager = "lockd"
security_driver = "none"
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
cgroup_controllers = [ ]
namespaces = [ ]
migration_address = "{host.ip}"
migration_host = "{host.ip}"
migration_port_min = {port}
migration_port_max = {port + 15}
""", host.name)
        _append(etc / "qemu-lockd.conf", "auto_disk_leases = 1\nrequire_lease_for_disks = 1\n", host.name)
        _append(etc / "libvirtd.conf", f"""
host_uuid = "{HOST_UUIDS[host.name]}"
listen_tls = 0
listen_tcp = 1
listen_addr = "{host.ip}"
auth_tcp = "none"
log_filters = "1:qemu.qemu_monitor 1:locking"
log_outputs = "1:file:/var/log/libvirt/libvirtd.log"
""", host.name)
        if self.debug_lockd:
            _append(etc / "virtlockd.conf", 'log_filters = "1:locking 1:rpc"\n'
                    'log_outputs = "1:file:/var/log/libvirt/virtlockd.log"\n', host.name)

    def _lock_command(self, host: Host) -> list[str]:
        if self.lock_daemon == "virtlockd":
            return list(STOCK_VIRTLOCKD)
        if isinstance(self.lock_daemon, str):
            raise RigError("lock_daemon is 'virtlockd' or a command template (a list of arguments)")
        subst = {"host": host.name, "socket": LOCKD_SOCKET, "ip": host.ip,
                 "host_uuid": HOST_UUIDS[host.name], "workdir": str(self.workdir)}
        return [arg.format(**subst) for arg in self.lock_daemon]

    def _start_host(self, host: Host, hosts_file: Path) -> dict[str, Any]:
        """Start the host's namespaces, subreaper and daemons; return its namespace ids."""
        r = host.root
        script = f"""set -e
trap 'echo $? > /run/libvirt/start.rc' EXIT
hostname host{host.name}
mount -t tmpfs -o mode=0755 rig-run /run
mkdir -p /run/libvirt /run/lock
mount --bind {r}/run /run/libvirt
mount --bind {r}/etc /etc/libvirt
mount --bind {r}/lib /var/lib/libvirt
mount --bind {r}/log /var/log/libvirt
mount --bind {r}/cache /var/cache/libvirt
mount --bind {hosts_file} /etc/hosts
echo $$ > /run/libvirt/start.pid
virtlogd -d -p /run/libvirt/virtlogd.pid
{shlex.join(self._lock_command(host))} </dev/null >>/var/log/libvirt/lockdaemon.log 2>&1 &
echo $! > /run/libvirt/lockdaemon.pid
i=0
while [ ! -S {LOCKD_SOCKET} ]; do
    i=$((i + 1))
    [ $i -le {int(self.lock_daemon_timeout * 50)} ] || {{ echo "no {LOCKD_SOCKET} from the lock daemon" >&2; exit 1; }}
    kill -0 $(cat /run/libvirt/lockdaemon.pid) || {{ echo "the lock daemon exited" >&2; exit 1; }}
    sleep 0.02
done
libvirtd -d --listen -p /run/libvirt/libvirtd.pid
"""
        (r / "start.sh").write_text(script)
        (r / "run" / "subreaper.pid").unlink(missing_ok=True)
        log = open(r / "log" / "start.log", "ab")
        self._procs[host.name] = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--uts", "--propagation", "private",
             "--", sys.executable, "-I", str(HERE / "subreaper.py"), str(r / "run" / "subreaper.pid"),
             "/bin/sh", str(r / "start.sh")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        proc = self._procs[host.name]
        # the subreaper writes its pid file once it runs in the host's namespaces
        wait_for(lambda: host.pid("subreaper") == proc.pid or proc.poll() is not None, 10.0, 0.005,
                 f"host {host.name}'s subreaper")
        net, mnt = _ns_id(proc.pid, "net"), _ns_id(proc.pid, "mnt")
        if not net or not mnt:
            raise RigError(f"host {host.name}: its subreaper exited at once (see {r}/log/start.log)")
        return {"net": net, "mnt": mnt, "subreaper": proc.pid}

    def _wait_host(self, host: Host, deadline: float) -> None:
        """Wait until the host's libvirtd answers; RigError (with the start log) when it fails."""
        proc = self._procs[host.name]
        while True:
            rc = (host.run / "start.rc").read_text().strip() if (host.run / "start.rc").exists() else None
            if proc.poll() is not None or rc not in (None, "", "0"):
                log = (host.root / "log" / "start.log").read_text(errors="replace")
                raise RigError(f"host {host.name} failed to start (start script rc {rc}):\n{log}")
            if (host.run / "libvirt-sock").exists() and self.virsh(host.name, "list", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RigError(f"host {host.name}: libvirtd does not answer")
            time.sleep(0.02)

    def _destroy_all(self, host: Host) -> None:
        cp = self.virsh(host.name, "list", "--all", "--name", check=False)
        running = set(self.virsh(host.name, "list", "--name", check=False).stdout.split())
        for dom in cp.stdout.split():
            if dom in running:
                self.virsh(host.name, "destroy", dom, check=False)
            self.virsh(host.name, "undefine", dom, check=False)

    def _save_caps(self) -> None:
        """Keep the QEMU capabilities the hosts probed for the next run."""
        dst = self.cache_dir / "capabilities"
        for host in self.hosts.values():
            src = host.root / "cache" / "qemu" / "capabilities"
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                for f in src.glob("*.xml"):
                    target = dst / f.name
                    if not target.exists() or target.read_bytes() != f.read_bytes():
                        shutil.copy2(f, target)

    @staticmethod
    def _procs_in(net: str, mnt: str, exclude: int | None = None) -> list[int]:
        """Live pids whose net or mnt namespace is the given one."""
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == exclude:
                continue
            pid = int(entry.name)
            if (_ns_id(pid, "net") == net or _ns_id(pid, "mnt") == mnt) and _pid_alive(pid):
                out.append(pid)
        return out

    @staticmethod
    def _stop_pid(pid: int, grace: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; wait until the pid is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(RigError):
                wait_for(lambda: not _pid_alive(pid), 5.0, 0.01, f"pid {pid} to exit")


def _append(path: Path, text: str, host: str) -> None:
    """Append the rig's settings to one of the host's config files."""
    with open(path, "a") as f:
        f.write(f"\n# --- virtlease libvirt rig, host {host} ---\n{text.lstrip()}")


DOMAIN_TEMPLATE = """<domain type='qemu'>
  <name>{name}</name>
{uuid}  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
{disks}    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@contextlib.contextmanager
def rig(workdir: Path, **kwargs: Any) -> Iterator[Rig]:
    """``with rig(workdir) as r:`` — a Rig that is up inside the block and down after it."""
    r = Rig(workdir, **kwargs)
    with r:
        yield r
