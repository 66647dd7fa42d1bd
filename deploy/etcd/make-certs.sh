#!/usr/bin/env bash
# Create the PKI for the three-member TLS etcd cluster described by etcd{1,2,3}.conf.yml:
#   ca.crt / ca.key                   cluster CA (keep ca.key offline once done)
#   etcdN-server.crt / .key           client-facing serving cert of member N (serverAuth+clientAuth:
#                                     etcd's own grpc-gateway dials itself with it)
#   etcdN-peer.crt / .key             member N's peer cert (serverAuth+clientAuth, used both ways)
#   virtlease.crt / .key              client cert for virtlease hosts, CN=virtlease; with auth
#                                     enabled, etcd maps the CN to the etcd user `virtlease`
#   virtlease-monitor.crt / .key      client cert for monitoring (`virtlease status`,
#                                     `virtlease check --read-only`), CN=virtlease-monitor: the
#                                     read-only etcd user of rbac.sh
#   root.crt / .key                   admin client cert, CN=root (for rbac.sh and etcdctl)
#
# Usage: deploy/etcd/make-certs.sh [OUT_DIR]      (default $ETCD_PKI_DIR or /etc/etcd/pki)
# Env:
#   ETCD_MEMBERS   "name=dns,ip name=dns,ip ..." SANs per member
#                  (default "etcd1=etcd1.virtlease.internal,10.0.0.11
#                            etcd2=etcd2.virtlease.internal,10.0.0.12
#                            etcd3=etcd3.virtlease.internal,10.0.0.13")
#                  Every member cert also gets DNS:<name>, DNS:localhost and IP:127.0.0.1.
#   CA_DAYS (3650), CERT_DAYS (825), CA_SUBJECT ("/O=virtlease/CN=virtlease etcd CA")
# Idempotent: existing files are kept; pass --force to regenerate everything (new CA!).
# Keys are written 0600, certs 0644, owned by the caller: `chown -R etcd: OUT_DIR` on member
# hosts where etcd runs unprivileged. Never commit OUT_DIR.
set -euo pipefail

force=0
out=""
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        -*) echo "make-certs.sh: unknown option $arg" >&2; exit 2 ;;
        *) out="$arg" ;;
    esac
done
out="${out:-${ETCD_PKI_DIR:-/etc/etcd/pki}}"
ETCD_MEMBERS="${ETCD_MEMBERS:-etcd1=etcd1.virtlease.internal,10.0.0.11 etcd2=etcd2.virtlease.internal,10.0.0.12 etcd3=etcd3.virtlease.internal,10.0.0.13}"
CA_DAYS="${CA_DAYS:-3650}"
CERT_DAYS="${CERT_DAYS:-825}"
CA_SUBJECT="${CA_SUBJECT:-/O=virtlease/CN=virtlease etcd CA}"

command -v openssl >/dev/null 2>&1 || { echo "make-certs.sh: openssl not found (apt-get install openssl)" >&2; exit 1; }

umask 077
mkdir -p "$out"
cd "$out"
if [ "$force" -eq 1 ]; then
    rm -f ca.crt ca.key ca.srl ./*-server.* ./*-peer.* virtlease.crt virtlease.key virtlease-monitor.crt \
        virtlease-monitor.key root.crt root.key
fi

newkey() {  # EC P-256 private key, PKCS#8 PEM
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
    chmod 0600 "$1"
}

if [ ! -f ca.crt ] || [ ! -f ca.key ]; then
    echo "make-certs.sh: creating CA in $out"
    newkey ca.key
    openssl req -x509 -new -key ca.key -sha256 -days "$CA_DAYS" -subj "$CA_SUBJECT" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" \
        -out ca.crt
    chmod 0644 ca.crt
fi

# issue NAME CN SAN EKU : sign NAME.crt for NAME.key with the CA (SAN may be empty).
issue() {
    local name="$1" cn="$2" san="$3" eku="$4" ext
    if [ -f "$name.crt" ] && [ -f "$name.key" ]; then
        echo "make-certs.sh: $name.crt exists, kept"
        return
    fi
    newkey "$name.key"
    ext="$(mktemp)"
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$eku"
        echo "subjectKeyIdentifier=hash"
        echo "authorityKeyIdentifier=keyid,issuer"
        [ -n "$san" ] && echo "subjectAltName=$san"
    } >"$ext"
    openssl req -new -key "$name.key" -subj "/O=virtlease/CN=$cn" -out "$name.csr"
    openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
        -days "$CERT_DAYS" -sha256 -extfile "$ext" -out "$name.crt" 2>/dev/null
    rm -f "$name.csr" "$ext"
    chmod 0644 "$name.crt"
    openssl verify -CAfile ca.crt "$name.crt" >/dev/null
    echo "make-certs.sh: issued $name.crt (CN=$cn${san:+, $san})"
}

for spec in $ETCD_MEMBERS; do
    member="${spec%%=*}"
    sans="${spec#*=}"
    san="DNS:$member,DNS:localhost,IP:127.0.0.1"
    IFS=, read -r -a extra <<<"$sans"
    for s in "${extra[@]}"; do
        [ -n "$s" ] || continue
        if [[ "$s" =~ ^[0-9.]+$ || "$s" == *:* ]]; then san="$san,IP:$s"; else san="$san,DNS:$s"; fi
    done
    issue "$member-server" "$member" "$san" "serverAuth,clientAuth"
    issue "$member-peer" "$member" "$san" "serverAuth,clientAuth"
done
issue virtlease virtlease "" "clientAuth"
issue virtlease-monitor virtlease-monitor "" "clientAuth"
issue root root "" "clientAuth"
rm -f ca.srl
echo "make-certs.sh: done; copy ca.crt and the member's etcdN-* files to /etc/etcd/pki/ on each member host,"
echo "make-certs.sh: ca.crt and virtlease.crt/.key to /etc/virtlease/pki/ on each hypervisor,"
echo "make-certs.sh: ca.crt and virtlease-monitor.crt/.key to the monitoring host"
