"""Content-addressed blob store: `blobs/sha256/ab/<hash>`.

A body is streamed into `tmp/`, hashed on the way (SHA-256 for the address, MD5 for the
S3 ETag), fsynced and renamed into place. Only after that may a record referencing it be
committed, so a crash leaves at worst an orphan blob (found by fsck, removed by gc), never
a record pointing at missing bytes.

Every read is verified (`read_verified`): a blob of at most one chunk (1 MiB) against its
SHA-256 address, a larger one chunk by chunk against its sidecar `ab/<hash>.chunks` (one
digest per 1 MiB of the blob, written and fsynced before the blob is named), so a range costs
only the chunks it touches. A blob whose bytes no longer match its address raises
`BlobCorrupted`; `quarantine` moves it to `STORAGE_PATH/quarantine/<hash>`.

Small bodies may instead live inline in the record store (`storage.inline`, table
`inline_blobs`): every read here looks there too, so callers never know which holds a body.

Where the other bodies live is a blob backend (`storage.blobbackend`): files under
`blobs/sha256/` by default (the fast paths below are for them), or an S3-compatible bucket
(`storage.s3blobs`, `self.remote`), reached only through the backend's operations: the body is
still spooled and hashed in `tmp/` first, then uploaded, and every check above works the same.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import hashlib
import os
import re
import struct
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

from anvil.frozen import fast_init
from anvil.storage import inline, records
from anvil.storage.blobbackend import BlobBackend, LocalBlobBackend, StoredBlob, backend_from_env, fanout_entries
from anvil.storage.blobscan import HashResult, ScanResult, hash_file, read_sequentially, scan_blobs
from anvil.storage.digests import md5_hex, sha256_hex
from anvil.storage.layout import fsync_dir
from anvil.storage.space import is_full_error, parse_size, storage_full

READ_CHUNK = 1024 * 1024

# Per-chunk digests: the blob's byte stream cut on absolute 1 MiB boundaries. Blobs of at most one
# chunk have no sidecar (their SHA-256 address is checked directly: cheap at that size).
CHUNK_SIZE = 1024 * 1024
SIDECAR_SUFFIX = ".chunks"
SIDECAR_MAGIC = b"ANVLCHK1"
# magic, algorithm id, digest length, reserved, chunk size, blob size; then one digest per chunk.
_SIDECAR_HEADER = struct.Struct("<8sBBHIQ")


def _blake3(data: bytes | memoryview = b"") -> Any:
    import blake3  # optional (not a dependency): only to re-run the algorithm comparison

    return blake3.blake3(data)


# Algorithm ids are part of the sidecar format: never renumber. SHA-256 (~2 GB/s on one core) cannot
# keep up with a large GET (~3.5 GB/s). Measured in bench/objects.py --compare-large (docs/performance.md):
# BLAKE3 kept about half of today's large-GET throughput, XXH3-128 0.80-0.94 of it, so XXH3-128. It
# detects accidental damage (bit rot, torn or misdirected writes), which is what sidecars are for; a
# chunk mismatch is always confirmed with the blob's SHA-256 before anything is quarantined.
CHUNK_ALGORITHMS: dict[int, tuple[str, int, Callable[..., Any]]] = {
    1: ("xxh3-128", 16, xxhash.xxh3_128),
    2: ("blake3", 32, _blake3),
}
CHUNK_ALGORITHM = 1
# Sidecars of a remote blob backend kept in memory (each 24 bytes + 16 per MiB of its blob).
SIDECAR_CACHE = 1024


@fast_init
@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    md5: str
    size: int


@fast_init
@dataclass(frozen=True)
class InlineBody(BlobInfo):
    """A small body, hashed and checked, to be stored inline by the mutation that references it
    (`inline.put` on the mutation's connection): nothing is written before that transaction."""

    data: bytes = field(default=b"", repr=False, compare=False)


_HASH_RE = re.compile(r"[0-9a-f]{64}")


def _valid_hash(h: str) -> bool:
    return _HASH_RE.fullmatch(h) is not None


class BlobCorrupted(Exception):
    """A blob does not hold the bytes its address and recorded size promise.

    `confirmed`: its content was shown not to match its SHA-256 (or it is shorter/longer than
    its sidecar says), so the file itself is bad and may be quarantined. `missing`: no file.
    """

    def __init__(self, sha256: str, detail: str, *, confirmed: bool = False, missing: bool = False):
        super().__init__(f"blob {sha256}: {detail}")
        self.sha256 = sha256
        self.detail = detail
        self.confirmed = confirmed
        self.missing = missing


def chunk_digest(data: bytes | memoryview, algorithm: int = CHUNK_ALGORITHM) -> bytes:
    return CHUNK_ALGORITHMS[algorithm][2](data).digest()


class ChunkHasher:
    """Per-chunk digests of a byte stream received in pieces of any size (no copies)."""

    def __init__(self, algorithm: int = CHUNK_ALGORITHM):
        self.algorithm = algorithm
        self._new = CHUNK_ALGORITHMS[algorithm][2]
        self._h = self._new()
        self._fill = 0
        self.digests: list[bytes] = []

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            take = min(CHUNK_SIZE - self._fill, len(view))
            self._h.update(view[:take])
            self._fill += take
            view = view[take:]
            if self._fill == CHUNK_SIZE:
                self.digests.append(self._h.digest())
                self._h = self._new()
                self._fill = 0

    def finish(self) -> list[bytes]:
        if self._fill:
            self.digests.append(self._h.digest())
            self._h = self._new()
            self._fill = 0
        return self.digests


def needs_sidecar(size: int) -> bool:
    return size > CHUNK_SIZE


def encode_sidecar(size: int, digests: list[bytes], algorithm: int = CHUNK_ALGORITHM) -> bytes:
    dlen = CHUNK_ALGORITHMS[algorithm][1]
    return _SIDECAR_HEADER.pack(SIDECAR_MAGIC, algorithm, dlen, 0, CHUNK_SIZE, size) + b"".join(digests)


def decode_sidecar(raw: bytes, size: int | None = None) -> tuple[int, list[bytes]]:
    """(algorithm, digests) of a sidecar; ValueError if it is malformed or describes another size."""
    if len(raw) < _SIDECAR_HEADER.size:
        raise ValueError("shorter than its header")
    magic, alg, dlen, _, chunk, recorded = _SIDECAR_HEADER.unpack_from(raw)
    if magic != SIDECAR_MAGIC:
        raise ValueError("not a chunk-digest sidecar")
    if alg not in CHUNK_ALGORITHMS or CHUNK_ALGORITHMS[alg][1] != dlen:
        raise ValueError(f"unknown digest algorithm {alg}")
    if chunk != CHUNK_SIZE:
        raise ValueError(f"chunk size {chunk}, expected {CHUNK_SIZE}")
    if size is not None and recorded != size:
        raise ValueError(f"describes {recorded} bytes, the blob has {size}")
    n = -(-recorded // CHUNK_SIZE)
    body = raw[_SIDECAR_HEADER.size:]
    if len(body) != n * dlen:
        raise ValueError(f"holds {len(body)} bytes of digests, expected {n * dlen}")
    return alg, [body[i * dlen:(i + 1) * dlen] for i in range(n)]


# A large body's MD5 (the S3 ETag, ~750 MB/s of one core, the slowest digest taken) runs on a second
# thread while SHA-256, the chunk digests and the write run on the caller's: hashlib releases the GIL
# for buffers this large, so a large PUT is bound by the slower hash, not by the sum of both.
PARALLEL_HASH_MIN = 256 * 1024
# How many blocks a writer's MD5 may trail its writes by (`write_pieces` with immutable bytes). In
# lockstep (0) the MD5 thread sat idle through every hand-off (the caller's wake-up, the event
# loop's next block); a few blocks of slack keep it busy, at most this many blocks held per upload.
MD5_LAG = 4
_side_pool: concurrent.futures.ThreadPoolExecutor | None = None
_side_lock = threading.Lock()


def _side_hasher() -> concurrent.futures.ThreadPoolExecutor:
    global _side_pool
    if _side_pool is None:
        with _side_lock:
            if _side_pool is None:
                _side_pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="anvil-md5")
    return _side_pool


class _SideHash:
    """Feeds one hash object on a side-pool thread, batch after batch in order, while the caller
    goes on. One drain task at a time per hash (never two threads on one object), and none while
    idle, so a slow client holds no pool thread."""

    def __init__(self, h: Any):
        self._h = h
        self._queue: collections.deque[list[bytes] | list[memoryview]] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._pending = 0      # batches fed and not yet hashed
        self._running = False  # a drain task is queued or running

    @property
    def pending(self) -> int:
        return self._pending

    def feed(self, pieces: list[Any]) -> None:
        with self._cond:
            self._queue.append(pieces)
            self._pending += 1
            if self._running:
                return
            self._running = True
        _side_hasher().submit(self._drain)

    def _drain(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._running = False
                    self._cond.notify_all()
                    return
                pieces = self._queue.popleft()
            try:
                for piece in pieces:
                    self._h.update(piece)
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def wait(self, most: int = 0) -> None:
        """Until at most `most` batches are still to hash."""
        with self._cond:
            while self._pending > most:
                self._cond.wait()


# sync_file_range flags (linux/fs.h).
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


def _find_sync_file_range() -> Callable[[int, int, int, int], Any] | None:
    """Linux `sync_file_range(fd, offset, n, flags)` (os has no binding); None where libc has none."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNC_FILE_RANGE = _find_sync_file_range()
DROP_BEHIND_ENV = "ANVIL_DROP_BEHIND"
DROP_BEHIND_DEFAULT = 32 * 1024 * 1024


def drop_behind_from_env(environ: dict[str, str] | None = None) -> int:
    """`ANVIL_DROP_BEHIND` (bytes, or with K/M/G binary units; 0 turns it off; read at the store's
    start, a malformed value stops it): a streamed body at least this large is written past the page
    cache, each window's pages dropped once it is on disk (`BlobWriter`, `BlobStore.drop_behind`).

    Why: a page cache that grows is costly on a VM that hands freed memory back to its host (measured
    here, bench/largeput.py: 0.7-2.1 s of CPU to write 256 MiB into new page cache, against 0.15-0.23 s
    when the pages of the window written just before are reused), and anywhere a stream of large
    bodies would push the small, hot ones out of the cache (MinIO drops behind large writes likewise).
    Reads keep the cache: the first GET of such a blob reads it from disk, later ones from memory."""
    raw = (os.environ if environ is None else environ).get(DROP_BEHIND_ENV)
    if raw is None or not raw.strip():
        return DROP_BEHIND_DEFAULT
    return parse_size(DROP_BEHIND_ENV, raw)


# A streamed body's written bytes are handed to the disk every this many bytes instead of all at the
# final fsync: the page cache would otherwise hold the whole body dirty (writeback starts at 10 % of
# RAM) and the fsync would write 256 MiB while the client waits (~0.1 s here, a fifth of the time
# budget of a 256 MiB PUT at 450 MB/s); this way it finds only the last few MiB to write.
WRITEBACK_EVERY = 8 * 1024 * 1024
# How many writeback windows may be on their way to the disk before the writer waits for the oldest
# (drop-behind). Waiting for the window just before the current one (0) made the writer thread wait
# ~0.24 s per 256 MiB PUT on the disk and on the kernel's writeback workers (py-spy, 2 cores shared);
# with two windows of slack the waits halved on an idle disk (bench: 0.11 -> 0.05 s per 256 MiB), and
# at most (DROP_LAG + 1) windows (24 MiB) of a body are in the page cache at a time.
DROP_LAG = 2
# Buffers per writev call (Linux refuses more than IOV_MAX, 1024).
_IOV_MAX = 512


# A cold large read drops its pages behind it in windows of this size (`BlobStore.read_verified`).
READ_DROP_WINDOW = 8 * 1024 * 1024


def _cold(fd: int, offset: int, length: int) -> bool:
    """Whether a range of a file is not (wholly) in the page cache, from three probes (its first,
    middle and last page) read with RWF_NOWAIT, which fails rather than wait for the disk. Probed
    before the read starts, so the kernel's read-ahead of this read has not filled anything yet.
    Where the flag is not supported, the range counts as cached (the read keeps its pages, as before)."""
    flag = getattr(os, "RWF_NOWAIT", 0)
    if not flag:
        return False
    buf = bytearray(1)
    for at in (offset, offset + length // 2, offset + length - 1):
        try:
            if os.preadv(fd, [buf], at, flag) != 1:
                return True
        except BlockingIOError:
            return True
        except OSError:
            return False
    return False


# A large verified read takes this much per pread (and per piece it yields), checking each chunk in it.
READ_SPAN = 4 * 1024 * 1024


def _first_mismatch(data: bytes, want: int, digests: list[bytes], first: int, alg: int) -> int | None:
    """The first chunk of a span read from chunk `first` (`want` bytes asked for) that is short or does
    not match its digest; None when all match."""
    view = memoryview(data)
    for k in range(0, want, CHUNK_SIZE):
        piece = view[k:k + CHUNK_SIZE]
        if len(piece) != min(CHUNK_SIZE, want - k) or chunk_digest(piece, alg) != digests[first + k // CHUNK_SIZE]:
            return first + k // CHUNK_SIZE
    return None


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _read_exact(stream: Any, n: int) -> bytes:
    """n bytes from a stream that may return fewer per read (an HTTP body), or fewer at its end."""
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def log_sidecar_failure(sha256: str) -> None:
    import logging

    logging.getLogger("anvil.storage.blobs").warning("could not keep the chunk digests of blob %s", sha256)


class BlobWriter:
    """Receives a body piece by piece; never holds it whole."""

    def __init__(self, store: BlobStore, *, max_size: int | None = None, md5: bool = True,
                 hold: int | None = None):
        self._store = store
        # A body that turns out small enough to be stored inline is also kept in memory (at most
        # `hold` bytes, the store's inline threshold), so it need not be read back from tmp/.
        self._hold = store.inline_max if hold is None else hold
        self._held: list[bytes] | None = [] if self._hold > 0 else None
        self.tmp_path = store.tmp / f"upload-{uuid.uuid4().hex}"
        self._fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._sha = hashlib.sha256()
        # md5=False: for bodies that need no S3 ETag (artefact components); MD5 is the slowest of
        # the digests taken per byte (~740 MB/s), and BlobInfo.md5 is then "".
        self._md5 = hashlib.md5() if md5 else None
        self._side = _SideHash(self._md5) if self._md5 is not None else None
        self._chunks = ChunkHasher()
        self.size = 0
        self._max_size = max_size
        self._done = False
        # Written bytes not yet handed to writeback (WRITEBACK_EVERY), and the offset below which
        # pages were dropped (the store's drop_behind). A remote store's spool is uploaded from the
        # page cache and deleted: it never needs to reach the disk first.
        self._unflushed = 0
        self._dropped = 0
        self._windows: collections.deque[int] = collections.deque(maxlen=DROP_LAG + 1)  # starts handed on
        self._writeback = _SYNC_FILE_RANGE if not store.remote else None

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        self.write_pieces([chunk])

    def write_pieces(self, pieces: list[Any]) -> None:
        """Append pieces of the body (one received block): each hashed as it is, all written with
        one `writev`, no copies. A large block's MD5 runs on a side thread; when every piece is
        immutable `bytes`, the call returns without waiting for it (it may trail by `MD5_LAG`
        blocks; `digests` and `commit` wait), otherwise the caller may reuse its buffers at once."""
        total = 0
        for piece in pieces:
            total += len(piece)
        if not total:
            return
        self.size += total
        if self._max_size is not None and self.size > self._max_size:
            raise OverflowError("body larger than allowed")
        side = self._side
        if side is not None and (total >= PARALLEL_HASH_MIN or side.pending):
            side.feed(pieces)  # in order behind any block still being hashed
        elif self._md5 is not None:
            for piece in pieces:
                self._md5.update(piece)
            side = None
        else:
            side = None
        try:
            for piece in pieces:
                self._sha.update(piece)
                self._chunks.update(piece)
            if self._held is not None:
                if self.size <= self._hold:
                    self._held.extend(bytes(piece) for piece in pieces)
                else:
                    self._held = None
            self._write_all(pieces, total)
        except OSError as exc:
            if not is_full_error(exc):
                raise
            self.abort()  # no half-written body is left behind in tmp/
            raise storage_full() from None
        finally:
            if side is not None:
                immutable = all(type(piece) is bytes for piece in pieces)
                side.wait(MD5_LAG if immutable else 0)

    def _write_all(self, pieces: list[Any], total: int) -> None:
        """One writev per block (a loop only for short writes), then writeback every few MiB."""
        fd = self._fd
        if len(pieces) == 1:
            view = memoryview(pieces[0])
            while view:
                view = view[os.write(fd, view):]
        else:
            for start in range(0, len(pieces), _IOV_MAX):
                group = [memoryview(p) for p in pieces[start:start + _IOV_MAX]]
                while group:
                    written = os.writev(fd, group)
                    while group and written >= len(group[0]):
                        written -= len(group[0])
                        group.pop(0)
                    if group and written:
                        group[0] = group[0][written:]
        if self._writeback is not None:
            self._unflushed += total
            if self._unflushed >= WRITEBACK_EVERY:
                # Start writing back what was written so far; the final fsync then waits only for
                # the tail. Advisory: a failure here is found by that fsync.
                start = self.size - self._unflushed
                self._writeback(fd, start, self._unflushed, _SFR_WRITE)
                self._unflushed = 0
                windows = self._windows
                windows.append(start)
                drop = self._store.drop_behind
                if drop and self.size >= drop and len(windows) > DROP_LAG and windows[0] > self._dropped:
                    # What came before the window handed on DROP_LAG windows ago is on its way to the
                    # disk: wait for it, then drop its pages, so the next writes reuse them instead
                    # of growing the page cache.
                    upto = windows[0]
                    self._writeback(fd, self._dropped, upto - self._dropped,
                                    _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER)
                    os.posix_fadvise(fd, self._dropped, upto - self._dropped, os.POSIX_FADV_DONTNEED)
                    self._dropped = upto

    def held(self) -> bytes | None:
        """The whole body if it was small enough to be kept in memory (see `hold`), else None."""
        return b"".join(self._held) if self._held is not None else None

    def digests(self) -> BlobInfo:
        if self._side is not None:
            self._side.wait()  # the MD5 of every block fed so far
        return BlobInfo(self._sha.hexdigest(), self._md5.hexdigest() if self._md5 is not None else "", self.size)

    def commit(self) -> BlobInfo:
        """Make the bytes durable under their hash. Idempotent for identical content."""
        info = self.digests()
        if self._store.remote:
            return self._commit_remote(info)
        try:
            os.fsync(self._fd)  # delayed allocation (or NFS) may report the lack of space only here
        except OSError as exc:
            if not is_full_error(exc):
                raise
            self.abort()
            raise storage_full() from None
        if self._store.drop_behind and self.size >= self._store.drop_behind and self._writeback is not None:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean now: the tail's pages too
        os.close(self._fd)
        self._done = True
        final = self._store.path(info.sha256)
        digests = self._chunks.finish()
        if final.exists():
            # Same content already stored: drop ours, and refresh the old one's mtime so a
            # concurrent gc's grace period protects it until our record commits. Its sidecar is
            # kept; a blob stored before sidecars existed gets ours (digests of the same content).
            os.unlink(self.tmp_path)
            os.utime(final)
            if needs_sidecar(info.size) and not self._store.sidecar_path(info.sha256).exists():
                self._store.write_sidecar(info.sha256, info.size, digests)
                fsync_dir(final.parent)
            return info
        try:
            created = self._store.ensure_parent(final)
            if needs_sidecar(info.size):
                # Durable before the blob is named: a named blob always has its digests.
                self._store.write_sidecar(info.sha256, info.size, digests)
            os.rename(self.tmp_path, final)  # a new directory block may be needed
        except BaseException as exc:
            os.unlink(self.tmp_path)  # nothing was stored; leave nothing in tmp/ either
            if isinstance(exc, OSError) and is_full_error(exc):
                raise storage_full() from None
            raise
        fsync_dir(final.parent)
        for d in created:
            fsync_dir(d.parent)
        return info

    def _commit_remote(self, info: BlobInfo) -> BlobInfo:
        """Upload the spooled body under its hash (its digests first, as on disk); the spool file
        goes in every case. A failed upload raises (BlobBackendUnavailable) and stores nothing."""
        os.close(self._fd)
        self._done = True
        try:
            digests = self._chunks.finish()
            if needs_sidecar(info.size):
                self._store.write_sidecar(info.sha256, info.size, digests)
            self._store.backend.put_file(info.sha256, self.tmp_path, info.size)
        finally:
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass
        return info

    def abort(self) -> None:
        if not self._done:
            self._done = True
            os.close(self._fd)
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass


# errno values meaning "this filesystem or kernel cannot do O_TMPFILE + linkat via /proc".
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT, errno.EXDEV, errno.EPERM}


class _TmpfileUnsupported(Exception):
    """O_TMPFILE or linkat through /proc is not available here: use tmp/ and rename."""


def digest_bytes(data: bytes) -> BlobInfo:
    return BlobInfo(sha256_hex(data), md5_hex(data), len(data))  # (no OpenSSL lookup per call: storage/digests.py)


class BlobStore:
    def __init__(self, blobs_root: Path, tmp: Path, quarantine_dir: Path | None = None,
                 backend: BlobBackend | None = None):
        self.root = blobs_root
        self._root_str = str(blobs_root)
        self.tmp = tmp
        # STORAGE_PATH/quarantine beside blobs/ (blobs_root is STORAGE_PATH/blobs/sha256): same filesystem.
        self.quarantine_dir = quarantine_dir if quarantine_dir is not None else blobs_root.parent.parent / "quarantine"
        # Where bodies live (storage.blobbackend). The local default keeps the file fast paths below;
        # a remote one (S3) is reached only through the backend's operations.
        self.backend: BlobBackend = backend if backend is not None else LocalBlobBackend(
            blobs_root, self.quarantine_dir)
        self.remote = not self.backend.local
        # Sidecars of a remote backend read recently (hash -> raw): a large GET then costs a HEAD
        # and its ranged GET, not a third request. Safe if stale: a sidecar that disagrees with its
        # body is never trusted alone (the full SHA-256 decides and the sidecar is rewritten).
        self._sidecars: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._sidecars_lock = threading.Lock()
        self._tmpfile_ok = True
        self._proc_fd_cache: int | None = None
        # Blobs at least this large stream past the page cache (drop_behind_from_env; 0: never).
        self.drop_behind = DROP_BEHIND_DEFAULT
        # Inline bodies (storage.inline): bodies up to `inline_max` bytes are written inline by
        # the objects layer (0: never). Reads look inline whatever the threshold, so a store keeps
        # working when it changes. `attach_catalog` gives the live catalog; otherwise the file
        # `inline_catalog` (catalog.db beside blobs/: restore, offline tools; a backup's checkpoint
        # copy in the snapshot's own process) is opened read-only on first need.
        self.inline_max = 0
        self._catalog: Any = None
        self.inline_catalog = blobs_root.parent.parent / "catalog.db"
        self._local = threading.local()
        # Who still needs blobs that no record may reference any more (continuous archiving has
        # not shipped them yet): each returns hashes gc must keep, whatever their references.

    # ---------------------------------------------------------------- inline bodies

    def attach_catalog(self, catalog: Any, inline_max: int) -> None:
        """The live catalog (`storage.catalog.Catalog`): its readers for inline reads, its writer
        for quarantining a bad inline body; `inline_max`: the threshold new writes use."""
        self._catalog = catalog
        self.inline_max = inline_max

    def _records(self) -> records.Connection | None:
        if self._catalog is not None:
            return self._catalog.reader()
        conn = getattr(self._local, "conn", None)
        if conn is None:
            path = self.inline_catalog
            if not path.exists():
                return None
            try:
                conn = records.open_readonly(path)
            except records.RecordError:
                return None
            self._local.conn = conn
        return conn

    def inline_body(self, sha256: str) -> bytes | None:
        """The inline body stored under `sha256` (not verified), or None."""
        conn = self._records()
        return inline.get(conn, sha256) if conn is not None else None

    def inline_among(self, shas: Iterable[str]) -> set[str]:
        """Which of `shas` are stored inline (a batch's worth, not the whole store's set)."""
        conn = self._records()
        return inline.among(conn, shas) if conn is not None else set()

    def iter_inline_sizes(self) -> Iterator[tuple[str, int]]:
        """(sha256, size) of every inline body in hash order, streamed (never one dict of the whole store)."""
        conn = self._records()
        if conn is not None:
            yield from inline.iter_sizes(conn)

    def _inline_size(self, sha256: str) -> int | None:
        conn = self._records()
        return inline.size(conn, sha256) if conn is not None else None

    def _verified_inline(self, sha256: str, size: int, data: bytes, offset: int, length: int) -> bytes:
        if len(data) != size:
            # The record's size or the row's bytes are wrong: the address decides which.
            raise BlobCorrupted(sha256, f"is {len(data)} bytes inline, {size} recorded",
                                confirmed=hashlib.sha256(data).hexdigest() != sha256)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise BlobCorrupted(sha256, "(inline) does not match its SHA-256", confirmed=True)
        return data if offset == 0 and length == size else data[offset:offset + length]

    def path(self, sha256: str) -> Path:
        if not _valid_hash(sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def file_path(self, sha256: str) -> str:
        """`path()` as a string, for loops over many blobs and the read path: a `Path` costs ~7 µs to
        build here (against 0.2), and pathlib interns every part, so a backup or fsck holding
        100,000 hashes grew the interpreter's interned-string table by ~4 MB for good."""
        if not _valid_hash(sha256):
            raise ValueError("not a sha256 hex digest")
        return f"{self._root_str}/{sha256[:2]}/{sha256}"

    def prepare_fanout(self) -> None:
        """Create the 256 fan-out folders once, so no write ever pays for a mkdir and its fsync."""
        if self.remote:
            return
        created = False
        for i in range(256):
            try:
                (self.root / f"{i:02x}").mkdir()
                created = True
            except FileExistsError:
                pass
        if created:
            fsync_dir(self.root)

    def ensure_parent(self, final: Path) -> list[Path]:
        """Create the fan-out folder if missing (normally made up front); return it if created."""
        try:
            final.parent.mkdir()
        except FileExistsError:
            return []
        return [final.parent]

    def writer(self, *, max_size: int | None = None, md5: bool = True, hold: int | None = None) -> BlobWriter:
        return BlobWriter(self, max_size=max_size, md5=md5, hold=hold)

    def put_bytes(self, data: bytes, info: BlobInfo | None = None) -> BlobInfo:
        """Store a body held in memory (`info`: its digests, if already computed)."""
        if info is None:
            info = digest_bytes(data)
        if self.remote:
            if needs_sidecar(info.size):
                hasher = ChunkHasher()
                hasher.update(data)
                self.write_sidecar(info.sha256, info.size, hasher.finish())
            self.backend.put_bytes(info.sha256, data)
            return info
        if self._tmpfile_ok and hasattr(os, "O_TMPFILE"):
            try:
                return self._put_tmpfile(data, info)
            except _TmpfileUnsupported:
                self._tmpfile_ok = False
            except OSError as exc:
                # The unnamed file vanished with its descriptor: nothing partial is left.
                if not is_full_error(exc):
                    raise
                raise storage_full() from None
        w = self.writer()
        try:
            w.write(data)
            return w.commit()
        except BaseException:
            w.abort()
            raise

    def _put_tmpfile(self, data: bytes, info: BlobInfo) -> BlobInfo:
        """Write an unnamed file in the blob's own folder, fsync it, then link it under its hash.

        The name appears only once the bytes are durable, so a crash leaves no partial file and
        no orphan in `tmp/`; and there is no cross-folder rename (those serialise filesystem-wide)
        or shared `tmp/` folder for concurrent small PUTs to queue on. Measured ~2x the
        throughput of write-to-tmp-then-rename with 8 concurrent writers.
        """
        final = self.path(info.sha256)
        proc_fd = self._proc_fd()  # before any folder is created: raising later would skip their fsync
        created = self.ensure_parent(final)
        if needs_sidecar(info.size) and not self.sidecar_path(info.sha256).exists():
            # Before the blob is named (or, deduplicated onto a blob stored before sidecars existed,
            # digests of the same content for it).
            hasher = ChunkHasher()
            hasher.update(data)
            self.write_sidecar(info.sha256, info.size, hasher.finish())
        if not final.exists():
            try:
                fd = os.open(final.parent, os.O_TMPFILE | os.O_WRONLY, 0o644)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._sync_created(created)  # the fallback will not know it created them
                raise _TmpfileUnsupported from exc
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                try:
                    os.link(str(fd), final, src_dir_fd=proc_fd, follow_symlinks=True)
                except FileExistsError:
                    pass  # an identical body won the race; it too was durable before it was named
                except OSError as exc:
                    if exc.errno not in _UNSUPPORTED:
                        raise
                    self._sync_created(created)
                    raise _TmpfileUnsupported from exc
            finally:
                os.close(fd)
        else:
            # Same content already stored: refresh its mtime so a concurrent gc's grace period
            # protects it until our record commits.
            os.utime(final)
        # Also when deduplicated: the name may come from a writer that has not fsynced it yet.
        fsync_dir(final.parent)
        self._sync_created(created)
        return info

    @staticmethod
    def _sync_created(created: list[Path]) -> None:
        for d in created:
            fsync_dir(d.parent)

    def _proc_fd(self) -> int:
        # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N names an O_TMPFILE; os.link only calls
        # linkat (rather than link, which would not follow) when given a directory fd.
        if self._proc_fd_cache is None:
            try:
                self._proc_fd_cache = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
            except OSError as exc:
                raise _TmpfileUnsupported from exc
        return self._proc_fd_cache

    def exists(self, sha256: str) -> bool:
        """Stored, as a file (or in the backend) or inline."""
        if self.remote:
            return self.stat(sha256) is not None or self._inline_size(sha256) is not None
        return self.path(sha256).exists() or self._inline_size(sha256) is not None

    def size(self, sha256: str) -> int:
        """The stored size (file or inline); FileNotFoundError if neither holds it."""
        if self.remote:
            st = self.stat(sha256)
            n = st[0] if st is not None else self._inline_size(sha256)
            if n is None:
                raise FileNotFoundError(sha256)
            return n
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            n = self._inline_size(sha256)
            if n is None:
                raise
            return n

    # ---------------------------------------------------------------- backend-neutral access
    # What callers outside storage use instead of file paths (gc, fsck, backup, restore, artefacts).

    def stat(self, sha256: str) -> tuple[int, float] | None:
        """(size, mtime) of the stored body (not an inline one), None if the backend lacks it."""
        if not _valid_hash(sha256):
            raise ValueError("not a sha256 hex digest")
        return self.backend.stat(sha256)

    def location(self, sha256: str) -> str:
        """Where a body lives, for messages: a path, or the backend's key URL."""
        if self.remote:
            return getattr(self.backend, "location", lambda s: f"{self.backend.url}{s}")(sha256)
        return self.file_path(sha256)

    def list_blobs(self) -> Iterator[StoredBlob]:
        """Every body in the backend (size, mtime), paged; inline bodies are `iter_inline_sizes()`."""
        return self.backend.list_blobs()

    def list_sidecars(self) -> Iterator[tuple[str, float]]:
        """(hash, mtime) of every chunk-digest sidecar, whether or not its body exists."""
        return self.backend.list_sidecars()

    def open_raw(self, sha256: str) -> tuple[BinaryIO, int] | None:
        """(unverified byte stream, size) of a stored body for copying it elsewhere (backup), or None."""
        if not self.remote:
            try:
                f = open(self.path(sha256), "rb")  # noqa: SIM115 - the caller closes it
            except FileNotFoundError:
                return None
            return f, os.fstat(f.fileno()).st_size
        st = self.stat(sha256)
        if st is None:
            return None
        try:
            return self.backend.open_range(sha256), st[0]
        except FileNotFoundError:
            return None

    def store_file(self, sha256: str, path: Path, size: int) -> None:
        """Store a local file already known to hash to `sha256` (restore into a remote backend);
        the file is left for the caller."""
        if needs_sidecar(size):
            with open(path, "rb") as f:
                hasher = ChunkHasher()
                while block := f.read(CHUNK_SIZE):
                    hasher.update(block)
            self.write_sidecar(sha256, size, hasher.finish())
        self.backend.put_file(sha256, path, size)

    @contextmanager
    def local_copy(self, sha256: str) -> Iterator[Path]:
        """A local file holding the body (parsers that need a path): the blob itself on local disk,
        a temporary download from a remote backend (unverified: callers check sizes and hashes)."""
        if not self.remote:
            yield self.path(sha256)
            return
        tmp = self.tmp / f"fetch-{uuid.uuid4().hex}"
        try:
            with self.backend.open_range(sha256) as src, open(tmp, "wb") as out:
                while block := src.read(CHUNK_SIZE):
                    out.write(block)
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    def scan(self, *, deep: bool, threads: int = 2, on_progress: Callable[[int], None] | None = None) -> ScanResult:
        """List every body and, with `deep`, hash each (fsck, gc): the fast file walk on local disk,
        the paged listing and streamed reads of a remote backend."""
        if not self.remote:
            return scan_blobs(self.root, deep=deep, threads=threads, on_progress=on_progress)
        listed = list(self.backend.list_blobs())
        res = ScanResult({b.sha256: b.location for b in listed}, [], [], {})
        if not deep:
            return res

        def work(b: StoredBlob) -> HashResult:
            try:
                h = hashlib.sha256()
                n = 0
                with self.backend.open_range(b.sha256) as f:
                    while block := f.read(CHUNK_SIZE):
                        h.update(block)
                        n += len(block)
                return HashResult(b.sha256, b.location, h.hexdigest(), n, None)
            except FileNotFoundError:
                return HashResult(b.sha256, b.location, None, 0, "removed while it was read")

        with concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="anvil-fsck-scan") as pool:
            for r in pool.map(work, listed):
                res.sizes[r.name] = r.size
                if r.actual != r.name:
                    res.bad.append(r)
                if on_progress is not None:
                    on_progress(1)
        return res

    # ---------------------------------------------------------------- verified reads

    def check_size(self, sha256: str, size: int) -> None:
        """At open, before anything is sent: the blob exists and has its recorded size."""
        try:
            if self.remote:
                st = self.stat(sha256)
                if st is None:
                    raise FileNotFoundError(sha256)
                actual = st[0]
            else:
                actual = os.stat(self.file_path(sha256)).st_size
        except FileNotFoundError:
            data = self.inline_body(sha256) if size <= inline.LIMIT else None
            if data is None:
                raise BlobCorrupted(sha256, "is missing from the blob store", missing=True) from None
            self._verified_inline(sha256, size, data, 0, size)
            return
        if actual != size:
            self._size_mismatch(sha256, size, actual)

    def _size_mismatch(self, sha256: str, size: int, actual: int) -> None:
        # The record's size is the blob's, unless the record is what is wrong. The sidecar, written
        # with the blob, says which without reading it (this runs before any header, possibly on
        # the event loop); without one the address decides.
        detail = f"is {actual} bytes, {size} recorded"
        try:
            written = _SIDECAR_HEADER.unpack_from(self.read_sidecar(sha256) or b"")[5]
        except (OSError, struct.error):
            written = None
        if written == size:
            raise BlobCorrupted(sha256, detail + " (and written)", confirmed=True)
        raise BlobCorrupted(sha256, detail, confirmed=self.full_sha256(sha256) != sha256)

    def full_sha256(self, sha256: str) -> str | None:
        """The SHA-256 of the blob's whole file (or inline body) as it is now (None if it is missing
        or unreadable)."""
        actual = self._remote_sha256(sha256) if self.remote else hash_file(self.file_path(sha256))[0]
        if actual is None:
            data = self.inline_body(sha256)
            if data is not None:
                return hashlib.sha256(data).hexdigest()
        return actual

    def _remote_sha256(self, sha256: str) -> str | None:
        try:
            h = hashlib.sha256()
            with self.backend.open_range(sha256) as f:
                while block := f.read(CHUNK_SIZE):
                    h.update(block)
            return h.hexdigest()
        except FileNotFoundError:
            return None

    def _read_remote_small(self, sha256: str, size: int) -> bytes | None:
        """The whole body from a remote backend (None if absent), its size checked."""
        try:
            with self.backend.open_range(sha256) as f:
                data = _read_exact(f, size + 1)  # one byte more than recorded is enough to see it is wrong
        except FileNotFoundError:
            return None
        if len(data) != size:
            st = self.stat(sha256)
            self._size_mismatch(sha256, size, st[0] if st is not None else len(data))
        return data

    def read_small(self, sha256: str, size: int, offset: int = 0, length: int | None = None) -> bytes:
        """`read_verified` for a blob of at most one chunk, done at once: every small GET takes this
        path, so it is one open, fstat, pread and SHA-256, with no generator in between."""
        if length is None:
            length = size - offset
        if size <= self.inline_max:
            # Written inline since the threshold allowed it: look there first.
            data = self.inline_body(sha256)
            if data is not None:
                return self._verified_inline(sha256, size, data, offset, length)
        if self.remote:
            data = self._read_remote_small(sha256, size)
            if data is None:
                data = self.inline_body(sha256) if self.inline_max < size <= inline.LIMIT else None
                if data is None:
                    raise BlobCorrupted(sha256, "is missing from the blob store", missing=True)
                return self._verified_inline(sha256, size, data, offset, length)
            if hashlib.sha256(data).hexdigest() != sha256:
                raise BlobCorrupted(sha256, "does not match its SHA-256", confirmed=True)
            return data if offset == 0 and length == size else data[offset:offset + length]
        try:
            fd = os.open(self.file_path(sha256), os.O_RDONLY)
        except FileNotFoundError:
            data = self.inline_body(sha256) if self.inline_max < size <= inline.LIMIT else None
            if data is None:
                raise BlobCorrupted(sha256, "is missing from the blob store", missing=True) from None
            return self._verified_inline(sha256, size, data, offset, length)
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                self._size_mismatch(sha256, size, actual)
            data = _pread_exact(fd, size, 0)
        finally:
            os.close(fd)
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise BlobCorrupted(sha256, "does not match its SHA-256", confirmed=True)
        return data if offset == 0 and length == size else data[offset:offset + length]

    def read_verified(self, sha256: str, size: int, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Bytes [offset, offset+length) of a blob of recorded `size`, each chunk verified before it
        is yielded, so a bad chunk is never handed out: `BlobCorrupted` is raised instead."""
        if length is None:
            length = size - offset
        if not needs_sidecar(size):
            # One chunk at most (a file or an inline body): verified whole by read_small.
            if length > 0:
                yield self.read_small(sha256, size, offset, length)
            else:
                self.check_size(sha256, size)
            return
        if self.remote:
            yield from self._read_verified_remote(sha256, size, offset, length)
            return
        path = self.path(sha256)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise BlobCorrupted(sha256, "is missing from the blob store", missing=True) from None
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                self._size_mismatch(sha256, size, actual)
            if length <= 0:
                return
            if length > CHUNK_SIZE:
                read_sequentially(fd)
            # A cold read of a large blob is dropped behind as it goes (the pages already sent are
            # given back), so the read recycles a few MiB of page cache instead of growing it by the
            # whole blob; a blob already cached is read from the cache and left there.
            drop = self.drop_behind and length >= self.drop_behind and _cold(fd, offset, length)
            dropped = offset - offset % CHUNK_SIZE
            alg, digests = self._digests(fd, sha256, size)
            end = offset + length
            i, last = offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE
            while i <= last:
                # Up to READ_SPAN at a time (one pread, each chunk checked in place): fewer hand-offs
                # between the reading thread and the event loop, fewer and larger socket writes.
                j = min(last, i + READ_SPAN // CHUNK_SIZE - 1)
                start = i * CHUNK_SIZE
                stop = min(size, (j + 1) * CHUNK_SIZE)
                if drop and start - dropped >= 2 * READ_DROP_WINDOW:
                    # What was read before the last window is handed on: its pages go. (The caller
                    # has the bytes: `os.pread` copied them out of the page cache.)
                    os.posix_fadvise(fd, dropped, start - READ_DROP_WINDOW - dropped, os.POSIX_FADV_DONTNEED)
                    dropped = start - READ_DROP_WINDOW
                data = _pread_exact(fd, stop - start, start)
                bad = _first_mismatch(data, stop - start, digests, i, alg)
                if bad is not None:
                    data = b"".join(self._reverify(fd, sha256, size, bad, i, j))
                lo, hi = max(offset, start) - start, min(end, stop) - start
                yield data if lo == 0 and hi == len(data) else data[lo:hi]
                i = j + 1
            if drop:
                os.posix_fadvise(fd, dropped, 0, os.POSIX_FADV_DONTNEED)
        finally:
            if fd >= 0:
                os.close(fd)

    def _reverify(self, fd: int, sha256: str, size: int, bad: int, first: int, last: int) -> Iterator[bytes]:
        """Chunks first..last one at a time, after chunk `bad` among them did not match: the sidecar is
        checked against the blob's SHA-256 (rewritten if it was the sidecar that was wrong, else the
        blob is corrupt) and each chunk read again and verified."""
        alg, digests = self._sidecar_disagrees(fd, sha256, size, bad)
        for i in range(first, last + 1):
            start = i * CHUNK_SIZE
            n = min(CHUNK_SIZE, size - start)
            data = _pread_exact(fd, n, start)
            if len(data) != n or chunk_digest(data, alg) != digests[i]:
                raise BlobCorrupted(sha256, f"chunk {i} changed while it was read", confirmed=True)
            yield data

    def _read_verified_remote(self, sha256: str, size: int, offset: int, length: int) -> Iterator[bytes]:
        """`read_verified` over a remote backend: one ranged GET covering the chunks the range
        touches, each chunk checked against the sidecar (also kept in the backend) before it is
        yielded; a mismatch is confirmed with the body's full SHA-256, exactly as on disk."""
        st = self.stat(sha256)
        if st is None:
            raise BlobCorrupted(sha256, "is missing from the blob store", missing=True)
        if st[0] != size:
            self._size_mismatch(sha256, size, st[0])
        if length <= 0:
            return
        raw = self.read_sidecar(sha256)
        try:
            if raw is None:
                raise ValueError("missing")
            alg, digests = decode_sidecar(raw, size)
        except ValueError:
            alg, digests = self._recompute_remote(sha256, size)
        end = offset + length
        first, last = offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE
        span_start = first * CHUNK_SIZE
        span_end = min(size, (last + 1) * CHUNK_SIZE)
        try:
            stream = self.backend.open_range(sha256, span_start, span_end - span_start)
        except FileNotFoundError:
            raise BlobCorrupted(sha256, "is missing from the blob store", missing=True) from None
        with stream:
            for i in range(first, last + 1):
                start = i * CHUNK_SIZE
                n = min(CHUNK_SIZE, size - start)
                data = _read_exact(stream, n)
                if len(data) != n or chunk_digest(data, alg) != digests[i]:
                    alg, digests = self._recompute_remote(
                        sha256, size, f"chunk {i} (bytes {start}-) does not match its digest and the blob does "
                        "not match its SHA-256")
                    with self.backend.open_range(sha256, start, n) as again:
                        data = _read_exact(again, n)
                    if len(data) != n or chunk_digest(data, alg) != digests[i]:
                        raise BlobCorrupted(sha256, f"chunk {i} changed while it was read", confirmed=True)
                lo, hi = max(offset, start) - start, min(end, start + n) - start
                yield data if lo == 0 and hi == n else data[lo:hi]

    def _recompute_remote(self, sha256: str, size: int, detail: str = "does not match its SHA-256"
                          ) -> tuple[int, list[bytes]]:
        h = hashlib.sha256()
        chunks = ChunkHasher()
        got = 0
        try:
            with self.backend.open_range(sha256) as f:
                while block := f.read(CHUNK_SIZE):
                    h.update(block)
                    chunks.update(block)
                    got += len(block)
        except FileNotFoundError:
            raise BlobCorrupted(sha256, "is missing from the blob store", missing=True) from None
        if got != size or h.hexdigest() != sha256:
            raise BlobCorrupted(sha256, detail, confirmed=True)
        digests = chunks.finish()
        try:
            self.write_sidecar(sha256, size, digests)
        except Exception:  # noqa: BLE001 - verified bytes are served; the digests are just not kept
            log_sidecar_failure(sha256)
        return chunks.algorithm, digests

    def _digests(self, fd: int, sha256: str, size: int) -> tuple[int, list[bytes]]:
        """The blob's chunk digests: its sidecar, or (none yet, or unreadable) recomputed after its
        full SHA-256 matched its address, and saved for the next read."""
        try:
            return decode_sidecar(self.sidecar_path(sha256).read_bytes(), size)
        except (OSError, ValueError):
            return self._recompute(fd, sha256, size)

    def _sidecar_disagrees(self, fd: int, sha256: str, size: int, chunk: int) -> tuple[int, list[bytes]]:
        """A chunk does not match its digest: the blob is bad only if its full SHA-256 says so;
        otherwise the sidecar was wrong and is rewritten (and the read goes on)."""
        return self._recompute(fd, sha256, size, f"chunk {chunk} (bytes {chunk * CHUNK_SIZE}-) does not match "
                               "its digest and the blob does not match its SHA-256")

    def _recompute(self, fd: int, sha256: str, size: int, detail: str = "does not match its SHA-256"
                   ) -> tuple[int, list[bytes]]:
        h = hashlib.sha256()
        chunks = ChunkHasher()
        offset = 0
        read_sequentially(fd)
        while offset < size:
            data = os.pread(fd, CHUNK_SIZE, offset)
            if not data:
                break
            h.update(data)
            chunks.update(data)
            offset += len(data)
        if offset != size or h.hexdigest() != sha256:
            raise BlobCorrupted(sha256, detail, confirmed=True)
        digests = chunks.finish()
        try:
            self.write_sidecar(sha256, size, digests)
            fsync_dir(self.path(sha256).parent)
        except OSError:
            pass  # a read-only store still serves verified bytes; the digests are just not kept
        return chunks.algorithm, digests

    # ---------------------------------------------------------------- sidecars

    def sidecar_path(self, sha256: str) -> Path:
        p = self.path(sha256)
        return p.with_name(p.name + SIDECAR_SUFFIX)

    def read_sidecar(self, sha256: str) -> bytes | None:
        """The raw sidecar (None if there is none); OSError if it cannot be read."""
        if self.remote:
            with self._sidecars_lock:
                raw = self._sidecars.get(sha256)
                if raw is not None:
                    self._sidecars.move_to_end(sha256)
                    return raw
            raw = self.backend.get_sidecar(sha256)
            if raw is not None:
                self._remember_sidecar(sha256, raw)
            return raw
        try:
            return self.sidecar_path(sha256).read_bytes()
        except FileNotFoundError:
            return None

    def write_sidecar(self, sha256: str, size: int, digests: list[bytes]) -> None:
        """Write and fsync `<hash>.chunks` (the caller fsyncs the folder, once, with the blob's name)."""
        if self.remote:
            self._remember_sidecar(sha256, None)  # cached on the next read, as the backend then has it
            self.backend.put_sidecar(sha256, encode_sidecar(size, digests))
            return
        final = self.sidecar_path(sha256)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                os.write(fd, encode_sidecar(size, digests))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _remember_sidecar(self, sha256: str, raw: bytes | None) -> None:
        with self._sidecars_lock:
            if raw is None:
                self._sidecars.pop(sha256, None)
                return
            self._sidecars[sha256] = raw
            self._sidecars.move_to_end(sha256)
            while len(self._sidecars) > SIDECAR_CACHE:
                self._sidecars.popitem(last=False)

    def rebuild_sidecar(self, sha256: str) -> bool:
        """Recompute a blob's sidecar after checking its SHA-256 (repair). False: nothing to do
        (a single-chunk blob); raises `BlobCorrupted` if the blob does not match its address."""
        if self.remote:
            st = self.stat(sha256)
            if st is None:
                raise BlobCorrupted(sha256, "is missing from the blob store", missing=True)
            if not needs_sidecar(st[0]):
                return False
            self._recompute_remote(sha256, st[0])
            return True
        path = self.path(sha256)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise BlobCorrupted(sha256, "is missing from the blob store", missing=True) from None
        try:
            size = os.fstat(fd).st_size
            if not needs_sidecar(size):
                return False
            self._recompute(fd, sha256, size)
            return True
        finally:
            os.close(fd)

    def sidecar_problem(self, sha256: str, size: int) -> str | None:
        """Why the sidecar of a blob of `size` bytes is unusable ('missing' or a reason), else None."""
        try:
            # fsck and repair judge what is stored, never the read cache.
            raw = self.backend.get_sidecar(sha256) if self.remote else self.read_sidecar(sha256)
        except OSError as e:
            return f"unreadable ({e})"
        if raw is None:
            return "missing"
        try:
            decode_sidecar(raw, size)
        except ValueError as e:
            return str(e)
        return None

    def _fanout_entries(self) -> Iterator[os.DirEntry]:
        return fanout_entries(self.root)

    def iter_sidecars(self) -> Iterator[tuple[str, Path]]:
        """Every sidecar (hash, path), whether or not its blob exists."""
        for f in self._fanout_entries():
            name = f.name
            if name.endswith(SIDECAR_SUFFIX) and _valid_hash(name[:-len(SIDECAR_SUFFIX)]) and f.is_file():
                yield name[:-len(SIDECAR_SUFFIX)], Path(f.path)

    def sidecar_leftovers(self) -> Iterator[Path]:
        """Temporary sidecar files (`.<hash>.chunks.<id>.tmp`) a crash left in the fan-out folders."""
        if self.remote:
            return  # a remote store has no temporary names: a PUT appears whole or not at all
        for f in self._fanout_entries():
            if f.name.startswith(".") and f.name.endswith(".tmp") and SIDECAR_SUFFIX in f.name:
                yield Path(f.path)

    def remove_sidecar(self, sha256: str) -> bool:
        if self.remote:
            self._remember_sidecar(sha256, None)
            return self.backend.delete_sidecar(sha256)
        try:
            self.sidecar_path(sha256).unlink()
            return True
        except FileNotFoundError:
            return False

    # ---------------------------------------------------------------- quarantine

    def quarantine(self, sha256: str) -> bool:
        """Move a blob whose bytes are bad to `quarantine/<hash>` (kept for inspection, out of reach
        of reads and deduplication: the next upload of the same content stores a fresh copy).
        Its sidecar is dropped. False if it was not there (already quarantined, or missing).
        An inline body is copied there and its row removed (unless a write healed it meanwhile)."""
        if self.remote:
            self._remember_sidecar(sha256, None)
            return self.backend.quarantine(sha256) or self._quarantine_inline(sha256)
        src = self.path(sha256)
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(src, self.quarantine_dir / sha256)
        except FileNotFoundError:
            return self._quarantine_inline(sha256)
        self.remove_sidecar(sha256)
        fsync_dir(self.quarantine_dir)
        fsync_dir(src.parent)
        return True

    def _quarantine_inline(self, sha256: str) -> bool:
        if self._catalog is None:
            return False  # a read-only view of a store (restore, offline check): nothing to move
        data = self.inline_body(sha256)
        if data is None or hashlib.sha256(data).hexdigest() == sha256:
            return False
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        dest = self.quarantine_dir / sha256
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.quarantine_dir)

        def fn(txn: Any) -> bool:
            now = inline.get(txn.conn, sha256)
            if now is None or hashlib.sha256(now).hexdigest() == sha256:
                return False  # gone, or rewritten with good bytes by a PUT of the same content
            return inline.delete(txn.conn, sha256)

        return bool(self._catalog.mutate(fn, actor="system/blobs", request_id=f"quarantine-{sha256[:16]}"))

    def drop_quarantined(self, sha256: str) -> bool:
        """Forget `quarantine/<hash>` once the blob is healthy again (healed); True if there was one."""
        if self.remote and self.backend.drop_quarantined(sha256):
            return True
        try:
            os.unlink(self.quarantine_dir / sha256)
        except FileNotFoundError:
            return False
        return True

    def quarantined(self) -> list[str]:
        try:
            names = os.listdir(self.quarantine_dir)
        except FileNotFoundError:
            names = []
        local = {n for n in names if _valid_hash(n)}  # (a remote store's bad inline bodies land here too)
        if self.remote:
            local |= set(self.backend.quarantined())
        return sorted(local)

    def iter_all(self) -> Iterator[tuple[str, Path]]:
        """Every stored blob (hash, path); used by fsck and gc. Sidecars are not blobs."""
        for f in self._fanout_entries():
            if f.is_file() and _valid_hash(f.name):
                yield f.name, Path(f.path)

    def remove(self, sha256: str) -> None:
        if self.remote:
            self._remember_sidecar(sha256, None)
            if not self.backend.delete(sha256):
                raise FileNotFoundError(sha256)
            return
        p = self.path(sha256)
        p.unlink()
        self.remove_sidecar(sha256)
        fsync_dir(p.parent)


def open_blob_store(blobs_root: Path, tmp: Path) -> BlobStore:
    """The blob store of a STORAGE_PATH as this process is configured: local files, or the backend
    `ANVIL_BLOBS_URL` names (offline tools — fsck, restore, the drill — open the server's)."""
    return BlobStore(blobs_root, tmp, backend=backend_from_env())
