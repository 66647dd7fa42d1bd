"""The agent's metrics over real etcd: a lost session is counted when it happens and its state
comes back with the next session; the ACQUIRE latency histogram; TTL and margin gauges."""

from __future__ import annotations

from pathlib import Path

from agent.etcd_agent import StandinQemu
from agent.test_agent_etcd import _agent_behind_proxy, _hold_then_cut, images, wait_for
from conftest import FAST_TTL, EtcdServer
from virtlease_etcd.agent.lockdclient import LockdClient
from virtlease_etcd.agent.metrics import Metrics


def test_a_lost_session_is_counted_once_and_the_state_comes_back(etcd_process: EtcdServer, prefix: str,
                                                                  tmp_path: Path) -> None:
    with _agent_behind_proxy(etcd_process, prefix, tmp_path, "host-m", ttl=FAST_TTL) as (proxy, plugin, server):
        metrics = Metrics(server.server.backend)

        def sample(name: str, **labels: str) -> float | None:
            metrics.collect_state()
            return metrics.registry.get_sample_value(name, labels)

        session = plugin.driver.session
        assert sample("virtlease_agent_ttl_seconds") == session.ttl
        assert sample("virtlease_agent_fence_margin_seconds") == session.cfg.margin
        assert sample("virtlease_agent_session_state", state="valid") == 1
        assert sample("virtlease_agent_session_losses_total") == 0
        (d1,) = images(tmp_path, "d1.img")
        old, old_lease = _hold_then_cut(proxy, plugin, server, d1)
        assert sample("virtlease_agent_acquire_seconds_count", result="ok") == 1
        wait_for(lambda: not old.alive(), 10)  # fenced: poweroff
        wait_for(lambda: metrics.registry.get_sample_value("virtlease_agent_session_losses_total") == 1, 5)
        assert sample("virtlease_agent_fenced_domains_total") == 1
        assert sample("virtlease_agent_session_state", state="lost") == 1
        assert sample("virtlease_agent_session_state", state="valid") == 0
        proxy.heal()
        new = StandinQemu(server.path, "web2")
        try:
            with LockdClient(server.path) as c:
                c.register(new.owner())
                c.acquire(d1)  # opens a new session
            assert plugin.driver.session.lease_id != old_lease
            assert sample("virtlease_agent_session_state", state="valid") == 1
            assert sample("virtlease_agent_session_state", state="lost") == 0
            assert sample("virtlease_agent_session_losses_total") == 1, "counted once, not per scrape"
            assert sample("virtlease_agent_requests_total", op="renew", result="renewed") == 1
            assert sample("virtlease_agent_acquire_seconds_count", result="ok") == 2
        finally:
            new.kill()
