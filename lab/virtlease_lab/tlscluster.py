"""A three-member etcd with TLS on client and peer traffic, client certificates required.

The members use the certificates of ``pki.make_pki`` (deploy/etcd/make-certs.sh), the
way deploy/etcd/etcdN.conf.yml configures a real cluster. Each member also listens on
127.0.0.2 -- an address its certificate does not name -- for the server-name test.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from virtlease.errors import VirtleaseError
from virtlease_etcd.config import load_config
from virtlease_etcd.devtools.embedded import find_etcd_binary, free_port
from virtlease_etcd.etcd.client import EtcdClient, TransientError


class TlsCluster:
    def __init__(self, workdir: Path, pki: Path, *, client_certs: bool = True, extra: tuple[str, ...] = ()) -> None:
        """``client_certs=False``: server TLS only, clients authenticate by password."""
        self.dir, self.pki = workdir, pki
        self.ports = [(free_port(), free_port()) for _ in range(3)]
        cluster = ",".join(f"m{i}=https://127.0.0.1:{p}" for i, (_, p) in enumerate(self.ports))
        self.procs: list[subprocess.Popen[bytes]] = []
        for i, (client, peer) in enumerate(self.ports):
            log = open(workdir / f"m{i}.log", "ab")
            self.procs.append(subprocess.Popen([
                find_etcd_binary(), "--name", f"m{i}", "--data-dir", str(workdir / f"m{i}"),
                "--listen-client-urls", f"https://127.0.0.1:{client},https://127.0.0.2:{client}",
                "--advertise-client-urls", f"https://127.0.0.1:{client}",
                "--listen-peer-urls", f"https://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"https://127.0.0.1:{peer}",
                "--initial-cluster", cluster, "--initial-cluster-state", "new",
                "--cert-file", str(pki / f"m{i}-server.crt"), "--key-file", str(pki / f"m{i}-server.key"),
                *(["--client-cert-auth", "--trusted-ca-file", str(pki / "ca.crt")] if client_certs else []),
                "--peer-cert-file", str(pki / f"m{i}-peer.crt"), "--peer-key-file", str(pki / f"m{i}-peer.key"),
                "--peer-client-cert-auth", "--peer-trusted-ca-file", str(pki / "ca.crt"),
                "--log-level", "warn", *extra,
            ], stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            log.close()

    @property
    def endpoints(self) -> str:
        return ",".join(f"127.0.0.1:{c}" for c, _ in self.ports)

    def tls(self, cn: str = "virtlease") -> dict[str, str]:
        """Driver settings for a client with the ``cn`` certificate of this cluster's CA."""
        return {"ca_cert": str(self.pki / "ca.crt"), "cert_cert": str(self.pki / f"{cn}.crt"),
                "cert_key": str(self.pki / f"{cn}.key")}

    def wait(self, timeout: float = 30.0) -> TlsCluster:
        cfg = load_config({"endpoints": self.endpoints, "host_id": "probe", **self.tls("root")}, environ={})
        # (a server without client-certificate auth ignores the certificate)
        until = time.monotonic() + timeout
        while True:
            client = EtcdClient(cfg)
            try:
                st = client.status(timeout=1.0)
                if st.leader:
                    return self
            except (TransientError, VirtleaseError):
                if time.monotonic() > until:
                    raise
            finally:
                client.close()
            time.sleep(0.2)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
