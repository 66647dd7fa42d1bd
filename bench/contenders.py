"""The three contenders, each as a worker whose ``op()`` is one unit of work.

- ``Ceiling``: one plain etcd transaction (compare + put: a compare-and-swap
  on one key per caller) from python-etcd3's ``client.transaction``.
- ``VirtleaseVM``: acquire + release of one VM's disks through the public
  virtlease API (two etcd transactions whatever the number of disks).
- ``RecipeVM``: python-etcd3's ``Lock`` taken once per disk (acquire all,
  then release all): per disk a lease grant + a txn, then a txn to release.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

from virtlease import LockObject, Plugin, ResourceType


def vm_uuid(run_id: str, tag: str, index: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"virtlease-bench/{run_id}/{tag}/{index}"))


def disk_paths(run_id: str, tag: str, index: int, disks: int) -> list[str]:
    return [f"/srv/bench-{run_id}/{tag}/vm{index}/disk{d}.qcow2" for d in range(disks)]


class Ceiling:
    """Compare-and-swap on the caller's own key: ``value == n`` -> put ``n+1``."""

    def __init__(self, client: Any, key: str) -> None:
        self.client = client
        self.key = key
        self.n = 0
        client.put(key, "0")

    def op(self) -> None:
        t = self.client.transactions
        ok, _ = self.client.transaction(compare=[t.value(self.key) == str(self.n)],
                                        success=[t.put(self.key, str(self.n + 1))], failure=[])
        if not ok:
            raise RuntimeError(f"ceiling CAS on {self.key} failed at {self.n}")
        self.n += 1

    def close(self) -> None:
        self.client.delete(self.key)


class VirtleaseVM:
    """One VM's lock object; ``op`` = acquire() + release()."""

    def __init__(self, plugin: Plugin, run_id: str, tag: str, index: int, disks: int) -> None:
        self.obj: LockObject = plugin.new_object(uuid=vm_uuid(run_id, tag, index), name=f"{tag}-vm{index}")
        for path in disk_paths(run_id, tag, index, disks):
            self.obj.add_resource(ResourceType.DISK, path)

    def acquire(self) -> None:
        self.obj.acquire()

    def release(self) -> None:
        self.obj.release()

    def op(self) -> None:
        self.obj.acquire()
        self.obj.release()

    def close(self) -> None:
        self.obj.free()


class RecipeVM:
    """One python-etcd3 ``Lock`` per disk; ``op`` = acquire all, release all.

    As the recipe is usually written (``with client.lock(name, ttl)``),
    release deletes the key but leaves the lock's lease to expire.  We keep
    a reference to each such lease so that ``cleanup()`` (never timed) can
    revoke them after a measurement, before the next contender runs: left
    alone, thousands of expiring leases slow etcd down for whoever follows."""

    def __init__(self, client: Any, run_id: str, tag: str, index: int, disks: int, ttl: int) -> None:
        self.locks = [client.lock(path, ttl=ttl) for path in disk_paths(run_id, tag, index, disks)]
        self.leases: list[Any] = []

    def acquire(self) -> None:
        for lock in self.locks:
            if not lock.acquire(timeout=5):
                raise RuntimeError(f"recipe lock {lock.name} not acquired within 5 s")
            self.leases.append(lock.lease)

    def release(self) -> None:
        for lock in self.locks:
            lock.release()

    def op(self) -> None:
        self.acquire()
        self.release()

    def cleanup(self) -> int:
        """Revoke the leases the recipe left behind; return how many."""
        leases, self.leases = self.leases, []
        for lease in leases:
            with contextlib.suppress(Exception):  # already expired: fine
                lease.revoke()
        return len(leases)

    def close(self) -> None:
        self.cleanup()
