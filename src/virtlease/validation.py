"""Input checks the core applies before any driver sees a value.

Each function returns the canonical form of a valid value or raises
:class:`~virtlease.errors.ValidationError` naming the field.

See docs/DESIGN.md §3 (The ABI).
"""

from __future__ import annotations

import enum
import uuid as uuidlib
from collections.abc import Mapping
from typing import Any, TypeVar

from .abi import ObjectType, ResourceType
from .errors import ValidationError

#: Longest path accepted, in bytes (Linux PATH_MAX).
MAX_PATH_BYTES = 4096
#: Longest domain name / lease key, in bytes.
MAX_NAME_BYTES = 1024
#: Longest state string accepted from a caller.
MAX_STATE_CHARS = 1 << 20

F = TypeVar("F", bound=enum.IntFlag)
E = TypeVar("E", bound=enum.IntEnum)


def _text(field: str, value: object, *, max_bytes: int) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, f"expected a string, got {type(value).__name__}")
    if not value:
        raise ValidationError(field, "must not be empty")
    if "\x00" in value:
        raise ValidationError(field, "contains a NUL byte")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValidationError(field, f"not valid UTF-8 text ({exc.reason})") from None
    if size > max_bytes:
        raise ValidationError(field, f"{size} bytes long, the limit is {max_bytes}")
    return value


def check_uuid(value: object) -> str:
    """A UUID as a ``uuid.UUID`` or 32 hex digits (hyphens optional)."""
    if isinstance(value, uuidlib.UUID):
        return str(value)
    if not isinstance(value, str) or not value:
        raise ValidationError("uuid", f"required, got {value!r}")
    plain = value.replace("-", "")
    if len(plain) != 32 or any(c not in "0123456789abcdefABCDEF" for c in plain):
        raise ValidationError("uuid", f"{value!r} is not a UUID")
    return str(uuidlib.UUID(plain))


def check_name(value: object, field: str = "name") -> str:
    return _text(field, value, max_bytes=MAX_NAME_BYTES)


def check_optional_int(value: object, field: str, *, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"expected an integer, got {value!r}")
    if value < minimum:
        raise ValidationError(field, f"must be >= {minimum}, got {value}")
    return value


def check_optional_text(value: object, field: str) -> str | None:
    if value is None:
        return None
    return _text(field, value, max_bytes=MAX_PATH_BYTES)


def check_flags(value: object, kind: type[F], field: str = "flags") -> F:
    """Reject non-integers and bits that ``kind`` does not define."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"expected {kind.__name__} bits, got {value!r}")
    known = 0
    for member in kind:
        known |= int(member)
    unknown = int(value) & ~known
    if int(value) < 0 or unknown:
        raise ValidationError(field, f"unknown {kind.__name__} bits {unknown:#x} in {int(value):#x}")
    return kind(int(value))


def check_enum(value: object, kind: type[E], field: str) -> E:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"expected a {kind.__name__}, got {value!r}")
    try:
        return kind(value)
    except ValueError:
        names = ", ".join(m.name for m in kind)
        raise ValidationError(field, f"{value!r} is not one of {names}") from None


def check_object_type(value: object) -> ObjectType:
    if not isinstance(value, ObjectType):
        raise ValidationError("type", f"expected ObjectType.DOMAIN, got {value!r}")
    return value


def check_path(value: object, field: str) -> str:
    """An absolute path, without NUL bytes, at most 4096 bytes."""
    path = _text(field, value, max_bytes=MAX_PATH_BYTES)
    if not path.startswith("/"):
        raise ValidationError(field, f"{path!r} is not an absolute path")
    return path


def check_resource(rtype: object, name: object, params: object) -> tuple[ResourceType, str, dict[str, Any]]:
    """Validate a resource's type, name and params; return canonical ones."""
    if not isinstance(rtype, ResourceType):
        raise ValidationError("resource type", f"expected ResourceType.DISK or LEASE, got {rtype!r}")
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ValidationError("params", f"expected a mapping, got {type(params).__name__}")
    if rtype is ResourceType.DISK:
        if params:
            raise ValidationError("params", f"a disk takes no params, got {sorted(params)}")
        return rtype, check_path(name, "disk path"), {}
    key = _text("lease key", name, max_bytes=MAX_NAME_BYTES)
    unknown = set(params) - {"lockspace", "path", "offset"}
    if unknown:
        raise ValidationError("params", f"unknown lease params {sorted(unknown)}")
    if "lockspace" not in params:
        raise ValidationError("lockspace", f"required for lease {key!r}")
    clean: dict[str, Any] = {"lockspace": check_name(params["lockspace"], "lockspace")}
    if "/" in clean["lockspace"]:
        raise ValidationError("lockspace", f"{clean['lockspace']!r} must not contain '/'")
    if params.get("path") is not None:
        clean["path"] = check_path(params["path"], "lease path")
    if params.get("offset") is not None:
        offset = check_optional_int(params["offset"], "offset", minimum=0)
        clean["offset"] = offset
    return rtype, key, clean


def check_state(value: object) -> str | None:
    """A state string as returned by release/inquire/prepare_migrate."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError("state", f"expected a string, got {type(value).__name__}")
    if len(value) > MAX_STATE_CHARS:
        raise ValidationError("state", f"{len(value)} characters, the limit is {MAX_STATE_CHARS}")
    if "\x00" in value:
        raise ValidationError("state", "contains a NUL byte")
    return value


def check_host(value: object, field: str = "host") -> str:
    host = _text(field, value, max_bytes=255)
    if any(c in host for c in "/ \t\r\n"):
        raise ValidationError(field, f"{host!r} must not contain '/' or whitespace")
    return host
