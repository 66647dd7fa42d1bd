"""Fencing through the storage and the machine, without etcd (docs/DESIGN.md §11).

``scsi_pr``: SCSI-3 persistent reservations on one path of a LUN (SG_IO); ``luns``: the LUNs
and paths under a disk (sysfs); ``watchdog``: a Linux watchdog device.  Device access only:
what to register, whom to preempt and when to pet is decided in ``session/`` (it knows the
leases).
"""
