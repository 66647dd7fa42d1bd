"""XDR primitives of the lockd protocol: a writer and a bounds-checked reader.

Big-endian, every item padded to 4 bytes; the reader raises :class:`ProtocolError` (with the
frame's header when known) and never anything else.
"""

from __future__ import annotations

import struct

from .messages import Header, ProtocolError


class Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u32(self, value: int) -> None:
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"u32 out of range: {value}")
        self.parts.append(struct.pack(">I", value))

    def i32(self, value: int) -> None:
        if not -0x80000000 <= value <= 0x7FFFFFFF:
            raise ValueError(f"i32 out of range: {value}")
        self.parts.append(struct.pack(">i", value))

    def opaque_fixed(self, data: bytes, size: int) -> None:
        if len(data) != size:
            raise ValueError(f"fixed opaque needs {size} bytes, got {len(data)}")
        self.parts.append(data + b"\0" * (-size % 4))

    def string(self, value: str, limit: int) -> None:
        data = value.encode("utf-8", "surrogateescape")
        if len(data) > limit:
            raise ValueError(f"string of {len(data)} bytes exceeds the limit {limit}")
        if b"\0" in data:
            raise ValueError("string contains a NUL byte")
        self.u32(len(data))
        self.parts.append(data + b"\0" * (-len(data) % 4))

    def optional_string(self, value: str | None, limit: int) -> None:
        if value is None:
            self.u32(0)
        else:
            self.u32(1)
            self.string(value, limit)

    def data(self) -> bytes:
        return b"".join(self.parts)


class Reader:
    def __init__(self, data: bytes, header: Header | None) -> None:
        self.data = data
        self.pos = 0
        self.header = header

    def _take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError(
                "truncated", f"{what}: need {n} bytes at offset {self.pos}, have {len(self.data) - self.pos}", self.header
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u32(self, what: str) -> int:
        return int(struct.unpack(">I", self._take(4, what))[0])

    def i32(self, what: str) -> int:
        return int(struct.unpack(">i", self._take(4, what))[0])

    def opaque_fixed(self, size: int, what: str) -> bytes:
        data = self._take(size, what)
        self._take(-size % 4, what + " padding")
        return data

    def string(self, limit: int, what: str) -> str:
        n = self.u32(what + " length")
        if n > limit:
            raise ProtocolError("string-too-long", f"{what}: {n} bytes exceeds the limit {limit}", self.header)
        data = self._take(n, what)
        self._take(-n % 4, what + " padding")
        if b"\0" in data:
            raise ProtocolError("nul-in-string", f"{what} contains a NUL byte", self.header)
        return data.decode("utf-8", "surrogateescape")

    def pointer(self, what: str) -> bool:
        flag = self.u32(what + " pointer")
        if flag > 1:
            raise ProtocolError("bad-pointer", f"{what}: optional-data flag {flag} is neither 0 nor 1", self.header)
        return flag == 1

    def optional_string(self, limit: int, what: str) -> str | None:
        return self.string(limit, what) if self.pointer(what) else None

    def finish(self, what: str) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("trailing", f"{len(self.data) - self.pos} bytes after the {what}", self.header)
