"""Storage fencing in a real kernel: SCSI-3 persistent reservations keyed by the etcd lease.

In the lab guest, hosts A (dm-multipath over two paths) and B (one path) share one LUN of the
kernel's SCSI target; each is a driver process talking to the etcd on this machine.  The proof
the issue asks for: a frozen host's late writes never land once the other host took the disk
(and do land without storage fencing: the test can fail), a fenced host comes back with a new
session and writes again, and migrations between live hosts preempt nobody.
"""

from __future__ import annotations

import json
import statistics
from typing import Any

from conftest import EtcdServer
from virtlease_lab.fencing.guest import LabGuest

from .conftest import guest_endpoint

FREEZE_CYCLES = 20
CONTROL_CYCLES = 3
TTL = 5


def test_one_lun_seen_by_both_hosts_with_one_wwid(lab: LabGuest) -> None:
    luns = lab.call("scsilab:standard")
    for lun in ("fenced", "control"):
        assert len({luns["paths"][nexus][lun] for nexus in ("A0", "A1", "B0")}) == 3
    assert luns["wwid"]["fenced"] != luns["wwid"]["control"]
    assert luns["devices"]["fenced"]["A"].startswith("/dev/mapper/")


def _freeze(lab: LabGuest, etcd: EtcdServer, prefix: str, pair: str, lun: str, fenced: bool,
            cycles: int) -> list[dict[str, Any]]:
    lab.call("scenarios:start_hosts", pair=pair, lun=lun, fenced=fenced,
             endpoints=guest_endpoint(etcd.endpoints), prefix=prefix, ttl=TTL)
    try:
        result: list[dict[str, Any]] = lab.call("scenarios:freeze", pair=pair, cycles=cycles,
                                                wait=cycles * 60)["cycles"]
    finally:
        lab.call("scenarios:stop_hosts", pair=pair)
    return result


def test_frozen_hosts_late_writes_never_land_with_storage_fencing(
        lab: LabGuest, etcd_process: EtcdServer, lab_prefix: str, record_property: Any) -> None:
    cycles = _freeze(lab, etcd_process, lab_prefix, "fz", "fenced", True, FREEZE_CYCLES)
    assert len(cycles) == FREEZE_CYCLES
    for c in cycles:
        assert c["overwrite_ok"] == 32 and c["overwrite_failed"] == 0, c  # the taker writes every block
        assert c["late_attempts"] >= 3, c  # the woken QEMU did try to write
        assert c["late_ok"] == 0 and set(c["late_errors"]) == {"EBADE"}, c  # RESERVATION CONFLICT
        assert c["late_landed"] == 0, c
        assert c["holder_fenced"], c  # and its own host fenced it once it ran again
        keys = c["keys_at_grant"]
        assert c["taker_lease"] in keys["keys"] and c["frozen_lease"] not in keys["keys"], c
        assert keys["reservation"] in keys["keys"] and keys["type"] == 5, c  # WERO, held by a live key
        assert c["renewed_lease"] != c["frozen_lease"]
    # every host was fenced and came back with a new session that registered and wrote again
    takers = {(c["taker"], c["taker_lease"]) for c in cycles}
    assert len(takers) == FREEZE_CYCLES
    landed = sum(c["late_landed"] for c in cycles)
    attempts = sum(c["late_attempts"] for c in cycles)
    takeover = [c["takeover_s"] for c in cycles]
    record_property("late_writes_landed", landed)
    record_property("late_write_attempts", attempts)
    print(f"\nstorage fencing, {FREEZE_CYCLES} freeze cycles: {attempts} late write attempts, {landed} landed; "
          f"takeover after the freeze p50 {statistics.median(takeover):.2f} s (TTL {TTL} s)")


def test_without_storage_fencing_late_writes_land(
        lab: LabGuest, etcd_process: EtcdServer, lab_prefix: str, record_property: Any) -> None:
    """The negative control: the same freeze on a LUN without fencing."""
    cycles = _freeze(lab, etcd_process, lab_prefix, "ctl", "control", False, CONTROL_CYCLES)
    landed = [c["late_landed"] for c in cycles]
    record_property("late_writes_landed_without_fencing", sum(landed))
    print(f"\nwithout storage fencing, {CONTROL_CYCLES} freeze cycles: late writes landed {landed}")
    assert all(n > 0 for n in landed), json.dumps(cycles, indent=1)
    assert all(c["late_ok"] > 0 and not c["late_errors"] for c in cycles), json.dumps(cycles, indent=1)
