"""Handoff marker bytes: what a marker lists and checking a state's marker
before a claim (docs/DESIGN.md "Migration"; why a claim failed is
``plan.explain``).

A marker's entry per record: ``res`` (readable: the giver's path and the
disk's identity), ``rid``, ``mode``, ``kind``, ``token`` and, for a disk's
legacy path key, ``legacy`` (the rid of its identity key).
"""

from __future__ import annotations

from typing import Any

from virtlease.errors import StaleStateError
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.model import statestring as st
from virtlease_etcd.session.owners import Held

from .domain import Domain

RESERVED = "*"
"""The ``to`` of a reservation marker: any host, for the same domain UUID."""


def entry(h: Held) -> dict[str, Any]:
    out: dict[str, Any] = {"res": h.rid.readable, "rid": h.rid.rid, "mode": h.rid.mode, "kind": h.rid.kind,
                             "token": h.token}
    if h.rid.legacy_of is not None:
        out["legacy"] = h.rid.legacy_of
    return out


def read_marker(d: Domain, parsed: st.State) -> tuple[bytes, dict[str, int]]:
    """The marker bytes the claim compares, checked to name this host, this
    domain and the state's source, and the records' tokens it lists (every
    record it marked, by rid: the claim moves those this host also locks and
    drops the giver's legacy path keys it does not)."""
    assert parsed.marker is not None
    raw = parsed.marker.encode()
    head = f"cannot claim the handoff of {d.where()}; nothing changed: "
    try:
        marker = ks.decode(raw, "handoff marker")
        listed = {(str(r["rid"]), str(r["mode"])): int(r["token"]) for r in marker["res"]}
        legacy = {(str(r["rid"]), str(r["mode"])) for r in marker["res"] if r.get("legacy") is not None}
    except (ks.ForeignValue, KeyError, TypeError, ValueError):
        raise StaleStateError(head + "the state's handoff marker is unreadable (tampered)") from None
    if marker.get("to") not in (d.host, RESERVED) or parsed.to not in (d.host, RESERVED):
        raise StaleStateError(head + f"the handoff is to host {marker.get('to')}, this host is {d.host}")
    if marker.get("uuid") != d.spec.uuid or marker.get("from") != parsed.host:
        raise StaleStateError(head + "the marker is of another domain or source host (tampered state)")
    if {(r.rid, r.mode): r.token for r in parsed.resources} != listed:
        raise StaleStateError(head + "the state's tokens differ from the marker's (tampered state)")
    if {(r.rid, r.mode) for r in parsed.resources if r.legacy is not None} != legacy:
        raise StaleStateError(head + "the state's legacy keys differ from the marker's (tampered state)")
    return raw, {rid: token for (rid, _mode), token in listed.items()}
