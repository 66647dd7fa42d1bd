#!/bin/bash
# Installs the Debian packages the system tests need besides libvirt (deploy/libvirt/install.sh):
# file systems on loop devices, a second mount namespace, sshfs over a local sshd
# (tests/identity/README.md says which test needs what).  Idempotent and fast once installed.
set -euo pipefail

PKGS=(mount util-linux e2fsprogs xfsprogs btrfs-progs sshfs fuse3 openssh-server openssh-client)

missing=()
for p in "${PKGS[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "system test packages already installed"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "test-packages.sh: must run as root" >&2; exit 1; }
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
