"""Fuzzing everything that parses outside input: state strings, configuration, the agent's wire.

Property-based (hypothesis), seeded and bounded in ``make test``
(``VIRTLEASE_FUZZ_EXAMPLES``, default 400 per target, derandomized); ``make safety-long``
runs 20,000 per target with a random seed. Each parser must either return a value or
raise its own documented error -- never anything else (a crash), and never hang.
Inputs are both random and mutations of real ones (a state the driver wrote, the lockd
capture's frames, the sample configuration).
"""

from __future__ import annotations

import json
import os
import tomllib
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtlease.errors import ConfigError, StaleStateError, ValidationError
from virtlease_etcd.agent import protocol
from virtlease_etcd.agent.messages import ProtocolError
from virtlease_etcd.config import KNOWN_KEYS, PROGRAM_ONLY, EtcdConfig, load_config
from virtlease_etcd.model import statestring as vstate

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("VIRTLEASE_FUZZ_EXAMPLES", "400"))
LONG = EXAMPLES > 5000
FUZZ = settings(max_examples=EXAMPLES, derandomize=not LONG, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TRIED: Counter[str] = Counter()

# -- seeds: real inputs to mutate ------------------------------------------------------------

STATE = vstate.State(kind=vstate.HANDOFF, cluster="c0ffee", prefix="/virtlease", host="host-a",
                     uuid="6a4f6f4e-0000-4000-8000-000000000001", name="web1",
                     resources=(vstate.StateResource(kind="disk", res="/var/lib/images/web1.qcow2", rid="ab" * 16,
                                                     mode="exclusive", token=42, xgen=None, legacy=None),),
                     revision=43, to="host-b", marker="6d61726b6572").encode()


def _frames() -> list[bytes]:
    lines = (REPO / "tests" / "agent" / "data" / "lockd-capture-vectors.txt").read_text().splitlines()
    return [bytes.fromhex(line.split()[2]) for line in lines if line.strip() and not line.startswith("#")]


FRAMES = _frames()
CALLS = [f for f, line in zip(FRAMES, FRAMES, strict=True) if int.from_bytes(f[16:20], "big") == 0]


def _mutated(seed: bytes | str, data: st.DataObject) -> bytes:
    raw = bytearray(seed.encode() if isinstance(seed, str) else seed)
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del raw[at:]
        elif op == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and raw:
            del raw[at:at + data.draw(st.integers(1, 8))]
    return bytes(raw)


# -- state strings -----------------------------------------------------------------------------

def _decode_state(text: str) -> None:
    TRIED["state"] += 1
    try:
        decoded = vstate.decode(text)
    except (ValidationError, StaleStateError):
        return
    assert isinstance(decoded, vstate.State)


def test_the_state_seed_is_valid() -> None:
    assert vstate.decode(STATE).to == "host-b"


@FUZZ
@given(st.text(max_size=300))
def test_state_decoder_on_random_text(text: str) -> None:
    _decode_state(text)
    _decode_state(vstate.MAGIC + "1 " + text)


@FUZZ
@given(st.data())
def test_state_decoder_on_mutated_states(data: st.DataObject) -> None:
    _decode_state(_mutated(STATE, data).decode("utf-8", errors="replace"))


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
                     max_leaves=20)


@FUZZ
@given(st.dictionaries(st.sampled_from(["kind", "cluster", "prefix", "host", "uuid", "name", "res", "rev", "to",
                                        "marker"]), _json, max_size=10))
def test_state_decoder_on_wrong_shaped_json(body: dict[str, object]) -> None:
    _decode_state(vstate.MAGIC + "1 " + json.dumps(body))


# -- configuration --------------------------------------------------------------------------------

def _load(raw: dict[str, object]) -> None:
    TRIED["config"] += 1
    try:
        cfg = load_config(raw, environ={})
    except ConfigError:
        return
    assert isinstance(cfg, EtcdConfig)


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(KNOWN_KEYS - {"config_file"} - PROGRAM_ONLY)),
                       _json, max_size=8))
def test_config_on_random_values(raw: dict[str, object]) -> None:
    _load(raw)


@FUZZ
@given(st.data())
def test_config_file_on_mutated_sample(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    sample = (REPO / "deploy" / "virtlease.toml").read_text()
    path = tmp_path_factory.mktemp("cfg") / "virtlease.toml"
    path.write_bytes(_mutated(sample, data))
    os.chmod(path, 0o600)
    try:
        tomllib.loads(path.read_text(errors="replace"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        pass
    _load({"config_file": str(path)})


def test_found_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """Found by the fuzzer: tomllib raised UnicodeDecodeError, a traceback for the user."""
    path = tmp_path / "virtlease.toml"
    path.write_bytes(b'\x80[etcd]\nendpoints = "127.0.0.1:2379"\n')
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config({"config_file": str(path)}, environ={})


# -- the agent's wire protocol ---------------------------------------------------------------

def _decode_call(frame: bytes) -> None:
    TRIED["wire"] += 1
    try:
        protocol.decode_call(frame)
    except ProtocolError:
        pass
    try:
        protocol.decode_reply(frame)
    except ProtocolError:
        pass


def test_the_wire_seeds_decode() -> None:
    assert len(CALLS) > 20
    for frame in CALLS:
        protocol.decode_call(frame)


@FUZZ
@given(st.binary(max_size=512))
def test_wire_decoder_on_random_bytes(frame: bytes) -> None:
    _decode_call(frame)
    _decode_call(len(frame).to_bytes(4, "big") + frame[4:])  # a length word that matches


@FUZZ
@given(st.sampled_from(FRAMES), st.data())
def test_wire_decoder_on_mutated_captured_frames(frame: bytes, data: st.DataObject) -> None:
    mutated = _mutated(frame, data)
    _decode_call(mutated)
    _decode_call(len(mutated).to_bytes(4, "big") + mutated[4:])


def test_zz_report_inputs_tried() -> None:
    """Printed for the record (``pytest -s``): how many inputs each target saw."""
    print(f"fuzz inputs tried: {dict(TRIED)} ({EXAMPLES} examples per test)")
    assert all(TRIED[k] >= EXAMPLES for k in ("state", "config", "wire")), TRIED
