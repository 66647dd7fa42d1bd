"""Storage fencing and the watchdog in ``virtlease check`` and ``virtlease status``.

``check``: the watchdog arithmetic of the configuration (the configuration itself is refused
at load when it cannot hold: ``config.watchdog_plan``), what sysfs says of the watchdog device
(it is never opened here: opening arms it), and, for every ``--fence-device`` and every LUN
named in ``scsi_pr_luns``, whether each of this host's paths to it answers PERSISTENT RESERVE
IN and supports *Write Exclusive - Registrants Only*, with the keys registered now.

``status``: the registered keys and the reservation of each fenced LUN this host sees, each key
named by the live host whose lease it is (or "no live lease": the next grant preempts it).

See docs/DESIGN.md §11.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from virtlease_etcd.config import EtcdConfig
from virtlease_etcd.fence import luns as lunmap
from virtlease_etcd.fence import scsi_pr
from virtlease_etcd.fence.watchdog import describe
from virtlease_etcd.identity.blockdev import normalise_wwid
from virtlease_etcd.ops.status import ClusterStatus
from virtlease_etcd.session.storagefence import lun_report

from .probes import FAIL, INFO, OK, WARN, Report


def check_watchdog(report: Report, cfg: EtcdConfig) -> None:
    plan = cfg.watchdog
    if plan is None or cfg.watchdog_device is None:
        report.add("watchdog", INFO, "no watchdog_device: a host whose agent and guard stop (a frozen host) is "
                   "not reset; its late writes are refused only by storage fencing (scsi_pr_luns)")
        return
    report.add("watchdog arithmetic", OK,
               f"TTL {plan.ttl} s, keepalive every {plan.keepalive_every:g} s, fence at +{plan.fence_at:g} s, "
               f"watchdog timeout {plan.timeout} s petted every {plan.pet_every:g} s only while now + timeout <= "
               f"+{plan.deadline:g} s: a stopped host is reset by +{plan.deadline:g} s, earliest takeover "
               f"+{plan.takeover:g} s, lead >= {plan.lead:g} s (times after the last keepalive sent; "
               f"largest timeout that fits: {plan.max_timeout} s)")
    info = describe(cfg.watchdog_device)
    if info.sysfs is None:
        report.add("watchdog device", FAIL, f"{cfg.watchdog_device}: no watchdog device there (load the hardware "
                   "driver, e.g. iTCO_wdt / i6300esb / ipmi_watchdog, or softdog); ACQUIREs are refused until it is")
        return
    detail = (f"{cfg.watchdog_device}: {info.identity or 'unknown'}, timeouts {info.min_timeout or '?'}-"
              f"{info.max_timeout or '?'} s, state {info.state or '?'}, nowayout {info.nowayout}")
    if (info.min_timeout and plan.timeout < info.min_timeout) or (info.max_timeout and plan.timeout > info.max_timeout):
        report.add("watchdog device", FAIL, detail + f": it cannot take a {plan.timeout} s timeout")
    elif info.identity and "softdog" in info.identity.lower():
        report.add("watchdog device", WARN, detail + ": softdog is a kernel timer: it resets a host whose "
                   "processes stop, not one whose kernel hangs; use a hardware watchdog where there is one")
    elif info.nowayout:
        report.add("watchdog device", WARN, detail + ": nowayout: once armed it never stops; the agent keeps "
                   "petting it while idle, and any agent exit without restart within the timeout resets the host")
    else:
        report.add("watchdog device", OK, detail + (" (held open: by this host's agent?)"
                                                     if info.state == "active" else ""))


def _probe_lun(report: Report, lun: lunmap.Lun, cfg: EtcdConfig) -> None:
    name = f"scsi pr {lun.wwid}"
    fenced = "*" in cfg.scsi_pr_luns or normalise_wwid(lun.wwid) in {normalise_wwid(w) for w in cfg.scsi_pr_luns}
    for path in lun.paths:
        try:
            with scsi_pr.Path(path, cfg.scsi_pr_timeout) as p:
                caps = p.report_capabilities()
                keys = p.read_keys()
                held = p.read_reservation()
        except scsi_pr.PrError as exc:
            report.add(name, FAIL, f"{path}: {exc}")
            continue
        if not caps.supports(scsi_pr.WERO):
            report.add(name, FAIL, f"{path}: the device does not support Write Exclusive - Registrants Only")
            continue
        reservation = "none" if held.key is None else f"{held.type_name} by key {held.key:#x}"
        level = OK if held.key is None or held.type == scsi_pr.WERO else WARN
        report.add(name, level, f"{path}: persistent reservations work (WERO supported), {len(set(keys.keys))} key(s) "
                   f"registered, reservation {reservation}"
                   + ("" if fenced else "; not fenced: add it to scsi_pr_luns")
                   + ("" if level == OK else "; another reservation type: virtlease refuses to take it over"))
    report.add(name, INFO, f"{len(lun.paths)} path(s) on this host: {', '.join(lun.paths)}; PREEMPT AND ABORT "
               f"{'on' if cfg.scsi_pr_preempt_abort else 'off'} (it cannot be probed without preempting someone: "
               "turn scsi_pr_preempt_abort off for a target that does not implement it)")


def check_storage_fencing(report: Report, cfg: EtcdConfig, devices: Sequence[str]) -> None:
    if not cfg.scsi_pr_luns and not devices:
        report.add("storage fencing", INFO, "scsi_pr_luns is empty: the storage does not refuse a dead host's late "
                   "writes (see deploy/OPERATIONS.md, 'Fencing')")
        return
    probed: set[str] = set()
    for device in devices:
        try:
            storage = lunmap.storage_of(device)
        except OSError as exc:
            report.add("fence device", FAIL, f"{device}: {exc.strerror}")
            continue
        if storage is None or not storage.luns:
            uncovered = ", ".join(storage.uncovered) if storage else "a network or virtual file system"
            report.add("fence device", FAIL, f"{device}: not on a SCSI LUN ({uncovered}): persistent reservations "
                       "cannot fence it (NVMe, virtio and file storage get the watchdog only)")
            continue
        report.add("fence device", INFO, f"{device}: {storage.stack}: LUN(s) "
                   + ", ".join(lun.wwid for lun in storage.luns))
        for lun in storage.luns:
            probed.add(normalise_wwid(lun.wwid))
            _probe_lun(report, lun, cfg)
    here = lunmap.luns_by_wwid()
    for wwid in cfg.scsi_pr_luns:
        if wwid == "*" or normalise_wwid(wwid) in probed:
            continue
        found = next((lun for w, lun in here.items() if normalise_wwid(w) == normalise_wwid(wwid)), None)
        if found is None:
            report.add("storage fencing", WARN, f"scsi_pr_luns names {wwid}, which this host has no path to")
        else:
            _probe_lun(report, found, cfg)
    if "*" in cfg.scsi_pr_luns:
        report.add("storage fencing", INFO, "scsi_pr_luns = '*': every SCSI LUN under a locked disk is fenced")


def fencing_status(cfg: EtcdConfig, st: ClusterStatus) -> list[dict[str, object]]:
    """The keys on each fenced LUN this host sees (``lun_report``), hosts named from ``st``."""
    if not cfg.scsi_pr_luns:
        return []
    return lun_report(cfg, {h.lease: h.host for h in st.hosts if h.ttl_left > 0})


def fencing_table(entries: list[dict[str, object]]) -> RenderableType:
    table = Table()
    for col in ("LUN", "paths here", "registered key", "whose", "reservation"):
        table.add_column(col)
    for e in entries:
        if e.get("error"):
            table.add_row(str(e["wwid"]), ", ".join(e.get("paths", [])), "-", Text(str(e["error"]), style="red"), "-")  # type: ignore[arg-type]
            continue
        res = e.get("reservation")
        reservation = "none" if not isinstance(res, dict) else f"{res['type']} by {res['key']}"
        keys = e.get("keys") or []
        assert isinstance(keys, list)
        for i, k in enumerate(keys or [{"key": "-", "host": ""}]):
            whose = Text(f"host {k['host']}") if k.get("host") else Text("no live lease (preempted at the next grant)",
                                                                        style="yellow")
            table.add_row(str(e["wwid"]) if i == 0 else "", ", ".join(e["paths"]) if i == 0 else "",  # type: ignore[arg-type]
                          str(k["key"]), whose if k["key"] != "-" else "", reservation if i == 0 else "")
    return Group(Text("Storage fencing (SCSI persistent reservations seen from this host)", style="bold"), table)
