"""SCSI-3 persistent reservations (SPC-3/4) on one path of a LUN, through SG_IO.

A *path* is a SCSI disk node (``/dev/sdX``, one I_T nexus: this host's initiator port to one
target port).  Registrations are per nexus: a host registers its key on every path it writes
through (``luns`` finds them, dm-multipath included).  Reservation state is per LUN: any path
reads it.

Why SG_IO and not Linux's block-layer PR ioctls (``linux/pr.h``): the block ioctls cannot *read*
keys or the reservation before Linux 6.x (READ KEYS / READ RESERVATION came to ``pr.h`` long
after the OUT side), and fencing needs both reads -- which keys to preempt is decided from the
registered keys.  SG_IO also carries a per-command timeout and returns the SCSI status and
sense, so a RESERVATION CONFLICT is told apart from a dead path, and a UNIT ATTENTION (the
target saying "registrations changed") is retried.  On dm-multipath the block ioctls would
fan REGISTER out to every path, which ``luns`` plus a loop over paths does here explicitly.
NVMe namespaces do not take SG_IO: they are not covered (docs/DESIGN.md §11).

Every function raises :class:`PrError` (one line naming the device, the command and what the
device said); :class:`ReservationConflict` when the device answered RESERVATION CONFLICT.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from enum import IntEnum

SG_IO = 0x2285
SG_DXFER_NONE = -1
SG_DXFER_TO_DEV = -2
SG_DXFER_FROM_DEV = -3
PR_IN, PR_OUT = 0x5E, 0x5F
STATUS_GOOD, STATUS_CHECK_CONDITION, STATUS_RESERVATION_CONFLICT = 0x00, 0x02, 0x18
SENSE_UNIT_ATTENTION = 0x6
DID_NEXUS_FAILURE = 0x11
"""The host byte Linux (before 6.3) sets on a RESERVATION CONFLICT status."""
DRIVER_ERROR_MASK = 0x07
"""Driver byte values that are errors (0x08, DRIVER_SENSE, only says sense data is there)."""
UNIT_ATTENTION_RETRIES = 5


class InAction(IntEnum):
    READ_KEYS = 0
    READ_RESERVATION = 1
    REPORT_CAPABILITIES = 2


class OutAction(IntEnum):
    REGISTER = 0
    RESERVE = 1
    RELEASE = 2
    CLEAR = 3
    PREEMPT = 4
    PREEMPT_AND_ABORT = 5
    REGISTER_AND_IGNORE = 6


class PrType(IntEnum):
    """SPC reservation types (the code in the CDB)."""

    WRITE_EXCLUSIVE = 1
    EXCLUSIVE_ACCESS = 3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8


WERO = PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY
TYPE_NAMES = {PrType.WRITE_EXCLUSIVE: "Write Exclusive", PrType.EXCLUSIVE_ACCESS: "Exclusive Access",
              WERO: "Write Exclusive - Registrants Only",
              PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: "Exclusive Access - Registrants Only",
              PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: "Write Exclusive - All Registrants",
              PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: "Exclusive Access - All Registrants"}
# bits of the PERSISTENT RESERVATION TYPE MASK (REPORT CAPABILITIES bytes 4-5, big-endian)
_TYPE_MASK_BITS = {PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: 0x8000,
                   PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: 0x4000, WERO: 0x2000,
                   PrType.EXCLUSIVE_ACCESS: 0x0800, PrType.WRITE_EXCLUSIVE: 0x0200,
                   PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: 0x0001}


class SgIoHdr(ctypes.Structure):
    """``struct sg_io_hdr`` (scsi/sg.h)."""

    _fields_ = [
        ("interface_id", ctypes.c_int), ("dxfer_direction", ctypes.c_int),
        ("cmd_len", ctypes.c_ubyte), ("mx_sb_len", ctypes.c_ubyte), ("iovec_count", ctypes.c_ushort),
        ("dxfer_len", ctypes.c_uint), ("dxferp", ctypes.c_void_p), ("cmdp", ctypes.c_void_p),
        ("sbp", ctypes.c_void_p), ("timeout", ctypes.c_uint), ("flags", ctypes.c_uint),
        ("pack_id", ctypes.c_int), ("usr_ptr", ctypes.c_void_p), ("status", ctypes.c_ubyte),
        ("masked_status", ctypes.c_ubyte), ("msg_status", ctypes.c_ubyte), ("sb_len_wr", ctypes.c_ubyte),
        ("host_status", ctypes.c_ushort), ("driver_status", ctypes.c_ushort), ("resid", ctypes.c_int),
        ("duration", ctypes.c_uint), ("info", ctypes.c_uint),
    ]


class PrError(OSError):
    """A persistent-reservation command failed on a device (the message names both)."""


class ReservationConflict(PrError):
    """The device answered RESERVATION CONFLICT."""


@dataclass(frozen=True)
class Keys:
    """READ KEYS: the registered keys (one per registered nexus: a key may repeat)."""

    generation: int
    keys: tuple[int, ...]


@dataclass(frozen=True)
class Reservation:
    """READ RESERVATION: the reservation holder's key and the type, or no reservation."""

    generation: int
    key: int | None
    type: int | None

    @property
    def type_name(self) -> str:
        if self.type is None:
            return "none"
        try:
            return TYPE_NAMES[PrType(self.type)]
        except ValueError:
            return f"type {self.type}"


