"""The etcd a test runs against, and reading back what is under a prefix.

``EtcdServer`` is what the ``etcd`` fixture of tests/conftest.py yields: a local etcd process
(``virtlease_etcd.devtools.embedded``) or a container (``etcdcontainer``), by its endpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import etcd3


@dataclass
class EtcdServer:
    """One etcd to test against: ``kind`` is "process" or "container"."""

    kind: str
    endpoints: str

    def client(self) -> etcd3.Etcd3Client:
        """A python-etcd3 client of the first endpoint (the caller closes it)."""
        host, port = self.endpoints.split(",")[0].rsplit(":", 1)
        return etcd3.client(host=host, port=int(port), timeout=5)


def dump(client: etcd3.Etcd3Client, prefix: str) -> dict[str, tuple[bytes, int, int]]:
    """Every key under ``prefix``: value, mod_revision, lease."""
    return {meta.key.decode(): (value, meta.mod_revision, meta.lease_id)
            for value, meta in client.get_prefix(prefix + "/")}


def holder_keys(client: etcd3.Etcd3Client, prefix: str) -> dict[str, dict[str, Any]]:
    """The holder records under ``prefix`` (``.../res/...`` keys), decoded."""
    return {key: json.loads(val) for key, (val, _rev, _lease) in dump(client, prefix).items() if "/res/" in key}
