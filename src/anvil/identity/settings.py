"""Identity settings: the run mode, the JWT secret, the envelope keyring and argon2 costs.

Secrets come from the environment (`JWT_SECRET`, `ANVIL_SECRET_ENCRYPTION_KEY` with
`_KEY_ID` and `_PREVIOUS_KEYS`). In development mode (the default, `ANVIL_MODE=development`)
missing ones are generated once and kept under `STORAGE_PATH/secrets/` with a loud warning;
in production mode (`ANVIL_MODE=production`) a missing secret refuses to start.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from anvil.errors import AnvilError
from anvil.identity.envelope import Keyring
from anvil.storage.layout import write_file_durably

log = logging.getLogger("anvil.identity")

MODES = ("development", "production")
DEFAULT_KEY_ID = "k1"


def run_mode() -> str:
    mode = os.environ.get("ANVIL_MODE", "development").strip().lower() or "development"
    if mode not in MODES:
        raise AnvilError("InvalidArgument", f"ANVIL_MODE must be one of {', '.join(MODES)}")
    return mode


def is_development() -> bool:
    return run_mode() == "development"


def dev_auth_enabled() -> bool:
    return os.environ.get("ANVIL_DEV_AUTH", "").strip() in ("1", "true", "yes")


@dataclass(frozen=True)
class Argon2Params:
    time_cost: int
    memory_cost: int  # KiB
    parallelism: int


def argon2_params() -> Argon2Params:
    # Production costs are argon2-cffi's defaults (~100 ms a verify). Tests set
    # ANVIL_ARGON2_FAST=1: the secrets are random 240-bit strings, so the hash is not what
    # protects them from guessing, and the suite must not spend seconds hashing.
    if os.environ.get("ANVIL_ARGON2_FAST", "").strip() in ("1", "true", "yes"):
        return Argon2Params(time_cost=1, memory_cost=8, parallelism=1)
    return Argon2Params(time_cost=3, memory_cost=65536, parallelism=4)


def _warn(message: str) -> None:
    banner = "!" * 78
    print(f"{banner}\nWARNING (development mode): {message}\n{banner}", file=sys.stderr, flush=True)


def decode_key(raw: str, what: str) -> bytes:
    """A 32-byte AES key given as base64 (standard or url-safe) or 64 hex digits."""
    raw = raw.strip()
    key: bytes | None = None
    if len(raw) == 64 and all(c in "0123456789abcdefABCDEF" for c in raw):
        key = bytes.fromhex(raw)
    else:
        for decoder in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                key = decoder(raw + "=" * (-len(raw) % 4))
                break
            except (binascii.Error, ValueError):
                continue
    if key is None or len(key) != 32:
        raise AnvilError("InvalidArgument", f"{what} must be 32 bytes, base64 or hex encoded")
    return key


def parse_previous_keys(raw: str) -> dict[str, bytes]:
    """`ANVIL_SECRET_ENCRYPTION_PREVIOUS_KEYS`: comma-separated `KEY_ID:KEY` pairs."""
    keys: dict[str, bytes] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        kid, sep, material = item.partition(":")
        if not sep or not kid.strip():
            raise AnvilError("InvalidArgument", "ANVIL_SECRET_ENCRYPTION_PREVIOUS_KEYS entries must be KEY_ID:KEY")
        keys[kid.strip()] = decode_key(material, f"previous key {kid.strip()!r}")
    return keys


def _generated(path: Path, make: bytes) -> bytes:
    if path.exists():
        return path.read_bytes()
    write_file_durably(path, make, mode=0o600)
    return make


def load_jwt_secret(secrets_dir: Path) -> bytes:
    env = os.environ.get("JWT_SECRET")
    if env:
        if len(env.encode()) < 32:
            raise AnvilError("InvalidArgument", "JWT_SECRET must be at least 32 bytes")
        return env.encode()
    if not is_development():
        raise AnvilError("InvalidArgument", "JWT_SECRET is required in production mode")
    path = secrets_dir / "jwt_secret"
    if not path.exists():
        _warn(f"JWT_SECRET is not set: generated one in {path}. Never use generated secrets in production.")
    return _generated(path, secrets.token_urlsafe(48).encode()).strip()


def load_keyring(secrets_dir: Path) -> Keyring:
    env_key = os.environ.get("ANVIL_SECRET_ENCRYPTION_KEY")
    previous = parse_previous_keys(os.environ.get("ANVIL_SECRET_ENCRYPTION_PREVIOUS_KEYS", ""))
    if env_key:
        kid = os.environ.get("ANVIL_SECRET_ENCRYPTION_KEY_ID", "").strip() or DEFAULT_KEY_ID
        return Keyring(kid, decode_key(env_key, "ANVIL_SECRET_ENCRYPTION_KEY"), previous)
    if not is_development():
        raise AnvilError("InvalidArgument", "ANVIL_SECRET_ENCRYPTION_KEY is required in production mode")
    path = secrets_dir / "encryption_key.json"
    if not path.exists():
        _warn(f"ANVIL_SECRET_ENCRYPTION_KEY is not set: generated one in {path}. "
              "Never use generated secrets in production.")
        body = {"key_id": "dev-" + secrets.token_hex(4), "key": base64.b64encode(secrets.token_bytes(32)).decode()}
        _generated(path, (json.dumps(body) + "\n").encode())
    try:
        body = json.loads(path.read_text())
        kid, key = str(body["key_id"]), decode_key(str(body["key"]), str(path))
    except (ValueError, KeyError, TypeError):
        raise AnvilError("InvalidArgument", f"{path} is unreadable") from None
    return Keyring(kid, key, previous)
