"""The container pass of ``make test`` on a machine with Docker and no image registry.

``prepare_docker`` (tests/etcd_container.py) builds the local etcd image itself when none is
there, and where the pass cannot run every container test is skipped with one line (or fails,
with VIRTLEASE_REQUIRE_CONTAINER=1 as CI sets it) -- never a flood of errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cliproc import clean_env
from etcd_container import docker_available, prepare_docker

REPO = Path(__file__).resolve().parents[1]
CASE = "tests/test_etcd_driver.py::test_conflict_names_the_holder[container]"


def test_the_container_pass_builds_its_etcd_image_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    if not docker_available():
        if os.environ.get("VIRTLEASE_REQUIRE_CONTAINER") == "1":
            pytest.fail("VIRTLEASE_REQUIRE_CONTAINER=1 but no Docker engine is reachable")
        pytest.skip("no Docker engine reachable")
    tag = f"virtlease/etcd:test-build-{uuid.uuid4().hex[:8]}"  # not there yet: prepare_docker must build it
    monkeypatch.delenv("VIRTLEASE_ETCD_IMAGE", raising=False)
    try:
        assert prepare_docker(local_image=tag) is None
        image = os.environ["VIRTLEASE_ETCD_IMAGE"]
        assert image == tag or "etcd-development" in image  # built, or the official one was already here
        version = subprocess.run(["docker", "run", "--rm", image, "/usr/local/bin/etcd", "--version"],
                                 capture_output=True, text=True, timeout=120)
        assert version.returncode == 0 and "etcd Version: 3." in version.stdout, version.stderr
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=120)


@pytest.mark.parametrize("required", [False, True])
def test_no_engine_is_one_line_or_a_failure_when_required(required: bool) -> None:
    env = clean_env(DOCKER_HOST="unix:///nonexistent/docker.sock",
                    **({"VIRTLEASE_REQUIRE_CONTAINER": "1"} if required else {}))
    done = subprocess.run([sys.executable, "-m", "pytest", CASE, "-q", "-ra", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    out = done.stdout + done.stderr
    if required:
        assert done.returncode == 1, out
        assert "VIRTLEASE_REQUIRE_CONTAINER=1 but the container etcd cannot run: no Docker engine reachable" in out
    else:
        assert done.returncode == 0, out
        skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
        assert len(skipped) == 1 and "container etcd not tested: no Docker engine reachable" in skipped[0], out
        assert "Error" not in out and len(out.splitlines()) < 10, out
