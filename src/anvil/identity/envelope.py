"""Secret envelopes: AES-256-GCM under a named key, with previous keys kept for decryption.

Application secrets must be recoverable in plaintext (S3 SigV4 signs with them), so they are
encrypted rather than only hashed. The envelope records its key id; the client id is bound
as associated data so an envelope copied onto another application fails to open.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from anvil.errors import AnvilError

ENVELOPE_VERSION = 1


class EnvelopeError(AnvilError):
    def __init__(self, message: str):
        super().__init__("Internal", message)


@dataclass(frozen=True)
class Keyring:
    active_id: str
    active_key: bytes
    previous: dict[str, bytes] = field(default_factory=dict)

    def key(self, key_id: str) -> bytes | None:
        if key_id == self.active_id:
            return self.active_key
        return self.previous.get(key_id)

    @property
    def key_ids(self) -> list[str]:
        return [self.active_id, *sorted(k for k in self.previous if k != self.active_id)]


def seal(keyring: Keyring, plaintext: str, aad: str) -> str:
    nonce = os.urandom(12)
    ct = AESGCM(keyring.active_key).encrypt(nonce, plaintext.encode(), aad.encode())
    return json.dumps({
        "v": ENVELOPE_VERSION, "alg": "AES-256-GCM", "kid": keyring.active_id,
        "nonce": base64.b64encode(nonce).decode(), "ct": base64.b64encode(ct).decode(),
    }, sort_keys=True)


def key_id(envelope: str) -> str:
    try:
        return str(json.loads(envelope)["kid"])
    except (ValueError, KeyError, TypeError):
        raise EnvelopeError("malformed secret envelope") from None


def open_envelope(keyring: Keyring, envelope: str, aad: str) -> str:
    try:
        body = json.loads(envelope)
        kid = str(body["kid"])
        nonce = base64.b64decode(body["nonce"])
        ct = base64.b64decode(body["ct"])
        if body.get("v") != ENVELOPE_VERSION:
            raise ValueError("version")
    except (ValueError, KeyError, TypeError):
        raise EnvelopeError("malformed secret envelope") from None
    key = keyring.key(kid)
    if key is None:
        raise EnvelopeError(f"secret envelope key {kid!r} is not configured")
    try:
        return AESGCM(key).decrypt(nonce, ct, aad.encode()).decode()
    except InvalidTag:
        raise EnvelopeError(f"secret envelope does not decrypt with key {kid!r}") from None
