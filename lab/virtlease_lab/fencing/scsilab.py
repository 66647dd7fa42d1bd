"""Guest side: shared LUNs from the kernel's SCSI target (LIO ``tcm_loop``), and dm-multipath.

:func:`setup` makes each LUN a file on the guest's tmpfs, exported through one ``tcm_loop``
target per *nexus* (one SCSI initiator-target pair: a path of a host).  Every nexus sees every
LUN as its own ``/dev/sdX`` with the LUN's one WWID, and LIO enforces SPC-3 persistent
reservations per nexus: a "host" is the set of nexuses it writes through.

Pitfalls met on the way (kept here so nobody meets them twice):

* the nexus must be set before a LUN is linked into the target, or the SCSI scan finds
  "I_T Nexus does not exist";
* a backstore needs ``wwn/vpd_unit_serial`` (the WWID), and LIO's ``dbroot`` (``/var/target``)
  needs a ``pr`` directory, or PR OUT REGISTER fails with "Device not ready": LIO rewrites its
  APTPL metadata file there on every registration change, from a kernel worker whose root is
  the initramfs, not the guest server's chroot -- so ``init.sh`` creates it in the initramfs;
* PREEMPT AND ABORT hangs in ``tcm_loop`` (its task-management path): the lab fences with
  plain PREEMPT (``scsi_pr_preempt_abort = false``).

:func:`multipath` puts a dm-multipath device over some of those paths (``dmsetup``, no
multipathd: the table names the paths), with the dm uuid multipathd would give it
(``mpath-3<wwid>``), so its identity is the LUN's WWID like the plain paths'.
"""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONFIGFS = Path("/sys/kernel/config/target")
BACKING = Path("/tmp/luns")


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _sd_devices() -> set[str]:
    return {os.path.basename(p) for p in glob.glob("/sys/block/sd*")}


def _wwid(dev: str) -> str:
    return Path(f"/sys/block/{dev}/device/wwid").read_text().strip()


def setup(luns: list[str], nexuses: list[str], size_mb: int = 16) -> dict[str, object]:
    """LUNs ``luns`` (names) seen through nexuses ``nexuses`` (names); returns
    ``{"wwid": {lun: wwid}, "paths": {nexus: {lun: "/dev/sdX"}}}``.  Idempotent per name."""
    BACKING.mkdir(parents=True, exist_ok=True)
    serials: dict[str, str] = {}
    for index, lun in enumerate(luns):
        store = CONFIGFS / "core" / f"fileio_{index}" / lun
        serials[lun] = f"6001405{index:02x}1ab{os.getpid() % 0xffff:04x}c"
        if (store / "enable").exists() and store.joinpath("enable").read_text().strip() == "1":
            serials[lun] = store.joinpath("wwn", "vpd_unit_serial").read_text().split(":")[-1].strip()
            continue
        store.mkdir(parents=True, exist_ok=True)
        backing = BACKING / f"{lun}.img"
        with open(backing, "wb") as fh:
            fh.truncate(size_mb << 20)
        _write(store / "control", f"fd_dev_name={backing},fd_dev_size={size_mb << 20}")
        _write(store / "wwn" / "vpd_unit_serial", serials[lun])
        _write(store / "enable", "1")
    paths: dict[str, dict[str, str]] = {}
    for n, nexus in enumerate(nexuses):
        wwn = f"naa.5001405{n:03x}00000a0"
        tpg = CONFIGFS / "loopback" / wwn / "tpgt_1"
        before = _sd_devices()
        if not tpg.exists():
            tpg.mkdir(parents=True)
            _write(tpg / "nexus", f"naa.5001405{n:03x}000aa01")
        for index, lun in enumerate(luns):
            link = tpg / "lun" / f"lun_{index}" / "virtual_scsi_port"
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(CONFIGFS / "core" / f"fileio_{index}" / lun)
        new: set[str] = set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            new = _sd_devices() - before
            if len(new) >= len(luns) and all(Path(f"/sys/block/{d}/device/wwid").exists() for d in new):
                break
            time.sleep(0.05)
        host = _scsi_host(tpg)
        mine = {d for d in _sd_devices() if _host_of(d) == host}
        by_serial = {}
        for dev in mine:
            wwid = _wwid(dev)
            for lun, serial in serials.items():
                if serial.replace("-", "") in wwid.replace("-", ""):
                    by_serial[lun] = f"/dev/{dev}"
        missing = [lun for lun in luns if lun not in by_serial]
        if missing:
            raise RuntimeError(f"nexus {nexus} (scsi host {host}): no disk for LUN(s) {missing}; "
                               f"have {sorted(mine)}")
        paths[nexus] = by_serial
    wwids = {lun: _wwid(os.path.basename(paths[nexuses[0]][lun])) for lun in luns}
    return {"wwid": wwids, "paths": paths}


_STANDARD: dict[str, Any] = {}


def standard() -> dict[str, Any]:
    """The lab's LUNs (set up once per guest): ``fenced`` and ``control``, each seen through
    nexuses A0, A1 (host A) and B0 (host B), host A's two paths of each joined by dm-multipath:
    ``{"wwid": {lun: wwid}, "paths": {nexus: {lun: /dev/sdX}}, "devices": {lun: {"A": map, "B": sdX}}}``."""
    if not _STANDARD:
        found = setup(["fenced", "control"], ["A0", "A1", "B0"])
        paths: dict[str, dict[str, str]] = found["paths"]  # type: ignore[assignment]
        wwids: dict[str, str] = found["wwid"]  # type: ignore[assignment]
        devices = {lun: {"A": multipath(f"mp-{lun}", [paths["A0"][lun], paths["A1"][lun]], wwids[lun]),
                         "B": paths["B0"][lun]} for lun in ("fenced", "control")}
        _STANDARD.update(wwid=wwids, paths=paths, devices=devices)
    return dict(_STANDARD)


def _scsi_host(tpg: Path) -> str:
    """The SCSI host (``hostN``) of a tcm_loop target's nexus."""
    address = (tpg / "address").read_text().strip()  # "N:0:T": scsi host, channel, target
    return f"host{address.split(':')[0]}"


def _host_of(dev: str) -> str:
    real = os.path.realpath(f"/sys/block/{dev}/device")
    return next((part for part in real.split("/") if part.startswith("host")), "")


def multipath(name: str, paths: list[str], wwid: str) -> str:
    """A dm-multipath device ``/dev/mapper/<name>`` over ``paths`` (round-robin, one group),
    with dm uuid ``mpath-3<naa hex>`` as multipathd would name it; returns its node."""
    nodes = [f"{os.major(os.stat(p).st_rdev)}:{os.minor(os.stat(p).st_rdev)}" for p in paths]
    size = int(Path(f"/sys/block/{os.path.basename(paths[0])}/size").read_text())
    table = f"0 {size} multipath 0 0 1 1 round-robin 0 {len(nodes)} 1 " + " ".join(f"{n} 1" for n in nodes)
    hex_id = wwid.split(".", 1)[1] if wwid.startswith("naa.") else wwid
    env = {**os.environ, "DM_DISABLE_UDEV": "1"}
    subprocess.run(["dmsetup", "create", name, "--uuid", f"mpath-3{hex_id}", "--table", table],
                   check=True, capture_output=True, text=True, env=env)
    return f"/dev/mapper/{name}"


def remove_multipath(name: str) -> None:
    subprocess.run(["dmsetup", "remove", name], check=False, capture_output=True,
                   env={**os.environ, "DM_DISABLE_UDEV": "1"})
