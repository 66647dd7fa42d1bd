#!/bin/bash
# Installs the Debian packages named as arguments, if any is missing (returns at once when
# all are installed).  A policy-rc.d that refuses every service start is in place during
# the install, so that no daemon (libvirtd, sshd, ...) starts on the machine itself: the
# tests run their own.  Used by deploy/test-packages.sh and deploy/libvirt/install.sh.
set -euo pipefail

missing=()
for p in "$@"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "already installed: $*"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "apt-install.sh: must run as root" >&2; exit 1; }

policy=/usr/sbin/policy-rc.d
had_policy=0
if [ -e "$policy" ]; then
    had_policy=1
else
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
echo "installing: ${missing[*]} (policy-rc.d present before: $had_policy)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
