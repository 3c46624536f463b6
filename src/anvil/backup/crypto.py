"""Passphrases, key derivation (argon2id), key wrapping, sealing (AES-256-GCM) and chunk ids.

docs/backup-format.md ("Keys", "Sealing", "Chunks and packs") is the byte-level description.
"""

from __future__ import annotations

import base64
import hmac
import os
import secrets
import threading
import time
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from anvil.backup.passphrase import PASSPHRASE_ENV, read_passphrase  # noqa: F401 - re-exported: callers import them from here

KDF_ENV = "ANVIL_BACKUP_KDF"
KDF_PRODUCTION = {"time_cost": 3, "memory_cost": 64 * 1024, "parallelism": 2}
KDF_TEST = {"time_cost": 1, "memory_cost": 8 * 1024, "parallelism": 1}
NONCE = 12
CHUNK_ID = "hmac-sha256(sha256)"  # chunk id = HMAC-SHA256(id key, SHA-256(plaintext))


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def unb64(s: str) -> bytes:
    return base64.b64decode(s)


def kdf_params() -> dict[str, int]:
    return dict(KDF_TEST if os.environ.get(KDF_ENV, "").lower() in ("test", "fast", "cheap") else KDF_PRODUCTION)


def derive(passphrase: str, salt: bytes, params: dict[str, int]) -> bytes:
    from argon2.low_level import Type, hash_secret_raw

    return hash_secret_raw(passphrase.encode(), salt, time_cost=params["time_cost"],
                           memory_cost=params["memory_cost"], parallelism=params["parallelism"],
                           hash_len=32, type=Type.ID)


_aead = threading.local()


def _aesgcm(key: bytes) -> AESGCM:
    """This thread's AESGCM for `key`: building one runs the key schedule, which for a small
    chunk costs as much as encrypting it; a backup seals every chunk with the same key."""
    cache = getattr(_aead, "by_key", None)
    if cache is None:
        cache = _aead.by_key = {}
    aead = cache.get(key)
    if aead is None:
        if len(cache) >= 8:  # key-encryption keys pass through too: keep it small
            cache.clear()
        aead = cache[key] = AESGCM(key)
    return aead


_NONCE_POOL = 4096 // NONCE * NONCE


def _nonce() -> bytes:
    """12 random bytes, from this thread's pool of getrandom(2) output: one syscall per 341
    nonces instead of one per chunk (a backup of many small blobs seals one chunk per blob).
    The bytes are the kernel's CSPRNG output either way, each used once."""
    pos = getattr(_aead, "pos", _NONCE_POOL)
    if pos >= _NONCE_POOL or _aead.pid != os.getpid():  # a forked child never reuses its parent's pool
        _aead.pool = os.urandom(_NONCE_POOL)
        _aead.pid = os.getpid()
        pos = 0
    _aead.pos = pos + NONCE
    return _aead.pool[pos:pos + NONCE]


def seal(key: bytes, data: bytes, aad: bytes) -> bytes:
    nonce = _nonce()
    return nonce + _aesgcm(key).encrypt(nonce, data, aad)


def unseal(key: bytes, blob: bytes | memoryview, aad: bytes) -> bytes:
    if len(blob) < NONCE + 16:
        raise InvalidTag()
    return _aesgcm(key).decrypt(blob[:NONCE], blob[NONCE:], aad)


def key_aad(repo_id: str, key_id: str) -> bytes:
    # Binds a key file to its repository and name: it cannot be moved or renamed.
    return f"anvil-backup-key:{repo_id}:{key_id}".encode()


def wrap_master(repo_id: str, key_id: str, master: bytes, passphrase: str) -> dict[str, Any]:
    """The `keys/<key id>` entry that unwraps `master` with `passphrase` (fresh salt)."""
    salt = secrets.token_bytes(16)
    params = kdf_params()
    kek = derive(passphrase, salt, params)
    return {"id": key_id, "created": time.time(), "algorithm": "argon2id", "kdf": params, "salt": b64(salt),
            "wrapped": b64(seal(kek, master, key_aad(repo_id, key_id)))}


# A key file is plaintext and read before anything authenticates it: its argon2 costs are bounded
# (64x the production ones) so a damaged or hostile key file cannot make opening the repository
# allocate gigabytes (argon2's "Memory allocation error" was a traceback) or run for hours.
KDF_LIMITS = {"time_cost": (1, 64), "memory_cost": (8, 4 * 1024 * 1024), "parallelism": (1, 64)}


def check_kdf(params: Any) -> str | None:
    """Why a key file's KDF parameters cannot be used, or None."""
    if not isinstance(params, dict):
        return "no KDF parameters"
    for name, (low, high) in KDF_LIMITS.items():
        value = params.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return f"KDF parameter {name} is {value!r}, outside {low}..{high}"
    if params["memory_cost"] < 8 * params["parallelism"]:
        return "KDF memory_cost is below 8 x parallelism"
    return None


def unwrap_master(repo_id: str, entry: dict[str, Any], passphrase: str) -> bytes:
    """The master key from a key entry; InvalidTag if the passphrase is not this entry's;
    ValueError if the entry is damaged."""
    from argon2.exceptions import HashingError

    why = check_kdf(entry["kdf"])
    if why:
        raise ValueError(why)
    try:
        kek = derive(passphrase, unb64(entry["salt"]), entry["kdf"])
    except HashingError as e:  # e.g. a salt too short: the file is damaged
        raise ValueError(f"argon2: {e}") from None
    return unseal(kek, unb64(entry["wrapped"]), key_aad(repo_id, entry["id"]))


def chunk_id_of_digest(id_key: bytes, sha256_digest: bytes) -> str:
    """HMAC-SHA256(id key, SHA-256(plaintext)): keyed, yet a file that is one chunk is hashed once."""
    return hmac.digest(id_key, sha256_digest, "sha256").hex()  # one-shot: no HMAC object per chunk
