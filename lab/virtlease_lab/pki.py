"""Certificates for the security tests, made with the project's own deploy/etcd/make-certs.sh.

``make_pki`` runs the script (as an operator would) for three loopback members; the
odd certificates the refusal tests need -- a client certificate from another CA, and
one that expired -- are made with openssl from those CAs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAKE_CERTS = REPO / "deploy" / "etcd" / "make-certs.sh"
MEMBERS = "m0=m0.etcd.test,127.0.0.1 m1=m1.etcd.test,127.0.0.1 m2=m2.etcd.test,127.0.0.1"


def make_pki(out: Path) -> Path:
    """A CA, member serving and peer certificates, and the virtlease and root client certificates."""
    env = {**os.environ, "ETCD_MEMBERS": MEMBERS}
    subprocess.run(["bash", str(MAKE_CERTS), str(out)], check=True, env=env, capture_output=True, text=True)
    return out


def expired_client_cert(pki: Path, out: Path, cn: str = "virtlease") -> tuple[Path, Path]:
    """A client certificate signed by ``pki``'s CA whose validity ended in 2021."""
    out.mkdir(parents=True, exist_ok=True)
    ca = out / "ca-db"
    (ca / "newcerts").mkdir(parents=True, exist_ok=True)
    (ca / "index.txt").write_text("")
    (ca / "serial").write_text("1000\n")
    conf = out / "ca.cnf"
    conf.write_text(f"[ca]\ndefault_ca = d\n[d]\ndatabase = {ca}/index.txt\nnew_certs_dir = {ca}/newcerts\n"
                    f"serial = {ca}/serial\ndefault_md = sha256\npolicy = p\nx509_extensions = ext\n"
                    "[p]\ncommonName = supplied\n[ext]\nextendedKeyUsage = clientAuth\n")
    key, csr, crt = out / "expired.key", out / "expired.csr", out / "expired.crt"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-new", "-key", str(key), "-subj", f"/CN={cn}", "-out", str(csr)],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "ca", "-batch", "-config", str(conf), "-cert", str(pki / "ca.crt"),
                    "-keyfile", str(pki / "ca.key"), "-in", str(csr), "-out", str(crt), "-notext",
                    "-startdate", "20200101000000Z", "-enddate", "20210101000000Z"], check=True, capture_output=True)
    return crt, key
