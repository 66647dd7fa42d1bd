"""Storage fencing and the watchdog outside the lab: the arithmetic, the configuration refusals,
the LUN walk over a sysfs tree, and what a host without the hardware does (real etcd).

The behaviour on real devices -- persistent reservations, a watchdog that fires -- is proven in
the lab guest (tests/fencing/); this machine has neither a SCSI target nor a watchdog.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import virtlease as v
from virtlease.errors import ConfigError
from virtlease_etcd.config import load_config, watchdog_plan
from virtlease_etcd.fence import luns, scsi_pr
from virtlease_etcd.fence.errors import FencingError
from virtlease_lab.cliproc import clean_env, opts, run
from virtlease_lab.drivers import new_uuid, shut
from virtlease_lab.etcdserver import EtcdServer, dump


@pytest.mark.parametrize(("ttl", "margin", "timeout", "reset", "lead"), [
    (10, 2.0, 5, 9.0, 1.0),   # the defaults: docs/DESIGN.md section 11's table
    (8, 1.6, 4, 7.2, 0.8),    # the lab's watchdog runs
    (6, 1.2, 3, 5.4, 0.6),
    (5, 1.0, 2, 4.5, 0.5),
    (30, 6.0, 16, 27.0, 3.0),
])
def test_the_watchdog_arithmetic_of_the_design_table(ttl: int, margin: float, timeout: int, reset: float,
                                                     lead: float) -> None:
    plan = watchdog_plan(ttl, margin)
    assert (plan.timeout, plan.deadline, plan.lead, plan.takeover) == (timeout, reset, lead, ttl)
    assert plan.fence_at == ttl - margin < plan.deadline < plan.takeover
    # the pets never pause on a healthy host: just before a keepalive, deadline - now = 2ttl/3 - margin/2
    assert plan.timeout + plan.pet_every <= 2 * ttl / 3 - margin / 2
    assert plan.pet_every <= margin / 4  # after a fence, pets resume before the watchdog runs out
    assert not watchdog_plan(ttl, margin, timeout + 1).fits


def test_a_watchdog_the_lease_cannot_hold_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"watchdog_timeout: 6 s does not fit TTL 10 s .* use at most 5 s"):
        load_config({"watchdog_device": "/dev/watchdog", "watchdog_timeout": 6}, environ={})
    with pytest.raises(ConfigError, match="leaves no room for a watchdog"):
        load_config({"watchdog_device": "/dev/watchdog", "ttl": 2, "fence_margin": 0.9}, environ={})
    with pytest.raises(ConfigError, match="set watchdog_device too"):
        load_config({"watchdog_timeout": 3}, environ={})
    cfg = load_config({"watchdog_device": "/dev/watchdog"}, environ={})
    assert cfg.watchdog is not None and cfg.watchdog.timeout == 5


def test_fenced_luns_are_configured_by_wwid_or_star() -> None:
    cfg = load_config({}, environ={"VIRTLEASE_ETCD_SCSI_PR_LUNS": "naa.6001405aa, 36001405bb"})
    assert cfg.scsi_pr_luns == ("naa.6001405aa", "36001405bb")
    assert load_config({"scsi_pr_luns": ["*"]}, environ={}).scsi_pr_luns == ("*",)
    with pytest.raises(ConfigError, match="scsi_pr_luns"):
        load_config({"scsi_pr_luns": "/dev/sdb"}, environ={})


def _disk(root: Path, name: str, dev: str, *, wwid: str | None = None, slaves: tuple[str, ...] = (),
          partitions: dict[str, str] | None = None) -> None:
    """A block device in a sysfs tree: ``block/<name>`` -> ``devices/.../<name>``."""
    real = root / "devices" / ("virtual" if not wwid else "scsi") / "block" / name
    real.mkdir(parents=True)
    (real / "dev").write_text(dev)
    (real / "uevent").write_text(f"MAJOR={dev.split(':')[0]}\nDEVNAME={name}\n")
    if wwid is not None:
        (real / "device" / "scsi_disk").mkdir(parents=True)
        (real / "device" / "wwid").write_text(wwid + "\n")
    (real / "slaves").mkdir()
    for slave in slaves:
        (real / "slaves" / slave).symlink_to(root / "devices" / "scsi" / "block" / slave)
    (root / "block").mkdir(exist_ok=True)
    (root / "block" / name).symlink_to(real)
    (root / "dev" / "block").mkdir(parents=True, exist_ok=True)
    (root / "dev" / "block" / dev).symlink_to(real)
    for part, pdev in (partitions or {}).items():
        (real / part).mkdir()
        (real / part / "partition").write_text("1")
        (real / part / "dev").write_text(pdev)
        (root / "dev" / "block" / pdev).symlink_to(real / part)


def test_a_disk_is_followed_down_to_every_path_of_its_luns(tmp_path: Path) -> None:
    """An LV on a multipath map's partition reaches the LUN's two paths; an NVMe leaf is named
    as not coverable; each path is the /dev node udev would make."""
    sysfs = tmp_path / "sys"
    _disk(sysfs, "sdb", "8:16", wwid="naa.600140511", partitions={"sdb1": "8:17"})
    _disk(sysfs, "sdc", "8:32", wwid="naa.600140511")
    _disk(sysfs, "sdd", "8:48", wwid="naa.600140522")
    (sysfs / "devices" / "nvme" / "block").mkdir(parents=True)
    _disk(sysfs, "nvme0n1", "259:0")
    _disk(sysfs, "dm-0", "253:0", slaves=("sdb", "sdc"), partitions={"dm-0p1": "253:1"})
    (sysfs / "devices" / "virtual" / "block" / "dm-2").mkdir(parents=True)
    lv = sysfs / "devices" / "virtual" / "block" / "dm-2"
    (lv / "slaves").mkdir()
    (lv / "slaves" / "dm-0").symlink_to(sysfs / "devices" / "virtual" / "block" / "dm-0")
    (lv / "slaves" / "nvme0n1").symlink_to(sysfs / "devices" / "virtual" / "block" / "nvme0n1")
    (sysfs / "dev" / "block" / "253:2").symlink_to(lv)

    lv_storage = luns.storage_of_device(253, 2, sysfs=str(sysfs), dev_root="/dev")
    assert lv_storage.luns == (luns.Lun("naa.600140511", ("/dev/sdb", "/dev/sdc")),)
    assert lv_storage.uncovered == ("nvme0n1",) and lv_storage.stack == "dm-2 <- dm-0, sdb, sdc, nvme0n1"
    part = luns.storage_of_device(8, 17, sysfs=str(sysfs), dev_root="/dev")  # a partition: its disk
    assert part.luns == (luns.Lun("naa.600140511", ("/dev/sdb",)),)
    assert set(luns.luns_by_wwid(sysfs=str(sysfs), dev_root="/dev")) == {"naa.600140511", "naa.600140522"}
    assert luns.storage_of(str(tmp_path)) is None or luns.storage_of(str(tmp_path)).luns == ()  # type: ignore[union-attr]


def test_sense_data_is_read_in_both_formats() -> None:
    fixed = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0x00])
    descriptor = bytes([0x72, 0x06, 0x2A, 0x03])
    assert scsi_pr._sense(fixed, len(fixed)) == (0x5, 0x20, 0)
    assert "no persistent reservations" in scsi_pr._describe(scsi_pr._sense(fixed, len(fixed)))
    assert scsi_pr._sense(descriptor, 4) == (0x6, 0x2A, 0x03)
    assert scsi_pr._sense(b"", 0) is None


def test_a_watchdog_that_cannot_be_armed_refuses_every_grant(etcd: EtcdServer, prefix: str, kv: Any,
                                                             tmp_path: Path) -> None:
    """This machine has no watchdog device: a host configured with one is granted nothing, and
    says why (a running VM elsewhere would be unaffected: nothing else changes)."""
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 512)
    plugin = v.load_driver("etcd", config={"endpoints": etcd.endpoints, "prefix": prefix, "host_id": "wd-less",
                                           "ttl": 5, "watchdog_device": str(tmp_path / "watchdog")},
                           capabilities=v.Capability.RESOURCES)
    try:
        before = {k: val for k, val in dump(kv, prefix).items() if "/hosts/" not in k}
        obj = plugin.new_object(uuid=new_uuid(), name="vm1", pid=os.getpid())
        obj.add_resource(v.ResourceType.DISK, str(disk))
        with pytest.raises(FencingError, match=r"watchdog .*/watchdog: cannot open: No such file .* grants nothing"):
            obj.acquire()
        assert {k: val for k, val in dump(kv, prefix).items() if "/hosts/" not in k} == before
        assert plugin.driver.watchdog is not None and not plugin.driver.watchdog.armed
    finally:
        shut(plugin)


def test_storage_fencing_leaves_disks_on_no_scsi_lun_alone(etcd: EtcdServer, prefix: str, tmp_path: Path) -> None:
    """``*`` fences every SCSI LUN under a locked disk: a file here has none, so the grant is an
    ordinary one (the lab proves the LUN case)."""
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 512)
    plugin = v.load_driver("etcd", config={"endpoints": etcd.endpoints, "prefix": prefix, "host_id": "pr-host",
                                           "ttl": 5, "scsi_pr_luns": ["*"]}, capabilities=v.Capability.RESOURCES)
    try:
        obj = plugin.new_object(uuid=new_uuid(), name="vm1", pid=os.getpid())
        obj.add_resource(v.ResourceType.DISK, str(disk))
        obj.acquire()
        assert [h.token for h in obj.held()] and list(plugin.driver.session.storage.durations) == []
        obj.release()
    finally:
        shut(plugin)


def test_check_reports_the_watchdog_and_a_device_persistent_reservations_cannot_fence(
        etcd_process: EtcdServer, prefix: str, tmp_path: Path) -> None:
    env = clean_env(VIRTLEASE_ETCD_WATCHDOG_DEVICE=str(tmp_path / "watchdog"), VIRTLEASE_ETCD_SCSI_PR_LUNS="*")
    result = run(*opts(etcd_process, prefix, ttl=6), "check", "--json", "--fence-device", str(tmp_path), env=env)
    assert result.returncode == 1, result.stderr
    findings = {(f["check"], f["level"]): f["detail"] for f in json.loads(result.stdout)["findings"]}
    arithmetic = findings[("watchdog arithmetic", "ok")]
    assert "timeout 3 s" in arithmetic and "reset by +5.4 s" in arithmetic and "lead >= 0.6 s" in arithmetic
    assert "no watchdog device there" in findings[("watchdog device", "fail")]
    assert "not on a SCSI LUN" in findings[("fence device", "fail")]


def test_check_refuses_a_watchdog_timeout_the_lease_cannot_hold(etcd_process: EtcdServer, prefix: str) -> None:
    env = clean_env(VIRTLEASE_ETCD_WATCHDOG_DEVICE="/dev/watchdog", VIRTLEASE_ETCD_WATCHDOG_TIMEOUT="4")
    result = run(*opts(etcd_process, prefix, ttl=6), "check", env=env)
    assert result.returncode == 2
    assert "watchdog_timeout: 4 s does not fit TTL 6 s" in result.stderr and "use at most 3 s" in result.stderr
