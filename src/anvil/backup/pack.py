"""Packs: compression, the pack file layout, writing new chunks into packs and reading them back.

A pack is sealed chunks, then a sealed header listing them, then the header's length
(docs/backup-format.md, "Chunks and packs"). Its name is the SHA-256 of the whole file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zstandard

from anvil.backup.crypto import seal
from anvil.backup.errors import BackupError

if TYPE_CHECKING:
    from anvil.backup.repository import Repository

PACK_TARGET = 16 * 1024 * 1024
# Packs are written (hashed, written, fsynced) on this many threads, with at most PACK_QUEUE
# sealed packs waiting in memory: the disk's fsync latency overlaps with encoding.
PACK_WRITERS = 2
PACK_QUEUE = 3
# A session's index entries are written out as an index file once this many wait for one (as
# restic does), not all at the end: an initial backup of 400,000 small blobs held ~36 MiB of index
# text until then, and ~100 MiB more while joining, compressing and sealing it in one piece.
INDEX_CHUNKS = 50_000


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


@dataclass(frozen=True, slots=True)  # one per chunk of the repository: no __dict__ each
class Location:
    """Where a chunk is stored: its sealed bytes at [offset, offset + length) of a pack."""

    pack: str
    offset: int
    length: int
    raw_length: int


# The largest pack `backup init --pack-size` makes: a pack is assembled in memory.
PACK_TARGET_MAX = 256 * 1024 * 1024


def pack_target(config: dict[str, Any]) -> int:
    """The config's pack size. The config is plaintext: a damaged value failed a create after its
    checkpoint with a traceback (a string, null), or made a pack of every chunk (0, negative)."""
    value = config.get("pack_target", PACK_TARGET)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= PACK_TARGET_MAX:
        raise BackupError(f"the repository's config is damaged: pack_target is {json.dumps(value)}, not a size in "
                          f"bytes up to {PACK_TARGET_MAX}; restores still work, but nothing can be written until it is "
                          f"repaired (it was {PACK_TARGET} unless `backup init --pack-size` said otherwise)")
    return value


def pack_name(pack_id: str) -> str:
    return f"data/{pack_id[:2]}/{pack_id}"


class PackWriter:
    """Accumulates new chunks into packs (~16 MiB), then writes the index that points at them.

    Full packs are hashed, written and fsynced on background threads (`PACK_WRITERS`, at most
    `PACK_QUEUE` packs in flight), so the encoders never wait for the disk. Nothing points at a
    pack until its write has completed: an index file names only packs already on disk (one every
    `INDEX_CHUNKS` chunks, the last one from `finish()`).
    """

    def __init__(self, repo: Repository):
        self.repo = repo
        self.known = repo.index()
        self.parts: list[bytes] = []  # sealed chunks of the open pack (joined once, at flush)
        self.size = 0
        self.entries: list[list[Any]] = []
        # Packs written this session: headers (id, size, chunk count); their index entries are kept
        # as compact JSON text (~90 bytes a chunk, where lists of four were ~280).
        self.written_packs: list[dict[str, Any]] = []
        self.index_parts: list[str] = []
        self._index_chunks = 0  # entries in index_parts
        self.new_bytes = 0
        self.new_chunks = 0
        self.pending: set[str] = set()  # chunks added this session whose pack is not yet written
        self.target = pack_target(repo.config)
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
        # Hashed and written part by part: no 16 MiB join (a copy and fresh pages per pack).
        h = hashlib.sha256()
        for part in parts:
            h.update(part)
        pack_id = h.hexdigest()
        self.repo.backend.write_parts(pack_name(pack_id), parts)
        size = sum(len(part) for part in parts)
        del parts[:]
        return {"id": pack_id, "size": size, "chunks": entries}

    def _collect(self, fut: Future[dict[str, Any]]) -> None:
        pack = fut.result()  # a failed write raises here, before any index can mention the pack
        self.written_packs.append({"id": pack["id"], "size": pack["size"], "chunks": len(pack["chunks"])})
        self.index_parts.append(json.dumps(pack, separators=(",", ":")))
        for cid, off, length, raw in pack["chunks"]:
            self.known[cid] = Location(pack["id"], off, length, raw)
            self.pending.discard(cid)
        self.repo.pack_sizes[pack["id"]] = pack["size"]
        self.new_bytes += pack["size"]
        self._index_chunks += len(pack["chunks"])
        if self._index_chunks >= INDEX_CHUNKS:
            self._write_index()  # its packs are on disk: an index naming them is safe to write now

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

    def sealed_index(self, more: list[dict[str, Any]] | None = None) -> bytes:
        """The sealed index file body `{"packs": [...]}` for this session's packs (and `more`)."""
        parts = [*self.index_parts, *(json.dumps(p, separators=(",", ":")) for p in more or [])]
        text = '{"packs":[' + ",".join(parts) + "]}"
        return seal(self.repo.enc_key, compress(text.encode()), b"index")

    def finish(self) -> str | None:
        """Write remaining chunks and the index file for this session's last packs (before any snapshot)."""
        self.flush()
        return self._write_index() if self.index_parts else None

    def _write_index(self) -> str:
        self.repo.assert_locked()
        index_id = uuid.uuid4().hex
        data = self.sealed_index()
        self.repo.backend.write(f"index/{index_id}", data)
        self.new_bytes += len(data)
        self.index_parts, self._index_chunks = [], 0
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


# The longest span `SpanReader` reads at once (a pack's worth: bounds the bytes one file holds).
MAX_SPAN = 16 * 1024 * 1024


class SpanReader(ChunkReader):
    """Reads a file's chunks a span at a time: each run of its chunks lying back to back in one
    pack is one ranged read, never the whole pack, and nothing is cached.

    For the restore's large blobs: their packs also hold small blobs (a backup packs what it
    encodes in one stream), which the restore's pack windows read themselves. Whole packs read
    for bench/backup.py's 336 MB of large blobs were 649 MB: the small blobs' 311 MB went from
    the disk twice."""

    def iter_file(self, chunks: list[str], *, check_id: bool = True) -> Iterator[bytes | memoryview]:
        locs = []
        for cid in chunks:
            loc = self.index.get(cid)
            if loc is None:
                raise BackupError(f"chunk {cid} is not in any index (missing from the repository)")
            locs.append((cid, loc))
        i = 0
        while i < len(locs):
            first = locs[i][1]
            end, j = first.offset + first.length, i + 1
            while (j < len(locs) and locs[j][1].pack == first.pack and locs[j][1].offset == end
                   and end + locs[j][1].length - first.offset <= MAX_SPAN):
                end += locs[j][1].length
                j += 1
            try:
                span = memoryview(self.repo.backend.read_range(pack_name(first.pack), first.offset,
                                                               end - first.offset))
            except BackupError:
                raise BackupError(f"chunk {locs[i][0]}: pack {first.pack} is missing from the repository") from None
            for cid, loc in locs[i:j]:
                at = loc.offset - first.offset
                try:
                    yield self.repo.decode_chunk(cid, span[at:at + loc.length], check_id=check_id)
                except BackupError as e:
                    raise BackupError(f"{e} in pack {loc.pack} at offset {loc.offset}") from None
            i = j
