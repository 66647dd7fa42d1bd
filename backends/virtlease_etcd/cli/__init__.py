"""The etcd backend's ``virtlease`` subcommands.

Registered with the core's command frame through the ``virtlease.commands``
entry-point group (see pyproject.toml): ``status``, ``check``, ``hold``,
``identity``, ``demo`` and ``etcd``.  Each takes the shared etcd options (``options``).

See docs/DESIGN.md §2 (Layers).
"""

from __future__ import annotations

from .check import check
from .demo import demo
from .etcd_server import etcd
from .hold import hold
from .identity import identity
from .status import status

__all__ = ["check", "demo", "etcd", "hold", "identity", "status"]
