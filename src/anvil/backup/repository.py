"""The backup repository: content-addressed, deduplicated, compressed, encrypted, packed.

Layout (see docs/backup-format.md for the byte-level description):

    config              plaintext JSON: format version, repo id, chunker parameters
    keys/<key id>       JSON: argon2id salt+params, master key wrapped with AES-256-GCM
    data/<xx>/<pack id> packs of encrypted chunks + an encrypted header; pack id = sha256(file)
    index/<id>          encrypted: chunk id -> pack, offset, length
    snapshots/<id>      encrypted, zstd-compressed JSON manifests

Chunk ids are HMAC-SHA256 of the plaintext under a key derived from the master key, so
they reveal nothing about content to someone holding only the repository.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import platform
import secrets
import threading
import time
import urllib.parse
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT_VERSION = 1
PASSPHRASE_ENV = "ANVIL_BACKUP_PASSPHRASE"
KDF_ENV = "ANVIL_BACKUP_KDF"
# FastCDC 2020 via pyfastcdc 0.3.1 (pinned: chunk boundaries are part of the format).
CHUNKER = {"algorithm": "fastcdc2020", "library": "pyfastcdc==0.3.1", "avg_size": 512 * 1024,
           "min_size": 128 * 1024, "max_size": 4 * 1024 * 1024, "normalized_chunking": 1, "seed": 0}
PACK_TARGET = 16 * 1024 * 1024
# Packs are written (hashed, written, fsynced) on this many threads, with at most PACK_QUEUE
# sealed packs waiting in memory: the disk's fsync latency overlaps with encoding.
PACK_WRITERS = 2
PACK_QUEUE = 3
CHUNK_ID = "hmac-sha256(sha256)"  # chunk id = HMAC-SHA256(id key, SHA-256(plaintext))
KDF_PRODUCTION = {"time_cost": 3, "memory_cost": 64 * 1024, "parallelism": 2}
KDF_TEST = {"time_cost": 1, "memory_cost": 8 * 1024, "parallelism": 1}
NONCE = 12


class BackupError(Exception):
    """A backup/restore failure with a message precise enough to act on."""


# ------------------------------------------------------------------ backends


class Backend:
    """Named immutable objects; the only operations the repository needs."""

    url: str

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        return self.read(name)[offset:offset + length]

    def write(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def list(self, folder: str) -> list[str]:
        """Names (relative to the repository) of every object under `folder/`."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError


class LocalBackend(Backend):
    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.url = f"file://{self.root}"

    def _p(self, name: str) -> Path:
        return self.root / name

    def read(self, name: str) -> bytes:
        try:
            return self._p(name).read_bytes()
        except FileNotFoundError:
            raise BackupError(f"{name} is missing from the repository") from None

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        try:
            with open(self._p(name), "rb") as f:
                f.seek(offset)
                return f.read(length)
        except FileNotFoundError:
            raise BackupError(f"{name} is missing from the repository") from None

    def write(self, name: str, data: bytes) -> None:
        p = self._p(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)

    def list(self, folder: str) -> list[str]:
        base = self._p(folder)
        if not base.exists():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    def delete(self, name: str) -> None:
        try:
            self._p(name).unlink()
        except FileNotFoundError:
            pass

    def exists(self, name: str) -> bool:
        return self._p(name).exists()

    def size(self, name: str) -> int:
        return self._p(name).stat().st_size


class S3Backend(Backend):
    def __init__(self, bucket: str, prefix: str, *, endpoint: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, region: str | None = None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        self.s3 = boto3.client(
            "s3", endpoint_url=endpoint, aws_access_key_id=access_key or os.environ.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY"),
            region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(retries={"max_attempts": 5, "mode": "standard"}),
        )

    def _k(self, name: str) -> str:
        return self.prefix + name

    def read(self, name: str) -> bytes:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self._k(name))["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            raise BackupError(f"{name} is missing from the repository") from None

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self._k(name),
                                      Range=f"bytes={offset}-{offset + length - 1}")["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            raise BackupError(f"{name} is missing from the repository") from None

    def write(self, name: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self._k(name), Body=data)

    def list(self, folder: str) -> list[str]:
        out: list[str] = []
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._k(folder.rstrip("/") + "/")):
            out.extend(o["Key"][len(self.prefix):] for o in page.get("Contents", []))
        return sorted(out)

    def delete(self, name: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self._k(name))

    def exists(self, name: str) -> bool:
        try:
            self.s3.head_object(Bucket=self.bucket, Key=self._k(name))
            return True
        except Exception:  # noqa: BLE001 - botocore raises ClientError(404)
            return False

    def size(self, name: str) -> int:
        return int(self.s3.head_object(Bucket=self.bucket, Key=self._k(name))["ContentLength"])


