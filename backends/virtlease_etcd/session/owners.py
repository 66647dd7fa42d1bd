"""Owners: what each domain holds on this host (docs/DESIGN.md "Owners").

Holds belong to an *owner* — a domain (UUID) on this host — never to a
Python lock object: libvirt makes a fresh lock object for every operation
(start, pause, resume, inquire, hotplug) and adds the disks again each
time.  A host session keeps one :class:`Owner` per domain that holds or is
registered; any object of that domain finds it by UUID.

The table is this process's knowledge of what it wrote.  It is never taken
as proof: every transaction that changes a record compares, in etcd, that
the record is still exactly the one this owner wrote (its ``mod_revision``
is the owner's token).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from virtlease.abi import FailureAction
from virtlease_etcd.model import keyspace as ks


@dataclass(frozen=True)
class Held:
    """One resource an owner holds: its key, the grant's token and the bytes written."""

    rid: ks.ResourceId
    key: str
    token: int
    value: bytes


@dataclass(frozen=True)
class Handoff:
    """A handoff marker this owner wrote: the records it lists are marked for ``to``."""

    to: str
    key: str
    value: bytes

    @cached_property
    def rids(self) -> frozenset[str]:
        """The rids of the records the marker lists (a reservation may list only some of the
        owner's records: those released while the others stay plainly held)."""
        try:
            return frozenset(str(r["rid"]) for r in ks.decode(self.value, self.key)["res"])
        except (ks.ForeignValue, KeyError, TypeError):
            return frozenset()


@dataclass(frozen=True)
class Policy:
    """What a driver instance asked for; an owner keeps the policy of the
    driver instance that granted it (two drivers of one host may differ)."""

    default_action: FailureAction
    restart_callback: Callable[[Any], None] | None = None

    def resolve(self, action: FailureAction) -> FailureAction:
        return self.default_action if action is FailureAction.DEFAULT else action


@dataclass(eq=False)
class Owner:
    """One domain on this host.  Mutated under ``lock`` by the object calls;
    the fence reads it without the lock (it must never wait)."""

    uuid: str
    name: str
    pid: int | None = None
    action: FailureAction = FailureAction.POWEROFF
    """Resolved failure action (never DEFAULT)."""
    policy: Policy | None = None
    held: dict[str, Held] = field(default_factory=dict)
    registered: bool = False
    handoff: Handoff | None = None
    claimed_from: str | None = None
    handed_back: bool = False
    """complete_migrate_in(cancel=True) marked the records back for the source."""
    fenced: str | None = None
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def active(self) -> bool:
        """Anything in etcd on this host's lease for the domain."""
        return bool(self.held or self.registered or self.handoff)

    @property
    def protects_a_vm(self) -> bool:
        """The domain may be running on this host on the strength of these records."""
        return self.active and not self.handed_back


class Owners:
    """The owners of one host session, by domain UUID."""

    def __init__(self) -> None:
        self._by_uuid: dict[str, Owner] = {}
        self._lock = threading.Lock()

    def get(self, uuid: str, name: str) -> Owner:
        with self._lock:
            owner = self._by_uuid.get(uuid)
            if owner is None:
                owner = self._by_uuid[uuid] = Owner(uuid=uuid, name=name)
            return owner

    def peek(self, uuid: str) -> Owner | None:
        with self._lock:
            return self._by_uuid.get(uuid)

    def forget_if_idle(self, owner: Owner) -> None:
        with self._lock:
            if not owner.active and self._by_uuid.get(owner.uuid) is owner:
                del self._by_uuid[owner.uuid]

    def all(self) -> list[Owner]:
        with self._lock:
            return list(self._by_uuid.values())
