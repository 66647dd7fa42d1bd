"""The .deb: lintian, what it holds, and what an operator does with it on a clean bookworm root
(``debootstrap --variant=minbase``): install (nothing starts), ``virtlease --version``,
``virtlease check`` against a real etcd, the agent serving a lockd client, removal refused while
a domain holds a lease, the drop-in's command under ``systemd-socket-activate``, the switch from
virtlockd and ``systemd-analyze verify`` of the units.  Everything virtlease runs here runs from
the installed files, chrooted into the root."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from debroot import Built, DebRoot, processes_in, run

from conftest import EtcdServer
from virtlease_etcd.config import load_config
from virtlease_etcd.etcd.client import EtcdClient
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.ops.status import HeldInfo, read_status

HOST = "hv-deb"
DROPIN = "usr/share/virtlease/systemd/virtlockd.service.d/virtlease.conf"
LIBVIRT_UNITS = ("virtlockd.service", "virtlockd.socket", "virtlockd-admin.socket")

# A lockd client from the installed files, as libvirt's lockd plugin talks: it registers as the
# domain's QEMU (its own pid), acquires the disk, and on each line of stdin releases or exits.
CLIENT = """
import os, sys
from virtlease_etcd.agent.lockdclient import LockdClient, make_owner
sock, disk = sys.argv[1:3]
c = LockdClient(sock)
c.register(make_owner("web1", pid=os.getpid()))
c.acquire(disk)
print("acquired", flush=True)
for line in sys.stdin:
    c.release(disk)
    print("released", flush=True)
"""


def configure(root: DebRoot, etcd: EtcdServer, prefix: str, ttl: int = 5) -> None:
    """Write /etc/virtlease/virtlease.toml as an operator would (the conffile, kept 0600)."""
    conf = root.path / "etc/virtlease/virtlease.toml"
    conf.write_text(f'[etcd]\nendpoints = ["{etcd.endpoints}"]\nprefix = "{prefix}"\nhost_id = "{HOST}"\n'
                    f"ttl = {ttl}\n")
    assert conf.stat().st_mode & 0o777 == 0o600


@pytest.fixture
def observer(etcd_process: EtcdServer) -> Iterator[EtcdClient]:
    """The test's own etcd client (the agents under test run in the root)."""
    client = EtcdClient(load_config({"endpoints": etcd_process.endpoints, "host_id": "observer"}, environ={}))
    yield client
    client.close()


def records(observer: EtcdClient, prefix: str) -> set[HeldInfo]:
    """Every disk record under ``prefix`` (holder, lease, token, ...), from etcd."""
    return set(read_status(observer, ks.Keys(prefix), timeout=5).resources)


def wait_for(pred: Callable[[], object], timeout: float, what: str) -> None:
    until = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < until, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def wait_log(log: Path, text: str, timeout: float = 30.0) -> str:
    wait_for(lambda: log.exists() and text in log.read_text(errors="replace"), timeout, f"{text!r} in {log}")
    return log.read_text(errors="replace")


def release_and_exit(vm: subprocess.Popen[str], observer: EtcdClient, prefix: str) -> None:
    """The client (a domain's QEMU) releases its disk and exits: wait until its records are gone."""
    assert vm.stdin and vm.stdout
    vm.stdin.write("release\n")
    assert vm.stdout.readline().strip() == "released"
    vm.stdin.close()
    vm.wait(10)
    wait_for(lambda: not records(observer, prefix), 15, "the released disk's records to go")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def disk(root: DebRoot) -> str:
    (root.path / "srv").mkdir(exist_ok=True)
    (root.path / "srv/web1.img").write_bytes(b"")
    return "/srv/web1.img"


