"""Guest side: the fence layer's device code (``virtlease_etcd.fence``) on the guest's devices.

:func:`reservations` drives ``scsi_pr`` on one LUN through two hosts' nexuses (host A through a
dm-multipath map of two paths) and reports what the kernel's target did; :func:`watchdog_pets`
arms ``fence.watchdog`` and stops petting (the lab machine watches QMP for the expiry);
:func:`watchdog_disarmed` checks the magic close.
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Any

from virtlease_etcd.fence import luns, scsi_pr
from virtlease_etcd.fence.watchdog import Watchdog, describe

from . import scsilab


def _write(device: str) -> str:
    """One 4 KiB O_DIRECT write: "ok" or the errno's name."""
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    buf.write(b"\x5a" * 4096)
    try:
        os.pwrite(fd, buf, 0)
        return "ok"
    except OSError as exc:
        import errno

        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    finally:
        os.close(fd)


def reservations() -> dict[str, Any]:
    """A registers (every path of its multipath map), reserves WERO, B registers; both write;
    B preempts A: A's writes fail on every path, B's go on; A cannot read its key back."""
    found = scsilab.standard()
    dev_a, dev_b = found["devices"]["control"]["A"], found["devices"]["control"]["B"]
    storage_a, storage_b = luns.storage_of(dev_a), luns.storage_of(dev_b)
    assert storage_a is not None and storage_b is not None
    (lun_a,), (lun_b,) = storage_a.luns, storage_b.luns
    out: dict[str, Any] = {"stack_a": storage_a.stack, "paths_a": list(lun_a.paths), "paths_b": list(lun_b.paths),
                           "same_wwid": lun_a.wwid == lun_b.wwid, "not_local": luns.storage_of("/tmp") is None}
    key_a, key_b = 0x0A0A0A0A0A0A0A0A, 0x0B0B0B0B0B0B0B0B
    with scsi_pr.Path(lun_b.paths[0]) as b:
        out["capabilities"] = sorted(int(t) for t in b.report_capabilities().types)
        b.clear(key_b) if key_b in b.read_keys().keys else None
        t0 = time.perf_counter()
        for path in lun_a.paths:
            with scsi_pr.Path(path) as p:
                p.register(key_a, ignore_existing=True)
        out["register_ms_per_path"] = round((time.perf_counter() - t0) * 1000 / len(lun_a.paths), 2)
        with scsi_pr.Path(lun_a.paths[0]) as a:
            a.reserve(key_a)
        b.register(key_b, ignore_existing=True)
        keys = b.read_keys()
        out["keys"] = [hex(k) for k in keys.keys]
        held = b.read_reservation()
        out["reservation"] = [hex(held.key or 0), held.type_name]
        out["writes_before"] = {"A": _write(dev_a), "B": _write(dev_b)}
        b.preempt(key_b, key_a)
        out["writes_after"] = {"A": [_write(dev_a) for _ in range(4)], "B": _write(dev_b)}  # both of A's paths
        out["keys_after"] = [hex(k) for k in b.read_keys().keys]
        held = b.read_reservation()
        out["reservation_after"] = [hex(held.key or 0), held.type_name]
        try:
            b.reserve(key_b, scsi_pr.PrType.EXCLUSIVE_ACCESS)
            out["conflicting_reserve"] = "accepted"
        except scsi_pr.ReservationConflict as exc:
            out["conflicting_reserve"] = f"conflict: {exc}"
        b.clear(key_b)
        out["keys_cleared"] = list(b.read_keys().keys)
    return out


def watchdog_pets(timeout: int, pet_for: float) -> dict[str, Any]:
    """Arm the watchdog with ``timeout``, pet it for ``pet_for`` s, then stop petting (and
    return: the guest's QEMU pauses at the expiry).  The device stays open."""
    info = describe("/dev/watchdog")
    dog = Watchdog("/dev/watchdog", timeout)
    until = time.monotonic() + pet_for
    while time.monotonic() < until:
        dog.keepalive()
        time.sleep(0.2)
    _KEEP.append(dog)
    return {"identity": info.identity, "nowayout": info.nowayout, "timeout": dog.timeout,
            "min_timeout": info.min_timeout}


_KEEP: list[Watchdog] = []


def watchdog_release() -> None:
    """Close what :func:`watchdog_pets` left open (magic close): the device is free again."""
    while _KEEP:
        _KEEP.pop().disarm()


def watchdog_disarmed(timeout: int, quiet_for: float) -> dict[str, Any]:
    """Arm, pet, magic-close; then wait ``quiet_for`` s (the lab machine sees no expiry)."""
    while _KEEP:
        _KEEP.pop().abandon()
    dog = Watchdog("/dev/watchdog", timeout)
    dog.keepalive()
    stopped = dog.disarm()
    time.sleep(quiet_for)
    return {"stopped": stopped, "state": describe("/dev/watchdog").state}
