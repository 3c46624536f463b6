"""SHA-256, MD5 and HMAC-SHA256 of small inputs without OpenSSL's algorithm lookup on every call.

`hashlib.sha256(data)` and `hmac.digest(key, msg, "sha256")` ask OpenSSL 3 for the algorithm by name each
time (`EVP_MD_fetch` / `EVP_Q_mac`: a property query, locks, a hash-table walk). Counted by callgrind in a
small S3 PUT: ~19 k instructions per `hashlib.sha256()`, ~11 k per `hashlib.md5()`, ~25 k per
`hmac.digest`, more than hashing the 1 KiB body itself (docs/performance.md). A copy of a hash object
made once (`EVP_MD_CTX_copy`) skips the lookup; HMAC is then two such copies over the key's padded
inner and outer blocks (RFC 2104), which is what OpenSSL computes too.
"""

from __future__ import annotations

import hashlib

_SHA256 = hashlib.sha256()
_MD5 = hashlib.md5()
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_BLOCK = 64  # SHA-256's block size


def sha256_hex(data: bytes) -> str:
    h = _SHA256.copy()
    h.update(data)
    return h.hexdigest()


def md5_hex(data: bytes) -> str:
    h = _MD5.copy()
    h.update(data)
    return h.hexdigest()


class HmacSha256:
    """HMAC-SHA256 under one key: the key's inner and outer blocks are hashed once, each message then
    costs two copies of those states and no algorithm lookup. Same digests as `hmac.digest(key, msg,
    "sha256")`."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes):
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))

    def digest(self, msg: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(msg)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()
