"""The S3 checksum family (CRC32, CRC32C, CRC64NVME, SHA-1, SHA-256), computed incrementally.

Values travel base64-encoded as S3 sends them (`x-amz-checksum-crc32: AAAAAA==`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import zlib
from functools import cache
from typing import Any

ALGORITHMS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")
# A multipart object's checksum is either COMPOSITE (the checksum of the parts' checksums, `-N`)
# or FULL_OBJECT (the checksum of all its bytes). Only a CRC can be FULL_OBJECT without reading
# the parts again: CRCs combine from the parts' values and sizes. CRC64NVME is FULL_OBJECT only.
COMPOSITE_ALGORITHMS = ("crc32", "crc32c", "sha1", "sha256")
FULL_OBJECT_ALGORITHMS = ("crc32", "crc32c", "crc64nvme")

_DIGEST_LENGTHS = {"crc32": 4, "crc32c": 4, "crc64nvme": 8, "sha1": 20, "sha256": 32}
_CRCS = ("crc32", "crc32c", "crc64nvme")


@cache
def _crc_functions() -> tuple[dict[str, Any], dict[str, Any]]:
    """(update, combine) per CRC. awscrt costs ~0.1 s of CPU to import: only a request that
    carries a CRC checksum pays it, not every server start and CLI call."""
    import crc32c
    from awscrt import checksums as crt

    return ({"crc32": zlib.crc32, "crc32c": crc32c.crc32c, "crc64nvme": crt.crc64nvme},
            {"crc32": crt.combine_crc32, "crc32c": crt.combine_crc32c, "crc64nvme": crt.combine_crc64nvme})


class _Crc:
    def __init__(self, algorithm: str):
        self._fn = _crc_functions()[0][algorithm]
        self._size = _DIGEST_LENGTHS[algorithm]
        self._value = 0

    def update(self, data: bytes) -> None:
        self._value = self._fn(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(self._size, "big")


class Checksum:
    """One running checksum; `b64()` gives the S3 wire form."""

    def __init__(self, algorithm: str):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unsupported checksum algorithm {algorithm!r}")
        self.algorithm = algorithm
        self._h = _Crc(algorithm) if algorithm in _CRCS else hashlib.new(algorithm)

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return self._h.digest()

    def b64(self) -> str:
        return base64.b64encode(self.digest()).decode()


def new_checksum(algorithm: str) -> Checksum:
    return Checksum(algorithm)


def digest_length(algorithm: str) -> int:
    return _DIGEST_LENGTHS[algorithm]


def combine_crcs(algorithm: str, parts: list[tuple[str, int]]) -> str:
    """The CRC of a concatenation from its pieces' (base64 CRC, byte size), without their bytes."""
    size = _DIGEST_LENGTHS[algorithm]
    combine = _crc_functions()[1][algorithm]
    value = 0  # the CRC of no bytes, for every algorithm here
    for b64, length in parts:
        value = combine(value, int.from_bytes(base64.b64decode(b64), "big"), length)
    return base64.b64encode(value.to_bytes(size, "big")).decode()


def content_md5_hex(value: str) -> str | None:
    """A `Content-MD5` header (base64 of 16 bytes) as hex; None when it is not one."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 16 else None
