#!/usr/bin/env bash
# End-to-end check against a real three-member etcd cluster (docker-compose.yml):
#   1. bring the cluster up with $VIRTLEASE_ETCD_IMAGE (default: the local image built by
#      deploy/etcd-image/build.sh, built here if missing);
#   2. wait until all three members report healthy (timeout $COMPOSE_CHECK_TIMEOUT, default 120 s);
#   3. run `virtlease demo` against the three published client ports;
#   4. ALWAYS tear the cluster down (containers, network, volumes), then exit with the demo's status.
#
# Env: VIRTLEASE_ETCD_IMAGE, VIRTLEASE_BIN (default .venv/bin/virtlease), COMPOSE_CHECK_TIMEOUT,
#      COMPOSE_PROJECT_NAME (default virtlease-check, so a developer's own `docker-compose up`
#      project in this directory is never torn down by this script).
# Needs a running docker engine (deploy/docker-engine.sh).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$repo"

LOCAL_IMAGE="virtlease/etcd:3.5.1-local"
export VIRTLEASE_ETCD_IMAGE="${VIRTLEASE_ETCD_IMAGE:-$LOCAL_IMAGE}"
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-virtlease-check}"
VIRTLEASE_BIN="${VIRTLEASE_BIN:-.venv/bin/virtlease}"
TIMEOUT="${COMPOSE_CHECK_TIMEOUT:-120}"
ENDPOINTS="127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793"
COMPOSE_FILE_PATH="$repo/docker-compose.yml"

log() { echo "compose-check: $*" >&2; }
die() { echo "compose-check: ERROR: $*" >&2; exit 1; }

if command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose -f "$COMPOSE_FILE_PATH")
elif docker compose version >/dev/null 2>&1; then
    compose=(docker compose -f "$COMPOSE_FILE_PATH")
else
    die "neither docker-compose nor 'docker compose' found (run deploy/docker-engine.sh)"
fi
docker info >/dev/null 2>&1 || die "docker engine not reachable (run deploy/docker-engine.sh)"
[ -x "$VIRTLEASE_BIN" ] || command -v "$VIRTLEASE_BIN" >/dev/null 2>&1 \
    || die "virtlease CLI not found: $VIRTLEASE_BIN (make install / set VIRTLEASE_BIN)"

if ! docker image inspect "$VIRTLEASE_ETCD_IMAGE" >/dev/null 2>&1; then
    if [ "$VIRTLEASE_ETCD_IMAGE" = "$LOCAL_IMAGE" ]; then
        log "building local etcd image $VIRTLEASE_ETCD_IMAGE"
        "$here/etcd-image/build.sh"
    else
        log "image $VIRTLEASE_ETCD_IMAGE not present locally; docker-compose will try to pull it"
    fi
fi

# shellcheck disable=SC2317  # invoked via trap
teardown() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$rc" -ne 0 ]; then
        log "failed (status $rc); last cluster logs:"
        "${compose[@]}" logs --no-color --tail=20 >&2 2>/dev/null || true
    fi
    log "tearing the cluster down"
    "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 \
        || log "WARNING: docker-compose down failed; clean up project $COMPOSE_PROJECT_NAME by hand"
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "starting etcd cluster (image $VIRTLEASE_ETCD_IMAGE, project $COMPOSE_PROJECT_NAME)"
start=$SECONDS
"${compose[@]}" up -d >&2

deadline=$((SECONDS + TIMEOUT))
while :; do
    mapfile -t ids < <("${compose[@]}" ps -q)
    healthy=0
    states=()
    for id in "${ids[@]}"; do
        st="$(docker inspect --format '{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id")"
        states+=("$st")
        case "$st" in
            running/healthy) healthy=$((healthy + 1)) ;;
            exited/*|dead/*) die "a member container stopped ($st)" ;;
        esac
    done
    [ "${#ids[@]}" -eq 3 ] && [ "$healthy" -eq 3 ] && break
    [ "$SECONDS" -lt "$deadline" ] || die "cluster not healthy after ${TIMEOUT}s (${states[*]:-no containers})"
    sleep 1
done
log "all 3 members healthy after $((SECONDS - start))s"

log "running: $VIRTLEASE_BIN demo --endpoints $ENDPOINTS"
set +e
"$VIRTLEASE_BIN" demo --endpoints "$ENDPOINTS"
demo_rc=$?
set -e
log "demo exited with status $demo_rc"
exit "$demo_rc"
