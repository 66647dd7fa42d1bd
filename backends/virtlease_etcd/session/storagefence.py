"""Storage fencing: SCSI-3 persistent reservations keyed by the host's etcd lease.

What a caller may rely on (docs/DESIGN.md §11):

* **The key is the lease.**  A host registers its session's etcd lease id (8 bytes) as its
  reservation key on every path (I_T nexus) it has to a fenced LUN.  A lease id is unique in
  the cluster, so "is this key a live session?" is one read of the host records in etcd.
* **Before a grant on a fenced LUN is reported** (:meth:`StorageFence.secure`): this host's key
  is registered on all its paths, a *Write Exclusive - Registrants Only* reservation is in
  place, and every registered key that is not the lease of a live session of this cluster is
  preempted (PREEMPT AND ABORT, or PREEMPT with ``scsi_pr_preempt_abort = false``).  The keys
  are read *before* the host records, so a session that registered before the keys were read
  has its host record in etcd at the later read: a live session's key is never preempted (a
  migration keeps both hosts registered).  A dead holder's lease is gone from etcd before any
  other host can be granted its disks, so the grant's own read already misses it: its late
  writes fail with RESERVATION CONFLICT at the array, whatever its clocks and processes do.
* **A preempted key is never registered again.**  If this session registered a LUN and finds
  its key gone, it was preempted (the cluster took its lease for dead): the session is lost,
  its owners fenced.  A *new* session registers its new key only once every QEMU fenced by an
  older session of this process has exited (:func:`remember_fenced`): registering the host
  again would let a paused or stuck old QEMU's writes through.
* **WERO held by someone else's type** (another cluster or tool on the LUN) is refused, never
  taken over.  Keys are never unregistered: a reservation must always be in place, or any
  unregistered initiator could write; a dead host's key is removed by the next grant's preempt.

Which LUNs: ``scsi_pr_luns`` (WWIDs, or ``*`` for every SCSI LUN under a locked disk); a disk
path's LUNs and paths come from ``fence.luns`` (partitions, LVM and dm-multipath followed).
Disks on network or virtual file systems have no LUN and are not fenced this way.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from virtlease_etcd.config import EtcdConfig
from virtlease_etcd.fence import luns as lunmap
from virtlease_etcd.fence import scsi_pr
from virtlease_etcd.fence.errors import FencingError
from virtlease_etcd.identity.blockdev import normalise_wwid
from virtlease_etcd.model import keyspace as ks

if TYPE_CHECKING:
    from .hostsession import HostSession

log = logging.getLogger(__name__)

_FENCED: dict[tuple[int, int], str] = {}
_FENCED_LOCK = threading.Lock()


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def remember_fenced(pid: int | None, who: str) -> None:
    """A QEMU this process fenced (or found running on a lease it could not continue): no new
    key is registered on this host until it has exited."""
    if pid is None:
        return
    start = _start_time(pid)
    if start is not None:
        with _FENCED_LOCK:
            _FENCED[(pid, start)] = who


def fenced_survivors() -> list[str]:
    """The remembered fenced QEMUs that still run (a zombie counts as gone)."""
    with _FENCED_LOCK:
        for key in [k for k in _FENCED if _start_time(k[0]) != k[1]]:
            del _FENCED[key]
        return [f"{who} (pid {pid})" for (pid, _s), who in _FENCED.items()]


@dataclass(frozen=True)
class Secured:
    """What :meth:`StorageFence.secure` did on one LUN (for logs and the lab)."""

    wwid: str
    registered: bool
    reserved: bool
    preempted: tuple[int, ...]


class StorageFence:
    """The persistent-reservation fencing of one host session."""

    def __init__(self, session: HostSession, cfg: EtcdConfig, *, sysfs: str = "/sys", dev_root: str = "/dev") -> None:
        self.session = session
        self.cfg = cfg
        self.sysfs = sysfs
        self.dev_root = dev_root
        self.every = "*" in cfg.scsi_pr_luns
        self.wwids = {normalise_wwid(w) for w in cfg.scsi_pr_luns if w != "*"}
        self._registered: set[str] = set()
        """LUNs (normalised WWIDs) this session registered its key on."""
        self._lock = threading.Lock()
        self.durations: deque[float] = deque(maxlen=256)
        """Seconds each :meth:`secure` with a fenced LUN took (the cost on the grant path)."""
        self.preempted = 0
        """Keys this session preempted."""

    @property
    def key(self) -> int:
        return self.session.lease_id

    def covers(self, wwid: str) -> bool:
        return self.every or normalise_wwid(wwid) in self.wwids

    def luns_of(self, paths: Iterable[str]) -> list[lunmap.Lun]:
        """The fenced LUNs under the disks at ``paths`` (each LUN once)."""
        found: dict[str, lunmap.Lun] = {}
        for path in paths:
            try:
                storage = lunmap.storage_of(path, sysfs=self.sysfs, dev_root=self.dev_root)
            except OSError as exc:
                raise FencingError(f"host {self.cfg.host_id}: cannot find the storage of {path} to fence it: "
                                   f"{exc.strerror}; nothing was granted") from None
            if storage is None:
                continue
            mine = [lun for lun in storage.luns if self.covers(lun.wwid)]
            if mine and storage.uncovered:
                log.warning("host %s: %s (%s) is also on %s, which persistent reservations cannot fence",
                            self.cfg.host_id, path, storage.stack, ", ".join(storage.uncovered))
            for lun in mine:
                found.setdefault(normalise_wwid(lun.wwid), lun)
        return list(found.values())

    def secure(self, paths: Sequence[str]) -> list[Secured]:
        """Make the fenced LUNs under ``paths`` safe to report a grant on (module docstring).
        FencingError (one line: the LUN, the key, what to do) if it cannot; LeaseLostError
        if this session's key was preempted."""
        started = self.session.clock.now()
        lun_list = self.luns_of(paths)
        if not lun_list:
            return []
        with self._lock:
            done = [self._secure(lun) for lun in lun_list]
        self.durations.append(self.session.clock.now() - started)
        self.preempted += sum(len(d.preempted) for d in done)
        return done

    def _fail(self, lun: lunmap.Lun, what: str, exc: Exception | None = None) -> FencingError:
        detail = f": {exc}" if exc is not None else ""
        return FencingError(f"host {self.cfg.host_id}: LUN {lun.wwid} ({', '.join(lun.paths)}): {what}{detail}; "
                            "nothing was granted")

    def _secure(self, lun: lunmap.Lun) -> Secured:
        key, wwid = self.key, normalise_wwid(lun.wwid)
        try:
            with scsi_pr.Path(lun.paths[0], self.cfg.scsi_pr_timeout) as first:
                keys = first.read_keys().keys
                registered = False
                if key not in keys:
                    if wwid in self._registered:
                        self.session.lease_gone(f"its reservation key {key:#x} was preempted on LUN {lun.wwid}: "
                                                "another host took this host's lease for dead")
                        self.session.check()
                    self._register(lun, key)
                    registered = True
                elif keys.count(key) < len(lun.paths):
                    self._register(lun, key)  # a path added since (the same key: idempotent)
                    registered = True
                self._registered.add(wwid)
                reserved = self._reserve(first, lun, key)
                others = sorted(set(keys) - {key})
                preempted = self._preempt(first, lun, key, others) if others else ()
        except scsi_pr.PrError as exc:
            raise self._fail(lun, "persistent reservation command failed", exc) from None
        if registered or reserved or preempted:
            log.info("host %s: LUN %s: key %#x %s%s%s", self.cfg.host_id, lun.wwid, key,
                     "registered on " + ", ".join(lun.paths) if registered else "in place",
                     ", reserved (Write Exclusive - Registrants Only)" if reserved else "",
                     f", preempted {', '.join(f'{k:#x}' for k in preempted)} (no live lease)" if preempted else "")
        return Secured(lun.wwid, registered, reserved, preempted)

    def _register(self, lun: lunmap.Lun, key: int) -> None:
        survivors = fenced_survivors()
        if survivors:
            raise self._fail(lun, f"not registering this host's new key {key:#x}: {'; '.join(survivors)} "
                             "was fenced by an earlier session and still runs, and would write again once "
                             "this host is registered; destroy it (virsh destroy), then retry")
        for path in lun.paths:
            with scsi_pr.Path(path, self.cfg.scsi_pr_timeout) as p:
                p.register(key, ignore_existing=True)

    def _reserve(self, first: scsi_pr.Path, lun: lunmap.Lun, key: int) -> bool:
        held = first.read_reservation()
        if held.key is None:
            try:
                first.reserve(key, scsi_pr.WERO)
                return True
            except scsi_pr.ReservationConflict:
                held = first.read_reservation()  # another host reserved it meanwhile
        if held.type != scsi_pr.WERO:
            raise self._fail(lun, f"it has a {held.type_name} reservation by key {held.key:#x}, not Write "
                             "Exclusive - Registrants Only: another cluster or tool reserves it; virtlease "
                             "will not take it over (release it there, or take the LUN out of scsi_pr_luns)")
        return False

    def _preempt(self, first: scsi_pr.Path, lun: lunmap.Lun, key: int, others: Sequence[int]) -> tuple[int, ...]:
        live = self.live_leases()
        done = []
        for victim in others:
            if victim in live:
                continue
            try:
                first.preempt(key, victim, scsi_pr.WERO, abort=self.cfg.scsi_pr_preempt_abort)
            except scsi_pr.ReservationConflict:
                if victim in first.read_keys().keys:  # not just preempted by another host meanwhile
                    raise
                continue
            log.warning("host %s: LUN %s: preempted key %#x (no live lease of this cluster has that id): "
                        "its writes are refused by the storage from now on", self.cfg.host_id, lun.wwid, victim)
            done.append(victim)
        return tuple(done)

    def live_leases(self) -> set[int]:
        """The lease ids of every live session of this cluster (one read of the host records)."""
        session = self.session
        hosts = session.keys.hosts
        kvs, _rev = session.client.retrying(
            lambda timeout: session.client.get_range(hosts, ks.range_end(hosts), timeout=timeout),
            deadline=session.deadline())
        return {int(kv.lease) for kv in kvs if int(kv.lease)}


