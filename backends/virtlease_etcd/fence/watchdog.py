"""A Linux watchdog device (``/dev/watchdog``): open, set the timeout, pet, close (ioctl only).

Opening the device starts the timer; every :meth:`Watchdog.keepalive` restarts it; if it runs
out the hardware (or softdog) resets the machine.  Closing is the tricky part, the *magic
close*: writing ``V`` just before ``close`` stops the timer -- unless the driver was built or
loaded with ``nowayout``, in which case nothing stops it once started.  Closing without ``V``
leaves it running (the kernel logs "watchdog did not stop!"): that is what a crash does, and
what a deliberate hand-over to the next process does (:meth:`Watchdog.abandon`).

:func:`describe` reads what sysfs says about a device without opening it (opening arms it):
``virtlease check`` uses it.  The policy -- when to pet, when to arm -- is the session's
(``session/watchdog.py``); nothing here knows about leases.
"""

from __future__ import annotations

import fcntl
import glob
import os
import stat
import struct
from dataclasses import dataclass

from .sysfs import read as _read

WDIOC_KEEPALIVE = 0x80045705
WDIOC_SETTIMEOUT = 0xC0045706
WDIOC_GETTIMEOUT = 0x80045707
MISC_WATCHDOG = (10, 130)
"""The legacy ``/dev/watchdog`` node: the first registered watchdog (``watchdog0``)."""


class WatchdogError(OSError):
    """The watchdog device could not be opened or driven (the message names it)."""


@dataclass(frozen=True)
class WatchdogInfo:
    """What sysfs says of a watchdog (any field may be unknown: None)."""

    device: str
    sysfs: str | None
    identity: str | None
    timeout: int | None
    min_timeout: int | None
    max_timeout: int | None
    nowayout: bool | None
    state: str | None
    """``active`` while some process holds it armed."""


def _int(path: str) -> int | None:
    text = _read(path)
    return int(text) if text is not None and text.lstrip("-").isdigit() else None


def _sysfs_dir(device: str, sysfs: str) -> str | None:
    try:
        st = os.stat(device)
    except OSError:
        return None
    if not stat.S_ISCHR(st.st_mode):
        return None
    rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    for candidate in sorted(glob.glob(os.path.join(sysfs, "class", "watchdog", "watchdog*"))):
        if rdev == MISC_WATCHDOG and os.path.basename(candidate) == "watchdog0":
            return candidate
        if _read(os.path.join(candidate, "dev")) == f"{rdev[0]}:{rdev[1]}":
            return candidate
    return None


def describe(device: str, *, sysfs: str = "/sys") -> WatchdogInfo:
    """What sysfs knows of ``device``, without opening it."""
    d = _sysfs_dir(device, sysfs)
    if d is None:
        return WatchdogInfo(device, None, None, None, None, None, None, None)
    nowayout = _read(os.path.join(d, "nowayout"))
    return WatchdogInfo(device, d, _read(os.path.join(d, "identity")), _int(os.path.join(d, "timeout")),
                        _int(os.path.join(d, "min_timeout")), _int(os.path.join(d, "max_timeout")),
                        None if nowayout is None else nowayout == "1", _read(os.path.join(d, "state")))


class Watchdog:
    """An open (armed) watchdog device."""

    def __init__(self, device: str, timeout: int, *, sysfs: str = "/sys") -> None:
        """Open ``device`` (this arms it), ask for ``timeout`` seconds and pet once.  The
        driver may round the timeout: :attr:`timeout` is what it took.  WatchdogError if the
        device cannot be opened (missing, held by another process) or takes no timeout."""
        self.device = device
        self.info = describe(device, sysfs=sysfs)
        try:
            self.fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            hint = (" (another process holds it: a watchdog daemon? only one may)"
                    if exc.errno == 16 else "")  # EBUSY
            raise WatchdogError(exc.errno, f"watchdog {device}: cannot open: {os.strerror(exc.errno or 0)}"
                                f"{hint}") from None
        try:
            buf = bytearray(struct.pack("i", timeout))
            fcntl.ioctl(self.fd, WDIOC_SETTIMEOUT, buf)
            self.timeout = int(struct.unpack("i", buf)[0])
            self.keepalive()
        except OSError as exc:
            self.abandon()
            raise WatchdogError(exc.errno, f"watchdog {device}: cannot set a {timeout} s timeout: "
                                f"{os.strerror(exc.errno or 0)}") from None

    def keepalive(self) -> None:
        """Restart the timer (WatchdogError if the device refuses)."""
        try:
            fcntl.ioctl(self.fd, WDIOC_KEEPALIVE)
        except OSError as exc:
            raise WatchdogError(exc.errno, f"watchdog {self.device}: keepalive failed: "
                                f"{os.strerror(exc.errno or 0)}") from None

    @property
    def open(self) -> bool:
        return self.fd >= 0

    def disarm(self) -> bool:
        """Magic close: stop the timer and close.  Returns False if the driver is ``nowayout``
        (then it keeps running and the machine resets unless someone pets it)."""
        if self.fd < 0:
            return True
        try:
            os.write(self.fd, b"V")
        finally:
            os.close(self.fd)
            self.fd = -1
        return self.info.nowayout is not True

    def abandon(self) -> None:
        """Close without the magic character: the timer keeps running."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
