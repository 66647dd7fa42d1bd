#!/usr/bin/env bash
# Make a Docker engine usable on a Debian host without systemd (CI containers, dev VMs).
#
# Idempotent:
#   * installs docker.io and docker-compose via apt only if `dockerd` / `docker-compose` are missing
#     (runs `apt-get update` only in that case);
#   * starts `dockerd` in the background (log: $DOCKERD_LOG, default /tmp/dockerd.log) only if
#     `docker info` fails;
#   * waits up to $DOCKER_WAIT_SECS (default 60) seconds until `docker info` succeeds.
# Exits non-zero with a message on stderr if the engine cannot be made to work.
# Must run as root (apt-get, dockerd).
set -euo pipefail

DOCKERD_LOG="${DOCKERD_LOG:-/tmp/dockerd.log}"
DOCKER_WAIT_SECS="${DOCKER_WAIT_SECS:-60}"

die() { echo "docker-engine.sh: ERROR: $*" >&2; exit 1; }
log() { echo "docker-engine.sh: $*" >&2; }

docker_ok() { docker info >/dev/null 2>&1; }
# True if a dockerd process exists (pgrep if available, else /proc scan).
dockerd_running() {
    if command -v pgrep >/dev/null 2>&1; then
        pgrep -x dockerd >/dev/null 2>&1
    else
        grep -qx dockerd /proc/[0-9]*/comm 2>/dev/null
    fi
}

if [ "$(id -u)" -ne 0 ] && ! docker_ok; then
    die "must run as root to install/start dockerd (or start the engine yourself)"
fi

# 1. Packages.
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v docker >/dev/null 2>&1 || missing+=(docker.io)
if [ "${#missing[@]}" -gt 0 ]; then
    # de-duplicate
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install ${missing[*]} by hand"
    log "installing ${missing[*]} via apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" iptables \
        || die "apt-get install ${missing[*]} failed"
fi
command -v dockerd >/dev/null 2>&1 || die "dockerd still not on PATH after install"
command -v docker-compose >/dev/null 2>&1 || die "docker-compose still not on PATH after install"

# 2. Daemon.
if docker_ok; then
    log "docker engine already running"
    exit 0
fi

if dockerd_running; then
    log "dockerd process exists but does not answer yet; waiting for it"
else
    # A stale pid file from a killed daemon prevents a new start.
    if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid 2>/dev/null)" 2>/dev/null; then
        rm -f /var/run/docker.pid
    fi
    log "starting dockerd in the background (log: $DOCKERD_LOG)"
    nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
    disown || true
fi

# 3. Wait.
deadline=$((SECONDS + DOCKER_WAIT_SECS))
until docker_ok; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "---- last lines of $DOCKERD_LOG ----" >&2
        tail -n 30 "$DOCKERD_LOG" >&2 2>/dev/null || true
        die "docker engine did not become ready within ${DOCKER_WAIT_SECS}s"
    fi
    if ! dockerd_running; then
        echo "---- last lines of $DOCKERD_LOG ----" >&2
        tail -n 30 "$DOCKERD_LOG" >&2 2>/dev/null || true
        die "dockerd exited during start-up (see $DOCKERD_LOG)"
    fi
    sleep 1
done
log "docker engine ready ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
