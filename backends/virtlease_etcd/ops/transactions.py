"""Sending the driver's etcd transactions, and the size limit they share.

``run`` (``session/writes``, re-exported here) sends one transaction with
retries and resolves lost replies by reading back our own records
(docs/DESIGN.md §6); the grants' transactions are built by ``plan.decide``.
A grant writes, per resource, the holder key (on the session lease) and the
resource's ``gen`` key: two operations, so one transaction holds
``max_txn_ops // 2`` keys.  A file disk has two keys (its directory id and
its name, see ``keyspace``), three with ``legacy_path_keys`` (its legacy path
key): ``max_txn_ops // 4`` or ``// 6`` disks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from virtlease.errors import TransactionTooLargeError
from virtlease_etcd.session.writes import Outcome as Outcome
from virtlease_etcd.session.writes import ReadBack as ReadBack
from virtlease_etcd.session.writes import deleted as deleted
from virtlease_etcd.session.writes import lease_checked as lease_checked
from virtlease_etcd.session.writes import run as run
from virtlease_etcd.session.writes import withdraw_in_background as withdraw_in_background
from virtlease_etcd.session.writes import written as written

log = logging.getLogger(__name__)


def check_size(op_counts: Sequence[int], limit: int, what: str, n: int, *, legacy: bool = False) -> None:
    worst = max(op_counts)
    if worst > limit:
        cost = (f" A file disk takes two keys (its directory id and its name): about {limit // 4} disks fit"
                + (f", and {limit // 6} with legacy_path_keys on (a third key: its path; turn it off once "
                   "no host runs the release before the previous one)." if legacy else "."))
        raise TransactionTooLargeError(
            f"{what} of {n} resource(s) needs {worst} operations in one etcd transaction, but the "
            f"cluster allows {limit} (etcd --max-txn-ops; set max_txn_ops if your cluster differs). "
            f"Nothing was taken: raise --max-txn-ops on every etcd member, or give the domain fewer "
            f"locked disks (readonly disks are not locked).{cost}"
        )
