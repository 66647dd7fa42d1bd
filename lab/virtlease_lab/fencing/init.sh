#!/bin/busybox sh
# The fencing lab guest's /init (see guest.py): modules, this machine's root read-only over 9p at
# /host with tmpfs over its writable places, the network to the machine's loopback (10.0.2.2),
# then the lab's guest server (inguest.py) from the machine's virtualenv on the control port.
# Kernel command line: vl_python=<the virtualenv's python> (passed to this script's environment);
# vl_binds=<tag>:<dir>,...: trees of the machine under a place the tmpfs mounts cover (a clone
# in /tmp), each its own 9p share, mounted again at their own path.
# The lab machine's WORKDIR/share (9p tag labshare) is writable at /run/vl-share.
/bin/busybox --install -s /bin
ln -sf /bin/busybox /sbin/modprobe
export PATH=/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_pci virtio_net virtio_console 9pnet_virtio 9p i6300esb sd_mod sg tcm_loop \
         target_core_file dm_mod dm_multipath dm_round_robin; do
    modprobe "$m" 2>/dev/null || [ -d "/sys/module/$m" ] || echo "vl-init: modprobe $m failed"
done
mount -t configfs none /sys/kernel/config
mkdir -p /var/target/pr /var/target/alua /etc/target  # LIO's dbroot, written from kernel workers
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose hostroot /host || { echo "vl-init: no 9p root"; poweroff -f; }
for d in tmp run var/tmp; do mount -t tmpfs -o mode=1777 tmp "/host/$d"; done
for bind in $(echo "${vl_binds:-}" | tr ',' ' '); do
    tag=${bind%%:*}; dir=${bind#*:}
    mkdir -p "/host$dir" && mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose "$tag" "/host$dir" \
        || echo "vl-init: cannot mount $dir"
done
mount --bind /dev /host/dev; mount -t tmpfs -o mode=1777 shm /host/dev/shm
mount --bind /proc /host/proc; mount --bind /sys /host/sys
mount --bind /sys/kernel/config /host/sys/kernel/config
mkdir -p /host/run/vl-share && mount -t 9p -o trans=virtio,version=9p2000.L labshare /host/run/vl-share
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
port=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = vl.ctl ] && port=/dev/$(basename "$p")
done
[ -n "$port" ] || { echo "vl-init: no control port"; poweroff -f; }
echo "vl-init: up at $(cut -d' ' -f1 /proc/uptime) s, control on $port"
VL_SHARE=/run/vl-share HOME=/tmp TMPDIR=/tmp PYTHONDONTWRITEBYTECODE=1 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    chroot /host "$vl_python" -m virtlease_lab.fencing.inguest "$port"
echo "vl-init: guest server exited ($?)"
poweroff -f
