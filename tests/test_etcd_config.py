"""etcd driver configuration: dict, TOML file, environment, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtlease import ConfigError, FailureAction
from virtlease_etcd.config import load_config


def test_defaults() -> None:
    cfg = load_config({}, environ={})
    assert cfg.endpoints == ("127.0.0.1:2379",)
    assert cfg.prefix == "/virtlease" and cfg.ttl == 10 and cfg.host_id
    assert cfg.margin == 2.0 and cfg.max_txn_ops == 128
    assert cfg.default_action is FailureAction.POWEROFF


def test_dict_then_environment_then_toml_file_then_defaults(tmp_path: Path) -> None:
    path = tmp_path / "virtlease.toml"
    path.write_text('[etcd]\nendpoints = ["10.0.0.1:2379", "10.0.0.2:2379"]\nttl = 7\nprefix = "/from-file"\n'
                    'default_action = "pause"\nhost_id = "hv-file"\n')
    cfg = load_config({"config_file": str(path), "prefix": "/from-dict", "ttl": 5},
                      environ={"VIRTLEASE_ETCD_TTL": "12", "VIRTLEASE_ETCD_HOST_ID": "hv-9",
                               "VIRTLEASE_ETCD_PREFIX": "/from-env"})
    assert cfg.prefix == "/from-dict" and cfg.ttl == 5  # the explicit dict beats the environment
    assert cfg.host_id == "hv-9"  # the environment beats the file
    assert cfg.endpoints == ("10.0.0.1:2379", "10.0.0.2:2379")  # the file beats the defaults
    assert cfg.default_action is FailureAction.PAUSE
    assert cfg.request_timeout == 2.0  # nobody set it: the default


def test_none_in_the_dict_counts_as_not_given(tmp_path: Path) -> None:
    path = tmp_path / "virtlease.toml"
    path.write_text('ttl = 7\n')
    cfg = load_config({"config_file": str(path), "ttl": None, "prefix": None},
                      environ={"VIRTLEASE_ETCD_PREFIX": "/from-env"})
    assert cfg.ttl == 7 and cfg.prefix == "/from-env"


def test_an_explicit_config_file_beats_virtlease_config(tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine.toml", tmp_path / "theirs.toml"
    mine.write_text('ttl = 7\n')
    theirs.write_text('ttl = 9\n')
    assert load_config({"config_file": str(mine)}, environ={"VIRTLEASE_CONFIG": str(theirs)}).ttl == 7


def test_load_config_never_writes_the_environment() -> None:
    environ = {"VIRTLEASE_ETCD_TTL": "12"}
    assert load_config({"ttl": 4}, environ=environ).ttl == 4
    assert environ == {"VIRTLEASE_ETCD_TTL": "12"}


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "v.toml"
    path.write_text('endpoints = "http://127.0.0.1:1234,127.0.0.1:1235"\n')
    cfg = load_config({}, environ={"VIRTLEASE_CONFIG": str(path)})
    assert cfg.endpoints == ("127.0.0.1:1234", "127.0.0.1:1235")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"ttl": 1}, "ttl: 1s is below the minimum of 2s"),
        ({"ttl": "ten"}, "ttl: invalid value"),
        ({"endpoints": "nohost"}, "endpoints: 'nohost' is not host:port"),
        ({"endpoints": ""}, "at least one"),
        ({"prefix": "relative"}, "prefix"),
        ({"prefix": "/trailing/"}, "prefix"),
        ({"host_id": "a b"}, "host_id"),
        ({"fence_margin": 6}, "fence_margin"),
        ({"default_action": "restart"}, "default_action"),
        ({"default_action": "explode"}, "default_action"),
        ({"user": "u"}, "user/password"),
        ({"user": "u", "password": "p"}, "only over TLS"),
        ({"ca_cert": "/nonexistent/ca.pem"}, "ca_cert: /nonexistent/ca.pem does not exist"),
        ({"colour": "blue"}, "unknown setting 'colour'; the settings are: acquire_timeout, "),
        ({"endpoint": "a:1"}, "unknown setting 'endpoint' \\(did you mean 'endpoints'\\?\\)$"),
        ({"fence-margin": 1}, "did you mean 'fence_margin'"),
        ({"config_file": "/nonexistent.toml"}, "does not exist"),
    ],
)
def test_bad_settings_are_named(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(raw, environ={})


def test_bad_toml_is_reported_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("ttl = = 3\n")
    with pytest.raises(ConfigError, match=f"{path} is not valid TOML"):
        load_config({"config_file": str(path)}, environ={})


def test_environment_override_is_validated() -> None:
    with pytest.raises(ConfigError, match="endpoints"):
        load_config({}, environ={"VIRTLEASE_ETCD_ENDPOINTS": "bad"})


def test_unknown_keys_never_list_program_only_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config({"colour": "blue"}, environ={})
    for key in ("on_lease_lost", "restart_callback", "config_file"):
        assert key not in str(exc.value)
    conf = tmp_path / "virtlease.toml"
    conf.write_text('[etcd]\non_lease_lost = "print"\n')
    with pytest.raises(ConfigError, match="on_lease_lost can only be given by a program"):
        load_config({"config_file": str(conf)}, environ={})
