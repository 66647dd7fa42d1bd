#!/bin/bash
# Installs what the two-host libvirt rig (tests/libvirt) needs: libvirtd, virtlockd, virtlogd,
# virsh, QEMU (x86, TCG is enough), iproute2 and util-linux (unshare, nsenter).
# Idempotent; no libvirt service starts on the machine itself (the rig runs its own daemons
# per host): see deploy/apt-install.sh.
exec "$(dirname "$0")/../apt-install.sh" libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients \
    libvirt-daemon-system libvirt-daemon-system-sysv qemu-system-x86 iproute2 util-linux
