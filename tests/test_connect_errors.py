"""Every way a first connection to etcd fails is its own one-line error, reported at once.

A wrong port is "connection refused", a name that does not resolve says so, no route says
so, something that is not etcd says so -- never "did not answer before the deadline" after
waiting for it.  Each case is real: a closed loopback port, a loopback HTTP/1 server, and a
network namespace the test creates (no DNS server, an unreachable route).  TLS refusals and
a certificate/key mismatch are in tests/security/test_tls.py, authentication and RBAC in
tests/security/test_rbac.py.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import virtlease as v
from cliproc import VIRTLEASE, assert_one_line_error, clean_env, run
from virtlease.errors import BackendUnavailableError
from virtlease_etcd.devtools.embedded import free_port


def _slow_config(tmp_path: Path, endpoints: str) -> Path:
    """Deadlines far beyond the test's own timeout: an error that waited for one fails the test."""
    conf = tmp_path / "virtlease.toml"
    conf.write_text(f'endpoints = "{endpoints}"\nrequest_timeout = 30.0\nacquire_timeout = 120.0\nttl = 300\n'
                    'fence_margin = 10.0\n')
    return conf


@pytest.mark.parametrize("command", [["status"], ["check"], ["hold", "--name", "web1", "--disk"]])
def test_a_wrong_port_says_connection_refused_at_once(command: list[str], tmp_path: Path) -> None:
    conf = _slow_config(tmp_path, f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}")
    if command[0] == "hold":
        (tmp_path / "web1.qcow2").write_bytes(b"")
        command = [*command, str(tmp_path / "web1.qcow2")]
    result = run("--config", str(conf), *command, timeout=20)  # the deadlines are 60-120 s
    assert result.returncode == 4, result.stdout + result.stderr
    if command == ["check"]:
        assert "connection refused" in result.stdout and "deadline" not in result.stdout, result.stdout
        assert result.stderr == "", result.stderr
    else:
        assert_one_line_error(result.stderr, "connection refused")
        assert "deadline" not in result.stderr and "is etcd running there" in result.stderr, result.stderr


def test_the_driver_reports_a_refused_connection_with_its_hint() -> None:
    with pytest.raises(BackendUnavailableError) as exc:
        v.load_driver("etcd", config={"endpoints": f"127.0.0.1:{free_port()}", "host_id": "host-r", "ttl": 300,
                                      "fence_margin": 10.0, "request_timeout": 30.0},
                      capabilities=v.Capability.RESOURCES)
    assert "connection refused" in str(exc.value) and "\n" not in str(exc.value)
    assert exc.value.hint is not None and "client port" in exc.value.hint


@pytest.fixture
def http1_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_port_that_is_not_etcd_says_so(http1_server: str, tmp_path: Path) -> None:
    result = run("--config", str(_slow_config(tmp_path, http1_server)), "status", timeout=20)
    assert result.returncode == 4
    assert_one_line_error(result.stderr, "not an etcd client port")


def _in_new_netns(script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (sh) in a network namespace of its own: loopback only, plus what it adds."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        reason = "needs root, unshare and ip for a network namespace"
        if os.environ.get("VIRTLEASE_REQUIRE_SYSTEM_TESTS") == "1":
            pytest.fail(f"{reason} (VIRTLEASE_REQUIRE_SYSTEM_TESTS=1)")
        pytest.skip(reason)
    env = clean_env(VIRTLEASE_CLI=" ".join(VIRTLEASE))
    return subprocess.run(["unshare", "-n", "sh", "-ec", "ip link set lo up\n" + script], capture_output=True,
                          text=True, timeout=30, env=env)


def test_no_route_to_the_members_says_so() -> None:
    result = _in_new_netns("ip route add unreachable 10.77.0.0/16\n"
                           "$VIRTLEASE_CLI --endpoints 10.77.0.1:2379,10.77.0.2:2379 status")
    assert result.returncode == 4, result.stderr
    assert_one_line_error(result.stderr, "10.77.0.1:2379 is unreachable: no route to that host")
    assert "network" in result.stderr.splitlines()[-1]


def test_a_name_this_host_cannot_resolve_says_so() -> None:
    # no DNS server answers in the namespace: the lookup of an endpoint's name fails
    result = _in_new_netns("$VIRTLEASE_CLI --endpoints etcd1.virtlease.invalid:2379 status")
    assert result.returncode == 4, result.stderr
    assert_one_line_error(result.stderr, "etcd1.virtlease.invalid:2379 is a name this host cannot resolve")
    assert "DNS" in result.stderr


def test_python_api_users_see_no_grpc_log_lines_either(tmp_path: Path) -> None:
    """Loading the driver from a program quiets gRPC's C core for the whole process."""
    script = ("import virtlease as v\n"
              "try:\n"
              f"    v.load_driver('etcd', config={{'endpoints': '127.0.0.1:{free_port()}', 'host_id': 'h'}})\n"
              "except v.BackendUnavailableError as exc:\n"
              "    print('refused' if 'connection refused' in str(exc) else exc)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=clean_env(),
                            timeout=60)
    assert result.stdout.strip() == "refused" and result.stderr == "", result.stdout + result.stderr
