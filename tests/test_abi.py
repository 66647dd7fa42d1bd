"""The ABI's constants: distinct capability bits, version encoding."""

from __future__ import annotations

import virtlease as v
from virtlease.abi import version_major


def test_every_capability_is_a_distinct_single_bit() -> None:
    values = [int(c) for c in v.Capability]
    assert len(values) == 4
    for value in values:
        assert value > 0 and value & (value - 1) == 0, f"{value:#x} is not a single bit"
    assert len(set(values)) == len(values)
    combined = 0
    for value in values:
        assert not combined & value
        combined |= value


def test_resources_and_migrate_differ_unlike_the_2010_rfc() -> None:
    assert v.Capability.RESOURCES != v.Capability.MIGRATE


def test_abi_version_encoding() -> None:
    assert v.ABI_VERSION == 2_000_000
    assert v.encode_version(1, 2, 3) == 1_002_003
    assert v.format_version(1_002_003) == "1.2.3"
    assert version_major(v.encode_version(2, 999, 999)) == 2


def test_flag_enums_have_distinct_bits() -> None:
    for kind in (v.ResourceFlags, v.AcquireFlags, v.NewFlags):
        bits = [int(m) for m in kind]
        assert all(b & (b - 1) == 0 for b in bits)
        assert len(set(bits)) == len(bits)


def test_failure_actions_are_libvirts() -> None:
    assert [a.name for a in v.FailureAction] == ["DEFAULT", "POWEROFF", "RESTART", "PAUSE", "IGNORE"]
