#!/usr/bin/env bash
# Set up etcd authentication for virtlease (run once per cluster, by an administrator):
#   * user `root` with role `root` (needed before auth can be enabled);
#   * role `virtlease`: readwrite on every key under the prefix /virtlease/ (and nothing else);
#   * user `virtlease` with that role;
#   * role `virtlease-monitor`: read on the prefix only, and user `virtlease-monitor` with it
#     (for `virtlease status` from monitoring: it cannot take or drop a lease);
#   * auth enable.
# Idempotent: existing users/roles/permissions are kept, and it works whether auth is on or off.
#
# Connection: the usual etcdctl environment, e.g. for the TLS cluster of deploy/etcd/:
#   export ETCDCTL_ENDPOINTS=https://etcd1.virtlease.internal:2379
#   export ETCDCTL_CACERT=/etc/etcd/pki/ca.crt ETCDCTL_CERT=/etc/etcd/pki/root.crt ETCDCTL_KEY=/etc/etcd/pki/root.key
# With client-cert-auth, etcd takes the user name from the client certificate's CN, so the root.crt
# client cert authenticates as root and the virtlease.crt one as virtlease: no passwords needed.
#
# Env:
#   ETCDCTL             etcdctl binary (default: etcdctl on PATH)
#   ROOT_PASSWORD       if set, root gets this password and rbac.sh authenticates with it once
#                       auth is on; if unset, root is created with --no-password (cert only).
#   VIRTLEASE_PASSWORD  likewise for the virtlease user (unset: cert only, --no-password).
#   MONITOR_PASSWORD    likewise for the virtlease-monitor user.
#   VIRTLEASE_PREFIX    key prefix (default /virtlease/; must match the driver's prefix + "/").
# Passwords never appear in a process's arguments: etcdctl gets root's through ETCDCTL_USER
# (its environment) and new users' on its standard input.
set -euo pipefail

ETCDCTL="${ETCDCTL:-etcdctl}"
PREFIX="${VIRTLEASE_PREFIX:-/virtlease/}"
ROOT_PASSWORD="${ROOT_PASSWORD:-}"
VIRTLEASE_PASSWORD="${VIRTLEASE_PASSWORD:-}"
MONITOR_PASSWORD="${MONITOR_PASSWORD:-}"

die() { echo "rbac.sh: ERROR: $*" >&2; exit 1; }
log() { echo "rbac.sh: $*" >&2; }

command -v "$ETCDCTL" >/dev/null 2>&1 || die "etcdctl not found (set ETCDCTL)"
case "$PREFIX" in /*/) ;; *) die "VIRTLEASE_PREFIX must start and end with '/': $PREFIX" ;; esac

# Is auth already enabled? (`auth status` exists since etcd 3.5; 3.4's etcdctl prints its help
# for it and exits 0, so only its answer line counts.)
auth_enabled=false
if status="$("$ETCDCTL" auth status 2>/dev/null)" && grep -qi 'Authentication Status:' <<<"$status"; then
    grep -qi 'Authentication Status: true' <<<"$status" && auth_enabled=true
else
    # Older etcdctl or access denied: probe with a read that needs no permission when auth is off.
    if ! "$ETCDCTL" user list >/dev/null 2>&1; then
        auth_enabled=true
    fi
fi
log "authentication currently enabled: $auth_enabled"
if [ "$auth_enabled" = true ] && [ -z "$ROOT_PASSWORD" ] && [ -z "${ETCDCTL_CERT:-}" ]; then
    die "auth is enabled: set ROOT_PASSWORD, or ETCDCTL_CERT/ETCDCTL_KEY to a CN=root client certificate"
fi

ctl() {
    if [ "$auth_enabled" = true ] && [ -n "$ROOT_PASSWORD" ]; then
        ETCDCTL_USER="root:$ROOT_PASSWORD" "$ETCDCTL" "$@"
    else
        "$ETCDCTL" "$@"    # auth off, or root authenticated by its client certificate (CN=root)
    fi
}

# has_line LINE TEXT: whether TEXT has LINE (the listing is read whole first: `etcdctl ... | grep -q`
# breaks the pipe when grep exits at the first match, and with pipefail the test then fails at random)
has_line() { grep -qxF "$1" <<<"$2"; }

# add_user NAME PASSWORD
add_user() {
    local name="$1" password="$2"
    if has_line "$name" "$(ctl user list)"; then
        log "user $name exists"
    elif [ -n "$password" ]; then
        printf '%s\n' "$password" | ctl user add "$name" --interactive=false >/dev/null
        log "user $name added (password)"
    else
        ctl user add "$name" --no-password >/dev/null
        log "user $name added (no password: client-certificate CN only)"
    fi
}

# add_role NAME
add_role() {
    if has_line "$1" "$(ctl role list)"; then
        log "role $1 exists"
    else
        ctl role add "$1" >/dev/null
        log "role $1 added"
    fi
}

# grant_role USER ROLE
grant_role() {
    local info
    info="$(ctl user get "$1")"  # not piped into grep -q: an early exit breaks the pipe (pipefail)
    if grep -qE "^Roles:.*\b$2\b" <<<"$info"; then
        log "user $1 already has role $2"
    else
        ctl user grant-role "$1" "$2" >/dev/null
        log "granted role $2 to user $1"
    fi
}

add_role root
add_user root "$ROOT_PASSWORD"
grant_role root root

add_role virtlease
# readwrite on [PREFIX, prefix-end): every key whose name starts with PREFIX (granting twice is harmless).
ctl role grant-permission virtlease --prefix=true readwrite "$PREFIX" >/dev/null
log "role virtlease: readwrite on prefix $PREFIX"
add_user virtlease "$VIRTLEASE_PASSWORD"
grant_role virtlease virtlease

add_role virtlease-monitor
ctl role grant-permission virtlease-monitor --prefix=true read "$PREFIX" >/dev/null
log "role virtlease-monitor: read on prefix $PREFIX"
add_user virtlease-monitor "$MONITOR_PASSWORD"
grant_role virtlease-monitor virtlease-monitor

if [ "$auth_enabled" = true ]; then
    log "auth already enabled"
else
    "$ETCDCTL" auth enable >/dev/null
    auth_enabled=true
    log "auth enabled"
fi
ctl role get virtlease
