"""``virtlease check``: is this configuration safe to run VMs with?

Validates the configuration and its TLS files, then asks every endpoint for its health
(status, alarms, a linearizable read, which needs quorum; no permission needed: ``probes``),
judges the etcd version against the versions tested and known data-loss bugs, the TTL against
the election timeout, the etcd user and its permission under the prefix (``access``: a probe
key on a probe lease, deleted and revoked; ``--read-only``: a read), what already lives under
the prefix, and the clocks.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from virtlease.cli.exitcodes import ExitCode
from virtlease.cli.output import out, print_json
from virtlease.errors import ConfigError
from virtlease_etcd.clock import SYSTEM
from virtlease_etcd.config import EtcdConfig
from virtlease_etcd.etcd.client import EtcdClient
from virtlease_etcd.etcd.tlsfiles import ClientCertificate, check_tls_files

from .access import check_access, identify
from .fencing import check_storage_fencing, check_watchdog
from .options import Settings, etcd_client, etcd_command, fetch_status
from .probes import (
    FAIL,
    INFO,
    OK,
    WARN,
    EndpointReport,
    Report,
    check_endpoints,
    judge_version,
    parse_version,
)
from .storage import storage_roots

_STYLE = {OK: ("✔ ok", "green"), INFO: ("• info", "cyan"), WARN: ("! warn", "yellow"), FAIL: ("✘ FAIL", "bold red")}


def _check_version(report: Report, healthy: list[EndpointReport]) -> None:
    versions = sorted({r.version for r in healthy if r.version})
    for text in versions:
        parsed = parse_version(text)
        if parsed is None:
            report.add("etcd version", WARN, f"cannot parse version {text!r}")
        else:
            level, detail = judge_version(parsed)
            report.add("etcd version", level, f"etcd {text}: {detail}")
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


def _check_contents(report: Report, client: EtcdClient, cfg: EtcdConfig, *, read_only: bool) -> None:
    try:
        st = fetch_status(client, cfg)
    except Exception as exc:
        report.add("prefix contents", FAIL, f"cannot read {cfg.prefix}/: {exc}")
        return
    report.add("prefix contents", OK if not st.problems else WARN,
               f"{len(st.hosts)} live host(s), {len(st.resources)} held resource(s), "
               f"{len(st.handoffs)} handoff(s) in flight" + (
                   f"; {len(st.problems)} foreign key(s) under the prefix: {st.problems[0]}" if st.problems else ""))
    if read_only:
        return  # a monitoring user is no host: its host_id means nothing
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
    table.add_column("check", overflow="fold", max_width=32)
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
@click.option("--read-only", is_flag=True,
              help="For monitoring users: check read permission under the prefix, not write; no host checks.")
@click.option("--fence-device", "fence_devices", multiple=True, metavar="DEVICE",
              help="Probe SCSI persistent reservations on the LUN(s) under DEVICE, every path (repeatable).")
@etcd_command
@click.pass_context
def check(ctx: click.Context, settings: Settings, as_json: bool, election_timeout: float, strict: bool,
          read_only: bool, fence_devices: tuple[str, ...]) -> None:
    """Validate the configuration and reach the cluster.

    Checks the TLS files, every endpoint's health (status, alarms, a quorum read; no
    permission needed), the etcd version, the TTL against the election timeout, the etcd user
    and its permission under the prefix (a host: write, with a probe key removed again;
    --read-only: read), the prefix's contents and the clocks; the watchdog (arithmetic,
    device) and storage fencing (persistent reservations on every path of each fenced LUN
    and --fence-device) when configured.

    \b
    Exit codes: 0 healthy (warnings allowed unless --strict), 1 a check failed
    (e.g. permission), 2 bad configuration, 4 no endpoint reachable.
    """
    cfg = settings.load()
    cert = check_tls_files(cfg)
    report = Report()
    report.add("configuration", OK,
               f"endpoints {','.join(cfg.endpoints)}, prefix {cfg.prefix}, host_id {cfg.host_id}, ttl {cfg.ttl}s, "
               f"fence margin {cfg.margin:.1f}s, request timeout {cfg.request_timeout:g}s, "
               f"TLS {'on' if cfg.tls else 'off'}, auth {'user ' + cfg.user if cfg.user else 'none'}, "
               f"default action {cfg.default_action.name.lower()}" + (", read-only check" if read_only else ""))
    if cert is not None:
        _check_certificate(report, cert)
    if not read_only:  # this host's own devices: not a monitoring user's business
        check_watchdog(report, cfg)
        check_storage_fencing(report, cfg, fence_devices)
    healthy = check_endpoints(report, cfg)
    if healthy:
        _check_version(report, healthy)
    if not read_only:
        _check_ttl(report, cfg, election_timeout)
        _check_storage(report, cfg)
    if healthy:
        try:
            with etcd_client(dataclasses.replace(cfg, endpoints=tuple(r.endpoint for r in healthy))) as client:
                if check_access(report, client, cfg, identify(client, cfg, cert), read_only=read_only):
                    _check_contents(report, client, cfg, read_only=read_only)
        except ConfigError as exc:  # authentication refused
            report.add("authentication", FAIL, str(exc))
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


def _check_storage(report: Report, cfg: EtcdConfig) -> None:
    """One row per storage root this host sees: how a disk there is named (``storage``)."""
    try:
        roots = storage_roots(cfg)
    except OSError as exc:
        report.add("storage", WARN, f"cannot read this host's mount table: {exc}")
        return
    for root in roots:
        where = f"{root.fstype} {root.source}" if root.fstype != "identity_map" else "identity_map"
        report.add(f"storage {root.path}", INFO, f"{where}: {root.naming}"
                   + ("" if root.cluster_wide or cfg.strict_identity else
                      "; a host reaching a disk there by another path is not excluded: set identity_map for "
                      "shared storage (strict_identity refuses such disks)"))


def _check_certificate(report: Report, cert: ClientCertificate) -> None:
    expiry = time.strftime("%Y-%m-%d", time.gmtime(cert.not_after)) if cert.not_after else "unknown"
    detail = (f"{cert.path}: CN={cert.common_name or '?'} (with client-certificate auth etcd takes the CN as "
              f"the user), expires {expiry}")
    if cert.expired:
        report.add("client certificate", FAIL, detail + ": it has expired; issue a new one (deploy/etcd/make-certs.sh)")
    elif cert.not_after is not None and cert.not_after - SYSTEM.wall() < 30 * 86400:
        report.add("client certificate", WARN, detail + ": in less than 30 days; issue a new one in time")
    else:
        report.add("client certificate", OK, detail)
