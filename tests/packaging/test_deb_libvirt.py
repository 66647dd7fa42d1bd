"""The installed package on the two-host libvirt rig: each host's agent is the .deb's, run from a
clean bookworm root of its own with version N installed (chrooted, with the host's /run and the
shared images directory bound in), driven by stock virsh; then host A is upgraded to N+1 with
``dpkg -i`` while its domain runs.

The upgrade, as on a host without systemd whose supervisor restarts the agent: the package's
postinst finds the running agent (its state file), hands it over (SIGUSR2, opted in with
``VIRTLEASE_HANDOVER=signal``) and waits for the new one; the test restarts the agent from the
upgraded files the moment the old one exits, as ``Restart=always`` would.  Throughout, etcd is
sampled every ~5 ms and host B keeps trying to start a domain on the same disk.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from debroot import Built, DebRoot, kill_processes_in

from virtlease_lab.libvirt.agentrig import AgentRig, DeathWatch, Watch, agent_rig
from virtlease_lab.libvirt.rig import HOSTS

pytestmark = pytest.mark.libvirt
TTL = 10
"""The default TTL: an upgrade must bring the new agent up before the fence deadline, at worst
2/3 TTL - margin after the handover (4.7 s here).  With the rig's usual 5 s (2.3 s at worst), a
chrooted agent restarted on this loaded 2-core machine came up after the guard had fenced."""

# The rig's agent command: in the host's namespaces, a private mount namespace of its own with
# the host's /run (libvirt's sockets and pid files, the agent's state) and the images directory
# bound into the host's root, then the installed /usr/bin/virtlease-agent chrooted there.  (The
# rig formats every argument: no braces here but its {host}.)
AGENT_SCRIPT = """set -e
r=$0; images=$1; shift
mount -t proc proc "$r/proc"
mount --rbind /run "$r/run"
mkdir -p "$r$images"
mount --bind "$images" "$r$images"
exec chroot "$r" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \\
    /usr/bin/virtlease-agent "$@"
