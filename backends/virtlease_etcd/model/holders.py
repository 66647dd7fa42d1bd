"""Holders, read out of etcd replies: who has a disk, for the busy error.

A failed grant's failure branch reads each resource's holder range and the
handoffs in flight; these turn those replies into ``virtlease.errors.Holder``
values that name the host, the domain, the mode, the token and any handoff
(docs/DESIGN.md §6).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from virtlease.errors import Holder

from . import keyspace as ks


def from_ranges(ranges: Sequence[Sequence[Any]], markers: Sequence[Any], rids: Sequence[ks.ResourceId],
                uuid: str) -> list[Holder]:
    """The conflicting holders read by a failed grant: the records of each resource
    (``ranges``, in the order of ``rids``: what we asked for) and the handoff markers in
    flight.  Other shared holders do not conflict with a shared request."""
    handoff_to: dict[tuple[str, str, str], str] = {}
    for kv in markers:
        try:
            rec = ks.decode(kv.value, kv.key.decode(errors="replace"))
            for r in rec.get("res") or []:  # a reservation lists only the disks released so far
                handoff_to[(str(rec.get("uuid")), str(rec.get("from")), str(r["rid"]))] = str(rec.get("to"))
        except (ks.ForeignValue, KeyError, TypeError):
            continue
    holders: list[Holder] = []
    seen: set[tuple[str, str, str, str, int]] = set()
    for kvs, rid in zip(ranges, rids, strict=False):
        mode = rid.mode
        for kv in kvs:
            holder = holder_of(kv, handoff_to, resource=rid.readable, rid=rid.rid)
            if mode == ks.SHARED and holder.mode == ks.SHARED and holder.domain_uuid != uuid:
                continue
            once = (holder.resource, holder.host, holder.domain_uuid, holder.mode, holder.token)
            if once in seen:  # one grant's identity and legacy path records: one holder
                continue
            seen.add(once)
            holders.append(holder)
    return holders


def holder_of(kv: Any, handoff_to: dict[tuple[str, str, str], str] | None = None, *,
              resource: str | None = None, rid: str | None = None) -> Holder:
    """The holder recorded at ``kv`` (the record of ``rid``).  ``handoff_to``: for each
    (domain uuid, giver host, rid) a marker lists, where it hands that record.  A value
    virtlease cannot read (foreign, corrupt, another format) is still a holder — never
    overwritten — and is reported under ``resource`` (the disk asked for) with its etcd key."""
    key = kv.key.decode(errors="replace")
    try:
        rec = ks.decode(kv.value, key)
        if not all(isinstance(rec.get(f), str) for f in ("res", "host", "uuid", "mode")):
            raise ks.ForeignValue(f"{key}: record without res/host/uuid/mode")
    except ks.ForeignValue as exc:
        return Holder(resource=resource or key, host="unknown", domain_name="unknown", domain_uuid="unknown",
                      mode=f"unreadable record at etcd key {key} ({exc}); remove it by hand if stale",
                      token=int(kv.mod_revision), since=0.0)
    uuid, host = str(rec.get("uuid")), str(rec.get("host"))
    return Holder(
        resource=str(rec.get("res")), host=host, domain_name=str(rec.get("name")), domain_uuid=uuid,
        mode=str(rec.get("mode")), token=int(kv.mod_revision), since=float(rec.get("since") or 0.0),
        handoff_to=(handoff_to or {}).get((uuid, host, str(rid))),
        note=ks.HOST_ONLY if ks.host_only(str(rec.get("identity") or "")) else None,
    )
