"""TLS against a real three-member etcd with peer and client TLS (deploy/etcd/make-certs.sh).

The driver, the CLI and the agent work over it; every way a connection can be refused
-- no client certificate, one from another CA, an expired one, a server name the
certificate does not carry, a client that does not speak TLS -- is refused with one
line that says which, and ``virtlease check`` reports it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pki import expired_client_cert, make_pki
from tls_cluster import TlsCluster

import virtlease as v
from virtlease.errors import BackendUnavailableError

VIRTLEASE = [str(Path(sys.executable).with_name("virtlease"))]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[TlsCluster]:
    c = TlsCluster(tmp_path_factory.mktemp("tls-etcd"), pki)
    try:
        yield c.wait()
    finally:
        c.stop()


def _config(cluster: TlsCluster, prefix: str, host: str, **tls: str) -> dict[str, object]:
    return {"endpoints": cluster.endpoints, "prefix": prefix, "host_id": host, "ttl": 5,
            "acquire_timeout": 2.0, **tls}


def _toml(path: Path, settings: dict[str, object]) -> Path:
    lines = ["[etcd]"] + [f"{k} = {json.dumps(val)}" for k, val in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return path


def _env() -> dict[str, str]:
    return {k: val for k, val in os.environ.items() if not k.startswith(("VIRTLEASE_", "GRPC_"))}


def _cli(conf: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``virtlease --config CONF ARGS...`` with no virtlease settings from our environment."""
    return subprocess.run([*VIRTLEASE, "--config", str(conf), *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout)


def test_driver_grants_refuses_and_releases_over_tls(cluster: TlsCluster, tmp_path: Path) -> None:
    disk = tmp_path / "web1.qcow2"
    disk.write_bytes(b"")
    prefix = f"/tls-{uuid.uuid4().hex[:8]}"
    caps = v.Capability.RESOURCES
    a = v.load_driver("etcd", config=_config(cluster, prefix, "host-a", **cluster.tls()), capabilities=caps)
    b = v.load_driver("etcd", config=_config(cluster, prefix, "host-b", **cluster.tls()), capabilities=caps)
    try:
        web1 = a.new_object(uuid=str(uuid.uuid4()), name="web1")
        web1.add_resource(v.ResourceType.DISK, str(disk))
        web1.acquire()
        other = b.new_object(uuid=str(uuid.uuid4()), name="web2")
        other.add_resource(v.ResourceType.DISK, str(disk))
        with pytest.raises(v.ResourceBusyError) as busy:
            other.acquire()
        assert busy.value.conflicts[0].host == "host-a" and busy.value.conflicts[0].domain_name == "web1"
        web1.release()
        other.acquire()
        other.release()
        web1.free()
        other.free()
    finally:
        a.unload()
        b.unload()


def _cli_setup(cluster: TlsCluster, tmp_path: Path, disk_name: str, host: str) -> tuple[Path, str, Path]:
    """An empty disk image, a fresh prefix and a TLS config file for ``host``."""
    disk = tmp_path / disk_name
    disk.write_bytes(b"")
    prefix = f"/tls-{uuid.uuid4().hex[:8]}"
    return disk, prefix, _toml(tmp_path / "virtlease.toml", _config(cluster, prefix, host, **cluster.tls()))


def test_cli_status_and_check_over_tls(cluster: TlsCluster, tmp_path: Path) -> None:
    disk, prefix, conf = _cli_setup(cluster, tmp_path, "db1.qcow2", "host-cli")
    check = _cli(conf, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "TLS on" in check.stdout
    holder = v.load_driver("etcd", config=_config(cluster, prefix, "host-a", **cluster.tls()),
                           capabilities=v.Capability.RESOURCES)
    try:
        db1 = holder.new_object(uuid=str(uuid.uuid4()), name="db1")
        db1.add_resource(v.ResourceType.DISK, str(disk))
        db1.acquire()
        status = _cli(conf, "status", "--json")
        assert status.returncode == 0, status.stderr
        held = json.loads(status.stdout)["resources"]
        assert [(r["host"], r["domain_name"]) for r in held] == [("host-a", "db1")], held
        db1.release()
        db1.free()
    finally:
        holder.unload()


def test_cli_hold_and_demo_over_tls(cluster: TlsCluster, tmp_path: Path) -> None:
    disk, _, conf = _cli_setup(cluster, tmp_path, "app1.qcow2", "host-hold")
    hold = subprocess.Popen([*VIRTLEASE, "--config", str(conf), "hold", "--name", "app1", "--disk", str(disk),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert hold.stdout is not None
        held = json.loads(hold.stdout.readline())
        assert held, hold.stderr
        status = _cli(conf, "status", "--json")
        assert [(r["host"], r["domain_name"]) for r in json.loads(status.stdout)["resources"]] == [("host-hold", "app1")]
    finally:
        hold.send_signal(signal.SIGTERM)
        assert hold.wait(20) == 0
    demo = _cli(conf, "demo", "--endpoints", cluster.endpoints, timeout=180)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "demo finished" in demo.stdout


def test_agent_serves_over_tls(cluster: TlsCluster, tmp_path: Path) -> None:
    """The agent opens its session over TLS (the lockd protocol itself is tested in tests/agent)."""
    conf = _toml(tmp_path / "virtlease.toml", _config(cluster, f"/tls-{uuid.uuid4().hex[:8]}", "host-agent",
                                                      **cluster.tls()))
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    log = tmp_path / "agent.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*VIRTLEASE, "--config", str(conf), "agent", "--socket", str(run / "sock"),
                                 "--state-dir", str(run / "state")], stdout=out, stderr=subprocess.STDOUT,
                                env=_env())
    try:
        for _ in range(400):
            if "virtlease agent serving" in log.read_text() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert "virtlease agent serving" in log.read_text(), log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)  # no domain holds a lease: it exits
        assert proc.wait(20) == 0, log.read_text()


@pytest.fixture(scope="module")
def refusals(pki: Path, cluster: TlsCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    other = make_pki(tmp_path_factory.mktemp("other-ca"))
    crt, key = expired_client_cert(pki, tmp_path_factory.mktemp("expired"))
    wrong_name = ",".join(ep.replace("127.0.0.1", "127.0.0.2") for ep in cluster.endpoints.split(","))
    return {
        "no client certificate": {"ca_cert": str(pki / "ca.crt")},
        "client certificate from another CA": {"ca_cert": str(pki / "ca.crt"), "cert_cert": str(other / "virtlease.crt"),
                                               "cert_key": str(other / "virtlease.key")},
        "expired client certificate": {"ca_cert": str(pki / "ca.crt"), "cert_cert": str(crt), "cert_key": str(key)},
        "server certificate from another CA": {"ca_cert": str(other / "ca.crt"), "cert_cert": str(pki / "virtlease.crt"),
                                               "cert_key": str(pki / "virtlease.key")},
        "wrong server name": {"endpoints": wrong_name, **cluster.tls()},
        "client without TLS": {},
    }


EXPECTED = {
    "no client certificate": "refused this host's client certificate",
    "client certificate from another CA": "refused this host's client certificate",
    "expired client certificate": "refused this host's client certificate",
    "server certificate from another CA": "server certificate not signed by ca_cert",
    "wrong server name": "server certificate that does not name this endpoint",
    "client without TLS": "does etcd require TLS there?",
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_refused_connection_says_why_in_one_line(case: str, cluster: TlsCluster, refusals: dict[str, dict[str, str]],
                                                 tmp_path: Path) -> None:
    settings = {**_config(cluster, "/tls-refused", f"host-{abs(hash(case)) % 1000}"), **refusals[case]}
    with pytest.raises(BackendUnavailableError) as exc:
        v.load_driver("etcd", config=settings, capabilities=v.Capability.RESOURCES)
    message = str(exc.value)
    assert EXPECTED[case] in message and "\n" not in message, message
    assert "Traceback" not in message and "_InactiveRpcError" not in message
    conf = _toml(tmp_path / "virtlease.toml", settings)
    check = _cli(conf, "check", "--json")  # whole findings: the table folds long details
    assert check.returncode == 4, check.stdout + check.stderr
    assert EXPECTED[case] in check.stdout, check.stdout + check.stderr
    assert "Traceback" not in check.stderr


def _stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_no_grpc_log_line_reaches_the_terminal_on_a_failed_handshake(cluster: TlsCluster, refusals: dict[
        str, dict[str, str]], tmp_path: Path) -> None:
    """gRPC's C core logs every failed handshake (dozens of lines per command); only the one
    error line and its hint may reach stderr -- unless --debug asks for gRPC's own lines."""
    conf = _toml(tmp_path / "virtlease.toml", {**_config(cluster, "/tls-quiet", "host-quiet"),
                                                **refusals["server certificate from another CA"]})
    quiet = _cli(conf, "status")
    assert quiet.returncode == 4
    lines = _stderr_lines(quiet)
    assert len(lines) == 2 and lines[0].startswith("virtlease: error: ") and lines[1].startswith("hint: "), lines
    assert "server certificate not signed by ca_cert" in lines[0]
    debug = _cli(conf, "--debug", "status")  # the control: gRPC does log here when asked
    assert "ssl_transport_security" in debug.stderr and "Handshake failed" in debug.stderr, debug.stderr[-2000:]


def test_a_key_that_is_not_the_certificates_gets_its_own_line(cluster: TlsCluster, pki: Path, tmp_path: Path) -> None:
    mismatched = {"ca_cert": str(pki / "ca.crt"), "cert_cert": str(pki / "virtlease.crt"),
                  "cert_key": str(pki / "root.key")}
    conf = _toml(tmp_path / "virtlease.toml", {**_config(cluster, "/tls-mismatch", "host-mm"), **mismatched})
    (tmp_path / "web1.qcow2").write_bytes(b"")
    for command in (["status"], ["hold", "--name", "web1", "--disk", str(tmp_path / "web1.qcow2")], ["check"]):
        result = _cli(conf, *command, timeout=30)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        lines = _stderr_lines(result)
        assert len(lines) == 2 and lines[1].startswith("hint: "), (command, lines)
        assert lines[0] == (f"virtlease: error: cert_key: {pki / 'root.key'} is not the private key of cert_cert "
                            f"{pki / 'virtlease.crt'} (they do not match): give the key that certificate was "
                            "issued with"), lines
        assert result.stdout == "", result.stdout
    with pytest.raises(v.ConfigError, match="is not the private key of cert_cert"):
        v.load_driver("etcd", config={**_config(cluster, "/tls-mismatch", "host-mm"), **mismatched},
                      capabilities=v.Capability.RESOURCES)


def test_the_agents_log_has_no_grpc_line_and_says_why_it_has_no_session(cluster: TlsCluster, refusals: dict[
        str, dict[str, str]], tmp_path: Path) -> None:
    """An agent whose CA does not match the members' serves its socket, retries, and logs why in
    its own format: not one line of gRPC's own in its log."""
    settings = {**_config(cluster, "/tls-agent-quiet", "host-aq"), **refusals["server certificate from another CA"]}
    conf = _toml(tmp_path / "virtlease.toml", settings)
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    log = tmp_path / "agent.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*VIRTLEASE, "--config", str(conf), "agent", "--socket", str(run / "sock"),
                                 "--state-dir", str(run / "state")], stdout=out, stderr=subprocess.STDOUT, env=_env())
    try:
        for _ in range(400):
            if "no etcd session yet" in log.read_text() or proc.poll() is not None:
                break
            time.sleep(0.05)
        time.sleep(1.5)  # a few more attempts, each a failed handshake per member
        text = log.read_text()
        assert "no etcd session yet" in text and "server certificate not signed by ca_cert" in text, text
        lines = [line for line in text.splitlines() if line.strip()]
        assert all(line.startswith("ts=") and " logger=virtlease_etcd." in line for line in lines), text
        assert "ssl_transport_security" not in text and "Handshake failed" not in text, text
    finally:
        proc.send_signal(signal.SIGTERM)  # no session, nothing held: it exits at once
        assert proc.wait(20) == 0, log.read_text()
