"""Configuration of disk identity: identity_map, server_aliases, strict_identity, legacy_path_keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtlease.errors import ConfigError
from virtlease_etcd.config import load_config


def test_defaults() -> None:
    cfg = load_config({}, environ={})
    assert cfg.identity_map == {} and cfg.server_aliases == {}
    assert cfg.strict_identity is True and cfg.legacy_path_keys is True


def test_toml_tables_dict_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "v.toml"
    path.write_text('[etcd]\nstrict_identity = true\nlegacy_path_keys = false\n'
                    '[etcd.identity_map]\n"/mnt/pool" = "san://pool1"\n'
                    '[etcd.server_aliases]\n"10.0.0.5" = "filer1"\n')
    cfg = load_config({"config_file": str(path)}, environ={})
    assert cfg.identity_map == {"/mnt/pool": "san://pool1"} and cfg.server_aliases == {"10.0.0.5": "filer1"}
    assert cfg.strict_identity is True and cfg.legacy_path_keys is False
    env = load_config({}, environ={"VIRTLEASE_ETCD_IDENTITY_MAP": "/a=x://a, /b=y://b",
                                   "VIRTLEASE_ETCD_STRICT_IDENTITY": "yes"})
    assert env.identity_map == {"/a": "x://a", "/b": "y://b"} and env.strict_identity is True


@pytest.mark.parametrize(("raw", "message"), [
    ({"identity_map": {"mnt/pool": "san://p"}}, r"identity_map: 'mnt/pool' must be an absolute path"),
    ({"identity_map": {"/mnt/pool": "pool1"}}, r"identity prefix must look like scheme://name"),
    ({"identity_map": {"/mnt/pool": "path:///x"}}, r"path:// is the local fallback"),
    ({"identity_map": {"/mnt/pool": ""}}, r"non-empty strings"),
    ({"identity_map": ["/mnt"]}, r"identity_map: expected a table"),
    ({"identity_map": "/mnt"}, r"'/mnt' is not name=value"),
    ({"server_aliases": {"10.0.0.5": "filer 1"}}, r"server_aliases: .* may not contain"),
    ({"strict_identity": "maybe"}, r"strict_identity: 'maybe' is not a boolean"),
    ({"legacy_path_keys": 1}, r"legacy_path_keys: 1 is not a boolean"),
])
def test_bad_values_are_refused_clearly(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(raw, environ={})
