#!/bin/bash
# Installs what `make deb` and the package tests (tests/packaging) need: the Debian build tools
# (dpkg-dev, debhelper; python3.11 and python3-pip build the package's environment), lintian,
# debootstrap (the clean bookworm root the package is installed into), systemd's tools
# (systemd-analyze verify, systemd-socket-activate; systemd does not run as PID 1 here) and
# prometheus (promtool, for the alert rules' tests) and pipx (the wheel's install test).  Idempotent; starts no service
# (deploy/apt-install.sh).
exec "$(dirname "$0")/apt-install.sh" dpkg-dev debhelper python3.11 python3-pip python3-venv lintian \
    debootstrap systemd prometheus man-db pipx
