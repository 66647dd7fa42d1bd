"""The watchdog armed by the lease, with the real agent in the lab guest.

The agent (``watchdog_device = /dev/watchdog``, the guest's emulated i6300esb) holds a disk for
a stand-in QEMU; the test SIGSTOPs the agent and its guard, so nothing of that host can fence
any more.  The watchdog must expire -- QEMU's watchdog action, seen on QMP -- strictly before
etcd expires the host's lease, the earliest moment another host could be granted the disk.
The lead is measured on this machine's clock: QMP's WATCHDOG event as it arrives, and the
first poll (every 5 ms) that finds the host record gone from etcd.  The last run uses QEMU's
``poweroff`` action: the guest really dies.

A watchdog expiry while the agent was *not* stopped is a false reset: the machine's load
starved the guest's agent for longer than the timeout (which is what a watchdog is for, on a
real host).  Such a run is counted, recovered and run again; it says nothing about the lead.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import pytest

from virtlease_etcd.config import watchdog_plan
from virtlease_lab.etcdserver import EtcdServer
from virtlease_lab.fencing.guest import LabGuest, now

from .conftest import guest_endpoint

RUNS = 20
TTL = 8  # the guest runs under TCG on a shared machine: a shorter TTL starves its keepalives
MARGIN = TTL / 5
TIMEOUT = watchdog_plan(TTL, MARGIN).max_timeout  # the largest that fits: 4 s


def _expiry(etcd: EtcdServer, key: str, lease: int, found: dict[str, float], stop: threading.Event) -> None:
    client = etcd.client()
    try:
        while not stop.is_set():
            value, meta = client.get(key)
            if value is None or meta.lease_id != lease:
                found["at"] = now()
                return
            time.sleep(0.005)
    finally:
        client.close()


def _run_vm(lab: LabGuest, name: str) -> dict[str, Any] | None:
    """Start a VM through the agent; None if the watchdog fired meanwhile (a false reset)."""
    since = now()
    result: dict[str, Any] = {}
    failed: list[BaseException] = []

    def run() -> None:
        try:
            result.update(lab.call("wdlab:run_vm", name=name))
        except BaseException as exc:
            failed.append(exc)

    call = threading.Thread(target=run, daemon=True)
    call.start()
    while call.is_alive():
        if lab.qmp.wait_event("WATCHDOG", 0.2, since=since) is not None:
            lab.resume()
            call.join()  # whatever it says now: the run is void
            lab.call("wdlab:drop_vm")
            return None
    if failed:
        raise failed[0]
    return result


@pytest.mark.timeout(RUNS * 90)
def test_a_stopped_host_is_reset_before_etcd_expires_its_lease(
        lab: LabGuest, etcd_process: EtcdServer, lab_prefix: str, record_property: Any) -> None:
    assert TIMEOUT >= 1
    lab.set_watchdog_action("pause")
    lab.call("wdlab:start_agent", endpoints=guest_endpoint(etcd_process.endpoints), prefix=lab_prefix,
             ttl=TTL, timeout=TIMEOUT)
    leads: list[float] = []
    false_resets = 0
    key = f"{lab_prefix}/v1/hosts/wd-host"
    started = time.monotonic()
    while len(leads) < RUNS:
        assert false_resets <= RUNS, "the watchdog kept firing on a running agent: is the machine overloaded?"
        run = len(leads) + 1
        last = run == RUNS
        began = now()
        vm = _run_vm(lab, f"wd{run}-{false_resets}")
        if vm is None or lab.qmp.wait_event("WATCHDOG", 0, since=began) is not None:
            if vm is not None:
                lab.resume()
                lab.call("wdlab:drop_vm")
            false_resets += 1
            continue
        m = vm["metrics"]
        assert m["virtlease_agent_watchdog_armed"] == 1 and m["virtlease_agent_watchdog_timeout_seconds"] == TIMEOUT
        assert 0 <= m["virtlease_agent_watchdog_last_pet_age_seconds"] < TIMEOUT, m
        if last:
            lab.set_watchdog_action("poweroff")
        found: dict[str, float] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=_expiry, args=(etcd_process, key, vm["lease"], found, stop), daemon=True)
        watcher.start()
        stopped = now()
        lab.call("wdlab:stop_host")
        event = lab.qmp.wait_event("WATCHDOG", TTL + 20, since=began)
        watcher.join(TTL + 20)
        stop.set()
        assert event is not None, f"run {run}: the watchdog never fired: {lab.console_tail()}"
        assert "at" in found, f"run {run}: the lease never expired"
        lead = found["at"] - event.at
        expired = now()
        if event.at < stopped:  # it fired before the stop: a false reset while the agent ran
            false_resets += 1
            lab.resume()
            lab.call("wdlab:continue_host")
            continue
        leads.append(lead)
        line = (f"run {run}: stopped -> reset {event.at - stopped:.2f} s, reset -> lease expiry {lead:.2f} s "
                f"(VM start {stopped - began:.1f} s")
        assert lead > 0, f"run {run}: etcd expired the lease {-lead:.2f} s before the watchdog reset the host"
        if last:
            assert lab.wait_exit(30) is not None, "QEMU's poweroff action did not end the guest"
        else:
            lab.resume()
            after = lab.call("wdlab:continue_host")["metrics"]
            assert after["virtlease_agent_watchdog_armed"] == 0, after  # fenced: nothing left to guard
            line += f", recovery {now() - expired:.1f} s"
        print(line + ")")
    record_property("seconds_per_run", round((time.monotonic() - started) / RUNS, 1))
    record_property("false_resets", false_resets)
    record_property("reset_lead_min_s", round(min(leads), 3))
    record_property("reset_lead_median_s", round(statistics.median(leads), 3))
    print(f"\nwatchdog, {RUNS} runs (TTL {TTL} s, margin {MARGIN:g} s, watchdog timeout {TIMEOUT} s): reset before "
          f"the earliest takeover by min {min(leads):.2f} s, median {statistics.median(leads):.2f} s; "
          f"{false_resets} false reset(s) of a starved agent run again")
