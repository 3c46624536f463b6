"""Encoding and decoding of many small blobs in worker processes.

Per small blob a backup hashes, compresses, seals and packs a few KiB, and a restore unseals,
decompresses, hashes and writes them: some tens of microseconds of Python each, which threads
cannot spread over cores (the GIL). Here batches of small blobs go to a pool of spawned
processes (one per core); the parent only orders the results, appends sealed chunks to packs
and keeps the index and the tree. Large blobs stay on the threaded, streamed path (their work
is in zstd, AES-GCM and SHA-256, which release the GIL, and they must not be held whole). A
restore without a pool decodes the same pack windows (`restore_window`) on threads.

A worker gets the repository's keys once (the pool's initializer), never a passphrase, and
imports nothing of the store: this module, `crypto`, `pack` (compression) and `chunking`.
The repository format is unchanged: a chunk sealed here is byte-for-byte what `PackWriter`
would have sealed (apart from the random nonce).
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from anvil.backup.errors import BackupError

# Blobs up to this size are read whole, cut and sealed in a worker; larger ones stream on threads.
SMALL_MAX = 4 * 1024 * 1024
# Below this many small blobs the pool is not worth its start (~0.5-1 s per spawned interpreter).
PROCESS_MIN_ENV = "ANVIL_BACKUP_PROCESS_MIN"
PROCESS_MIN = 2000
# By default a backup encodes in processes only while its small blobs average at most this (unless
# ANVIL_BACKUP_WORKERS asks for processes): above it a blob's cost is mostly native (read, SHA-256,
# zstd, AES-GCM, all without the GIL), which threads already spread over the cores, and the
# processes only add the pickling, the pipe copies of sealed bytes and their own page faults.
# Measured on the initial backup of bench/backup.py's dataset (10,000 blobs of 1-256 KiB, 128 KiB on
# average, + 20 x 16 MiB), same server, alternated, load 1.4-2.7: threads 4.9 and 8.8 s using 6.7
# and 7.8 CPU-s, processes 5.7 and 10.0 s using 9.3 and 10.8.
PROCESS_AVG_MAX = 32 * 1024
# Worker processes; 0 turns the pool off (threads only, as before). Default: one per core while
# a core is idle (the 1-minute load average is below the core count), else none.
WORKERS_ENV = "ANVIL_BACKUP_WORKERS"
# One task: up to this many blobs or bytes (enough to amortise the pickling round trip, small
# enough that every worker gets several).
BATCH_ITEMS = 512
BATCH_BYTES = 4 * 1024 * 1024
# Tasks in flight per worker: results arrive while the next batch is already being worked on.
INFLIGHT_PER_WORKER = 3

_KEYS: dict[str, bytes] = {}


def worker_count(*, by_load: bool = True) -> int:
    """Worker processes to use: ANVIL_BACKUP_WORKERS if set, else one per core (none on one core);
    `by_load`: none while every core is busy (a backup's choice; a restore decides without it)."""
    text = os.environ.get(WORKERS_ENV, "").strip()
    if text:
        try:
            n = int(text)
        except ValueError:
            raise BackupError(f"{WORKERS_ENV} must be a whole number of processes, got {text!r}") from None
        if n < 0:
            raise BackupError(f"{WORKERS_ENV} must be 0 or more, got {text!r}")
        return n
    n = os.cpu_count() or 1
    if n < 2:
        return 0
    if not by_load:
        return n
    # Workers trade CPU (spawning, pickling batches) for wall time on idle cores. With every core
    # already busy (1-minute load average at or above the core count) they only add that CPU:
    # measured on a 2-core machine at load 25-32, a restore used ~1.8 CPU-s more and was no faster.
    try:
        if os.getloadavg()[0] >= n:
            return 0
    except OSError:
        pass
    return n


def process_min() -> int:
    text = os.environ.get(PROCESS_MIN_ENV, "").strip()
    try:
        return max(0, int(text)) if text else PROCESS_MIN
    except ValueError:
        raise BackupError(f"{PROCESS_MIN_ENV} must be a whole number of blobs, got {text!r}") from None


def use_processes(small_blobs: int, small_bytes: int | None = None, *, by_load: bool = True) -> int:
    """How many worker processes for this many small blobs (of `small_bytes` in all, for a backup's
    encoding: see PROCESS_AVG_MAX); 0: stay on threads. `by_load`: as `worker_count`."""
    n = worker_count(by_load=by_load)
    if not n or small_blobs < max(1, process_min()):
        return 0
    if small_bytes is not None and small_bytes > PROCESS_AVG_MAX * small_blobs and not os.environ.get(WORKERS_ENV):
        return 0  # (processes asked for by number are used whatever the sizes)
    return n


def _init(enc_key: bytes, id_key: bytes, parent: int) -> None:
    _KEYS["enc"] = enc_key
    _KEYS["id"] = id_key
    threading.Thread(target=_exit_with_parent, args=(parent,), name="anvil-worker-parent", daemon=True).start()


def _exit_with_parent(parent: int, every: float = 0.5) -> None:
    """A worker whose parent died (a killed backup process, a killed CLI) is re-parented; it would
    wait for tasks forever, holding what it inherited (a pipe its grandparent reads to its end).
    `parent` is the pool's creator as it gave it: it may have died before this worker started."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def _noop() -> None:
    return None


_MAIN_LOCK = threading.Lock()


def pool(workers: int, enc_key: bytes, id_key: bytes) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes holding the repository's keys, all started now.

    spawn, not fork: the parent (a server) has threads, open databases and locks. A spawned child
    normally re-imports the parent's `__main__` (the CLI: ~1.5 s of imports per worker) only to
    find functions pickled by reference; ours live in this module, so `__main__` is hidden from
    the preparation data while the processes start."""
    ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init, initargs=(enc_key, id_key, os.getpid()))
    main = sys.modules.get("__main__")
    with _MAIN_LOCK:
        saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if main is not None and k in main.__dict__}
        try:
            if main is not None:
                main.__dict__["__spec__"] = None
                main.__dict__.pop("__file__", None)
            for _ in range(workers):  # each submit with no idle worker spawns one (Python >= 3.9)
                ex.submit(_noop)
        except BaseException:
            ex.shutdown(cancel_futures=True)
            raise
        finally:
            if main is not None:
                main.__dict__.update(saved)
    return ex