def open_backend(url: str, *, s3_endpoint: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, storage_path: str | Path | None = None) -> Backend:
    """`file:///path` or `s3://bucket/prefix`; a local repository inside STORAGE_PATH is refused."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise BackupError(f"file URLs must be file:///absolute/path, got {url!r}")
        path = Path(urllib.parse.unquote(parsed.path)).absolute()
        if storage_path is not None:
            root = Path(storage_path).absolute().resolve()
            target = path.resolve()
            if target == root or root in target.parents:
                raise BackupError(f"the repository {path} is inside STORAGE_PATH {root}: "
                                  "a backup must live somewhere else")
        return LocalBackend(path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise BackupError(f"s3 URLs must be s3://bucket/prefix, got {url!r}")
        return S3Backend(parsed.netloc, parsed.path, endpoint=s3_endpoint, access_key=access_key,
                         secret_key=secret_key)
    raise BackupError(f"unsupported repository URL {url!r}: use file:///path or s3://bucket/prefix")


def read_passphrase(key_file: str | None = None, env: str = PASSPHRASE_ENV) -> str:
    if key_file:
        try:
            value = Path(key_file).read_text().rstrip("\r\n")
        except OSError as e:
            raise BackupError(f"cannot read key file {key_file}: {e.strerror}") from None
    else:
        value = os.environ.get(env, "")
    if not value:
        raise BackupError(f"no passphrase: set {env} or pass --key-file")
    return value


# ------------------------------------------------------------------ crypto helpers


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s)


def _kdf_params() -> dict[str, int]:
    return dict(KDF_TEST if os.environ.get(KDF_ENV, "").lower() in ("test", "fast", "cheap") else KDF_PRODUCTION)


def _derive(passphrase: str, salt: bytes, params: dict[str, int]) -> bytes:
    from argon2.low_level import Type, hash_secret_raw

    return hash_secret_raw(passphrase.encode(), salt, time_cost=params["time_cost"],
                           memory_cost=params["memory_cost"], parallelism=params["parallelism"],
                           hash_len=32, type=Type.ID)


def seal(key: bytes, data: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE)
    return nonce + AESGCM(key).encrypt(nonce, data, aad)


def unseal(key: bytes, blob: bytes | memoryview, aad: bytes) -> bytes:
    if len(blob) < NONCE + 16:
        raise InvalidTag()
    return AESGCM(key).decrypt(blob[:NONCE], blob[NONCE:], aad)


_zstd = threading.local()  # (de)compressor objects are not thread-safe: one per thread


def _zc() -> zstandard.ZstdCompressor:
    if not hasattr(_zstd, "c"):
        _zstd.c = zstandard.ZstdCompressor(level=3)
    return _zstd.c


def _zd() -> zstandard.ZstdDecompressor:
    if not hasattr(_zstd, "d"):
        _zstd.d = zstandard.ZstdDecompressor()
    return _zstd.d


def compress(data: bytes) -> bytes:
    """One leading byte says how: 1 = zstd, 0 = stored (incompressible data is not inflated)."""
    if len(data) > 16 * 1024:
        # Probe a sample first: random/already-compressed bodies skip a wasted full compression.
        sample = data[: 8 * 1024]
        if len(_zc().compress(sample)) > 0.97 * len(sample):
            return b"\x00" + data
    z = _zc().compress(data)
    return b"\x01" + z if len(z) < len(data) else b"\x00" + data


def decompress(data: bytes) -> bytes:
    if data[:1] == b"\x01":
        return _zd().decompress(data[1:])
    if data[:1] == b"\x00":
        return data[1:]
    raise ValueError("unknown compression tag")


_local = threading.local()


def chunker() -> Any:
    """This thread's pinned FastCDC chunker (instances are not thread-safe, but reusable)."""
    cdc = getattr(_local, "cdc", None)
    if cdc is None:
        cdc = _local.cdc = _new_chunker()
    return cdc


