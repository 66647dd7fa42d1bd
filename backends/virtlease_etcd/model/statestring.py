"""State strings: what release/inquire/prepare_migrate return and acquire takes.

A state is one line of self-describing, versioned text::

    virtlease-state/1 {"cluster":"...","host":"...","kind":"resume",...}

The JSON is ASCII-only with ``<``, ``>``, ``&`` and ``'`` escaped, so the
string can travel inside XML (libvirt's migration cookie) unchanged.  The
state is a claim to check, not a credential: every field that matters is
compared exactly against etcd in the acquiring transaction (a resume
compares the exclusive resource's last-grant revision with its token, a
shared one's last exclusive grant with ``xgen``; a claim compares the
handoff marker byte for byte), so a tampered state can only fail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from virtlease.errors import StaleStateError, ValidationError

MAGIC = "virtlease-state/"
VERSION = 1
RESUME = "resume"
HANDOFF = "handoff"


@dataclass(frozen=True)
class StateResource:
    kind: str
    res: str
    rid: str
    mode: str
    token: int
    xgen: int | None = None
    """Shared resources: the revision of the resource's last exclusive grant
    while we held it (resume requires it unchanged, exactly)."""
    legacy: str | None = None
    """A disk's legacy path key: the rid of the identity key it belongs to."""

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": self.kind, "res": self.res, "rid": self.rid, "mode": self.mode,
                                "token": self.token}
        if self.xgen is not None:
            body["xgen"] = self.xgen
        if self.legacy is not None:
            body["legacy"] = self.legacy
        return body


@dataclass(frozen=True)
class State:
    kind: str
    cluster: str
    prefix: str
    host: str
    uuid: str
    name: str
    resources: tuple[StateResource, ...]
    revision: int
    to: str | None = None
    marker: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> str:
        body: dict[str, Any] = {
            "kind": self.kind, "cluster": self.cluster, "prefix": self.prefix, "host": self.host,
            "uuid": self.uuid, "name": self.name, "rev": self.revision,
            "res": [r.as_json() for r in self.resources],
        }
        if self.to is not None:
            body["to"] = self.to
        if self.marker is not None:
            body["marker"] = self.marker
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("'", "\\u0027")):
            text = text.replace(ch, esc)
        return f"{MAGIC}{VERSION} {text}"


def decode(text: str) -> State:
    """Parse a state string; ValidationError if malformed, StaleStateError if
    it is of another format version."""
    if not text.startswith(MAGIC):
        raise ValidationError("state", f"not a virtlease state (expected it to start with {MAGIC!r})")
    head, _, body = text[len(MAGIC):].partition(" ")
    if not head.isdigit():
        raise ValidationError("state", f"bad format version {head[:20]!r}")
    if int(head) != VERSION:
        raise StaleStateError(f"state is format {head}, this virtlease reads format {VERSION}")
    try:
        data = json.loads(body)
        resources = tuple(
            StateResource(kind=str(r["kind"]), res=str(r["res"]), rid=str(r["rid"]), mode=str(r["mode"]),
                          token=_int(r["token"]), xgen=None if r.get("xgen") is None else _int(r["xgen"]),
                          legacy=None if r.get("legacy") is None else str(r["legacy"]))
            for r in data["res"]
        )
        state = State(
            kind=str(data["kind"]), cluster=str(data["cluster"]), prefix=str(data["prefix"]),
            host=str(data["host"]), uuid=str(data["uuid"]), name=str(data["name"]),
            resources=resources, revision=_int(data["rev"]),
            to=None if data.get("to") is None else str(data["to"]),
            marker=None if data.get("marker") is None else str(data["marker"]),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValidationError("state", f"malformed or truncated state ({type(exc).__name__}: {exc})") from None
    if state.kind not in (RESUME, HANDOFF):
        raise ValidationError("state", f"unknown state kind {state.kind!r}")
    if state.kind == HANDOFF and (state.to is None or state.marker is None):
        raise ValidationError("state", "handoff state without destination or marker")
    return state


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value
