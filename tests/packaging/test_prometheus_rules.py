"""The alert rules (deploy/prometheus/virtlease.rules.yml): valid for Prometheus, their unit tests
pass under ``promtool test rules``, and every metric they use is one the agent exports."""

from __future__ import annotations

import re

from debroot import REPO, run

RULES = REPO / "deploy/prometheus/virtlease.rules.yml"
TESTS = REPO / "deploy/prometheus/virtlease.rules.test.yml"
METRICS = REPO / "backends/virtlease_etcd/agent/metrics.py"


def test_rules_check_and_their_unit_tests_pass() -> None:
    assert "SUCCESS: 6 rules found" in run(["promtool", "check", "rules", str(RULES)]).stdout
    out = run(["promtool", "test", "rules", str(TESTS)], check=False)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_rules_use_the_agents_metrics() -> None:
    used = set(re.findall(r"\b(virtlease_(?:agent|build)_[a-z_]+)", RULES.read_text()))
    assert len(used) >= 7, used
    exported = METRICS.read_text()
    for name in used:
        base = re.sub(r"_(bucket|count|sum|total)$", "", name)
        assert f'"{base}"' in exported or f'"{base.removesuffix("_info")}"' in exported, name