def _new_chunker() -> Any:
    """The pinned FastCDC chunker; refuse the pure-Python fallback (~200x slower, same cuts)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            from pyfastcdc.cy import FastCDC
        except ImportError as e:
            raise BackupError(f"pyfastcdc's native extension is not available ({e}); reinstall pyfastcdc") from None
    import pyfastcdc

    if pyfastcdc.__version__ != CHUNKER["library"].split("==")[1]:
        raise BackupError(f"pyfastcdc {pyfastcdc.__version__} installed, the repository format needs "
                          f"{CHUNKER['library']}")
    return FastCDC(CHUNKER["avg_size"], min_size=CHUNKER["min_size"], max_size=CHUNKER["max_size"],
                   normalized_chunking=CHUNKER["normalized_chunking"], seed=CHUNKER["seed"])


# ------------------------------------------------------------------ the repository


@dataclass(frozen=True)
class Location:
    pack: str
    offset: int
    length: int
    raw_length: int


def pack_name(pack_id: str) -> str:
    return f"data/{pack_id[:2]}/{pack_id}"


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
                kek = _derive(passphrase, _unb64(entry["salt"]), entry["kdf"])
                master = unseal(kek, _unb64(entry["wrapped"]), cls._key_aad(config["repo_id"], entry["id"]))
            except InvalidTag:
                continue
            except (ValueError, KeyError, TypeError):
                continue
            return cls(backend, config, master, entry["id"])
        raise BackupError("wrong passphrase: no key in the repository accepts it")

    @staticmethod
    def _key_aad(repo_id: str, key_id: str) -> bytes:
        return f"anvil-backup-key:{repo_id}:{key_id}".encode()

    @classmethod
    def _write_key(cls, backend: Backend, repo_id: str, master: bytes, passphrase: str) -> str:
        key_id = uuid.uuid4().hex[:16]
        salt = secrets.token_bytes(16)
        params = _kdf_params()
        kek = _derive(passphrase, salt, params)
        entry = {"id": key_id, "created": time.time(), "algorithm": "argon2id", "kdf": params, "salt": _b64(salt),
                 "wrapped": _b64(seal(kek, master, cls._key_aad(repo_id, key_id)))}
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
        """HMAC-SHA256(id key, SHA-256(plaintext)): keyed, yet a file that is one chunk is hashed once."""
        return hmac.new(self.id_key, sha256_digest, hashlib.sha256).hexdigest()

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


class PackWriter:
    """Accumulates new chunks into packs (~16 MiB), then writes the index that points at them.

    Full packs are hashed, written and fsynced on background threads (`PACK_WRITERS`, at most
    `PACK_QUEUE` packs in flight), so the encoders never wait for the disk. Nothing points at a
    pack until `finish()` has waited for every write and then writes the index.
    """

    def __init__(self, repo: Repository):
        self.repo = repo
        self.known = repo.index()
        self.parts: list[bytes] = []  # sealed chunks of the open pack (joined once, at flush)
        self.size = 0
        self.entries: list[list[Any]] = []
        self.written_packs: list[dict[str, Any]] = []
        self.new_bytes = 0
        self.new_chunks = 0
        self.pending: set[str] = set()  # chunks added this session whose pack is not yet written
        self.target = int(repo.config.get("pack_target", PACK_TARGET))
        self._inflight: deque[Future[dict[str, Any]]] = deque()
        self._pool: ThreadPoolExecutor | None = None

    def encode(self, data: bytes | memoryview, digest: bytes | None = None) -> tuple[str, int, bytes | None]:
        """(chunk id, plaintext length, sealed bytes or None if already stored); thread-safe.

        `digest` is the plaintext's SHA-256 if the caller already has it (a one-chunk file).
        """
        cid = self.repo.chunk_id_of_digest(digest or hashlib.sha256(data).digest())
        if cid in self.known or cid in self.pending:
            return cid, len(data), None
        return cid, len(data), seal(self.repo.enc_key, compress(data), cid.encode())

    def add(self, data: bytes | memoryview) -> str:
        cid, raw, blob = self.encode(data)
        return self.add_encoded(cid, raw, blob)

    def add_encoded(self, cid: str, raw_length: int, blob: bytes | None) -> str:
        """Append an encoded chunk (from `encode`, possibly on another thread) unless stored already."""
        if cid in self.known or cid in self.pending:
            return cid
        assert blob is not None
        self.entries.append([cid, self.size, len(blob), raw_length])
        self.parts.append(blob)
        self.size += len(blob)
        self.pending.add(cid)
        self.new_chunks += 1
        if self.size >= self.target:
            self.flush(wait=False)
        return cid

    def flush(self, *, wait: bool = True) -> None:
        """Seal the open pack and hand it to a writer thread; with `wait`, until every pack is on disk."""
        if self.entries:
            header = seal(self.repo.enc_key, compress(json.dumps(self.entries).encode()), b"pack-header")
            parts = [*self.parts, header, len(header).to_bytes(4, "big")]
            entries = self.entries
            self.parts, self.size, self.entries = [], 0, []
            if self._pool is None:
                self._pool = ThreadPoolExecutor(PACK_WRITERS, thread_name_prefix="anvil-pack")
            while len(self._inflight) >= PACK_QUEUE:
                self._collect(self._inflight.popleft())
            self._inflight.append(self._pool.submit(self._write_pack, parts, entries))
        if wait:
            self.drain()

    def _write_pack(self, parts: list[bytes], entries: list[list[Any]]) -> dict[str, Any]:
        body = b"".join(parts)
        del parts[:]
        pack_id = hashlib.sha256(body).hexdigest()
        self.repo.backend.write(pack_name(pack_id), body)
        return {"id": pack_id, "size": len(body), "chunks": entries}

    def _collect(self, fut: Future[dict[str, Any]]) -> None:
        pack = fut.result()  # a failed write raises here, before any index can mention the pack
        self.written_packs.append(pack)
        for cid, off, length, raw in pack["chunks"]:
            self.known[cid] = Location(pack["id"], off, length, raw)
            self.pending.discard(cid)
        self.repo.pack_sizes[pack["id"]] = pack["size"]
        self.new_bytes += pack["size"]

    def drain(self) -> None:
        try:
            while self._inflight:
                self._collect(self._inflight.popleft())
        finally:
            if self._pool is not None and not self._inflight:
                self._pool.shutdown()
                self._pool = None

    def close(self) -> None:
        """Wait for (and discard errors of) writes still in flight; used when a backup fails."""
        for fut in self._inflight:
            with contextlib.suppress(Exception):
                fut.result()
        self._inflight.clear()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def finish(self) -> str | None:
        """Write remaining chunks and one index file for this session's packs (before any snapshot)."""
        self.flush()
        if not self.written_packs:
            return None
        index_id = uuid.uuid4().hex
        data = self.repo.seal_json({"packs": self.written_packs}, b"index")
        self.repo.backend.write(f"index/{index_id}", data)
        self.new_bytes += len(data)
        return index_id


