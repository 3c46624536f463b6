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
import logging
import os
import platform
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zstandard
from cryptography.exceptions import InvalidTag

from anvil.backup.backends import Backend
from anvil.backup.chunkindex import ChunkIndex, iter_index_packs
from anvil.backup.chunking import CHUNKER
from anvil.backup.crypto import CHUNK_ID, chunk_id_of_digest, read_passphrase, seal, unseal, unwrap_master, wrap_master
from anvil.backup.errors import BackupError
from anvil.backup.pack import PACK_TARGET, PackWriter, compress, decompress

# Re-exported: callers outside this package's files import these from here.
__all__ = ["BackupError", "Repository", "read_passphrase"]

# 2: archived journal segments (archive/<deployment>/...); version 1 repositories are read as
# they are and upgraded (config rewritten once) when continuous archiving first writes to them.
FORMAT_VERSION = 2
LOCK_STALE_ENV = "ANVIL_BACKUP_LOCK_STALE"
# As restic: a lock not refreshed for this long belongs to a process that is gone or hung.
LOCK_STALE = 30 * 60

log = logging.getLogger("anvil.backup")


def env_seconds(name: str, default: float) -> float:
    """A duration from the environment: seconds, or like 90s, 15m, 1h, 2d."""
    text = os.environ.get(name, "").strip()
    if not text:
        return float(default)
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            value = float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise BackupError(f"{name} must be a duration like 600, 90s, 15m or 1h, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise BackupError(f"{name} must be a finite duration of 0 or more, got {text!r}")
    return value


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        # A killed child its parent has not reaped yet still answers kill(0): it is a zombie.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:][:1] != "Z"
    except (OSError, ValueError):
        return True


def stale_reason(info: dict[str, Any], now: float, stale_after: float) -> str | None:
    """Why a lock no longer protects anything, or None if it may still be held."""
    pid, host = info.get("pid"), info.get("host")
    if host == platform.node() and isinstance(pid, int) and not pid_alive(pid):
        return f"process {pid} on {host} is gone"
    beat = info.get("heartbeat", info.get("time"))
    if isinstance(beat, int | float) and now - beat > stale_after:
        return f"no heartbeat for {int(now - beat)}s (stale after {int(stale_after)}s)"
    return None


def describe_lock(name: str, info: Any, now: float) -> str:
    try:
        beat = info.get("heartbeat", info["time"])
        return (f"{info['kind']} lock by pid {info['pid']} on {info['host']} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(info['time']))} UTC, "
                f"last heartbeat {int(now - beat)}s ago")
    except (AttributeError, KeyError, TypeError):
        return name


# Passphrase -> master key is a memory-hard KDF (~0.3 s with production costs): a long-running
# process (the server's backups, the archiver) pays it once per repository key and passphrase.
_MASTERS: dict[tuple[str, str, str], bytes] = {}
_MASTERS_LOCK = threading.Lock()
CACHE_ENV = "ANVIL_BACKUP_CACHE_DIR"
# What `snapshot_rows` keeps of a manifest: everything but the (large) file tree and summaries.
ROW_FIELDS = ("id", "parent", "tag", "started", "finished", "deployment_id", "consistency", "stats", "kind", "base",
              "key_ids", "problems")


def cache_root() -> Path | None:
    """Where decrypted-then-resealed snapshot headers are cached (like restic's cache); None disables."""
    text = os.environ.get(CACHE_ENV)
    if text is not None:
        return Path(text) if text.strip() and text.strip() != "off" else None
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "anvil" / "backup"


class Repository:
    def __init__(self, backend: Backend, config: dict[str, Any], master: bytes, key_id: str):
        self.backend = backend
        self.config = config
        self.repo_id = config["repo_id"]
        self.enc_key = master[:32]
        self.id_key = master[32:64]
        self.key_id = key_id
        self._index: ChunkIndex | None = None
        # One load at a time: a backup starts it on a thread of its own while the checkpoint is
        # copied (`prefetch_index`), and whoever asks meanwhile waits for that load.
        self._index_lock = threading.Lock()
        self.index_problems: list[str] = []
        self.pack_sizes: dict[str, int] = {}
        self._held: list[str] = []  # names of the locks this object holds
        self.live_locks: list[dict[str, Any]] = []  # other live locks seen when the last lock was taken

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
        secret = hashlib.sha256(passphrase.encode()).hexdigest()
        damaged: list[str] = []
        for name in key_names:
            try:
                raw = backend.read(name)
                entry = json.loads(raw)
                ck = (config["repo_id"], hashlib.sha256(raw).hexdigest(), secret)
                with _MASTERS_LOCK:
                    master = _MASTERS.get(ck)
                if master is None:
                    master = unwrap_master(config["repo_id"], entry, passphrase)
                    with _MASTERS_LOCK:
                        _MASTERS[ck] = master
            except InvalidTag:
                continue
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                # Not a wrong passphrase: the key file itself is unusable. Said so, below.
                why = ("not JSON" if isinstance(e, json.JSONDecodeError) else str(e) if isinstance(e, ValueError)
                       else "not a key file")
                damaged.append(f"{name} is damaged ({why})")
                continue
            return cls(backend, config, master, entry["id"])
        if len(damaged) == len(key_names):
            raise BackupError(f"no usable key in {backend.url}: {'; '.join(damaged[:3])}; restore keys/ from a copy "
                              "of the repository")
        raise BackupError("wrong passphrase: no key in the repository accepts it"
                          + (f" (and {'; '.join(damaged[:3])})" if damaged else ""))

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
    def lock(self, kind: str, operation: str | None = None) -> Iterator[None]:
        """`shared` (create, restore, verify) or `exclusive` (forget, prune): prune never races a backup.

        Write our lock, then look: if a conflicting lock exists, withdraw ours and refuse. Two
        racing writers can both withdraw (both refuse), never both proceed. Stale locks (their
        process is gone, or no heartbeat for `ANVIL_BACKUP_LOCK_STALE`) are deleted on the way:
        a crash does not need `anvil backup unlock`. While held, the lock's heartbeat is
        rewritten every sixth of the stale threshold.
        """
        stale_after = env_seconds(LOCK_STALE_ENV, LOCK_STALE)
        name = f"locks/{kind}-{uuid.uuid4().hex[:12]}"
        now = time.time()
        body = {"kind": kind, "pid": os.getpid(), "host": platform.node(), "time": now, "heartbeat": now,
                "operation": operation}
        try:
            self.backend.write(name, json.dumps(body).encode())
        except OSError as e:
            # A read-only copy (a mount, an immutable medium): the bare OS error named a temporary
            # lock file and said nothing of why a read needs to write.
            folder = f"{self.backend.url.rstrip('/')}/locks/"
            raise BackupError(f"cannot write a lock into {folder} ({e.strerror or e}): every backup, restore "
                              "and verify takes one; if this copy of the repository is "
                              "read-only, copy it somewhere writable and use that") from None
        stop = threading.Event()
        mutex = threading.Lock()  # a heartbeat never rewrites the lock after its release deleted it
        try:
            self.live_locks = self._check_locks(name, kind, stale_after)
            threading.Thread(target=self._heartbeat, args=(name, body, stale_after / 6, stop, mutex),
                             name="anvil-backup-lock", daemon=True).start()
            self._held.append(name)
            yield
        finally:
            stop.set()
            with mutex:
                if name in self._held:
                    self._held.remove(name)
                self.backend.delete(name)

    def _check_locks(self, own: str, kind: str, stale_after: float) -> list[dict[str, Any]]:
        """Take over stale locks; refuse on a live conflicting one; return the other live locks."""
        live: list[dict[str, Any]] = []
        conflicting: list[str] = []
        now = time.time()
        for other in self.backend.list("locks"):
            if other == own:
                continue
            try:
                info = json.loads(self.backend.read(other))
            except BackupError:
                continue  # released since it was listed
            except ValueError:
                info = None
            reason = stale_reason(info, now, stale_after) if isinstance(info, dict) else None
            if reason:
                self.backend.delete(other)
                log.warning("took over stale lock %s: %s", other, reason)
                continue
            live.append(info if isinstance(info, dict) else {"name": other})
            if kind == "exclusive" or other.split("/", 1)[1].startswith("exclusive-"):
                conflicting.append(describe_lock(other, info, now))
        if conflicting:
            raise BackupError(f"the repository is locked ({'; '.join(conflicting[:3])}); it is taken over "
                              f"automatically once its process is gone or after {stale_after / 60:g} minutes "
                              "without a heartbeat; if you are sure that process is gone, run `anvil backup unlock`")
        return live

    def _heartbeat(self, name: str, body: dict[str, Any], interval: float, stop: threading.Event,
                   mutex: threading.Lock) -> None:
        while not stop.wait(interval):
            with mutex:
                if stop.is_set():
                    return
                try:
                    if not self.backend.exists(name):
                        log.error("lock %s was removed while held; this operation will stop", name)
                        return
                    self.backend.write(name, json.dumps({**body, "heartbeat": time.time()}).encode())
                except Exception as e:  # noqa: BLE001 - a failed refresh is retried; staleness is judged by age
                    log.warning("cannot refresh lock %s: %s", name, e)

    def assert_locked(self) -> None:
        """Refuse to go on if a lock this object holds was removed (taken over as stale, or unlocked).

        Called before writing what makes data visible (an index) or deleting data: a process that
        stalled past the stale threshold may have had its packs' protection lifted meanwhile.
        """
        for name in list(self._held):
            if not self.backend.exists(name):
                raise BackupError(f"lock {name} of this process was removed (taken over as stale, or by "
                                  "`anvil backup unlock`); stopping before anything refers to data written under it")

    @property
    def held_locks(self) -> list[str]:
        return list(self._held)

    def write_under(self, held: list[str], live_locks: list[dict[str, Any]]) -> None:
        """Write under locks another process holds and keeps alive (a backup's child process works
        under its parent's `create` lock): `assert_locked` checks them, orphan removal sees `live_locks`."""
        self._held = list(held)
        self.live_locks = list(live_locks)

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

    def index(self) -> ChunkIndex:
        """chunk id -> location, from every readable index file; unreadable ones are recorded.

        Packed (`chunkindex`: 52 bytes a chunk, not a dict of objects), and each index file is
        decoded one pack at a time: a backup's own memory does not follow the repository's size."""
        with self._index_lock:
            if self._index is None:
                self._index = self._load_index()
            return self._index

    def prefetch_index(self) -> None:
        """Start loading the index on a thread (what is decrypted and decompressed there releases
        the GIL; the rest overlaps a checkpoint's copy, which releases it too): `index()` then
        waits for that load instead of starting its own."""
        def load() -> None:
            with contextlib.suppress(Exception):  # `index()` asked again raises it where it is handled
                self.index()

        threading.Thread(target=load, name="anvil-backup-index", daemon=True).start()

    def _load_index(self) -> ChunkIndex:
        idx = ChunkIndex()
        self.index_problems = []
        for name in self.backend.list("index"):
            try:
                plain = unseal(self.enc_key, self.backend.read(name), b"index")
                for pack in iter_index_packs(plain):
                    self.pack_sizes[pack["id"]] = pack["size"]
                    number = idx.pack_number(pack["id"])
                    for cid, off, length, raw in pack["chunks"]:
                        idx.add(cid, number, off, length, raw)
            except (InvalidTag, ValueError, KeyError, TypeError, zstandard.ZstdError):
                self.index_problems.append(f"{name} cannot be decrypted (truncated or corrupted)")
                continue
        return idx

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

    def load_snapshot(self, snap_id: str, *, pages: bool = True) -> dict[str, Any]:
        """A manifest, whole. Its blob tree, if stored in pages (`treepages`), is read into
        `tree.blobs` unless `pages=False` (then only `tree.blob_pages` lists them)."""
        name = f"snapshots/{snap_id}"
        if not self.backend.exists(name):
            raise BackupError(f"no snapshot {snap_id} in {self.backend.url}")
        try:
            manifest = self.unseal_json(self.backend.read(name), f"snapshot:{snap_id}".encode())
        except (InvalidTag, ValueError, zstandard.ZstdError):
            raise BackupError(f"snapshot {snap_id} cannot be decrypted (corrupted)") from None
        if pages:
            from anvil.backup import treepages

            try:
                treepages.expand(self, manifest)
            except BackupError as e:
                raise BackupError(f"snapshot {snap_id}: {e}") from None
        return manifest

    def snapshots(self) -> list[dict[str, Any]]:
        """Every readable manifest, oldest first."""
        out = [self.load_snapshot(i) for i in self.snapshot_ids()]
        return sorted(out, key=lambda m: m["started"])

    def snapshot_rows(self, damaged: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
        """Every snapshot's header (no tree, no summaries), oldest first, without decrypting every
        manifest each time: headers are cached locally (sealed with the repository key, by id;
        snapshots are immutable), so a repository with thousands of snapshots opens in one listing.

        A snapshot that cannot be read raises, since which snapshot is the newest (or which a
        retention policy keeps) cannot then be told; with `damaged`, it is recorded there (id,
        problem) and left out instead: for listings and for choosing a backup's parent, where an
        older parent only costs deduplication."""
        ids = self.snapshot_ids()
        root = cache_root()
        folder = root / self.repo_id / "snapshots" if root else None
        rows = []
        for sid in ids:
            row = None
            if folder is not None:
                try:
                    row = self.unseal_json((folder / sid).read_bytes(), f"snapshot-row:{sid}".encode())
                except Exception:  # noqa: BLE001 - a missing or damaged cache entry is read afresh
                    row = None
            if row is None:
                from anvil.backup.treestream import read_header  # (it imports this module's types)

                try:
                    head = read_header(self, sid, ROW_FIELDS)  # up to the tree: never the whole manifest
                except BackupError as e:
                    if damaged is None:
                        raise BackupError(f"{e}; so the repository's snapshots cannot all be read: `anvil backup "
                                          "verify` reports the damage, `anvil backup list` the readable snapshots "
                                          "(name one by its id)") from None
                    damaged.append((sid, str(e)))
                    continue
                row = {k: head.get(k) for k in ROW_FIELDS}
                if folder is not None:
                    with contextlib.suppress(OSError):
                        folder.mkdir(parents=True, exist_ok=True)
                        tmp = folder / f".{sid}.{uuid.uuid4().hex[:6]}"
                        tmp.write_bytes(self.seal_json(row, f"snapshot-row:{sid}".encode()))
                        os.replace(tmp, folder / sid)
            rows.append(row)
        if folder is not None and folder.is_dir():
            for stale in set(os.listdir(folder)) - set(ids):  # forgotten snapshots leave the cache too
                if not stale.startswith("."):
                    with contextlib.suppress(OSError):
                        (folder / stale).unlink()
        return sorted(rows, key=lambda m: m["started"])

    def resolve_snapshot(self, ref: str | None) -> dict[str, Any]:
        if ref in (None, "", "latest"):
            rows = self.snapshot_rows()
            if not rows:
                raise BackupError(f"{self.backend.url} holds no snapshots")
            return self.load_snapshot(rows[-1]["id"])
        matches = [i for i in self.snapshot_ids() if i.startswith(ref)]
        if len(matches) != 1:
            raise BackupError(f"snapshot {ref!r} {'is ambiguous' if matches else 'not found'}")
        return self.load_snapshot(matches[0])

    def save_snapshot(self, manifest: dict[str, Any], *, tree_json: str | None = None) -> None:
        """`tree_json`: the manifest's tree as JSON text (another snapshot's, taken over as written);
        `manifest` then has no `tree`."""
        sid = manifest["id"]
        self.backend.write(f"snapshots/{sid}", seal(self.enc_key, compress_manifest(manifest, tree_json),
                                                    f"snapshot:{sid}".encode()))


def compress_manifest(manifest: dict[str, Any], tree_json: str | None = None) -> bytes:
    """`compress` of a manifest's compact JSON. A manifest is small: a full snapshot's blob tree is
    in pages (`treepages`), a journal delta's is empty; only the manifests of older versions, read
    and never written again, carry their whole tree. `tree_json` goes in as the last key, as every
    manifest's tree does (`treestream` reads the header up to it)."""
    text = json.dumps(manifest, separators=(",", ":"))
    if tree_json is not None:
        if "tree" in manifest:
            raise ValueError("a manifest with a tree and tree_json")
        text = f'{text[:-1]},"tree":{tree_json}}}'
    return compress(text.encode())