class Pools:
    """One worker pool for a whole backup or restore, started on first need and shut at the end.

    A backup encodes its blobs a bounded batch at a time; a pool per batch cost a spawn of every
    worker again (~0.5 s of CPU per batch of 20,000 blobs). Here the first batch that qualifies
    (`use_processes`) starts the pool, and later batches reuse it whatever their size."""

    def __init__(self, enc_key: bytes, id_key: bytes, *, by_load: bool = True):
        self._keys = (enc_key, id_key)
        self._by_load = by_load
        self.ex: ProcessPoolExecutor | None = None
        self.workers = 0
        self._starting: threading.Thread | None = None

    def start_soon(self, small_blobs: int, small_bytes: int | None = None) -> None:
        """Start the pool on a thread (spawning takes ~0.4 s) while the caller does other work."""
        def start() -> None:
            # A pool that fails to start here is tried again (and its error raised) by `get`.
            with contextlib.suppress(Exception):
                self.get(small_blobs, small_bytes)

        self._starting = threading.Thread(target=start, name="anvil-backup-pool-start", daemon=True)
        self._starting.start()

    def _started(self) -> None:
        if self._starting is not None and self._starting is not threading.current_thread():
            self._starting.join()
            self._starting = None

    def get(self, small_blobs: int, small_bytes: int | None = None) -> tuple[ProcessPoolExecutor, int] | None:
        """The running pool, or a new one if this many small blobs are worth it; None: threads."""
        self._started()
        if self.ex is None:
            n = use_processes(small_blobs, small_bytes, by_load=self._by_load)
            if not n:
                return None
            self.ex, self.workers = pool(n, *self._keys), n
        return self.ex, self.workers

    def close(self) -> None:
        self._started()
        if self.ex is not None:
            self.ex.shutdown(cancel_futures=True)
            self.ex = None

    def __enter__(self) -> Pools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------ backup

