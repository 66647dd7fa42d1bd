"""The fencing lab: a nested guest with a real kernel's SCSI persistent reservations and watchdog.

``image`` builds (and caches) Debian's kernel and a busybox initramfs, ``guest`` boots it under
QEMU and drives it, ``inguest`` is the server in the guest; the guest-side code (``scsilab``:
LIO and dm-multipath; ``writer``: a stand-in QEMU writing tagged blocks; ``scenarios``: the
freeze, watchdog, renewal and migration runs) executes in the guest through ``LabGuest.call``.
tests/fencing/ runs it.
"""
