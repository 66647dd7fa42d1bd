"""Reading one sysfs attribute (the fence layer's device facts)."""

from __future__ import annotations


def read(path: str) -> str | None:
    """The attribute at ``path``, stripped; None if it cannot be read (absent, no device)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return None
