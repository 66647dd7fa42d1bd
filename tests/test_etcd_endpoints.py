"""Which member the client asks when every member failed a moment ago (an election, a member
killed): the one that failed longest ago, at once, not nobody until a failure mark runs out."""

from __future__ import annotations

import time

from virtlease_etcd.config import load_config
from virtlease_etcd.etcd.client import EtcdClient
from virtlease_etcd.etcd.endpoints import ENDPOINT_RETRY
from virtlease_lab.etcdserver import EtcdServer
from virtlease_lab.ports import free_port


def test_when_every_member_failed_a_moment_ago_the_longest_failed_is_asked(etcd_process: EtcdServer) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: a member that is down
    client = EtcdClient(load_config({"endpoints": f"{etcd_process.endpoints},{dead}", "host_id": "t"}, environ={}))
    try:
        live = next(ep for ep in client._endpoints if ep.netloc != dead)
        down = next(ep for ep in client._endpoints if ep.netloc == dead)
        live.fail()  # the live member failed first (its election), then the dead one
        time.sleep(0.01)
        down.fail()
        assert live.failed() and down.failed()
        started = client.clock.now()
        kvs, revision = client.retrying(lambda timeout: client.get_range("/virtlease-test/x", timeout=timeout),
                                        deadline=started + ENDPOINT_RETRY / 2)
        assert revision > 0 and kvs == []
        assert client.endpoint_in_use == live.netloc
    finally:
        client.close()

