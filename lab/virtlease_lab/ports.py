"""Free loopback ports for the servers tests, benchmarks and rigs start.

One implementation: the embedded etcd of ``virtlease etcd`` and ``virtlease demo`` needs it in
the product, which cannot import the lab, so the lab hands the product's function on.
"""

from __future__ import annotations

from virtlease_etcd.devtools.embedded import free_port as free_port

__all__ = ["free_port"]
