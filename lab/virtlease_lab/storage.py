"""Real storage for the identity tests: loop devices, file systems, mounts, sshd and sshfs.

Each helper needs root and its tools; ``need`` skips a test that lacks them (tests/identity/
README.md lists the packages).  Every mount, loop device and daemon is undone when its block
ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtlease_lab.ports import free_port


def need(*tools: str) -> None:
    """Skip the test unless it runs as root with every tool in ``tools`` installed (tests/conftest.py
    turns such a skip into a failure under ``VIRTLEASE_REQUIRE_SYSTEM_TESTS=1``)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts and loop devices")
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (see tests/identity/README.md)")


def run(*args: str) -> str:
    """Run a command; its stdout, stripped (CalledProcessError if it fails)."""
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=60).stdout.strip()


@contextlib.contextmanager
def mounted(target: Path, *args: str) -> Iterator[Path]:
    """``mount ARGS TARGET`` for the block; unmounted (lazily if busy) after it."""
    target.mkdir(parents=True, exist_ok=True)
    run("mount", *args, str(target))
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False, capture_output=True)
        if os.path.ismount(target):
            subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


@contextlib.contextmanager
def loop_device(image: Path, *options: str) -> Iterator[str]:
    """A loop device over ``image`` for the block (``losetup -f --show OPTIONS``)."""
    device = run("losetup", "-f", "--show", *options, str(image))
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False, capture_output=True)


MKFS = {
    "ext4": (["mkfs.ext4", "-q", "-F"], "64M"),
    "xfs": (["mkfs.xfs", "-q", "-f"], "320M"),
    "btrfs": (["mkfs.btrfs", "-q", "-f"], "128M"),
}


@contextlib.contextmanager
def filesystem(tmp_path: Path, fstype: str) -> Iterator[str]:
    """A fresh ``fstype`` file system in an image under ``tmp_path``, as a loop device."""
    mkfs, size = MKFS[fstype]
    need(mkfs[0], "losetup", "mount")
    image = tmp_path / f"{fstype}.img"
    run("truncate", "-s", size, str(image))
    run(*mkfs, str(image))
    with loop_device(image) as device:
        yield device


def blkid_uuid(device: str) -> str | None:
    """The file-system UUID blkid reads on ``device`` (None without blkid or a UUID)."""
    if shutil.which("blkid") is None:
        return None
    found = subprocess.run(["blkid", "-p", "-s", "UUID", "-o", "value", device], capture_output=True, text=True)
    return found.stdout.strip().lower() or None


@contextlib.contextmanager
def sshd(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """An sshd on a free loopback port with a fresh key pair: yields (port, the user's key)."""
    need("sshfs", "ssh-keygen", "fusermount")
    daemon = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.access(daemon, os.X_OK):
        pytest.skip("sshd not installed (openssh-server, see tests/identity/README.md)")
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("host", "user"):
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name))
    shutil.copy(keys / "user.pub", keys / "authorized_keys")
    port = free_port()
    config = keys / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "Subsystem sftp internal-sftp\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen([daemon, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"sshd did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
            time.sleep(0.05)
        yield port, keys / "user"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def sshfs(source: str, target: Path, port: int, key: Path, *more: str) -> Iterator[Path]:
    """sshfs of ``source`` on ``target``; ``more``: fuse options, such as ``fsname=gluster1:/vmstore``
    and ``subtype=glusterfs`` (the kernel's mount table then shows ``fuse.glusterfs gluster1:/vmstore``)."""
    target.mkdir(parents=True, exist_ok=True)
    options = ",".join([f"IdentityFile={key},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,port={port}",
                        *more])
    run("sshfs", "-o", options, source, str(target))
    try:
        yield target
    finally:
        subprocess.run(["fusermount", "-u", str(target)], check=False, capture_output=True)
        if os.path.ismount(target):
            subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


@contextlib.contextmanager
def ext4_disks(base: Path, *names: str) -> Iterator[str]:
    """An ext4 loop device holding the files ``names`` (created through a mount undone at once)."""
    base.mkdir(parents=True, exist_ok=True)
    with filesystem(base, "ext4") as device:
        with mounted(base / "seed", device) as seed:
            for name in names:
                (seed / name).parent.mkdir(parents=True, exist_ok=True)
                (seed / name).write_bytes(b"disk")
        yield device
