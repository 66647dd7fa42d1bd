"""``virtlease status`` on a large cluster (real etcd).

A thousand hosts hold some 40,000 records: more than one gRPC reply carries (4 MiB).  The
status is read in pages, as of one revision, and a big section is printed as plain text.
Here the records are made large (long disk paths) so that a few hundred exceed one reply.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import etcd3
import pytest

import virtlease as v
from virtlease_etcd.devtools.embedded import EmbeddedEtcd
from virtlease_etcd.etcd.client import EtcdClient
from virtlease_etcd.model import keyspace as ks
from virtlease_etcd.ops import status as status_mod
from virtlease_lab.drivers import shut
from virtlease_lab.etcdserver import EtcdServer

VIRTLEASE = [str(Path(sys.executable).with_name("virtlease"))]
LONG_DIR = "/srv/" + "d" * 2900  # each record names its path three times: about 9 KB a record
VMS, DISKS = 12, 50  # 600 records, about 5.4 MB: more than one gRPC reply (4 MiB)


def _load(endpoints: str, prefix: str, host: str) -> v.Plugin:
    return v.load_driver("etcd", config={"endpoints": endpoints, "prefix": prefix, "host_id": host, "ttl": 10},
                         capabilities=v.Capability.RESOURCES)


def _start(plugin: v.Plugin, vm: int, disks: int = DISKS, directory: str = LONG_DIR) -> None:
    obj = plugin.new_object(uuid=str(uuid.uuid4()), name=f"vm{vm}")
    for d in range(disks):
        obj.add_resource(v.ResourceType.DISK, f"{directory}/vm{vm}/disk{d}.img")
    obj.acquire()
    obj.free()


@pytest.fixture
def big_prefix(etcd_process: EtcdServer, prefix: str) -> Iterator[list[v.Plugin]]:
    """Two hosts holding VMS x DISKS disks of long paths under ``prefix``."""
    hosts = [_load(etcd_process.endpoints, prefix, h) for h in ("host-a", "host-b")]
    try:
        for vm in range(VMS):
            _start(hosts[vm % 2], vm)
        yield hosts
    finally:
        for plugin in hosts:
            shut(plugin)


def _live_bytes(etcd: EtcdServer, under: str) -> int:
    """Key + value bytes under ``under``, read 50 keys at a time."""
    client = etcd.client()
    total, key, end = 0, under.encode(), ks.range_end(under).encode()
    try:
        while True:
            resp = client.kvstub.Range(etcd3.etcdrpc.RangeRequest(key=key, range_end=end, limit=50), 10)
            total += sum(len(kv.key) + len(kv.value) for kv in resp.kvs)
            if not resp.more:
                return total
            key = resp.kvs[-1].key + b"\0"
    finally:
        client.close()


def test_status_lists_more_records_than_one_grpc_reply_carries(
        etcd_process: EtcdServer, prefix: str, big_prefix: list[v.Plugin]) -> None:
    assert _live_bytes(etcd_process, prefix + "/v1/res/") > 4 * 2**20  # the premise: one reply cannot carry them

    st = big_prefix[0].driver.status()
    assert len(st.resources) == VMS * DISKS
    assert {h.host for h in st.hosts} == {"host-a", "host-b"}
    assert all(h.ttl_left > 0 for h in st.hosts)

    opts = ["--endpoints", etcd_process.endpoints, "--prefix", prefix]
    as_json = subprocess.run([*VIRTLEASE, *opts, "status", "--json"], capture_output=True, text=True, timeout=120)
    assert as_json.returncode == 0, as_json.stderr
    shown = json.loads(as_json.stdout)["resources"]
    assert sorted(r["token"] for r in shown) == sorted(r.token for r in st.resources)

    table = subprocess.run([*VIRTLEASE, *opts, "status"], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if line.startswith(LONG_DIR)]
    assert len(rows) == VMS * DISKS  # a plain row per record (more than PLAIN_ROWS)
    for r in st.resources:
        assert sum(1 for row in rows if row.startswith(r.resource + " ") and f" {r.token} " in row) == 1


def test_status_pages_show_one_revision_while_grants_go_on(
        etcd_process: EtcdServer, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With pages of 7 keys and another host granting meanwhile, the status is exactly the
    records of one revision: none newer, none missing."""
    monkeypatch.setattr(status_mod, "PAGE_KEYS", 7)
    reader, writer = _load(etcd_process.endpoints, prefix, "host-r"), _load(etcd_process.endpoints, prefix, "host-w")
    stop = threading.Event()
    grants = 0

    def grant_on() -> None:
        nonlocal grants
        while not stop.is_set():
            _start(writer, 1000 + grants, disks=2, directory="/srv/churn")
            grants += 1

    try:
        for vm in range(30):
            _start(reader, vm, disks=4, directory="/srv/base")
        thread = threading.Thread(target=grant_on, daemon=True)
        thread.start()
        try:
            reads = [reader.driver.status() for _ in range(5)]
        finally:
            stop.set()
            thread.join()
        assert grants >= 5  # the writer went on while we read
        client = etcd_process.client()
        try:
            for st in reads:
                assert st.resources and all(r.token <= st.revision for r in st.resources)
                at_revision = client.kvstub.Range(etcd3.etcdrpc.RangeRequest(
                    key=(prefix + "/v1/res/").encode(), range_end=ks.range_end(prefix + "/v1/res/").encode(),
                    revision=st.revision, count_only=True), 5).count
                assert len(st.resources) == at_revision
        finally:
            client.close()
    finally:
        shut(writer)
        shut(reader)


def test_status_read_again_when_its_revision_is_compacted_midway(monkeypatch: pytest.MonkeyPatch) -> None:
    """etcd compacts the revision being read after the first page: the read starts again at a
    newer revision and is complete (its own etcd: compaction would touch other tests)."""
    monkeypatch.setattr(status_mod, "PAGE_KEYS", 5)
    real = EtcdClient.get_page
    compacted: list[int] = []

    def compact_after_first_page(self: EtcdClient, *args: Any, **kw: Any) -> Any:
        page = real(self, *args, **kw)
        if not compacted:
            raw = etcd3.client(host="127.0.0.1", port=int(self.endpoint_in_use.rsplit(":", 1)[1]))
            try:
                raw.put("/compaction-bump", "x")  # the revision read is then below the newest
                compacted.append(page[1] + 1)
                raw.compact(page[1] + 1, physical=True)
            finally:
                raw.close()
        return page

    with EmbeddedEtcd() as server:
        plugin = _load(server.endpoints, "/compact", "host-c")
        try:
            for vm in range(6):
                _start(plugin, vm, disks=3, directory="/srv/compact")
            monkeypatch.setattr(EtcdClient, "get_page", compact_after_first_page)
            st = plugin.driver.status()
        finally:
            monkeypatch.undo()
            shut(plugin)
    assert compacted and st.revision >= compacted[0]
    assert len(st.resources) == 18 and [h.host for h in st.hosts] == ["host-c"]


def test_a_big_section_prints_as_aligned_plain_text() -> None:
    """Past PLAIN_ROWS rows a section is plain text: one line per row, columns aligned, a
    styled cell by its text, a multi-line cell (a handoff's disks) on one line."""
    from rich.text import Text

    from virtlease_etcd.cli.tables import Section

    section = Section("Handoffs", ("domain", "resources", "claimed"), "none",
                      rows=[["web1", "/a\n/b", Text("yes", style="green")], ["db-long-name", "/c", "not yet"]])
    assert section.plain().splitlines() == [
        "Handoffs",
        "domain        resources  claimed",
        "web1          /a, /b     yes",
        "db-long-name  /c         not yet",
    ]
