"""The agent's state file.

``<state dir>/agent-<host_id>.json`` (default ``/run/virtlease``; directory 0700, file 0600,
both root-owned, replaced atomically) says what a successor needs to continue the session::

    {"host": ..., "prefix": ..., "lease": <id>, "session": <id>, "agent_pid": ...,
     "guard": {"pid": ..., "start": ...},
     "owners": [{"uuid", "name", "pid", "start", "action"}]}

It lives under /run (tmpfs): after a reboot nothing in it can be true any more.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from virtlease.abi import FailureAction

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/run/virtlease"


@dataclass
class OwnerEntry:
    uuid: str
    name: str
    pid: int
    start: int
    action: str = FailureAction.POWEROFF.name.lower()


@dataclass
class AgentState:
    host: str
    prefix: str
    lease: int
    session: str
    agent_pid: int
    guard: dict[str, int] = field(default_factory=dict)
    owners: list[OwnerEntry] = field(default_factory=list)


def state_path(state_dir: str | os.PathLike[str], host_id: str) -> Path:
    return Path(state_dir) / f"agent-{host_id}.json"


def ensure_dir(state_dir: str | os.PathLike[str]) -> None:
    """Create the directory 0700; refuse one that others could write to."""
    d = Path(state_dir)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(d)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(f"state directory {d} must be owned by uid {os.geteuid()} with mode 0700 "
                              f"(is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")


def save(path: Path, state: AgentState) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(state), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: Path) -> AgentState | None:
    """The state a previous agent left, or None (absent or unreadable: logged)."""
    try:
        raw = json.loads(path.read_text())
        owners = [OwnerEntry(**o) for o in raw.pop("owners", [])]
        return AgentState(**raw, owners=owners)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.error("ignoring unreadable agent state file %s: %s", path, exc)
        return None


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


