"""Directory ids (``identity/dirid.py``) on real files: one id whoever creates it first, a marker
being written is waited for, anything that is not a marker is refused naming it.  No root needed;
the same through sshfs is in test_identity_system.py."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from virtlease_etcd.identity import Resolver
from virtlease_etcd.identity.dirid import FORMAT, MARKER, DirIdError, folds_case, read_or_create, stamp


def test_many_creators_at_once_agree_on_one_id(tmp_path: Path) -> None:
    for round_ in range(20):
        directory = tmp_path / f"d{round_}"
        directory.mkdir()
        start = threading.Barrier(12)
        found: list[str] = []

        def one(d: Path = directory, barrier: threading.Barrier = start, out: list[str] = found) -> None:
            barrier.wait()
            out.append(read_or_create(str(d)))

        threads = [threading.Thread(target=one) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(found) == 12 and len(set(found)) == 1, found
        assert sorted(os.listdir(directory)) == [MARKER]
        text = (directory / MARKER).read_text()
        assert text.startswith(f"{FORMAT}{found[0]}\n") and "Do not delete" in text
        assert (directory / MARKER).stat().st_mode & 0o777 == 0o444


def test_a_marker_being_written_is_waited_for(tmp_path: Path) -> None:
    marker = tmp_path / MARKER
    marker.write_bytes(b"")  # another host created it and has not written its id yet

    def writer() -> None:
        time.sleep(0.2)
        marker.write_text(f"{FORMAT}{'ab' * 16}\n")

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert read_or_create(str(tmp_path), wait=5) == "ab" * 16
    finally:
        thread.join()


@pytest.mark.parametrize("content", [b"", b"virtlease-dir-id 1 0123", b"something else\n"])
def test_what_is_not_a_marker_is_refused_naming_it(tmp_path: Path, content: bytes) -> None:
    (tmp_path / MARKER).write_bytes(content)
    started = time.monotonic()
    with pytest.raises(DirIdError) as err:
        read_or_create(str(tmp_path), wait=0.3)
    assert time.monotonic() - started >= 0.3
    message = str(err.value)
    assert f"{tmp_path / MARKER} is not a virtlease directory id" in message and "\n" not in message
    assert f"if no disk in {tmp_path} is in use on any host, delete it" in message
    assert (tmp_path / MARKER).read_bytes() == content  # never overwritten


def test_a_symlink_or_a_missing_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other = read_or_create(str(tmp_path / "other"))
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / MARKER).symlink_to(tmp_path / "other" / MARKER)  # two directories, one id: no
    with pytest.raises(DirIdError, match="must be a regular file, not a symlink"):
        read_or_create(str(tmp_path / "linked"))
    with pytest.raises(DirIdError, match=rf"{tmp_path}/gone has no directory id .* No such file or directory"):
        read_or_create(str(tmp_path / "gone"))
    assert read_or_create(str(tmp_path / "other")) == other


def test_stamp_tells_a_replaced_marker(tmp_path: Path) -> None:
    assert stamp(str(tmp_path)) is None
    first = read_or_create(str(tmp_path))
    before = stamp(str(tmp_path))
    assert before is not None and stamp(str(tmp_path)) == before
    os.unlink(tmp_path / MARKER)
    second = read_or_create(str(tmp_path))
    assert second != first and stamp(str(tmp_path)) != before


def test_a_case_insensitive_directory_folds_file_names(tmp_path: Path) -> None:
    """SMB shares, case-insensitive shares over sshfs or NFS and casefolded ext4 find one file under
    any case, so two hosts that write a disk's name in different cases reach one file.  None of these
    can be mounted here (no cifs, no CONFIG_UNICODE): a hard link of the marker under the upper-case
    name shows the directory exactly as such storage does to the probe (one file under both names)."""
    (tmp_path / "cs").mkdir()
    (tmp_path / "ci").mkdir()
    for d in ("cs", "ci"):
        (tmp_path / d / "Web1.qcow2").write_bytes(b"x")
        (tmp_path / d / "web1.QCOW2").write_bytes(b"x")
    read_or_create(str(tmp_path / "ci"))
    os.link(tmp_path / "ci" / MARKER, tmp_path / "ci" / MARKER.upper())
    assert not folds_case(str(tmp_path / "cs")) and folds_case(str(tmp_path / "ci"))
    with Resolver() as resolver:
        sensitive = {resolver.resolve(str(tmp_path / "cs" / n)).key for n in ("Web1.qcow2", "web1.QCOW2")}
        folded = {resolver.resolve(str(tmp_path / "ci" / n)).key for n in ("Web1.qcow2", "web1.QCOW2")}
    assert len(sensitive) == 2 and len(folded) == 1 and next(iter(folded)).endswith("/web1.qcow2")
