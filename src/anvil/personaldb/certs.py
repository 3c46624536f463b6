"""Commit and snapshot certificates: the witness's Ed25519 signature over a canonical JSON body.

This module is shared by the server (which signs) and the SDK replica and `anvil pdb verify`
(which check, offline, with the published public keys). Its format is specified in
docs/personaldb.md so that a client in another language can verify a chain:

    body      = {"v": 1, "type": "commit", "group", "index", "prev_hash", "hash",
                 "changeset_sha256", "schema_version", "entry_kind", "authz_revision", "time",
                 "key_id"}                                   (snapshot: see SNAPSHOT_FIELDS)
    canonical = JSON of body, keys sorted, separators (",", ":"), ASCII only
    signed    = b"anvil.personaldb.certificate.v1\\n" + canonical
    signature = base64(Ed25519.sign(witness private key, signed))

Chain hashes:

    genesis(group, schema_sha256) = sha256("anvil.personaldb.genesis.v1\\n" + group + "\\n" + schema_sha256)
    entry_hash = sha256("anvil.personaldb.entry.v1\\n" + canonical({"group", "index", "prev_hash",
                        "changeset_sha256", "schema_version", "entry_kind"}))
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from typing import TYPE_CHECKING, Any

# cryptography's Ed25519 code (~5 ms of CPU to import) loads when a key is made or a certificate
# verified: fsck loads this module for a store that may have no PersonalDB group at all.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

DOMAIN = b"anvil.personaldb.certificate.v1\n"
COMMIT_FIELDS = ("v", "type", "group", "index", "prev_hash", "hash", "changeset_sha256", "schema_version",
                 "entry_kind", "authz_revision", "time", "key_id")
SNAPSHOT_FIELDS = ("v", "type", "group", "index", "hash", "state_hash", "schema_version", "time", "key_id")


class CertificateInvalid(Exception):
    """A certificate (or a chain) that does not verify: code `PersonalDbCertificateInvalid`."""

    code = "PersonalDbCertificateInvalid"

    def __init__(self, message: str):
        super().__init__(f"{self.code}: {message}")
        self.message = message


def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def genesis_hash(group: str, schema_sha256: str) -> str:
    return sha256_hex(b"anvil.personaldb.genesis.v1\n" + f"{group}\n{schema_sha256}".encode())


def entry_hash(group: str, index: int, prev_hash: str, changeset_sha256: str, schema_version: int,
               entry_kind: str) -> str:
    return sha256_hex(b"anvil.personaldb.entry.v1\n" + canonical({
        "group": group, "index": index, "prev_hash": prev_hash, "changeset_sha256": changeset_sha256,
        "schema_version": schema_version, "entry_kind": entry_kind}))


def key_id_of(public_raw: bytes) -> str:
    return "ed25519:" + sha256_hex(public_raw)[:16]


class WitnessKey:
    """The private half (server only)."""

    def __init__(self, private_raw: bytes):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self._key = Ed25519PrivateKey.from_private_bytes(private_raw)
        self.public_raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_id = key_id_of(self.public_raw)

    @classmethod
    def generate(cls) -> WitnessKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        k = Ed25519PrivateKey.generate()
        return cls(k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))

    def private_raw(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def sign(self, body: dict[str, Any]) -> dict[str, Any]:
        body = {**body, "key_id": self.key_id}
        sig = self._key.sign(DOMAIN + canonical(body))
        return {"body": body, "signature": base64.b64encode(sig).decode()}


@functools.lru_cache(maxsize=64)
def _public_key(pub: str) -> Ed25519PublicKey:
    """A published key, decoded once (a chain holds thousands of certificates by the same few keys)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(base64.b64decode(pub))


def verify_certificate(cert: Any, public_keys: dict[str, str]) -> dict[str, Any]:
    """Check one certificate's signature against {key_id: base64 raw public key}; its body."""
    if not isinstance(cert, dict) or not isinstance(cert.get("body"), dict) or not isinstance(
            cert.get("signature"), str):
        raise CertificateInvalid("a certificate is {body, signature}")
    body = cert["body"]
    kid = body.get("key_id")
    pub = public_keys.get(kid) if isinstance(kid, str) else None
    if pub is None:
        raise CertificateInvalid(f"unknown witness key id {kid!r}")
    from cryptography.exceptions import InvalidSignature

    try:
        _public_key(pub).verify(base64.b64decode(cert["signature"]), DOMAIN + canonical(body))
    except (InvalidSignature, ValueError):
        raise CertificateInvalid(f"bad signature on the certificate of {body.get('group')!r} "
                                 f"index {body.get('index')!r}") from None
    return body