@pytest.fixture
def client(root: DebRoot, disk: str) -> Iterator[Callable[[], subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        proc = root.talk("/opt/virtlease/bin/python3.11", "-I", "-c", CLIENT, "/run/libvirt/virtlockd-sock", disk)
        started.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == "acquired", line + proc.stdout.read()
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait(10)


def test_contents(built: Built) -> None:
    listing = {}
    for line in run(["dpkg-deb", "-c", str(built.deb)]).stdout.splitlines():
        fields = line.split()
        listing[fields[5].removeprefix(".")] = fields[0]
    conffiles = run(["dpkg-deb", "--info", str(built.deb), "conffiles"]).stdout.split()
    assert listing["/usr/bin/virtlease"].startswith("-rwxr-xr-x")
    assert listing["/usr/bin/virtlease-agent"].startswith("-rwxr-xr-x")
    assert listing["/opt/virtlease/bin/virtlease-agent"].startswith("-rwxr-xr-x")
    assert listing["/etc/virtlease/virtlease.toml"] == "-rw-------" and conffiles == ["/etc/virtlease/virtlease.toml"]
    assert listing["/usr/share/man/man8/virtlease.8.gz"].startswith("-rw-r--r--")
    assert "/usr/share/man/man8/virtlease-agent.8.gz" in listing
    for doc in ("README.md.gz", "OPERATIONS.md.gz", "DESIGN.md.gz", "copyright", "changelog.gz",
                "requirements.lock.gz"):
        assert f"/usr/share/doc/virtlease/{doc}" in listing, doc
    assert f"/{DROPIN}" in listing
    assert not [p for p in listing if "__pycache__" in p or p.endswith(".pyc")], "byte code in the package"
    assert not [p for p in listing if p.startswith(("/lib/systemd", "/usr/lib/systemd", "/etc/systemd"))], \
        "a unit or drop-in that would act at install time"
    depends = run(["dpkg-deb", "-f", str(built.deb), "Depends"]).stdout
    assert depends.startswith("python3.11, procps"), depends


def test_install_starts_nothing(clean_root: DebRoot, built: Built) -> None:
    cp = clean_root.install(built.deb)
    assert "installed; nothing runs yet" in cp.stdout
    assert processes_in(clean_root.path) == []
    assert not (clean_root.path / "etc/systemd/system/virtlockd.service.d").exists()
    assert clean_root.version() == built.version
    assert clean_root.run("virtlease", "--version").stdout.strip() == f"virtlease, version {built.version}"
    # not configured yet: the shipped sample names TLS files this host does not have
    cp = clean_root.run("virtlease", "check", check=False)
    assert cp.returncode == 2
    assert cp.stderr.splitlines()[0] == "virtlease: error: ca_cert: /etc/virtlease/pki/ca.crt does not exist"


def test_man_page_is_the_commands_help(root: DebRoot) -> None:
    page = root.path / "usr/share/man/man8/virtlease.8.gz"
    cp = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                        env={**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": "0"})
    assert cp.returncode == 0 and not cp.stderr.strip(), cp.stderr
    text = re.sub(r".\x08", "", cp.stdout)
    helptext = root.run("virtlease", "agent", "--help").stdout
    assert "virtlease switch-from-virtlockd" in text and "virtlease agent" in text
    for phrase in ("Root-only directory of the state file", "SIGUSR2 hands over"):
        assert phrase in " ".join(helptext.split()) and phrase in " ".join(text.split()), phrase


def test_check_and_the_agent_against_real_etcd(root: DebRoot, built: Built, etcd_process: EtcdServer, prefix: str,
                                               observer: EtcdClient, client: Callable[[], subprocess.Popen[str]], tmp_path: Path) -> None:
    configure(root, etcd_process, prefix)
    cp = root.run("virtlease", "check")
    assert "virtlease check: all checks passed" in cp.stdout or "passed with warnings" in cp.stdout, cp.stdout
    (root.path / "run/libvirt").mkdir(mode=0o755, exist_ok=True)
    log = tmp_path / "agent.log"
    agent = root.popen("/usr/bin/virtlease-agent", log=log)
    try:
        wait_log(log, f"virtlease agent serving /run/libvirt/virtlockd-sock for host {HOST} (virtlease {built.version})")
        vm = client()
        held = records(observer, prefix)
        assert {(h.host, h.domain_name, h.resource) for h in held} == {(HOST, "web1", "/srv/web1.img")}, held
        # removing the package now would leave web1 without its agent: refused, naming it
        cp = root.run("dpkg", "-r", "virtlease", check=False)
        assert cp.returncode != 0
        assert "virtlease: refusing to remove virtlease: domain web1 (" in cp.stderr, cp.stderr
        assert root.version() == built.version and agent.poll() is None
        assert records(observer, prefix) == held, "the refused removal changed etcd"
        # the domain releases its disk and its QEMU exits: the lease goes, the removal works
        release_and_exit(vm, observer, prefix)
        cp = root.run("dpkg", "-r", "virtlease")
        assert "stopping the agent (pid" in cp.stdout, cp.stdout
        assert agent.wait(15) == 0, log.read_text()
        assert root.version() is None and not (root.path / "opt/virtlease").exists()
        assert (root.path / "etc/virtlease/virtlease.toml").exists(), "remove must keep the conffile"
        root.run("dpkg", "--purge", "virtlease")
        assert not (root.path / "etc/virtlease").exists()
    finally:
        if agent.poll() is None:
            agent.kill()


def drop_in_exec_start(root: DebRoot) -> list[str]:
    """The drop-in's ExecStart (after its reset), as argv."""
    text = (root.path / DROPIN).read_text().replace("\\\n", " ")
    starts = [line.split("=", 1)[1].strip() for line in text.splitlines() if line.startswith("ExecStart=")]
    assert starts[0] == "" and len(starts) == 2, starts
    return shlex.split(starts[1])


def test_the_drop_ins_command_under_socket_activation(root: DebRoot, built: Built, etcd_process: EtcdServer,
                                                     prefix: str, observer: EtcdClient, client: Callable[[], subprocess.Popen[str]],
                                                     tmp_path: Path) -> None:
    """The agent as virtlockd.service runs it with the drop-in (its ExecStart, the metrics port
    moved to a free one), started by systemd-socket-activate with virtlockd's two sockets."""
    configure(root, etcd_process, prefix)
    (root.path / "run/libvirt").mkdir(mode=0o755, exist_ok=True)
    port = free_port()
    argv = [a.replace("127.0.0.1:9477", f"127.0.0.1:{port}") for a in drop_in_exec_start(root)]
    assert argv[0] == "/usr/bin/virtlease-agent" and "--socket" in argv
    # /run of the namespace is the root's, so that the socket's path is the same on both sides;
    # systemd-socket-activate gives the command a minimal environment (PATH, HOME, LISTEN_*)
    script = ('set -e; mount -t proc proc "$0/proc"; mount --bind "$0/run" /run; '
              'exec systemd-socket-activate -l /run/libvirt/virtlockd-sock -l /run/libvirt/virtlockd-admin-sock '
              '--fdname=virtlockd.socket:virtlockd-admin.socket chroot "$0" "$@"')
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        ssa = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script,
                                str(root.path), *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (root.path / "run/libvirt/virtlockd-admin-sock").exists(), 10, "the sockets")
        vm = client()
        text = wait_log(log, "virtlease agent serving")
        assert "passed by the service manager (virtlockd.socket)" in text
        assert records(observer, prefix)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        assert f'version="{built.version}"' in metrics, metrics[:2000]
        release_and_exit(vm, observer, prefix)
        ssa.send_signal(signal.SIGTERM)
        assert ssa.wait(15) == 0, log.read_text()
        assert (root.path / "run/libvirt/virtlockd-sock").exists(), "the agent removed systemd's socket"
    finally:
        if ssa.poll() is None:
            ssa.kill()
            ssa.wait(10)


@pytest.fixture
def libvirt_units() -> list[Path]:
    """Debian's virtlockd units, from this machine's libvirt (deploy/libvirt/install.sh)."""
    units = [Path("/lib/systemd/system", u) for u in LIBVIRT_UNITS]
    missing = [str(u) for u in units if not u.exists()]
    if missing:
        pytest.skip(f"libvirt's units missing ({', '.join(missing)}): run deploy/libvirt/install.sh")
    return units


def test_switch_from_virtlockd_and_systemd_analyze_verify(root: DebRoot, etcd_process: EtcdServer, prefix: str,
                                                         libvirt_units: list[Path]) -> None:
    """On a root that has libvirt's units and config: the switch refuses while a domain runs,
    then edits the libvirt config and links the drop-in; systemd-analyze verify accepts the units
    as systemd would merge them; --back removes the link."""
    configure(root, etcd_process, prefix)
    for unit in libvirt_units:
        shutil.copy2(unit, root.path / "lib/systemd/system" / unit.name)
    etc = root.path / "etc/libvirt"
    etc.mkdir(exist_ok=True)
    for name in ("qemu.conf", "qemu-lockd.conf"):
        if Path("/etc/libvirt", name).exists():
            shutil.copy2(Path("/etc/libvirt", name), etc / name)
    before = {name: (etc / name).read_bytes() if (etc / name).exists() else b"" for name in ("qemu.conf", "qemu-lockd.conf")}
    link = root.path / "etc/systemd/system/virtlockd.service.d/virtlease.conf"

    qemu = subprocess.Popen(["sleep", "600"])  # a running domain, as libvirt records it
    try:
        (root.path / "run/libvirt/qemu").mkdir(parents=True, exist_ok=True)
        (root.path / "run/libvirt/qemu/web9.pid").write_text(f"{qemu.pid}\n")
        cp = root.run("virtlease", "switch-from-virtlockd", check=False)
        assert cp.returncode == 1
        assert f"refusing to switch: 1 domain(s) run on this host under virtlockd's locks, of which etcd knows " \
               f"nothing (web9 (QEMU pid {qemu.pid})); nothing changed" in cp.stderr, cp.stderr
        assert not link.is_symlink() and all((etc / n).read_bytes() == b for n, b in before.items() if b)
    finally:
        qemu.kill()
        qemu.wait()
    cp = root.run("virtlease", "switch-from-virtlockd")
    assert "systemd is not running here" in cp.stdout, cp.stdout
    assert link.is_symlink() and (link.parent / os.readlink(link)).resolve() == (root.path / DROPIN).resolve()
    qemu_conf = (etc / "qemu.conf").read_text()
    assert re.findall(r"^lock_manager = .*$", qemu_conf, re.M) == ['lock_manager = "lockd"']
    lockd_conf = (etc / "qemu-lockd.conf").read_text()
    assert re.search(r"^auto_disk_leases = 1$", lockd_conf, re.M)
    assert re.search(r"^require_lease_for_disks = 1$", lockd_conf, re.M)
    assert not re.search(r"^\s*file_lockspace_dir\s*=", lockd_conf, re.M)
    verify = run(["systemd-analyze", "verify", f"--root={root.path}", "--man=no", *LIBVIRT_UNITS], check=False)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr
    # the merged unit is the agent's: a broken drop-in is reported (the check above means something)
    merged = run(["systemctl", f"--root={root.path}", "cat", "virtlockd.service"], check=False).stdout
    assert "ExecStart=/usr/bin/virtlease-agent" in merged or not merged
    (root.path / "usr/bin/virtlease-agent").rename(root.path / "usr/bin/virtlease-agent.moved")
    broken = run(["systemd-analyze", "verify", f"--root={root.path}", "--man=no", "virtlockd.service"], check=False)
    assert "Command /usr/bin/virtlease-agent is not executable" in broken.stdout + broken.stderr
    (root.path / "usr/bin/virtlease-agent.moved").rename(root.path / "usr/bin/virtlease-agent")
    cp = root.run("virtlease", "switch-from-virtlockd", "--back")
    assert "removed /etc/systemd/system/virtlockd.service.d/virtlease.conf" in cp.stdout
    assert not link.exists() and not link.is_symlink()


def test_lintian_finds_no_errors(lintian_run: subprocess.CompletedProcess[str]) -> None:
    # (with --show-overrides lintian exits 2 for overridden errors too: judged by its output)
    cp = lintian_run
    tags = [line for line in cp.stdout.splitlines() if re.match(r"[EWIPXO]: ", line)]
    errors = [t for t in tags if t.startswith("E: ")]
    complaints = [line for line in cp.stderr.splitlines() if "running with root privileges" not in line]
    assert not errors and not complaints and cp.returncode in (0, 2), cp.stdout + cp.stderr
    kinds = {k: sum(t.startswith(k) for t in tags) for k in ("W: ", "I: ", "O: ")}
    overridden = sorted({t.split()[2] for t in tags if t.startswith("O: ")})
    print(f"\nlintian: 0 errors, {kinds['W: ']} warnings, {kinds['I: ']} info; overridden: {', '.join(overridden)}")
    assert kinds["W: "] == 0, "\n".join(t for t in tags if t.startswith("W: "))
