"""``Resolver.resolve_many`` (one lock operation's disks) agrees with ``resolve`` of each path,
whatever symlinks, ``..`` or relative names the paths hold; real files, no root needed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virtlease_etcd.identity import IdentityConfig, IdentityError, Resolver
from virtlease_etcd.identity.dirid import MARKER


def test_resolve_many_agrees_with_resolve_through_symlinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "real" / "sub").mkdir(parents=True)
    for name in ("a.img", "b.img", "sub/c.img"):
        (tmp_path / "real" / name).write_bytes(b"x")
    (tmp_path / "dirlink").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "filelink.img").symlink_to(tmp_path / "real" / "sub" / "c.img")
    (tmp_path / "real" / "dangling.img").symlink_to(tmp_path / "nowhere" / "x.img")
    monkeypatch.chdir(tmp_path)
    paths = [f"{tmp_path}/dirlink/a.img", f"{tmp_path}/dirlink/b.img", f"{tmp_path}/dirlink/filelink.img",
             f"{tmp_path}/dirlink/sub/../a.img", f"{tmp_path}/dirlink/dangling.img", f"{tmp_path}/dirlink/absent.img",
             "dirlink/sub/c.img", f"{tmp_path}/dirlink/"]
    with Resolver() as resolver:
        many = resolver.resolve_many(paths)
        assert many == [resolver.resolve(p) for p in paths]
    assert [m.path for m in many] == [os.path.realpath(p) for p in paths]
    assert many[2].path == str(tmp_path / "real" / "sub" / "c.img")  # a symlink as last component: followed


def test_resolve_many_names_the_path_given_when_strict(tmp_path: Path) -> None:
    for name in ("ok", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a").write_bytes(b"x")
    (tmp_path / "other" / MARKER).symlink_to("/dev/null")  # a directory id must be a regular file
    with Resolver(IdentityConfig(strict=True, mappings={str(tmp_path / "ok"): "x://ok"})) as resolver:
        assert resolver.resolve_many([str(tmp_path / "ok" / "a")])[0].name == "x://ok/a"
        with pytest.raises(IdentityError, match=rf"disk '{tmp_path}/other/a': no cluster-wide identity .*"
                                                 r"it must be a regular file, not a symlink"):
            resolver.resolve_many([str(tmp_path / "ok" / "a"), str(tmp_path / "other" / "a")])