def verify_entry(cert: Any, public_keys: dict[str, str], *, group: str, prev_hash: str, index: int,
                 changeset: bytes | None = None) -> dict[str, Any]:
    """One commit certificate in its place in the chain: signature, group, index, link to
    `prev_hash`, the recomputed entry hash, and (when the bytes are at hand) the changeset's hash."""
    return check_entry(verify_certificate(cert, public_keys), group=group, prev_hash=prev_hash, index=index,
                       changeset=changeset)


def check_entry(body: dict[str, Any], *, group: str, prev_hash: str, index: int,
                changeset: bytes | None = None) -> dict[str, Any]:
    """The chain checks of `verify_entry` on a body whose signature was already verified (so a
    client may verify many signatures in parallel and link them in order afterwards)."""
    if body.get("type") != "commit" or body.get("group") != group or body.get("index") != index:
        raise CertificateInvalid(f"certificate is for {body.get('group')!r}#{body.get('index')!r}, "
                                 f"expected {group!r}#{index}")
    if body.get("prev_hash") != prev_hash:
        raise CertificateInvalid(f"entry {index} does not link to the previous hash")
    if changeset is not None and sha256_hex(changeset) != body.get("changeset_sha256"):
        raise CertificateInvalid(f"entry {index}: the changeset does not match its certified hash")
    want = entry_hash(group, index, prev_hash, str(body.get("changeset_sha256")), int(body.get("schema_version", 0)),
                      str(body.get("entry_kind")))
    if body.get("hash") != want:
        raise CertificateInvalid(f"entry {index}: the certified hash is not the hash of the entry")
    return body


def verify_chain(group: str, genesis: str, certs: list[dict[str, Any]], public_keys: dict[str, str],
                 changesets: dict[int, bytes] | None = None) -> dict[str, Any]:
    """A whole chain from genesis: {entries, head_index, head_hash}; CertificateInvalid at the first break."""
    prev, index = genesis, 0
    for cert in certs:
        index += 1
        body = verify_entry(cert, public_keys, group=group, prev_hash=prev, index=index,
                            changeset=(changesets or {}).get(index))
        prev = body["hash"]
    return {"entries": index, "head_index": index, "head_hash": prev}


def verify_snapshot(cert: Any, public_keys: dict[str, str], *, group: str, state_hash: str) -> dict[str, Any]:
    body = verify_certificate(cert, public_keys)
    if body.get("type") != "snapshot" or body.get("group") != group:
        raise CertificateInvalid("not a snapshot certificate of this group")
    if body.get("state_hash") != state_hash:
        raise CertificateInvalid(f"snapshot at index {body.get('index')}: the state hash does not match "
                                 "its certificate")
    return body


def verify_group(client: Any, group: str) -> dict[str, Any]:
    """`anvil pdb verify`: fetch a group's certificates and check the whole chain and its snapshots with
    the published keys (any AnvilClient-like `client`); CertificateInvalid at the first break."""
    keys = {k["key_id"]: k["public"] for k in client.pdb_keys()}
    info = client.pdb_get(group)
    chain: list[dict[str, Any]] = []
    after_index, after_hash = 0, info["genesis"]
    while True:
        page = client.pdb_catch_up(group, after_index, after_hash, limit=2000, certificates_only=True)
        chain += [e["certificate"] for e in page["entries"]]
        if not page["entries"] or not page["more"]:
            break
        after_index, after_hash = page["entries"][-1]["index"], page["entries"][-1]["hash"]
    res = verify_chain(group, info["genesis"], chain, keys)
    if (res["head_index"], res["head_hash"]) != (page["head"]["index"], page["head"]["hash"]):
        raise CertificateInvalid("the chain does not end at the head the server states")
    snaps = []
    for s in info.get("snapshots", []):
        body = verify_snapshot(s["certificate"], keys, group=group, state_hash=s["state_hash"])
        # The link is checked with what the certificate signs: the record's own index and hash are the
        # server's word, and a genuine certificate of another entry must not vouch for them.
        index = body.get("index")
        if (not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= len(chain)
                or (index, body.get("hash")) != (s["index"], s["hash"])
                or body.get("hash") != (chain[index - 1]["body"]["hash"] if index > 0 else info["genesis"])):
            raise CertificateInvalid(f"snapshot {s['index']} is not linked to the chain")
        snaps.append(index)
    return {**res, "group": group, "snapshots_verified": snaps, "key_ids": sorted(keys)}