# One encoded blob: (sha, actual sha256 | None if unreadable | "large", size, [(chunk id, raw length,
# sealed bytes)]). A corrupt blob (actual != sha) carries no chunks: it is never stored.
EncodedBlob = tuple[str, str | None, int, list[tuple[str, int, bytes]]]


def encode_batch(items: list[tuple[str, str, bytes | None]]) -> list[EncodedBlob]:
    """Runs in a worker: read (or take the inline body), hash, cut, compress and seal each blob."""
    from anvil.backup.chunking import CHUNKER, chunker
    from anvil.backup.crypto import chunk_id_of_digest, seal
    from anvil.backup.pack import compress

    enc, idk = _KEYS["enc"], _KEYS["id"]
    out: list[EncodedBlob] = []
    for sha, path, body in items:
        data = body
        if data is None:
            try:
                with open(path, "rb") as f:
                    data = f.read(SMALL_MAX + 1)
            except FileNotFoundError:
                out.append((sha, None, 0, []))
                continue
        if len(data) > SMALL_MAX:
            out.append((sha, "large", len(data), []))  # grew past its record: the streamed path takes it
            continue
        digest = hashlib.sha256(data).digest()
        actual = digest.hex()
        if actual != sha or not data:
            out.append((sha, actual, len(data), []))
            continue
        if len(data) <= CHUNKER["min_size"]:
            pieces: list[Any] = [(data, digest)]
        else:
            pieces = [(c.data, None) for c in chunker().cut_buf(data)]
            if len(pieces) == 1:
                pieces = [(data, digest)]
        chunks = []
        for piece, d in pieces:
            cid = chunk_id_of_digest(idk, d or hashlib.sha256(piece).digest())
            chunks.append((cid, len(piece), seal(enc, compress(piece), cid.encode())))
        out.append((sha, actual, len(data), chunks))
    return out


def _batches(items: Iterable[Any], weight: Callable[[Any], int]) -> Iterator[list[Any]]:
    batch: list[Any] = []
    load = 0
    for item in items:
        batch.append(item)
        load += weight(item)
        if len(batch) >= BATCH_ITEMS or load >= BATCH_BYTES:
            yield batch
            batch, load = [], 0
    if batch:
        yield batch


def run_ordered(ex: ProcessPoolExecutor, fn: Callable[[list[Any]], list[Any]], batches: Iterable[list[Any]],
                inflight: int) -> Iterator[Any]:
    """fn over batches in the pool, results flattened in submission order, at most `inflight` tasks out."""
    pending: deque[Future[list[Any]]] = deque()
    for batch in batches:
        while len(pending) >= inflight:
            yield from pending.popleft().result()
        pending.append(ex.submit(fn, batch))
    while pending:
        yield from pending.popleft().result()


def encode_small(ex: ProcessPoolExecutor, workers: int, items: Iterable[tuple[str, str, bytes | None]],
                 size_of: Callable[[str], int]) -> Iterator[EncodedBlob]:
    """Encoded small blobs, in the order given; `items` is (sha, path, inline body or None)."""
    yield from run_ordered(ex, encode_batch, _batches(items, lambda it: size_of(it[0]) + 256),
                           workers * INFLIGHT_PER_WORKER)


# ------------------------------------------------------------------ restore

# One blob to restore from a pack window: (sha, destination, mode, [(chunk id, offset in the window, length)]).
RestoreItem = tuple[str, str, int, list[tuple[str, int, int]]]


# A pack window: its bytes, or (pack file, offset, length) of a local repository, which the
# worker reads itself (no read of the whole pack by the parent, no copy through the pipe).
Window = bytes | tuple[str, int, int]


