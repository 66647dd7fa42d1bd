#!/bin/bash
# Installs what the two-host libvirt rig (tests/libvirt) needs: libvirtd, virtlockd, virtlogd,
# virsh, QEMU (x86, TCG is enough), iproute2 and util-linux (unshare, nsenter).
# Idempotent: when every package is already installed it returns at once without apt.
# A policy-rc.d that refuses every start is in place during the install so that no
# libvirt service starts on the machine itself (the rig runs its own daemons per host).
set -euo pipefail

PKGS=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-daemon-system
      libvirt-daemon-system-sysv qemu-system-x86 iproute2 util-linux)

missing=()
for p in "${PKGS[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "libvirt rig packages already installed"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "install.sh: must run as root" >&2; exit 1; }

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
apt-get install -y -qq --no-install-recommends "${PKGS[@]}"