@dataclass(frozen=True)
class Capabilities:
    """REPORT CAPABILITIES: what the device server says it supports."""

    types: frozenset[int]
    """Reservation types it supports (empty when it does not report a type mask)."""
    type_mask_valid: bool
    ptpl_capable: bool
    """Persist Through Power Loss can be asked for."""
    all_target_ports_capable: bool
    compatible_reservation_handling: bool

    def supports(self, pr_type: int) -> bool:
        return not self.type_mask_valid or pr_type in self.types


def _sense(buf: bytes, length: int) -> tuple[int, int, int] | None:
    """(sense key, ASC, ASCQ) of fixed- or descriptor-format sense data."""
    if length < 3:
        return None
    code = buf[0] & 0x7F
    if code in (0x72, 0x73) and length >= 4:
        return buf[1] & 0x0F, buf[2], buf[3]
    if code in (0x70, 0x71) and length >= 14:
        return buf[2] & 0x0F, buf[12], buf[13]
    return None


def _describe(sense: tuple[int, int, int] | None) -> str:
    if sense is None:
        return "no sense data"
    key, asc, ascq = sense
    names = {0x2: "NOT READY", 0x3: "MEDIUM ERROR", 0x4: "HARDWARE ERROR", 0x5: "ILLEGAL REQUEST",
             0x6: "UNIT ATTENTION", 0xB: "ABORTED COMMAND"}
    what = names.get(key, f"sense key {key:#x}")
    if key == 0x5 and asc == 0x20:
        what += " (command not supported: the device has no persistent reservations)"
    return f"{what}, ASC/ASCQ {asc:02x}/{ascq:02x}"


def execute(fd: int, device: str, cdb: bytes, *, direction: int, data: bytearray | bytes = b"",
            timeout: float = 10.0, what: str = "") -> bytes:
    """Send one CDB through SG_IO; the data read (FROM_DEV) or b"".  Retries a UNIT ATTENTION
    (the target reports changed registrations once to every other nexus)."""
    for _attempt in range(UNIT_ATTENTION_RETRIES):
        buf = ctypes.create_string_buffer(bytes(data), max(len(data), 1))
        cmd = ctypes.create_string_buffer(cdb, len(cdb))
        sense = ctypes.create_string_buffer(64)
        hdr = SgIoHdr(interface_id=ord("S"), dxfer_direction=direction, cmd_len=len(cdb), mx_sb_len=64,
                      dxfer_len=len(data), dxferp=ctypes.cast(buf, ctypes.c_void_p),
                      cmdp=ctypes.cast(cmd, ctypes.c_void_p), sbp=ctypes.cast(sense, ctypes.c_void_p),
                      timeout=max(1, int(timeout * 1000)))
        try:
            fcntl.ioctl(fd, SG_IO, hdr)
        except OSError as exc:
            raise PrError(exc.errno, f"{device}: {what}: SG_IO failed: {os.strerror(exc.errno or 0)}"
                          + (" (not a SCSI device?)" if exc.errno in (errno.ENOTTY, errno.EINVAL) else "")) from None
        if hdr.status == STATUS_RESERVATION_CONFLICT or hdr.host_status == DID_NEXUS_FAILURE:
            raise ReservationConflict(errno.EBADE, f"{device}: {what}: RESERVATION CONFLICT")
        if hdr.host_status or hdr.driver_status & DRIVER_ERROR_MASK:
            raise PrError(errno.EIO, f"{device}: {what}: transport error (host status {hdr.host_status:#x}, "
                          f"driver status {hdr.driver_status:#x}): is the path down?")
        if hdr.status == STATUS_CHECK_CONDITION:
            found = _sense(sense.raw, hdr.sb_len_wr)
            if found is not None and found[0] == SENSE_UNIT_ATTENTION:
                continue
            raise PrError(errno.EIO, f"{device}: {what}: CHECK CONDITION, {_describe(found)}")
        if hdr.status != STATUS_GOOD:
            raise PrError(errno.EIO, f"{device}: {what}: SCSI status {hdr.status:#x}")
        if direction == SG_DXFER_FROM_DEV:
            return buf.raw[: len(data) - max(0, hdr.resid)]
        return b""
    raise PrError(errno.EIO, f"{device}: {what}: UNIT ATTENTION {UNIT_ATTENTION_RETRIES} times in a row")


