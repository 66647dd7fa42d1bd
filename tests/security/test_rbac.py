"""etcd authentication and RBAC as deploy/etcd/rbac.sh sets them up, on a real etcd.

rbac.sh runs twice (idempotent). A host user can do everything virtlease needs and
nothing outside the prefix; the read-only monitoring user can run ``status`` but not
``hold``; a denied operation gives one clear line and changes nothing; simple auth
tokens that expire during a long hold do not make the host fence itself.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from etcd3 import transactions as tx
from pki import make_pki
from tls_cluster import TlsCluster

import virtlease as v
from virtlease_etcd.config import load_config
from virtlease_etcd.devtools.embedded import find_etcd_binary
from virtlease_etcd.etcd.client import EtcdClient, PermissionDenied

REPO = Path(__file__).resolve().parents[2]
VIRTLEASE = [str(Path(sys.executable).with_name("virtlease"))]
PREFIX = "/vlrbac"
PASSWORDS = {"root": "r00t-secret", "virtlease": "host-secret", "virtlease-monitor": "mon-secret"}
TOKEN_TTL = 2


def _rbac(etcd: TlsCluster, *, certificates: bool = False) -> subprocess.CompletedProcess[str]:
    """rbac.sh as an administrator runs it: with passwords, or with the root client certificate."""
    env = {**os.environ, "ETCDCTL": str(Path(find_etcd_binary()).with_name("etcdctl")),
           "ETCDCTL_ENDPOINTS": ",".join(f"https://{ep}" for ep in etcd.endpoints.split(",")),
           "ETCDCTL_CACERT": str(etcd.pki / "ca.crt"), "VIRTLEASE_PREFIX": PREFIX + "/"}
    if certificates:
        env.update(ETCDCTL_CERT=str(etcd.pki / "root.crt"), ETCDCTL_KEY=str(etcd.pki / "root.key"))
    else:
        env.update(ROOT_PASSWORD=PASSWORDS["root"], VIRTLEASE_PASSWORD=PASSWORDS["virtlease"],
                   MONITOR_PASSWORD=PASSWORDS["virtlease-monitor"])
    return subprocess.run(["bash", str(REPO / "deploy" / "etcd" / "rbac.sh")], env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCluster]:
    # server TLS (etcd sends tokens only over TLS), passwords, and simple tokens that expire
    # after TOKEN_TTL seconds: a long hold outlives many
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    server = TlsCluster(tmp_path_factory.mktemp("rbac-etcd"), pki, client_certs=False,
                        extra=("--auth-token", "simple", "--auth-token-ttl", str(TOKEN_TTL)))
    try:
        server.wait()
        first = _rbac(server)
        assert first.returncode == 0, first.stderr
        again = _rbac(server)  # idempotent, now with auth on
        assert again.returncode == 0, again.stderr
        assert "auth already enabled" in again.stderr and "user virtlease exists" in again.stderr
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cert_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCluster]:
    """The production shape of deploy/etcd/: client certificates from make-certs.sh, their CN the
    etcd user, rbac.sh run with the root certificate."""
    pki = make_pki(tmp_path_factory.mktemp("cert-pki"))
    server = TlsCluster(tmp_path_factory.mktemp("cert-rbac-etcd"), pki)
    try:
        server.wait()
        result = _rbac(server, certificates=True)
        assert result.returncode == 0, result.stderr
        yield server
    finally:
        server.stop()


def _cfg(etcd: TlsCluster, user: str, host: str = "host-a") -> dict[str, object]:
    return {"endpoints": etcd.endpoints, "prefix": PREFIX, "host_id": host, "ttl": 5, "acquire_timeout": 3.0,
            "ca_cert": str(etcd.pki / "ca.crt"), "user": user, "password": PASSWORDS[user]}


def _root(etcd: TlsCluster) -> EtcdClient:
    return EtcdClient(load_config(_cfg(etcd, "root", "root-admin"), environ={}))


def _dump(etcd: TlsCluster) -> dict[bytes, bytes]:
    root = _root(etcd)
    try:
        kvs, _ = root.get_range("\x00", "\x00", timeout=5)
        return {kv.key: kv.value for kv in kvs}
    finally:
        root.close()


def _env(**extra: str) -> dict[str, str]:
    env = {k: val for k, val in os.environ.items() if not k.startswith(("VIRTLEASE_", "GRPC_"))}
    return {**env, **extra}


def test_host_user_can_do_what_virtlease_needs(etcd: TlsCluster, tmp_path: Path) -> None:
    disk = tmp_path / "web1.qcow2"
    disk.write_bytes(b"")
    a = v.load_driver("etcd", config=_cfg(etcd, "virtlease", "host-a"),
                      capabilities=v.Capability.RESOURCES | v.Capability.MIGRATE)
    b = v.load_driver("etcd", config=_cfg(etcd, "virtlease", "host-b"),
                      capabilities=v.Capability.RESOURCES | v.Capability.MIGRATE)
    try:
        web1 = a.new_object(uuid=str(uuid.uuid4()), name="web1")
        web1.add_resource(v.ResourceType.DISK, str(disk))
        web1.acquire()
        state = web1.prepare_migrate("host-b")  # mark, then claim on the other host
        dest = b.new_object(uuid=web1.spec.uuid, name="web1", flags=v.NewFlags.MIGRATE)
        dest.add_resource(v.ResourceType.DISK, str(disk))
        dest.acquire(state=state)
        web1.complete_migrate_out()
        dest.release()
        web1.free()
        dest.free()
    finally:
        a.unload()
        b.unload()


@pytest.mark.parametrize("op", ["read", "write", "delete", "lease on a key"])
def test_host_user_is_denied_outside_the_prefix_and_nothing_changes(etcd: TlsCluster, op: str) -> None:
    root = _root(etcd)
    root.txn([], [tx.Put("/other/secret", b"keep")], timeout=5)
    root.close()
    before = _dump(etcd)
    client = EtcdClient(load_config(_cfg(etcd, "virtlease"), environ={}))
    try:
        with pytest.raises(PermissionDenied) as denied:
            if op == "read":
                client.get_range("/other/secret", timeout=2)
            elif op == "write":
                client.txn([], [tx.Put("/other/secret", b"mine")], timeout=2)
            elif op == "delete":
                client.txn([], [tx.Delete("/other/secret")], timeout=2)
            else:
                lease, _ = client.lease_grant(5, timeout=2)
                client.txn([], [tx.Put("/other/x", b"x", lease=lease)], timeout=2)
        assert "permission denied" in str(denied.value) and "\n" not in str(denied.value)
    finally:
        client.close()
    assert _dump(etcd) == before


def test_monitor_user_runs_status_but_not_hold(etcd: TlsCluster, tmp_path: Path) -> None:
    disk = tmp_path / "db1.qcow2"
    disk.write_bytes(b"")
    holder = v.load_driver("etcd", config=_cfg(etcd, "virtlease", "host-a"), capabilities=v.Capability.RESOURCES)
    try:
        db1 = holder.new_object(uuid=str(uuid.uuid4()), name="db1")
        db1.add_resource(v.ResourceType.DISK, str(disk))
        db1.acquire()
        env = _env(VIRTLEASE_ETCD_USER="virtlease-monitor", VIRTLEASE_ETCD_PASSWORD=PASSWORDS["virtlease-monitor"],
                   VIRTLEASE_ETCD_CA_CERT=str(etcd.pki / "ca.crt"))
        base = [*VIRTLEASE, "--endpoints", etcd.endpoints, "--prefix", PREFIX]
        status = subprocess.run([*base, "status"], capture_output=True, text=True, env=env, timeout=60)
        assert status.returncode == 0, status.stderr
        assert "host-a" in status.stdout and "db1" in status.stdout
        before = _dump(etcd)
        hold = subprocess.run([*base, "--host-id", "monitor", "hold", "--allow-missing", "--name", "intruder", "--disk",
                               str(tmp_path / "other.qcow2")], capture_output=True, text=True, env=env, timeout=60)
        assert hold.returncode != 0
        lines = [line for line in hold.stderr.splitlines() if line.strip()]
        assert "Traceback" not in hold.stderr and lines[0].startswith("virtlease: error: "), hold.stderr
        assert "permission denied" in lines[0], hold.stderr
        after = _dump(etcd)
        assert {k: val for k, val in after.items() if not k.endswith(b"/host/monitor")} == before
        assert PASSWORDS["virtlease-monitor"] not in status.stdout + status.stderr + hold.stdout + hold.stderr
        db1.release()
        db1.free()
    finally:
        holder.unload()


def test_hold_across_auth_token_expiry_does_not_fence(etcd: TlsCluster, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    disks = [tmp_path / f"d{i}.qcow2" for i in range(2)]
    for d in disks:
        d.write_bytes(b"")
    caplog.set_level(logging.INFO, logger="virtlease_etcd.etcd.client")
    config = {**_cfg(etcd, "virtlease", "host-t"), "ttl": 6}
    plugin = v.load_driver("etcd", config=config, capabilities=v.Capability.RESOURCES)
    try:
        vm = plugin.new_object(uuid=str(uuid.uuid4()), name="long")
        vm.add_resource(v.ResourceType.DISK, str(disks[0]))
        vm.acquire()
        session = plugin.driver.session
        sent = session.keepalives_sent
        time.sleep(3 * TOKEN_TTL)  # well past the token's TTL: keepalives need no token
        assert session.lost is None, session.lost
        assert session.keepalives_sent >= sent + 2
        # a token etcd no longer knows (expired, or forgotten by a restarted member):
        session.client._metadata = (("token", "forgotten.token"),)
        other = plugin.new_object(uuid=str(uuid.uuid4()), name="later")
        other.add_resource(v.ResourceType.DISK, str(disks[1]))
        other.acquire()  # the write meets the invalid token, authenticates again, succeeds
        renewals = [r for r in caplog.records if "authenticating again" in r.getMessage()]
        assert renewals, "the client never met an invalid token: the test proves nothing"
        other.release()
        vm.release()
        other.free()
        vm.free()
        assert session.lost is None
    finally:
        plugin.unload()


def test_the_password_is_in_no_repr_and_no_debug_log(etcd: TlsCluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = load_config(_cfg(etcd, "virtlease", "host-log"), environ={})
    assert PASSWORDS["virtlease"] not in repr(cfg)
    plugin = v.load_driver("etcd", config=_cfg(etcd, "virtlease", "host-log"), capabilities=v.Capability.RESOURCES)
    plugin.unload()
    assert caplog.records and PASSWORDS["virtlease"] not in caplog.text


def test_config_file_with_a_password_must_not_be_readable_by_others(etcd: TlsCluster, tmp_path: Path) -> None:
    conf = tmp_path / "virtlease.toml"
    conf.write_text(f'[etcd]\nendpoints = "{etcd.endpoints}"\nca_cert = "{etcd.pki / "ca.crt"}"\n'
                    f'user = "virtlease"\npassword = "{PASSWORDS["virtlease"]}"\n')
    os.chmod(conf, 0o644)
    res = subprocess.run([*VIRTLEASE, "--config", str(conf), "--prefix", PREFIX, "status"], capture_output=True,
                         text=True, env=_env(), timeout=60)
    assert res.returncode == 2, res.stderr
    assert f"chmod 600 {conf}" in res.stderr and PASSWORDS["virtlease"] not in res.stderr
    os.chmod(conf, 0o600)
    res = subprocess.run([*VIRTLEASE, "--config", str(conf), "--prefix", PREFIX, "status"], capture_output=True,
                         text=True, env=_env(), timeout=60)
    assert res.returncode == 0, res.stderr
    assert PASSWORDS["virtlease"] not in res.stdout + res.stderr


def _check(etcd: TlsCluster, cn: str, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``virtlease check --json`` as the holder of the ``cn`` client certificate of make-certs.sh."""
    env = _env(**{f"VIRTLEASE_ETCD_{k.upper()}": val for k, val in etcd.tls(cn).items()})
    result = subprocess.run([*VIRTLEASE, "--endpoints", etcd.endpoints, "--prefix", PREFIX, "--host-id", "host-c",
                             "check", "--json", *args], capture_output=True, text=True, env=env, timeout=60)
    assert result.stderr == "", result.stderr
    return result, json.loads(result.stdout)


