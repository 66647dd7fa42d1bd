"""The etcd driver against a three-member cluster: requests fail over
between endpoints, and the session survives losing a member."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import virtlease as v
from conftest import new_uuid
from virtlease_etcd.embedded import EmbeddedEtcd

D = v.ResourceType.DISK


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedEtcd]:
    with EmbeddedEtcd(size=3) as etcd:
        yield etcd


def test_first_endpoint_down_from_the_start(cluster: EmbeddedEtcd, prefix: str) -> None:
    dead = "127.0.0.1:1"  # nothing listens there
    plugin = v.load_driver("etcd", config={"endpoints": f"{dead},{cluster.endpoints}", "prefix": prefix,
                                           "host_id": "fo-1", "ttl": 4, "request_timeout": 0.5})
    try:
        obj = plugin.new_object(uuid=new_uuid(), name="vm")
        obj.add_resource(D, "/srv/fo1.img")
        obj.acquire()
        obj.release()
        obj.free()
    finally:
        plugin.unload()


def test_member_killed_while_holding(cluster: EmbeddedEtcd, prefix: str) -> None:
    plugin = v.load_driver("etcd", config={"endpoints": cluster.endpoints, "prefix": prefix,
                                           "host_id": "fo-2", "ttl": 4, "request_timeout": 0.5})
    try:
        in_use = plugin.driver.session.client.raw.endpoint_in_use.netloc
        victim = next(m for m in cluster.members if m.endpoint == in_use)
        obj = plugin.new_object(uuid=new_uuid(), name="vm")
        obj.add_resource(D, "/srv/fo2.img")
        obj.acquire()
        victim.kill()
        try:
            obj.acquire_resource(D, "/srv/fo2b.img")  # served by another member
            state = obj.release()
            assert plugin.driver.session.lost is None
            obj.acquire(state)
        finally:
            victim.start()
        assert plugin.driver.session.client.raw.endpoint_in_use.netloc != in_use
        obj.free()
    finally:
        plugin.unload()