class ChunkReader:
    """Reads chunks, fetching whole packs and keeping the last few (restores read packs in order)."""

    def __init__(self, repo: Repository, cache_packs: int = 4):
        self.repo = repo
        self.index = repo.index()
        self.cache: OrderedDict[str, bytes] = OrderedDict()
        self.cache_packs = cache_packs
        self._lock = threading.Lock()

    def _pack(self, pack_id: str) -> bytes:
        # One lock: worker threads share the cache; decrypting happens outside it.
        with self._lock:
            if pack_id in self.cache:
                self.cache.move_to_end(pack_id)
                return self.cache[pack_id]
            data = self.repo.backend.read(pack_name(pack_id))
            self.cache[pack_id] = data
            while len(self.cache) > self.cache_packs:
                self.cache.popitem(last=False)
            return data

    def read(self, cid: str, *, check_id: bool = True) -> bytes | memoryview:
        loc = self.index.get(cid)
        if loc is None:
            raise BackupError(f"chunk {cid} is not in any index (missing from the repository)")
        try:
            pack = self._pack(loc.pack)
        except BackupError:
            raise BackupError(f"chunk {cid}: pack {loc.pack} is missing from the repository") from None
        blob = memoryview(pack)[loc.offset:loc.offset + loc.length]  # no copy of the sealed chunk
        try:
            return self.repo.decode_chunk(cid, blob, check_id=check_id)
        except BackupError as e:
            raise BackupError(f"{e} in pack {loc.pack} at offset {loc.offset}") from None

    def iter_file(self, chunks: list[str], *, check_id: bool = True) -> Iterator[bytes | memoryview]:
        for cid in chunks:
            yield self.read(cid, check_id=check_id)
