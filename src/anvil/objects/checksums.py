"""The S3 checksum family (CRC32, CRC32C, SHA-1, SHA-256), computed incrementally.

Values travel base64-encoded as S3 sends them (`x-amz-checksum-crc32: AAAAAA==`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import zlib

import crc32c as _crc32c

ALGORITHMS = ("crc32", "crc32c", "sha1", "sha256")


class _Crc:
    def __init__(self, fn):
        self._fn = fn
        self._value = 0

    def update(self, data: bytes) -> None:
        self._value = self._fn(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


class Checksum:
    """One running checksum; `b64()` gives the S3 wire form."""

    def __init__(self, algorithm: str):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unsupported checksum algorithm {algorithm!r}")
        self.algorithm = algorithm
        if algorithm == "crc32":
            self._h = _Crc(zlib.crc32)
        elif algorithm == "crc32c":
            self._h = _Crc(lambda data, value: _crc32c.crc32c(data, value))
        else:
            self._h = hashlib.new(algorithm)

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return self._h.digest()

    def b64(self) -> str:
        return base64.b64encode(self.digest()).decode()


def new_checksum(algorithm: str) -> Checksum:
    return Checksum(algorithm)


def digest_length(algorithm: str) -> int:
    return {"crc32": 4, "crc32c": 4, "sha1": 20, "sha256": 32}[algorithm]


def content_md5_hex(value: str) -> str | None:
    """A `Content-MD5` header (base64 of 16 bytes) as hex; None when it is not one."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 16 else None
