#!/bin/bash
# Installs the Debian packages the system tests need besides libvirt (deploy/libvirt/install.sh):
# file systems on loop devices, a second mount namespace, sshfs over a local sshd
# (tests/identity/README.md says which test needs what); openssl for the TLS tests (tests/security);
# Debian's etcd-server and etcd-client (3.4.23 on bookworm), the second etcd release CI runs the
# suite against (.ci/run; no service starts: apt-install.sh).  Idempotent and fast once installed.
exec "$(dirname "$0")/apt-install.sh" mount util-linux e2fsprogs xfsprogs btrfs-progs sshfs fuse3 \
    openssh-server openssh-client openssl etcd-server etcd-client
