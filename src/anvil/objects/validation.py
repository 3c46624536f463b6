"""Names, keys, metadata and ranges: every rule a request is checked against before it acts."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from anvil.errors import AnvilError

RESERVED_PREFIX = "_anvil/"
RESERVED_BUCKETS = frozenset({"anvil"})
MAX_KEY_BYTES = 1024
MAX_METADATA_BYTES = 2048  # user metadata: sum of UTF-8 key and value bytes, as in S3
MAX_CONTENT_TYPE = 256
MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PART_NUMBER = 10_000
MAX_OBJECT_SIZE = 5 * 1024**4

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_META_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")
# Control characters, searched in C: every PUT checks its content type (and metadata values) with them.
_CONTROL_RE = re.compile(r"[\x00-\x1f]")
_CONTROL_NOT_TAB_RE = re.compile(r"[\x00-\x08\x0a-\x1f]")


def reserved_error() -> AnvilError:
    return AnvilError("UnauthorizedReservedNamespace", "keys under '_anvil/' are reserved for Anvil")


def is_reserved_key(key: str) -> bool:
    return key.startswith(RESERVED_PREFIX)


def check_not_reserved(key: str | None) -> None:
    """The first check of every key-bearing operation."""
    if key is not None and is_reserved_key(key):
        raise reserved_error()


def check_bucket_name(name: str) -> None:
    if name in RESERVED_BUCKETS:
        raise AnvilError("InvalidArgument", f"bucket name '{name}' is reserved")
    if not _BUCKET_RE.match(name):
        raise AnvilError(
            "InvalidArgument",
            "bucket names are 3-63 characters of lowercase letters, digits, '.' and '-', "
            "starting and ending with a letter or digit",
        )
    if ".." in name or ".-" in name or "-." in name:
        raise AnvilError("InvalidArgument", "bucket names may not contain '..', '.-' or '-.'")
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        pass
    else:
        raise AnvilError("InvalidArgument", "bucket names may not look like an IP address")
    if name.startswith(("xn--", "sthree-")) or name.endswith(("-s3alias", "--ol-s3")):
        raise AnvilError("InvalidArgument", "bucket name uses a prefix or suffix S3 reserves")


def check_key(key: str) -> None:
    """Keys are opaque strings (never paths on disk); only their encoding and size matter."""
    if not key:
        raise AnvilError("InvalidArgument", "object key must not be empty")
    if "\x00" in key:
        raise AnvilError("InvalidArgument", "object key must not contain NUL")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        raise AnvilError("InvalidArgument", "object key must be valid UTF-8") from None
    if len(encoded) > MAX_KEY_BYTES:
        raise AnvilError("InvalidArgument", f"object key is longer than {MAX_KEY_BYTES} bytes")


def check_object_key(key: str) -> None:
    check_not_reserved(key)
    check_key(key)


def normalise_metadata(meta: dict[str, str] | None) -> dict[str, str]:
    if not meta:
        return {}
    out: dict[str, str] = {}
    total = 0
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise AnvilError("InvalidArgument", "metadata keys and values must be strings")
        lk = k.lower()
        if not _META_KEY_RE.match(lk):
            raise AnvilError("InvalidArgument", "metadata keys are 1-128 of [a-z0-9_.-]")
        if _CONTROL_NOT_TAB_RE.search(v):
            raise AnvilError("InvalidArgument", "metadata values must not contain control characters")
        total += len(lk.encode()) + len(v.encode())
        out[lk] = v
    if total > MAX_METADATA_BYTES:
        raise AnvilError("InvalidArgument", f"user metadata is larger than {MAX_METADATA_BYTES} bytes")
    return out


def check_content_type(ct: str | None) -> str:
    if not ct:
        return "application/octet-stream"
    if len(ct) > MAX_CONTENT_TYPE or _CONTROL_RE.search(ct):
        raise AnvilError("InvalidArgument", "invalid Content-Type")
    try:
        # It goes back out as a header, in latin-1. One from a header always is; one from a JSON body
        # (copy with REPLACE, a multipart upload) could hold any character, and was stored, after which
        # every GET and HEAD of the object failed to encode its headers: 500 Internal.
        ct.encode("latin-1")
    except UnicodeEncodeError:
        raise AnvilError("InvalidArgument", "invalid Content-Type: an HTTP header carries latin-1 text") from None
    return ct


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


_RANGE_RE = re.compile(r"^bytes=([0-9]*)-([0-9]*)$")


def decimal_length(value: str | None) -> int | None:
    """A byte count or position (ASCII digits only), or None. Past 20 digits the exact value cannot
    matter (it is beyond any size allowed) and int() would refuse 4,300 digits: it is capped instead."""
    if not value or not value.isascii() or not value.isdigit():
        return None
    return 10**20 if len(value.lstrip("0")) > 20 else int(value)


def parse_range(header: str, size: int) -> ByteRange:
    """`a-b`, `a-` and `-n`. Malformed -> InvalidArgument; unsatisfiable -> InvalidRange (416)."""
    m = _RANGE_RE.match(header.strip())
    if not m or (m.group(1) == "" and m.group(2) == ""):
        raise AnvilError("InvalidArgument", "malformed Range header: use bytes=a-b, bytes=a- or bytes=-n")
    first, last = decimal_length(m.group(1)), decimal_length(m.group(2))
    unsatisfiable = AnvilError(
        "InvalidRange", "the requested range is not satisfiable", headers={"Content-Range": f"bytes */{size}"}
    )
    if first is None:
        assert last is not None
        if last == 0 or size == 0:
            raise unsatisfiable
        return ByteRange(max(0, size - last), size - 1)
    if last is not None and last < first:
        raise AnvilError("InvalidArgument", "malformed Range header: last byte before first byte")
    if first >= size:
        raise unsatisfiable
    return ByteRange(first, size - 1 if last is None else min(last, size - 1))


def check_part_number(n: int) -> None:
    if not 1 <= n <= MAX_PART_NUMBER:
        raise AnvilError("InvalidArgument", f"part numbers run from 1 to {MAX_PART_NUMBER}")