def _read_window(window: Window) -> bytes:
    if isinstance(window, bytes):
        return window
    path, offset, length = window
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        got = 0
        while got < length:
            block = os.pread(fd, length - got, offset + got)
            if not block:
                break  # a short pack: its chunks fail to unseal and are reported per blob
            parts.append(block)
            got += len(block)
        # Read once: the window's pages leave the cache, as a local repository's do (backends/local.py
        # drop_behind; not imported here: a worker imports as little as it can).
        with contextlib.suppress(AttributeError, OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def restore_batch(task: tuple[Window, list[RestoreItem], bool]) -> list[tuple[str, str, str | None]]:
    """Runs in a worker: `restore_window` with the pool's key."""
    return restore_window(_KEYS["enc"], task)


def _in_pack(window: Window) -> str:
    """' in pack P' for a window read from a local pack file (a remote pack's window is its bytes)."""
    return f" in pack {os.path.basename(window[0])}" if isinstance(window, tuple) else ""  # type: ignore[index]


def restore_window(enc: bytes, task: tuple[Window, list[RestoreItem], bool]) -> list[tuple[str, str, str | None]]:
    """Unseal, decompress, check and write each blob of one pack window (in a worker, or in the
    restoring process itself when it has no pool).

    (sha, 'restored' | 'present' | 'failed', why). `fresh`: the target was empty, so files are
    written in place (the restore marks the store incomplete until its end); otherwise through
    a temporary name, and a blob already present with the right hash is left alone."""
    from cryptography.exceptions import InvalidTag

    from anvil.backup.crypto import unseal
    from anvil.backup.pack import decompress

    window, items, fresh = task
    out: list[tuple[str, str, str | None]] = []
    try:
        view = memoryview(_read_window(window))
    except OSError as e:
        why = f"pack {os.path.basename(window[0])} cannot be read: {e.strerror or e}"  # type: ignore[index]
        return [(sha, "failed", why) for sha, _, _, _ in items]
    for sha, dest, mode, chunks in items:
        if not fresh and _present(dest, sha):
            out.append((sha, "present", None))
            continue
        h = hashlib.sha256()
        parts = []
        try:
            for cid, off, length in chunks:
                plain = unseal(enc, view[off:off + length], cid.encode())
                data = memoryview(plain)[1:] if plain[:1] == b"\x00" else decompress(plain)
                h.update(data)
                parts.append(data)
        except (InvalidTag, ValueError) as e:
            # Named like the other restore paths do (the chunk and its pack), so the operator can
            # match the problem to `backup verify --read-data`'s report.
            out.append((sha, "failed", f"chunk {cid} cannot be decrypted (corrupted){_in_pack(window)}: "
                                       f"{type(e).__name__}"))
            continue
        except Exception as e:  # noqa: BLE001 - zstd errors and the like: reported per blob
            out.append((sha, "failed", f"chunk {cid} cannot be decoded (corrupted){_in_pack(window)}: {e}"))
            continue
        if h.hexdigest() != sha:
            out.append((sha, "failed", f"restored content hashes to {h.hexdigest()}, the snapshot recorded {sha}"))
            continue
        tmp = dest if fresh else f"{dest}.{os.getpid()}.restoring"
        parent = os.path.dirname(dest)
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
            except FileNotFoundError:
                os.makedirs(parent, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
            try:
                for data in parts:
                    v = memoryview(data)
                    while v:
                        v = v[os.write(fd, v):]
            finally:
                os.close(fd)
            if not fresh:
                os.replace(tmp, dest)
        except OSError as e:
            if not fresh:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            out.append((sha, "failed", f"cannot write {dest}: {e.strerror or e}"))
            continue
        out.append((sha, "restored", None))
    return out


def _present(path: str, sha: str) -> bool:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1024 * 1024):
                h.update(block)
    except OSError:
        return False
    return h.hexdigest() == sha