class Path:
    """One SCSI path (a ``/dev/sdX`` node), opened for PR commands.  Use as a context manager."""

    def __init__(self, device: str, timeout: float = 10.0) -> None:
        self.device = device
        self.timeout = timeout
        try:
            self.fd = os.open(device, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise PrError(exc.errno, f"{device}: cannot open for persistent reservations: "
                          f"{os.strerror(exc.errno or 0)}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Path:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- PERSISTENT RESERVE IN -------------------------------------------------------

    def _pr_in(self, action: InAction, length: int) -> bytes:
        cdb = struct.pack(">BB5xHB", PR_IN, int(action), length, 0)
        return execute(self.fd, self.device, cdb, direction=SG_DXFER_FROM_DEV, data=bytearray(length),
                       timeout=self.timeout, what=f"PERSISTENT RESERVE IN {action.name}")

    def read_keys(self) -> Keys:
        length = 8 + 8 * 32
        while True:
            raw = self._pr_in(InAction.READ_KEYS, length)
            generation, additional = struct.unpack_from(">II", raw, 0)
            if 8 + additional <= length:
                break
            length = 8 + additional  # more registrations than we asked room for
        count = min(additional, len(raw) - 8) // 8
        return Keys(generation, tuple(struct.unpack_from(f">{count}Q", raw, 8)))

    def read_reservation(self) -> Reservation:
        raw = self._pr_in(InAction.READ_RESERVATION, 24)
        generation, additional = struct.unpack_from(">II", raw, 0)
        if additional < 16 or len(raw) < 24:
            return Reservation(generation, None, None)
        key = struct.unpack_from(">Q", raw, 8)[0]
        return Reservation(generation, key, raw[21] & 0x0F)

    def report_capabilities(self) -> Capabilities:
        raw = self._pr_in(InAction.REPORT_CAPABILITIES, 8)
        if len(raw) < 6:
            raise PrError(errno.EIO, f"{self.device}: REPORT CAPABILITIES: short answer ({len(raw)} bytes)")
        flags, flags2 = raw[2], raw[3]
        mask = struct.unpack_from(">H", raw, 4)[0]
        valid = bool(flags2 & 0x80)
        types = frozenset(t for t, bit in _TYPE_MASK_BITS.items() if mask & bit) if valid else frozenset()
        return Capabilities(types=types, type_mask_valid=valid, ptpl_capable=bool(flags & 0x01),
                            all_target_ports_capable=bool(flags & 0x04),
                            compatible_reservation_handling=bool(flags & 0x10))

    # -- PERSISTENT RESERVE OUT ------------------------------------------------------

    def _pr_out(self, action: OutAction, key: int, sa_key: int, pr_type: int = 0, what: str = "") -> None:
        cdb = struct.pack(">BBB2xIB", PR_OUT, int(action), pr_type & 0x0F, 24, 0)
        params = struct.pack(">QQ4xBx2x", key, sa_key, 0)
        execute(self.fd, self.device, cdb, direction=SG_DXFER_TO_DEV, data=params, timeout=self.timeout,
                what=f"PERSISTENT RESERVE OUT {action.name}{what}")

    def register(self, key: int, *, old: int = 0, ignore_existing: bool = False) -> None:
        """Register ``key`` for this nexus (``old`` its current key, 0 for none); with
        ``ignore_existing`` whatever key the nexus has is replaced."""
        action = OutAction.REGISTER_AND_IGNORE if ignore_existing else OutAction.REGISTER
        self._pr_out(action, 0 if ignore_existing else old, key, what=f" key {key:#x}")

    def reserve(self, key: int, pr_type: int = WERO) -> None:
        self._pr_out(OutAction.RESERVE, key, 0, pr_type, what=f" key {key:#x} type {pr_type}")

    def release(self, key: int, pr_type: int = WERO) -> None:
        self._pr_out(OutAction.RELEASE, key, 0, pr_type, what=f" key {key:#x}")

    def preempt(self, key: int, victim: int, pr_type: int = WERO, *, abort: bool = False) -> None:
        """Remove every registration of ``victim`` (and its reservation, which passes to us)."""
        action = OutAction.PREEMPT_AND_ABORT if abort else OutAction.PREEMPT
        self._pr_out(action, key, victim, pr_type, what=f" of key {victim:#x} by {key:#x}")

    def clear(self, key: int) -> None:
        """Remove every registration and the reservation (a registrant's last resort)."""
        self._pr_out(OutAction.CLEAR, key, 0, what=f" by key {key:#x}")
