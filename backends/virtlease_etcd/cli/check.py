"""``virtlease check``: is this configuration safe to run VMs with?

Validates the configuration, then asks every endpoint for its status (health,
version, leader) with a linearizable read (which needs quorum), checks the
etcd version against known data-loss bugs, the TTL against the election
timeout, write permission under the prefix (a probe key on a probe lease,
deleted and revoked), what already lives under the prefix, and the clocks.
"""

from __future__ import annotations

import dataclasses
import email.utils
import secrets
import ssl
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import click
from etcd3 import transactions as tx
from rich.table import Table
from rich.text import Text

from virtlease.cli.exitcodes import ExitCode
from virtlease.cli.output import out, print_json
from virtlease.errors import BackendUnavailableError

from ..client import EtcdClient, PermissionDenied, TransientError
from ..config import EtcdConfig
from .options import Settings, etcd_client, etcd_command, fetch_status

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"
_STYLE = {OK: ("✔ ok", "green"), INFO: ("• info", "cyan"), WARN: ("! warn", "yellow"), FAIL: ("✘ FAIL", "bold red")}

#: etcd releases in which a member killed while applying entries can lose committed writes
#: (etcd-io/etcd#13766, fixed in 3.5.3).
BAD_VERSIONS = ((3, 5, 0), (3, 5, 1), (3, 5, 2))


@dataclass
class Finding:
    """One line of the check report."""

    check: str
    level: str
    detail: str


@dataclass
class EndpointReport:
    """What one endpoint said."""

    endpoint: str
    healthy: bool
    error: str | None = None
    version: str | None = None
    member_id: str | None = None
    leader_id: str | None = None
    is_leader: bool = False
    raft_term: int | None = None
    db_size: int | None = None
    alarms: list[str] = field(default_factory=list)
    latency_ms: float | None = None
    cluster_id: str | None = None
    clock_skew: float | None = None
    """Seconds the member's wall clock is ahead of ours (from its HTTP Date header)."""


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    endpoints: list[EndpointReport] = field(default_factory=list)

    def add(self, check: str, level: str, detail: str) -> None:
        self.findings.append(Finding(check, level, detail))

    def worst(self) -> str:
        levels = {f.level for f in self.findings}
        return FAIL if FAIL in levels else WARN if WARN in levels else OK


def parse_version(text: str) -> tuple[int, int, int] | None:
    parts = text.split("-")[0].split(".")
    try:
        return int(parts[0]), int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        return None


def _probe_endpoint(cfg: EtcdConfig, endpoint: str) -> EndpointReport:
    single = dataclasses.replace(cfg, endpoints=(endpoint,))
    report = EndpointReport(endpoint=endpoint, healthy=False)
    try:
        client = EtcdClient(single)
    except Exception as exc:  # auth failure at connect: ConfigError / BackendUnavailableError
        report.error = str(exc)
        return report
    try:
        started = time.monotonic()
        st = client.status(timeout=cfg.request_timeout)
        # A linearizable read goes through the leader: it fails without quorum.
        client.get_range(f"{cfg.prefix}/check-probe", timeout=cfg.request_timeout)
        report.latency_ms = (time.monotonic() - started) * 1000
        report.version = str(st.version)
        report.member_id = f"{st.header.member_id:x}"
        report.cluster_id = f"{st.header.cluster_id:x}"
        report.leader_id = f"{st.leader:x}" if st.leader else None
        report.is_leader = bool(st.leader) and st.leader == st.header.member_id
        report.raft_term = int(st.raftTerm)
        report.db_size = int(st.dbSize)
        report.alarms = [str(e) for e in getattr(st, "errors", [])]
        report.healthy = not report.alarms and bool(st.leader)
        if not st.leader:
            report.error = "no leader (no quorum?)"
        elif report.alarms:
            report.error = "alarm: " + "; ".join(report.alarms)
    except (TransientError, BackendUnavailableError, PermissionDenied) as exc:
        report.error = str(exc)
    finally:
        client.close()
    if report.version is not None:
        report.clock_skew = _clock_skew(cfg, endpoint)
    return report


def _clock_skew(cfg: EtcdConfig, endpoint: str) -> float | None:
    """The member's wall clock minus ours, from the HTTP Date header of its
    /version endpoint (one-second resolution); None if not measurable."""
    scheme = "https" if cfg.tls else "http"
    context = None
    if cfg.tls:
        context = ssl.create_default_context(cafile=cfg.ca_cert)
        if cfg.cert_cert and cfg.cert_key:
            context.load_cert_chain(cfg.cert_cert, cfg.cert_key)
    try:
        sent = time.time()
        with urllib.request.urlopen(f"{scheme}://{endpoint}/version", timeout=cfg.request_timeout,
                                    context=context) as resp:
            date = resp.headers.get("Date")
        received = time.time()
    except Exception:
        return None
    if not date:
        return None
    try:
        server = email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None
    # Date is truncated to the second: its true value lies in [server, server + 1).
    return server + 0.5 - (sent + received) / 2


def _check_endpoints(report: Report, cfg: EtcdConfig) -> list[EndpointReport]:
    reports = [_probe_endpoint(cfg, ep) for ep in cfg.endpoints]
    report.endpoints = reports
    healthy = [r for r in reports if r.healthy]
    for r in reports:
        if r.healthy:
            role = "leader" if r.is_leader else f"follower of {r.leader_id}"
            report.add(f"endpoint {r.endpoint}", OK,
                       f"healthy, etcd {r.version}, member {r.member_id} ({role}), {r.latency_ms:.0f} ms")
        else:
            report.add(f"endpoint {r.endpoint}", FAIL, f"unhealthy: {r.error}")
    if not healthy:
        return healthy
    clusters = {r.cluster_id for r in healthy}
    leaders = {r.leader_id for r in healthy}
    if len(clusters) > 1:
        report.add("cluster", FAIL, f"endpoints belong to different etcd clusters ({', '.join(sorted(str(c) for c in clusters))}): "
                   "list the members of one cluster only")
    elif len(leaders) > 1:
        report.add("cluster", WARN, f"members disagree on the leader ({', '.join(sorted(map(str, leaders)))}): "
                   "an election is in progress or the cluster is partitioned")
    else:
        report.add("cluster", OK, f"cluster {next(iter(clusters))}, leader {next(iter(leaders))}, "
                   f"{len(healthy)}/{len(reports)} listed endpoint(s) healthy")
    if 1 < len(reports) and len(healthy) < len(reports):
        report.add("redundancy", WARN, "some listed endpoints are down: requests fail over, but check them")
    elif len(reports) == 1:
        report.add("redundancy", INFO, "one endpoint listed: list every member so a member's loss is not "
                   "every host's loss (each host would fence itself)")
    return healthy


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
@etcd_command
@click.pass_context
def check(ctx: click.Context, settings: Settings, as_json: bool, election_timeout: float, strict: bool) -> None:
    """Validate the configuration and reach the cluster.

    Checks every endpoint (health, version, leader), the etcd version, the TTL
    against the election timeout, write permission under the prefix (a probe
    key, removed again), the prefix's contents and the clocks.

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
    healthy = _check_endpoints(report, cfg)
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
