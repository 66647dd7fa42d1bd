"""Prometheus metrics of the watchdog and storage fencing (``--metrics``; docs/DESIGN.md §11).

==================================================  =======  =================================
``virtlease_agent_watchdog_armed``                  gauge    1 while the watchdog is armed
``virtlease_agent_watchdog_last_pet_age_seconds``   gauge    since the last pet (NaN: never)
``virtlease_agent_watchdog_timeout_seconds``        gauge    the timeout it was armed with
``virtlease_agent_watchdog_pets_total``             counter  pets
``virtlease_agent_watchdog_withheld_total``         counter  pet ticks the lease forbade while
                                                             armed (the host resets unless a
                                                             keepalive succeeds in time)
``virtlease_agent_scsi_pr_grant_seconds``           gauge    the persistent-reservation work
                                                             of the last fenced grant
``virtlease_agent_scsi_pr_preempted_total``         counter  dead sessions' keys preempted by
                                                             this host's current session
==================================================  =======  =================================

Only what is configured is exported (``watchdog_device``, ``scsi_pr_luns``); values are read
when scraped, from the driver's current session (a renewed session replaces a lost one).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from virtlease_etcd.driver import EtcdDriver


class FenceCollector:
    """A collector over one driver's watchdog and its session's storage fencing."""

    def __init__(self, driver: EtcdDriver) -> None:
        self.driver = driver

    def collect(self) -> Iterator[Metric]:
        dog = self.driver.watchdog
        if dog is not None:
            yield GaugeMetricFamily("virtlease_agent_watchdog_armed", "1 while the watchdog is armed",
                                    value=1 if dog.armed else 0)
            age = float("nan") if dog.last_pet is None else dog.clock.now() - dog.last_pet
            yield GaugeMetricFamily("virtlease_agent_watchdog_last_pet_age_seconds", "Seconds since the last pet",
                                    value=age)
            yield GaugeMetricFamily("virtlease_agent_watchdog_timeout_seconds", "The watchdog's timeout",
                                    value=dog.plan.timeout)
            yield CounterMetricFamily("virtlease_agent_watchdog_pets", "Watchdog pets", value=dog.pets)
            yield CounterMetricFamily("virtlease_agent_watchdog_withheld", "Pet ticks the lease forbade while armed",
                                      value=dog.withheld)
        session = self.driver._session
        storage = session.storage if session is not None else None
        if storage is not None:
            last = storage.durations[-1] if storage.durations else float("nan")
            yield GaugeMetricFamily("virtlease_agent_scsi_pr_grant_seconds",
                                    "Persistent-reservation work of the last fenced grant", value=last)
            yield CounterMetricFamily("virtlease_agent_scsi_pr_preempted", "Dead sessions' keys preempted",
                                      value=storage.preempted)


def register(registry: CollectorRegistry, driver: EtcdDriver) -> None:
    """Add the fencing metrics of ``driver`` to ``registry``."""
    registry.register(FenceCollector(driver))
