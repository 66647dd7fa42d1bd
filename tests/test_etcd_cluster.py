"""The etcd driver against a three-member cluster: requests fail over
between endpoints, the session survives losing a member, and a fenced lease
that a leader change extended is revoked only when that is safe."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import etcd3
import pytest
from etcd3 import etcdrpc

import virtlease as v
from virtlease_etcd.clock import SYSTEM
from virtlease_etcd.devtools.embedded import EmbeddedEtcd
from virtlease_etcd.devtools.hostprocess import HostProcess, process_state
from virtlease_lab.drivers import new_uuid, shut

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
        shut(plugin)


def test_member_killed_while_holding(cluster: EmbeddedEtcd, prefix: str) -> None:
    plugin = v.load_driver("etcd", config={"endpoints": cluster.endpoints, "prefix": prefix,
                                           "host_id": "fo-2", "ttl": 10, "request_timeout": 0.5})  # room for an election
    try:
        in_use = plugin.driver.session.client.endpoint_in_use
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
        assert plugin.driver.session.client.endpoint_in_use != in_use
        obj.free()
    finally:
        shut(plugin)


# -- revoking a fenced lease ---------------------------------------------------
#
# After fencing, a host revokes its lease once etcd answers again, so that a
# lease a leader change extended does not keep its disks held for another
# TTL.  The revocation must never come earlier than the lease would have
# expired by the host's own clock, never while a killed VM still exists, and
# never for a paused VM (it could still write).
#
# The host talks only to the etcd leader; the test pauses that member (SIGSTOP)
# so the host's keepalives hang and it fences.  The old leader is resumed just
# after the fence (the host's connection was never broken, so it reaches etcd
# again at once) and leadership is moved, which extends every lease to a full
# TTL (etcd's lessor Promote).  An early or forbidden revocation then shows as
# the lease vanishing long before etcd would expire it.

def move_leader(cluster: EmbeddedEtcd, limit: float = 5.0) -> None:
    """Hand leadership to another member (retried while the cluster settles)."""
    deadline = SYSTEM.now() + limit
    while True:
        try:
            leader = cluster.leader()
            assert leader is not None, "no leader"
            target = next(m for m in cluster.members if m is not leader)
            client = etcd3.client(host="127.0.0.1", port=leader.client_port, timeout=2)
            try:
                ids = {m.name: m.id for m in client.members}
                client.maintenancestub.MoveLeader(etcdrpc.MoveLeaderRequest(targetID=ids[target.name]),
                                                  timeout=2)
                return
            finally:
                client.close()
        except Exception:
            if SYSTEM.now() > deadline:
                raise
            time.sleep(0.1)


def lease_left(client: etcd3.Etcd3Client, lease_id: int) -> int:
    """Seconds etcd still gives the lease; -1 once it is gone."""
    return int(client.get_lease_info(lease_id).TTL)


def wait_gone(client: etcd3.Etcd3Client, lease_id: int, limit: float) -> float:
    while lease_left(client, lease_id) >= 0:
        assert SYSTEM.now() < limit, f"lease {lease_id:x} still alive"
        time.sleep(0.02)
    return SYSTEM.now()


@pytest.mark.parametrize("case", ["killed", "paused", "unkillable"])
def test_fenced_lease_revoked_only_when_safe(cluster: EmbeddedEtcd, prefix: str, case: str) -> None:
    ttl, margin = 8, 3.5
    wrapper: list[str] | None = None
    guest_user: int | None = None
    if case == "unkillable":
        # A VM the host cannot kill stands in for one stuck in storage I/O:
        # the guest runs as nobody, the host as root without CAP_KILL.
        if os.geteuid() != 0:
            pytest.skip("needs root to run the host without CAP_KILL")
        wrapper, guest_user = ["setpriv", "--bounding-set=-kill", "--"], 65534
    leader = cluster.leader()
    assert leader is not None
    other = next(m for m in cluster.members if m is not leader)
    guest = subprocess.Popen(["sleep", "300"], user=guest_user)
    client = etcd3.client(host="127.0.0.1", port=other.client_port, timeout=2)
    try:
        with HostProcess(leader.endpoint, prefix, f"rv-{case}", ttl=ttl, fence_margin=margin,
                         request_timeout=0.5, wrapper=wrapper) as holder:
            holder.ok("new", obj="vm", uuid=new_uuid(), name="guest", disks=[f"/srv/rv-{case}.img"],
                      pid=guest.pid)
            holder.ok("acquire", obj="vm", action="PAUSE" if case == "paused" else "POWEROFF")
            leader.pause()
            try:
                limit = SYSTEM.now() + ttl + 2
                while not (session := holder.ok("session"))["lost"]:
                    assert SYSTEM.now() < limit, "the host was never fenced"
                    time.sleep(0.02)
            finally:
                leader.resume()
            move_leader(cluster)
            valid_until = session["fence_at"] + margin
            asked_at = SYSTEM.now()
            left = lease_left(client, holder.lease)
            assert left >= 0, "revoked right after the fence, before the lease could have expired"
            # the precondition: left alone, the lease outlives valid_until
            # (etcd rounds TTL down, so asked_at + left is a lower bound)
            assert asked_at + left > valid_until + 3, (left, valid_until - asked_at)
            expires_by = asked_at + left + 3

            if case == "killed":
                gone_at = wait_gone(client, holder.lease, expires_by)
                assert guest.wait(timeout=1) == -9
                assert gone_at >= valid_until - 0.05, "revoked before the lease could have expired"
                assert gone_at < asked_at + left - 0.3, "never revoked: it expired by itself"
                return

            time.sleep(max(0.0, valid_until + 1.0 - SYSTEM.now()))
            assert lease_left(client, holder.lease) >= 0, "revoked while the VM could still write"
            assert guest.poll() is None
            if case == "paused":
                assert process_state(guest.pid) == "T"
                wait_gone(client, holder.lease, expires_by)  # etcd alone ends it
                return
            guest.kill()  # the test (root with CAP_KILL) can; the VM finally exits
            exited_at = SYSTEM.now()
            guest.wait()
            gone_at = wait_gone(client, holder.lease, expires_by)
            assert gone_at - exited_at < 1.0, "not revoked once the VM exited"
            assert gone_at < asked_at + left - 0.3, "never revoked: it expired by itself"
    finally:
        if guest.poll() is None:
            guest.kill()
        guest.wait()
        client.close()
