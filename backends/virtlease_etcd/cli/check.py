"""``virtlease check``: is this configuration safe to run VMs with?

Validates the configuration, then asks every endpoint for its status (health,
version, leader) with a linearizable read (which needs quorum), checks the
etcd version against known data-loss bugs, the TTL against the election
timeout, write permission under the prefix (a probe key on a probe lease,
deleted and revoked), what already lives under the prefix, and the clocks.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import click
from etcd3 import transactions as tx
from rich.table import Table
from rich.text import Text

from virtlease.cli.exitcodes import ExitCode
from virtlease.cli.output import out, print_json
from virtlease.errors import BackendUnavailableError
from virtlease_etcd.config import EtcdConfig
from virtlease_etcd.etcd.client import EtcdClient, PermissionDenied, TransientError

from .fencing import check_storage_fencing, check_watchdog
from .options import Settings, etcd_client, etcd_command, fetch_status
from .probes import BAD_VERSIONS, FAIL, INFO, OK, WARN, EndpointReport, Report, check_endpoints, parse_version

_STYLE = {OK: ("✔ ok", "green"), INFO: ("• info", "cyan"), WARN: ("! warn", "yellow"), FAIL: ("✘ FAIL", "bold red")}


def _check_version(report: Report, healthy: list[EndpointReport]) -> None:
    versions = sorted({r.version for r in healthy if r.version})
    for text in versions:
        parsed = parse_version(text)
        if parsed is None:
            report.add("etcd version", WARN, f"cannot parse version {text!r}")
        elif parsed in BAD_VERSIONS:
            report.add("etcd version", WARN,
                       f"etcd {text} has the 3.5.0-3.5.2 data inconsistency bug: a member killed while "
                       "applying writes can come back without some committed writes (etcd-io/etcd#13766). "
                       "Use 3.5.3 or newer (the newest 3.5.x) for anything but throwaway test clusters")
        elif parsed < (3, 4, 0):
            report.add("etcd version", WARN, f"etcd {text} is older than 3.4: untested, upgrade")
        else:
            report.add("etcd version", OK, f"etcd {text}")
    if len(versions) > 1:
        report.add("etcd version", INFO, f"members run different versions ({', '.join(versions)}): "
                   "fine during a rolling upgrade only")


def _check_ttl(report: Report, cfg: EtcdConfig, election_timeout: float) -> None:
    ttl, margin = cfg.ttl, cfg.margin
    report.add("ttl", INFO,
               f"TTL {ttl}s: keepalive every {ttl / 3:.1f}s; a host that cannot refresh fences its VMs "
               f"{ttl - margin:.1f}s after the last keepalive it sent ({margin:.1f}s before etcd can expire "
               f"the lease); a crashed host's disks are free after ~{ttl}s")
    if ttl < 5:
        report.add("ttl", WARN, f"TTL {ttl}s is short: a leader election, a slow etcd disk or a GC pause can "
                   "delay keepalives enough to fence healthy hosts (false fencing). Use >= 5s (10s default) "
                   "outside demos and tests")
    if ttl < 5 * election_timeout:
        report.add("ttl vs election", WARN,
                   f"TTL {ttl}s is not well above the election timeout ({election_timeout:g}s): keepalives "
                   "stall for up to an election timeout during a leader change. Keep TTL >= 5x the "
                   "election timeout")
    else:
        report.add("ttl vs election", OK, f"TTL {ttl}s >= 5x election timeout {election_timeout:g}s "
                   "(etcd does not report its election timeout: pass --election-timeout if yours differs "
                   "from etcd's default 1s)")
    if cfg.request_timeout > ttl / 3:
        report.add("request timeout", WARN,
                   f"request_timeout {cfg.request_timeout:g}s exceeds the keepalive interval {ttl / 3:.1f}s: "
                   "a hung keepalive leaves fewer retries before the fence deadline")


def _check_write(report: Report, client: EtcdClient, cfg: EtcdConfig) -> None:
    key = f"{cfg.prefix}/check-probe/{cfg.host_id}.{secrets.token_hex(4)}"
    lease_id = 0
    try:
        lease_id, granted = client.lease_grant(cfg.ttl, timeout=cfg.request_timeout)
        client.txn([], [tx.Put(key, b"virtlease check probe", lease=lease_id)], timeout=cfg.request_timeout)
        kvs, _ = client.get_range(key, timeout=cfg.request_timeout)
        client.txn([], [tx.Delete(key)], timeout=cfg.request_timeout)
        left, _ = client.get_range(key, timeout=cfg.request_timeout)
        if not kvs or left:
            report.add("write permission", FAIL, f"probe {key} was not written and deleted as expected")
        else:
            report.add("write permission", OK, f"lease grant, put, read and delete under {cfg.prefix}/ work")
        if granted != cfg.ttl:
            report.add("lease ttl", FAIL, f"etcd granted TTL {granted}s for a requested {cfg.ttl}s: its minimum "
                       "lease TTL (1.5x election timeout) is above the configured TTL; raise ttl")
    except PermissionDenied as exc:
        report.add("write permission", FAIL, f"{exc}: the user needs readwrite on {cfg.prefix}/ "
                   "(deploy/etcd/rbac.sh)")
    except (TransientError, BackendUnavailableError) as exc:
        report.add("write permission", FAIL, f"probe write failed: {exc}")
    finally:
        if lease_id:
            try:
                client.lease_revoke(lease_id, timeout=cfg.request_timeout)
            except Exception as exc:
                report.add("write permission", WARN, f"could not revoke probe lease {lease_id:x} "
                           f"(it expires in {cfg.ttl}s): {exc}")


def _check_contents(report: Report, client: EtcdClient, cfg: EtcdConfig) -> None:
    try:
        st = fetch_status(client, cfg)
    except Exception as exc:
        report.add("prefix contents", FAIL, f"cannot read {cfg.prefix}/: {exc}")
        return
    report.add("prefix contents", OK if not st.problems else WARN,
               f"{len(st.hosts)} live host(s), {len(st.resources)} held resource(s), "
               f"{len(st.handoffs)} handoff(s) in flight" + (
                   f"; {len(st.problems)} foreign key(s) under the prefix: {st.problems[0]}" if st.problems else ""))
    mine = [h for h in st.hosts if h.host == cfg.host_id and h.ttl_left > 0]
    if mine:
        report.add("host id", INFO, f"host_id {cfg.host_id!r} has a live session (pid {mine[0].pid}): a second "
                   "session with this host_id is refused until it ends; host_id must be unique per host")
    else:
        report.add("host id", OK, f"host_id {cfg.host_id!r} is free")


def _check_clock(report: Report, healthy: list[EndpointReport], cfg: EtcdConfig) -> None:
    report.add("clock", INFO,
               "safety relies on monotonic clocks advancing at the same rate on every host and etcd member "
               f"(drift well below the fence margin, {cfg.margin:.1f}s per {cfg.ttl}s TTL), not on wall "
               "clocks agreeing; wall time only labels 'since'. Rate drift is not measurable from here")
    skews = [(r.endpoint, r.clock_skew) for r in healthy if r.clock_skew is not None]
    if not skews:
        report.add("clock skew", INFO, "no wall-clock skew measurable: etcd 3.5 does not report its time over "
                   "gRPC and its HTTP Date header was not available")
        return
    worst_ep, worst = max(skews, key=lambda s: abs(s[1]))
    detail = ("wall clock vs etcd members (HTTP Date, ±1s resolution): "
              + ", ".join(f"{ep} {skew:+.1f}s" for ep, skew in skews))
    if abs(worst) > 2.0:
        report.add("clock skew", WARN, detail + f"; {worst_ep} differs by {worst:+.1f}s: run NTP/chrony "
                   "everywhere ('since' times will be off, and unmanaged clocks often drift in rate too)")
    else:
        report.add("clock skew", OK, detail)


def render(report: Report, cfg: EtcdConfig) -> None:
    out.print(f"[bold]virtlease check[/] of {','.join(cfg.endpoints)} prefix {cfg.prefix} "
              f"host_id {cfg.host_id}")
    if report.endpoints:
        eps = Table()
        for col in ("endpoint", "health", "version", "member", "leader", "raft term", "db size", "latency"):
            eps.add_column(col)
        for r in report.endpoints:
            health = Text("healthy", style="green") if r.healthy else Text(f"unhealthy: {r.error}", style="red")
            eps.add_row(r.endpoint, health, r.version or "-", r.member_id or "-",
                        ("this member" if r.is_leader else r.leader_id or "-"),
                        str(r.raft_term) if r.raft_term is not None else "-",
                        f"{r.db_size / 1024:.0f} KiB" if r.db_size is not None else "-",
                        f"{r.latency_ms:.0f} ms" if r.latency_ms is not None else "-")
        out.print(Text("Endpoints", style="bold"), eps)
    table = Table()
    table.add_column("result", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("detail")
    for f in report.findings:
        label, style = _STYLE[f.level]
        table.add_row(Text(label, style=style), f.check, f.detail)
    out.print(Text("Checks", style="bold"), table)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option("--election-timeout", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              metavar="SECONDS", help="The cluster's --election-timeout (etcd does not report it).")
@click.option("--strict", is_flag=True, help="Exit non-zero on warnings too.")
@click.option("--fence-device", "fence_devices", multiple=True, metavar="DEVICE",
              help="Probe SCSI persistent reservations on the LUN(s) under DEVICE, every path (repeatable).")
@etcd_command
@click.pass_context
def check(ctx: click.Context, settings: Settings, as_json: bool, election_timeout: float, strict: bool,
          fence_devices: tuple[str, ...]) -> None:
    """Validate the configuration and reach the cluster.

    Checks every endpoint (health, version, leader), the etcd version, the TTL
    against the election timeout, write permission under the prefix (a probe
    key, removed again), the prefix's contents and the clocks; the watchdog
    (arithmetic, device) and storage fencing (persistent reservations on every
    path of each fenced LUN and --fence-device) when configured.

    \b
    Exit codes: 0 healthy (warnings allowed unless --strict), 1 a check failed,
    2 bad configuration, 4 no endpoint reachable.
    """
    cfg = settings.load()
    report = Report()
    report.add("configuration", OK,
               f"endpoints {','.join(cfg.endpoints)}, prefix {cfg.prefix}, host_id {cfg.host_id}, ttl {cfg.ttl}s, "
               f"fence margin {cfg.margin:.1f}s, request timeout {cfg.request_timeout:g}s, "
               f"TLS {'on' if cfg.tls else 'off'}, auth {'user ' + cfg.user if cfg.user else 'none'}, "
               f"default action {cfg.default_action.name.lower()}")
    check_watchdog(report, cfg)
    check_storage_fencing(report, cfg, fence_devices)
    healthy = check_endpoints(report, cfg)
    if healthy:
        _check_version(report, healthy)
    _check_ttl(report, cfg, election_timeout)
    if healthy:
        with etcd_client(dataclasses.replace(cfg, endpoints=tuple(r.endpoint for r in healthy))) as client:
            _check_write(report, client, cfg)
            _check_contents(report, client, cfg)
        _check_clock(report, healthy, cfg)
    worst = report.worst()
    ok = worst == OK or (worst == WARN and not strict)
    if as_json:
        data: dict[str, Any] = {
            "ok": ok, "worst": worst,
            "findings": [dataclasses.asdict(f) for f in report.findings],
            "endpoints": [dataclasses.asdict(r) for r in report.endpoints],
        }
        print_json(data)
    else:
        render(report, cfg)
        verdict = {OK: "[green]all checks passed[/]", WARN: "[yellow]passed with warnings[/]",
                   FAIL: "[bold red]FAILED[/]"}[worst]
        out.print(f"virtlease check: {verdict}")
    if not healthy:
        ctx.exit(ExitCode.UNREACHABLE)
    if not ok:
        ctx.exit(ExitCode.FAILED)
