#!/bin/bash
# `make deb`: the virtlease Debian package (bookworm) from the wheel of `make dist`.
#
# Usage: deploy/build-deb.sh WHEEL [OUTDIR]     (OUTDIR defaults to dist/)
#
# Stages deploy/debian/ as debian/ next to the wheel and the files the package installs, writes
# debian/changelog for the wheel's version (the Debian version is the Python one, "rc1" and
# ".dev1" made to sort before the release with "~"), and runs dpkg-buildpackage (binary only,
# unsigned).  The Python environment is filled from deploy/debian/requirements.lock, every hash
# checked (debian/rules); pip reaches the package index for files not in its cache.
# Needs: dpkg-dev, debhelper, python3.11, python3-pip (deploy/packaging-tools.sh).
# DEB_COMPRESSION=gzip builds faster than the default xz (lintian accepts both, not zstd).
# SOURCE_DATE_EPOCH (default: the last commit's time, else now) dates the changelog and the
# files.  Prints the path of the .deb on its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
wheel=$(realpath "${1:?usage: deploy/build-deb.sh WHEEL [OUTDIR]}")
out=$(realpath -m "${2:-$repo/dist}")
[ -f "$wheel" ] || { echo "build-deb.sh: no wheel at $wheel (run make dist)" >&2; exit 2; }

version=$(basename "$wheel" | cut -d- -f2)
debversion=$(printf '%s' "$version" | sed -E 's/\.?(a|b|rc|dev)([0-9]+)/~\1\2/g')
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

work=$(mktemp -d "${TMPDIR:-/tmp}/virtlease-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
src="$work/virtlease-$debversion"
mkdir -p "$src/wheel" "$src/docs" "$src/deploy/libvirt" "$src/deploy/prometheus"
cp -a "$here/debian" "$src/debian"
cp "$wheel" "$src/wheel/"
cp "$repo/README.md" "$src/"
cp "$repo/docs/DESIGN.md" "$src/docs/"
cp "$repo/deploy/OPERATIONS.md" "$repo/deploy/virtlease.toml" "$src/deploy/"
cp -a "$repo/deploy/libvirt/virtlockd.service.d" "$repo/deploy/libvirt/qemu-lockd.conf" "$src/deploy/libvirt/"
cp "$repo/deploy/prometheus/virtlease.rules.yml" "$src/deploy/prometheus/"

cat >"$src/debian/changelog" <<CHANGES
virtlease ($debversion) bookworm; urgency=medium

  * virtlease $version, built from its repository by make deb.

 -- $(sed -n 's/^Maintainer: //p' "$here/debian/control")  $(date -R -u -d "@$SOURCE_DATE_EPOCH")
CHANGES

(cd "$src" && dpkg-buildpackage --build=binary --no-sign >&2)
mkdir -p "$out"
deb=$(ls "$work"/virtlease_"$debversion"_*.deb)
mv "$deb" "$out/"
echo "$out/$(basename "$deb")"
