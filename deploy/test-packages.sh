#!/bin/bash
# Installs the Debian packages the system tests need besides libvirt (deploy/libvirt/install.sh):
# file systems on loop devices, a second mount namespace, sshfs over a local sshd
# (tests/identity/README.md says which test needs what); openssl for the TLS tests (tests/security).  Idempotent and fast once installed.
exec "$(dirname "$0")/apt-install.sh" mount util-linux e2fsprogs xfsprogs btrfs-progs sshfs fuse3 \
    openssh-server openssh-client openssl