"""


@pytest.fixture(scope="module")
def deb_env(tmp_path_factory: pytest.TempPathFactory, cached: Path, installed_layer: Path) -> Iterator[
        tuple[AgentRig, dict[str, DebRoot]]]:
    base = tmp_path_factory.mktemp("debrig")
    roots = {h: DebRoot(base / f"root-{h}", [installed_layer, cached]) for h in HOSTS}
    try:
        for root in roots.values():  # the rig passes every setting on the command line
            (root.path / "etc/virtlease/virtlease.toml").write_text("[etcd]\n")
        workdir = base / "rig"
        agent = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", AGENT_SCRIPT,
                 str(base / "root-{host}" / "root"), str(workdir / "rig" / "images")]
        with agent_rig(workdir, agent=agent, ttl=TTL) as env:
            yield env, roots
    finally:
        for root in roots.values():
            kill_processes_in(root.path)
            root.close()


def in_host(env: AgentRig, host: str, root: DebRoot, *argv: str, env_vars: dict[str, str] | None = None,
            ) -> list[str]:
    """``argv`` in ``root``, in ``host``'s namespaces with its /run: as the host's own dpkg."""
    pid = env.rig.hosts[host].pid("subreaper")
    assert pid
    return ["nsenter", "-t", str(pid), "-m", "-n", "-u", "--",
            *root.wrap(argv, binds=[("/run", "/run")], env=env_vars)]


def test_installed_agents_serve_both_hosts(deb_env: tuple[AgentRig, dict[str, DebRoot]], built: Built) -> None:
    env, _roots = deb_env
    r = env.rig
    for host in HOSTS:
        text = (r.hosts[host].log / "lockdaemon.log").read_text()
        assert f"virtlease agent serving /run/libvirt/virtlockd-sock for host host{host} (virtlease {built.version})" \
            in text, text
        agent = r.hosts[host].pid("lockdaemon")
        assert agent and Path(f"/proc/{agent}/root").resolve().name == "root", "not the installed agent"
        assert b"/opt/virtlease/bin/virtlease-agent" in Path(f"/proc/{agent}/cmdline").read_bytes()
    disk = r.image("deb-web1.img")
    r.define_domain("A", "web1", [disk])
    r.define_domain("B", "db1", [disk])
    r.start("A", "web1")
    cp, _ = r.start("B", "db1", check=False)
    assert cp.returncode != 0 and "resource busy" in cp.stderr and "domain web1" in cp.stderr \
        and "on host hostA" in cp.stderr, cp.stderr
    held = env.holders("web1")
    assert [(h.host, h.resource) for h in held] == [("hostA", str(disk))], held
    seconds = r.migrate("web1", "A", "B")
    after = env.holders("web1")
    assert [h.host for h in after] == ["hostB"] and after[0].token > held[0].token, after
    r.virsh("B", "destroy", "web1")
    env.start_once_free("B", "db1", time.monotonic(), 5)
    r.virsh("B", "destroy", "db1")
    r.reset()
    print(f"\ninstalled agents: start on A, B refused naming the holder, live migration A->B in {seconds:.2f} s")


def test_upgrade_with_a_domain_running(deb_env: tuple[AgentRig, dict[str, DebRoot]], built: Built,
                                       built_next: Built, record_property: pytest.RecordProperty) -> None:
    env, roots = deb_env
    r = env.rig
    disk = r.image("deb-up.img")
    r.define_domain("A", "web1", [disk])
    r.define_domain("B", "rival", [disk])
    r.start("A", "web1")
    qemu = r.qemu_pid("A", "web1")
    before = frozenset(env.holders("web1"))
    old = r.hosts["A"].pid("lockdaemon")
    assert qemu and old and {h.host for h in before} == {"hostA"}, before
    deb = roots["A"].path / "tmp" / built_next.deb.name
    deb.write_bytes(built_next.deb.read_bytes())
    dpkg_cmd = in_host(env, "A", roots["A"], "dpkg", "-i", f"/tmp/{deb.name}",
                       env_vars={"VIRTLEASE_HANDOVER": "signal"})
    result: list[subprocess.CompletedProcess[str]] = []

    def upgrade() -> None:
        result.append(subprocess.run(dpkg_cmd, capture_output=True, text=True, timeout=300))

    with Watch(env, ["web1"], intruder=("B", "rival"), linger=env.ttl + 1) as watch:
        time.sleep(1)
        death = DeathWatch(old)
        t0 = time.monotonic()
        dpkg = threading.Thread(target=upgrade)
        dpkg.start()
        dead_at = death.wait(120)
        assert dead_at is not None, f"the old agent was not handed over: {result}"
        log = env.restart_agent("A")  # Restart=always, from the upgraded files
        serving_at = time.monotonic()
        dpkg.join(120)
        done_at = time.monotonic()
    cp = result[0]
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert f"handing the running agent (pid {old}) over to the new version (SIGUSR2)" in cp.stdout, cp.stdout
    assert "the new agent serves (pid" in cp.stdout, cp.stdout
    assert roots["A"].version() == built_next.version
    text = log.read_text()
    assert f"(virtlease {built_next.version})" in text and "re-attached to lease" in text, text
    assert "re-adopted running domain web1" in text, text
    samples = watch.samples
    assert len(samples) > 100 and all(s == before for s in samples), [s for s in samples if s != before][:3]
    assert watch.intruder_tries and not watch.intruder_ran
    for err in watch.refusals:
        assert "resource busy" in err and "domain web1" in err and "on host hostA" in err, err
    assert r.qemu_pid("A", "web1") == qemu and r.domstate("A", "web1") == "running"
    assert frozenset(env.holders("web1")) == before
    handover, gap, dpkg_s = serving_at - t0, serving_at - dead_at, done_at - t0
    record_property("deb_upgrade_dpkg_to_new_agent_serving_s", round(handover, 3))
    record_property("deb_upgrade_no_agent_s", round(gap, 3))
    print(f"\nupgrade {built.version} -> {built_next.version} with web1 running on A: dpkg -i began, old agent "
          f"handed over {dead_at - t0:.2f} s later, new agent serving at {handover:.2f} s (no agent for "
          f"{gap:.2f} s), dpkg done at {dpkg_s:.2f} s; {len(samples)} etcd samples all the same record "
          f"(holder, lease {next(iter(before)).lease:x}, token {next(iter(before)).token}); "
          f"{watch.intruder_tries} starts on B refused")
    r.virsh("A", "destroy", "web1")
    env.start_once_free("B", "rival", time.monotonic(), 5)
    r.virsh("B", "destroy", "rival")
    r.reset()
