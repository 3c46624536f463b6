"""The backup repository: content-addressed, deduplicated, compressed, encrypted, packed.

Layout (see docs/backup-format.md for the byte-level description):

    config              plaintext JSON: format version, repo id, chunker parameters
    keys/<key id>       JSON: argon2id salt+params, master key wrapped with AES-256-GCM
    data/<xx>/<pack id> packs of encrypted chunks + an encrypted header; pack id = sha256(file)
    index/<id>          encrypted: chunk id -> pack, offset, length
    snapshots/<id>      encrypted, zstd-compressed JSON manifests

Chunk ids are HMAC-SHA256 of the plaintext under a key derived from the master key, so
they reveal nothing about content to someone holding only the repository.

This module is the Repository: config, keys, locks, index and snapshots. Where the objects
live is `backends/`, keys and sealing `crypto`, packs and compression `pack`, cutting files
into chunks `chunking`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import secrets
import time
import uuid
from collections.abc import Iterator
from typing import Any

import zstandard
from cryptography.exceptions import InvalidTag

from anvil.backup.backends import Backend
from anvil.backup.chunking import CHUNKER
from anvil.backup.crypto import CHUNK_ID, chunk_id_of_digest, read_passphrase, seal, unseal, unwrap_master, wrap_master
from anvil.backup.errors import BackupError
from anvil.backup.pack import PACK_TARGET, Location, PackWriter, compress, decompress

# Re-exported: callers outside this package's files import these from here.
__all__ = ["BackupError", "Repository", "read_passphrase"]

FORMAT_VERSION = 1


class Repository:
    def __init__(self, backend: Backend, config: dict[str, Any], master: bytes, key_id: str):
        self.backend = backend
        self.config = config
        self.repo_id = config["repo_id"]
        self.enc_key = master[:32]
        self.id_key = master[32:64]
        self.key_id = key_id
        self._index: dict[str, Location] | None = None
        self.index_problems: list[str] = []
        self.pack_sizes: dict[str, int] = {}

    # -------------------------------------------------------------- init / open / keys

    @classmethod
    def init(cls, backend: Backend, passphrase: str, *, pack_target: int = PACK_TARGET) -> Repository:
        if backend.exists("config"):
            raise BackupError(f"{backend.url} already holds a repository")
        config = {"format_version": FORMAT_VERSION, "repo_id": uuid.uuid4().hex, "created": time.time(),
                  "chunker": CHUNKER, "compression": "zstd-3", "encryption": "aes-256-gcm",
                  "chunk_id": CHUNK_ID, "pack_target": pack_target}
        master = secrets.token_bytes(64)
        key_id = cls._write_key(backend, config["repo_id"], master, passphrase)
        backend.write("config", (json.dumps(config, indent=2) + "\n").encode())
        return cls(backend, config, master, key_id)

    @staticmethod
    def read_config(backend: Backend) -> dict[str, Any]:
        if not backend.exists("config"):
            raise BackupError(f"{backend.url} is not an Anvil backup repository (no config); run `anvil backup init`")
        try:
            config = json.loads(backend.read("config"))
            version = int(config["format_version"])
        except (ValueError, KeyError, TypeError):
            raise BackupError(f"{backend.url}: config is unreadable") from None
        if version > FORMAT_VERSION:
            raise BackupError(f"{backend.url} uses repository format version {version}; this Anvil supports "
                              f"up to {FORMAT_VERSION}: upgrade Anvil to use it (nothing was changed)")
        if version < 1:
            raise BackupError(f"{backend.url}: invalid repository format version {version}")
        if config.get("chunk_id") != CHUNK_ID:
            raise BackupError(f"{backend.url}: chunk ids are {config.get('chunk_id')!r}, this Anvil computes "
                              f"{CHUNK_ID!r}; it cannot deduplicate against or verify this repository")
        return config

    @classmethod
    def open(cls, backend: Backend, passphrase: str) -> Repository:
        config = cls.read_config(backend)
        key_names = backend.list("keys")
        if not key_names:
            raise BackupError(f"{backend.url} has no keys: the repository cannot be decrypted")
        for name in key_names:
            try:
                entry = json.loads(backend.read(name))
                master = unwrap_master(config["repo_id"], entry, passphrase)
            except InvalidTag:
                continue
            except (ValueError, KeyError, TypeError):
                continue
            return cls(backend, config, master, entry["id"])
        raise BackupError("wrong passphrase: no key in the repository accepts it")

    @classmethod
    def _write_key(cls, backend: Backend, repo_id: str, master: bytes, passphrase: str) -> str:
        key_id = uuid.uuid4().hex[:16]
        entry = wrap_master(repo_id, key_id, master, passphrase)
        backend.write(f"keys/{key_id}", (json.dumps(entry, indent=2) + "\n").encode())
        return key_id

    def key_ids(self) -> list[str]:
        return [n.split("/", 1)[1] for n in self.backend.list("keys")]

    def add_key(self, passphrase: str) -> str:
        return self._write_key(self.backend, self.repo_id, self.enc_key + self.id_key, passphrase)

    def remove_key(self, key_id: str) -> None:
        ids = self.key_ids()
        if key_id not in ids:
            raise BackupError(f"no key {key_id} in this repository (keys: {', '.join(ids)})")
        if len(ids) == 1:
            raise BackupError("refusing to remove the last key: the repository would become unreadable")
        self.backend.delete(f"keys/{key_id}")

    # -------------------------------------------------------------- locks

    @contextlib.contextmanager
    def lock(self, kind: str) -> Iterator[None]:
        """`shared` (create, restore, verify) or `exclusive` (forget, prune): prune never races a backup.

        Write our lock, then look: if a conflicting lock exists, withdraw ours and refuse. Two
        racing writers can both withdraw (both refuse), never both proceed. A crashed process
        leaves its lock behind; `anvil backup unlock` removes it after checking.
        """
        lock_id = f"{kind}-{uuid.uuid4().hex[:12]}"
        body = {"kind": kind, "pid": os.getpid(), "host": platform.node(), "time": time.time()}
        self.backend.write(f"locks/{lock_id}", json.dumps(body).encode())
        try:
            others = [n.split("/", 1)[1] for n in self.backend.list("locks") if not n.endswith(lock_id)]
            conflicting = [o for o in others if kind == "exclusive" or o.startswith("exclusive-")]
            if conflicting:
                details = []
                for o in conflicting[:3]:
                    try:
                        info = json.loads(self.backend.read(f"locks/{o}"))
                        details.append(f"{info['kind']} lock by pid {info['pid']} on {info['host']} since "
                                       f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(info['time']))} UTC")
                    except (BackupError, ValueError, KeyError):
                        details.append(o)
                raise BackupError(f"the repository is locked ({'; '.join(details)}); if that process is gone, "
                                  "run `anvil backup unlock`")
            yield
        finally:
            self.backend.delete(f"locks/{lock_id}")

    def unlock(self) -> list[str]:
        names = self.backend.list("locks")
        for n in names:
            self.backend.delete(n)
        return [n.split("/", 1)[1] for n in names]

    # -------------------------------------------------------------- sealed files

    def seal_json(self, obj: Any, aad: bytes) -> bytes:
        return seal(self.enc_key, compress(json.dumps(obj, separators=(",", ":")).encode()), aad)

    def unseal_json(self, blob: bytes, aad: bytes) -> Any:
        return json.loads(decompress(unseal(self.enc_key, blob, aad)))

    def chunk_id(self, data: bytes | memoryview) -> str:
        return self.chunk_id_of_digest(hashlib.sha256(data).digest())

    def chunk_id_of_digest(self, sha256_digest: bytes) -> str:
        return chunk_id_of_digest(self.id_key, sha256_digest)

    # -------------------------------------------------------------- index

    def index(self) -> dict[str, Location]:
        """chunk id -> location, from every readable index file; unreadable ones are recorded."""
        if self._index is None:
            idx: dict[str, Location] = {}
            self.index_problems = []
            for name in self.backend.list("index"):
                try:
                    body = self.unseal_json(self.backend.read(name), b"index")
                except (InvalidTag, ValueError, zstandard.ZstdError):
                    self.index_problems.append(f"{name} cannot be decrypted (truncated or corrupted)")
                    continue
                for pack in body["packs"]:
                    self.pack_sizes[pack["id"]] = pack["size"]
                    for cid, off, length, raw in pack["chunks"]:
                        idx[cid] = Location(pack["id"], off, length, raw)
            self._index = idx
        return self._index

    def writer(self) -> PackWriter:
        return PackWriter(self)

    # -------------------------------------------------------------- chunks

    def decode_chunk(self, cid: str, blob: bytes | memoryview, *, check_id: bool = True) -> bytes | memoryview:
        """Decrypt, decompress and check a chunk against its id; BackupError names it if bad.

        `check_id=False` skips recomputing the HMAC: for callers that check a whole-file SHA-256
        of the result anyway (restore). AES-GCM still authenticates the chunk under its id.
        """
        try:
            plain = unseal(self.enc_key, blob, cid.encode())
            # A stored chunk is returned as a view past its tag byte: no copy of the plaintext.
            data: bytes | memoryview = memoryview(plain)[1:] if plain[:1] == b"\x00" else decompress(plain)
        except (InvalidTag, ValueError, zstandard.ZstdError):
            raise BackupError(f"chunk {cid} cannot be decrypted (corrupted)") from None
        if check_id and self.chunk_id(data) != cid:
            raise BackupError(f"chunk {cid} decrypts to content with a different id (corrupted)")
        return data

    # -------------------------------------------------------------- snapshots

    def snapshot_ids(self) -> list[str]:
        return [n.split("/", 1)[1] for n in self.backend.list("snapshots")]

    def load_snapshot(self, snap_id: str) -> dict[str, Any]:
        name = f"snapshots/{snap_id}"
        if not self.backend.exists(name):
            raise BackupError(f"no snapshot {snap_id} in {self.backend.url}")
        try:
            return self.unseal_json(self.backend.read(name), f"snapshot:{snap_id}".encode())
        except (InvalidTag, ValueError, zstandard.ZstdError):
            raise BackupError(f"snapshot {snap_id} cannot be decrypted (corrupted)") from None

    def snapshots(self) -> list[dict[str, Any]]:
        """Every readable manifest, oldest first."""
        out = [self.load_snapshot(i) for i in self.snapshot_ids()]
        return sorted(out, key=lambda m: m["started"])

    def resolve_snapshot(self, ref: str | None) -> dict[str, Any]:
        if ref in (None, "", "latest"):
            ids = self.snapshot_ids()
            if not ids:
                raise BackupError(f"{self.backend.url} holds no snapshots")
            return self.snapshots()[-1]
        matches = [i for i in self.snapshot_ids() if i.startswith(ref)]
        if len(matches) != 1:
            raise BackupError(f"snapshot {ref!r} {'is ambiguous' if matches else 'not found'}")
        return self.load_snapshot(matches[0])

    def save_snapshot(self, manifest: dict[str, Any]) -> None:
        sid = manifest["id"]
        self.backend.write(f"snapshots/{sid}", self.seal_json(manifest, f"snapshot:{sid}".encode()))
