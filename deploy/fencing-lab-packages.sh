#!/bin/bash
# Installs what the fencing lab (tests/fencing, lab/virtlease_lab/fencing) needs: QEMU (x86, TCG
# is enough), a static busybox for the guest's initramfs, kmod (depmod) and dmsetup
# (dm-multipath in the guest), and apt's package lists, from which the lab fetches Debian's
# stock kernel (linux-image-amd64's dependency) with `apt-get download`. Idempotent.
set -euo pipefail
"$(dirname "$0")/apt-install.sh" qemu-system-x86 busybox-static kmod dmsetup
if ! apt-cache depends linux-image-amd64 2>/dev/null | grep -q "Depends: linux-image-[0-9]"; then
    echo "apt lists do not know linux-image-amd64: apt-get update"
    apt-get update -qq
fi