def lun_report(cfg: EtcdConfig, hosts_by_lease: dict[int, str], *, sysfs: str = "/sys",
               dev_root: str = "/dev") -> list[dict[str, object]]:
    """The keys and reservation on each fenced LUN this host sees (``virtlease status``):
    ``[{"wwid", "paths", "keys": [{"key", "host"}], "reservation": {"key", "type", "host"},
    "error"}]``; a key's host is None when no live session has that lease."""
    every = "*" in cfg.scsi_pr_luns
    wanted = {normalise_wwid(w) for w in cfg.scsi_pr_luns if w != "*"}
    out: list[dict[str, object]] = []
    seen: set[str] = set()
    for wwid, lun in sorted(lunmap.luns_by_wwid(sysfs=sysfs, dev_root=dev_root).items()):
        if not every and normalise_wwid(wwid) not in wanted:
            continue
        seen.add(normalise_wwid(wwid))
        entry: dict[str, object] = {"wwid": wwid, "paths": list(lun.paths)}
        try:
            with scsi_pr.Path(lun.paths[0], cfg.scsi_pr_timeout) as p:
                keys = p.read_keys().keys
                held = p.read_reservation()
        except scsi_pr.PrError as exc:
            entry["error"] = str(exc)
            out.append(entry)
            continue
        if every and not keys and held.key is None:
            continue  # '*': only the LUNs that take part
        entry["keys"] = [{"key": f"{k:#018x}", "host": hosts_by_lease.get(k)} for k in sorted(set(keys))]
        entry["reservation"] = None if held.key is None else {
            "key": f"{held.key:#018x}", "type": held.type_name, "host": hosts_by_lease.get(held.key)}
        out.append(entry)
    out += [{"wwid": w, "paths": [], "error": "this host has no path to it"} for w in sorted(wanted - seen)]
    return out
