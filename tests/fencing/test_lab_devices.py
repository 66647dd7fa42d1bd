"""The fence layer's device code on a real kernel (the lab guest): SCSI-3 persistent
reservations through LIO, on every path of a dm-multipath map, and a watchdog device."""

from __future__ import annotations

from virtlease_lab.fencing.guest import LabGuest, now


def test_preempted_host_cannot_write_through_any_path(lab: LabGuest) -> None:
    r = lab.call("devices:reservations")
    assert r["same_wwid"] and r["not_local"]
    assert len(r["paths_a"]) == 2 and r["stack_a"].startswith("dm-") and len(r["paths_b"]) == 1
    assert 5 in r["capabilities"]  # Write Exclusive - Registrants Only
    assert r["keys"].count(hex(0x0A0A0A0A0A0A0A0A)) == 2  # one registration per path of A
    assert r["reservation"] == [hex(0x0A0A0A0A0A0A0A0A), "Write Exclusive - Registrants Only"]
    assert r["writes_before"] == {"A": "ok", "B": "ok"}
    assert r["writes_after"] == {"A": ["EBADE"] * 4, "B": "ok"}  # round robin: both of A's paths refuse
    assert r["keys_after"] == [hex(0x0B0B0B0B0B0B0B0B)]
    assert r["reservation_after"] == [hex(0x0B0B0B0B0B0B0B0B), "Write Exclusive - Registrants Only"]
    assert r["conflicting_reserve"].startswith("conflict")
    assert r["keys_cleared"] == []
    print(f"\nPR REGISTER: {r['register_ms_per_path']} ms per path (TCG guest)")


def test_watchdog_fires_when_the_pets_stop_and_not_after_a_magic_close(lab: LabGuest) -> None:
    lab.set_watchdog_action("pause")
    since = now()
    lab.call("devices:watchdog_disarmed", timeout=1, quiet_for=3.0)
    assert lab.qmp.wait_event("WATCHDOG", 0.5, since=since) is None
    info = lab.call("devices:watchdog_pets", timeout=1, pet_for=2.0)
    assert info["timeout"] == 1 and info["identity"] == "i6300ESB timer"
    stopped = now()
    event = lab.qmp.wait_event("WATCHDOG", 10, since=since)
    assert event is not None and event.data["action"] == "pause"
    print(f"\nwatchdog (timeout 1 s) expired {event.at - stopped:.2f} s after the last pet")
    assert event.at - stopped < 3
    lab.resume()
    lab.call("devices:watchdog_release")  # the device is free for the next module's agent