def _rows(report: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    rows: dict[str, list[tuple[str, str]]] = {}
    for f in report["findings"]:
        rows.setdefault(f["check"], []).append((f["level"], f["detail"]))
    return rows


def test_check_keeps_health_and_permission_apart(cert_etcd: TlsCluster) -> None:
    """A prefix outside the host's role: every member is healthy, one permission row fails,
    naming the prefix and the role it needs (exit 1, not 'unreachable')."""
    result, report = _check(cert_etcd, "virtlease", "--prefix", "/elsewhere")
    assert result.returncode == 1, result.stdout
    rows = _rows(report)
    assert [e["healthy"] for e in report["endpoints"]] == [True, True, True]
    assert all(rows[f"endpoint {ep}"] == [("ok", rows[f"endpoint {ep}"][0][1])]
               for ep in cert_etcd.endpoints.split(","))
    assert rows["etcd user"] == [("info", f"etcd user virtlease (role virtlease: readwrite on prefix {PREFIX}/)")]
    ((level, detail),) = rows["permission"]
    assert level == "fail" and "cannot read under /elsewhere/" in detail, detail
    assert "readwrite on prefix /elsewhere/ (deploy/etcd/rbac.sh role virtlease" in detail, detail
    assert report["worst"] == "fail"


def test_the_monitoring_certificate_passes_a_read_only_check(cert_etcd: TlsCluster) -> None:
    result, report = _check(cert_etcd, "virtlease-monitor", "--read-only", "--strict")
    rows = _rows(report)
    assert rows["permission"][0][0] == "ok", rows
    assert rows["client certificate"][0][0] == "ok" and "CN=virtlease-monitor" in rows["client certificate"][0][1]
    assert rows["etcd user"] == [("info", f"etcd user virtlease-monitor (role virtlease-monitor: read on prefix "
                                          f"{PREFIX}/)")]
    # --strict fails on warnings only: the etcd version's, where the version has a known defect
    warnings = {check for check, found in rows.items() for level, _ in found if level != "ok" and level != "info"}
    assert warnings <= {"etcd version"}, rows
    assert result.returncode == (0 if not warnings else 1), result.stdout
    # the same user checked as a host: it cannot write, and the row says what to do
    host, report = _check(cert_etcd, "virtlease-monitor")
    ((level, detail),) = _rows(report)["permission"]
    assert host.returncode == 1 and level == "fail" and "cannot write under /vlrbac/" in detail, detail
    assert "role virtlease," in detail and "check --read-only" in detail, detail


def test_a_wrong_password_is_an_authentication_error(etcd: TlsCluster, tmp_path: Path) -> None:
    env = _env(VIRTLEASE_ETCD_USER="virtlease", VIRTLEASE_ETCD_PASSWORD="not-the-password",
               VIRTLEASE_ETCD_CA_CERT=str(etcd.pki / "ca.crt"))
    base = [*VIRTLEASE, "--endpoints", etcd.endpoints, "--prefix", PREFIX]
    status = subprocess.run([*base, "status"], capture_output=True, text=True, env=env, timeout=60)
    assert status.returncode == 2, status.stderr
    lines = [line for line in status.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and "refused to authenticate user virtlease" in lines[0], lines
    check = subprocess.run([*base, "check", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert check.returncode == 1, check.stdout + check.stderr
    rows = _rows(json.loads(check.stdout))
    assert all(level == "ok" for level, _ in rows[f"endpoint {etcd.endpoints.split(',')[0]}"])
    assert rows["authentication"][0][0] == "fail" and "refused to authenticate" in rows["authentication"][0][1]
