"""``virtlease identity``: what this host locks a disk under, without etcd, as a real process.

The read-only view stands for a root-squashed NFS client: it can read a directory id but not
create one; ``virtlease identity DIR`` run where the directory is writable creates it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from virtlease_etcd.identity.dirid import MARKER
from virtlease_lab.storage import mounted, need

VIRTLEASE = [sys.executable, "-m", "virtlease.cli"]


def virtlease(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: val for k, val in os.environ.items() if not k.startswith("VIRTLEASE")}
    return subprocess.run([*VIRTLEASE, *args], capture_output=True, text=True, timeout=60, env=env)


def test_identity_of_a_disk_and_of_a_directory(tmp_path: Path) -> None:
    need("mount")
    (tmp_path / "rw" / "vm").mkdir(parents=True)
    (tmp_path / "rw" / "vm" / "web1.qcow2").write_bytes(b"x")
    with mounted(tmp_path / "ro", "--bind", "-o", "ro", str(tmp_path / "rw")) as ro:
        refused = virtlease("identity", str(ro / "vm" / "web1.qcow2"))
        assert refused.returncode == 2, refused
        assert f"{ro}/vm has no directory id" in refused.stderr and "virtlease identity" in refused.stderr
        assert not (tmp_path / "rw" / "vm" / MARKER).exists()
        made = virtlease("identity", str(tmp_path / "rw" / "vm"))  # where the directory is writable
        assert made.returncode == 0, made
        dir_id = (tmp_path / "rw" / "vm" / MARKER).read_text().split()[2]
        assert made.stdout.strip() == f"{tmp_path}/rw/vm: directory id {dir_id} ({tmp_path}/rw/vm/{MARKER})"
        now = virtlease("identity", "--json", str(ro / "vm" / "web1.qcow2"), str(tmp_path / "rw" / "vm" / "web1.qcow2"))
        assert now.returncode == 0, now
        through_ro, direct = json.loads(now.stdout)
    assert through_ro["identity"] == direct["identity"] == f"dir://{dir_id}/web1.qcow2"
    assert through_ro["cluster_wide"] and through_ro["name"] == f"path://{ro}/vm/web1.qcow2"
    assert [k["of"] for k in through_ro["keys"]] == ["identity", "also"]
    assert through_ro["keys"][0] == direct["keys"][0] and through_ro["keys"][1] != direct["keys"][1]
