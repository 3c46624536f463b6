"""Snapshots: the consistent checkpoint, create, list/inspect, verify, forget and prune."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from anvil import __version__
from anvil.backup import summaries as summaries_mod
from anvil.backup import treepages, workers
from anvil.backup.chunking import CHUNKER, chunker
from anvil.backup.errors import BackupError
from anvil.backup.pack import ChunkReader, PackWriter, pack_name, pack_target
from anvil.backup.refstore import RefStore, SavedTree
from anvil.backup.repository import Repository, env_seconds
from anvil.backup.treestream import iter_tree_blobs, light_tree, read_tree_text
from anvil.storage import journal, records
from anvil.storage.blobs import BlobStore
from anvil.storage.layout import FORMAT_FILE
from anvil.storage.recovery import (
    NOT_PRESENT,
    DefaultEscrow,
    FileOwner,
    KeyHolder,
    Participant,
    RecoveryContext,
    coverage,
)

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, what)
# Threads that cut, hash, compress and encrypt files; hashing, zstd and AES-GCM release the GIL.
ENCODERS = min(4, os.cpu_count() or 1)
ORPHAN_GRACE_ENV = "ANVIL_BACKUP_ORPHAN_GRACE"
# Unreferenced packs younger than this are left alone: a create that started after we looked
# at the locks may have written them.
ORPHAN_GRACE = 30 * 60
CONSISTENCY_METHOD = "sqlite-online-backup step(-1) in one read transaction; S = journal head of the copy"


@contextlib.contextmanager
def checkpoint(catalog_path: Path | str, tmp_dir: Path, participants: list[Participant] | None = None,
               info: dict[str, Any] | None = None) -> Iterator[Path]:
    """A transactionally consistent copy of catalog.db at some journal seq S.

    The online backup API copies every page in one `step(-1)`, inside one read transaction
    on the source: WAL lets the writer keep committing meanwhile, and the copy is exactly
    the database as of one commit. S is whatever the copy's journal head is. Blobs are
    immutable and written before their records commit, so those referenced at S exist.

    `catalog_path` may instead be a PostgreSQL record store's URL: one exported REPEATABLE READ
    snapshot of it is copied into a catalog file of the same schema (backup.pgcapture), so
    everything after this step is the same for both engines. `info["method"]` says which.
    """
    work = tmp_dir / f"checkpoint-{uuid.uuid4().hex[:12]}"
    work.mkdir(parents=True)
    dest_path = work / "catalog.db"
    try:
        if isinstance(catalog_path, str):  # a record store's URL (imported here: psycopg only when used)
            from anvil.backup import pgcapture

            method = pgcapture.capture(str(catalog_path), dest_path, participants or [])
        else:
            records.consistent_copy(catalog_path, dest_path)
            method = CONSISTENCY_METHOD
        if info is not None:
            info["method"] = method
        yield dest_path
    finally:
        shutil.rmtree(work, ignore_errors=True)


Encoded = tuple[list[tuple[str, int, bytes | None]], str, int]


# Files up to this size are read whole and cut in memory (no copies per chunk); larger ones stream.
WHOLE_FILE = 32 * 1024 * 1024


def _encode_file(writer: PackWriter, path: Path | None,
                 opened: tuple[Any, int] | None = None) -> Encoded | None:
    """Cut, hash and encode one file (runs on worker threads): (chunks, sha256, size); None if missing.
    `opened`: (stream, size) already open instead of `path` (a blob from a remote backend)."""
    out: list[tuple[str, int, bytes | None]] = []
    if opened is None:
        try:
            f = open(path, "rb")  # type: ignore[arg-type]  # noqa: SIM115 - closed below; FileNotFoundError is an answer here
        except FileNotFoundError:
            return None
    else:
        f = opened[0]
    with f:
        size = os.fstat(f.fileno()).st_size if opened is None else opened[1]
        if size <= WHOLE_FILE:
            data = f.read()
            if len(data) <= CHUNKER["min_size"]:
                # One chunk (no cut possible below the minimum size): its SHA-256 is the file's.
                digest = hashlib.sha256(data).digest()
                if data:
                    out.append(writer.encode(data, digest))
                return out, digest.hex(), len(data)
            pieces: Any = [c.data for c in chunker().cut_buf(data)]
            if len(pieces) == 1:
                # Most files up to a few hundred KiB are one chunk: its SHA-256 is the file's, so
                # the bytes are hashed once, not once for the chunk id and again for the file.
                digest = hashlib.sha256(data).digest()
                out.append(writer.encode(data, digest))
                return out, digest.hex(), len(data)
        else:
            pieces = (bytes(c.data) for c in chunker().cut_stream(f))
        h = hashlib.sha256()
        total = 0
        for piece in pieces:
            h.update(piece)
            total += len(piece)
            out.append(writer.encode(piece))
    return out, h.hexdigest(), total


def _encode_bytes(writer: PackWriter, data: bytes) -> Encoded:
    """`_encode_file` for bytes already in memory (an inline body)."""
    if len(data) <= CHUNKER["min_size"]:
        digest = hashlib.sha256(data).digest()
        return ([writer.encode(data, digest)] if data else []), digest.hex(), len(data)
    digest = hashlib.sha256(data).digest()
    pieces = [c.data for c in chunker().cut_buf(data)]
    if len(pieces) == 1:  # one chunk: its SHA-256 is the whole body's, hashed once
        return [writer.encode(data, digest)], digest.hex(), len(data)
    return [writer.encode(p) for p in pieces], digest.hex(), len(data)


def encode_blob(writer: PackWriter, blobs: BlobStore, sha: str) -> Encoded | None:
    """A blob's file, or its inline body (small bodies kept in catalog.db): a snapshot's blob tree,
    and so `backup get`, heal and PITR, are the same whichever of the two holds it."""
    opened = blobs.open_raw(sha)  # a file, or a stream from the blob backend (S3)
    if opened is None:
        data = blobs.inline_body(sha)
        if data is not None:
            return _encode_bytes(writer, data)
        return None
    return _encode_file(writer, None, opened)


def _must_encode(writer: PackWriter, path: Path) -> Encoded:
    encoded = _encode_file(writer, path)
    if encoded is None:
        raise BackupError(f"{path} disappeared while it was being backed up")
    return encoded


def _add_encoded(writer: PackWriter, encoded: Encoded) -> list[str]:
    return [writer.add_encoded(cid, raw, blob) for cid, raw, blob in encoded[0]]


def ordered_parallel(fn: Callable[[Any], Any], items: list[Any], workers: int | None = None,
                     window: int = 8, weight: Callable[[Any], int] | None = None,
                     max_weight: int = 0) -> Iterator[tuple[Any, Any]]:
    """map(fn, items) on threads, results in order, bounded memory.

    At most `window` items are in flight, or with `weight`, as many as fit in `max_weight`
    (always at least one): many small files keep every worker busy, a few big ones do not
    hold gigabytes of encoded data.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as ex:
        pending: deque = deque()
        load = 0
        for item in items:
            w = weight(item) if weight else 1
            limit = max_weight if weight else window
            while pending and load + w > limit:
                it, fut, wt = pending.popleft()
                load -= wt
                yield it, fut.result()
            pending.append((item, ex.submit(fn, item), w))
            load += w
        while pending:
            it, fut, _ = pending.popleft()
            yield it, fut.result()


def ordered_batches(fn: Callable[[Any], Any], items: Iterable[Any], *, weight: Callable[[Any], int],
                    workers: int | None = None, batch_items: int = 64, batch_bytes: int = 1024 * 1024,
                    max_weight: int = 64 * 1024 * 1024) -> Iterator[tuple[Any, Any]]:
    """`ordered_parallel` for many small items: each thread task runs `fn` over a batch of them.

    A task per item costs a future, a lock round trip and a queue hand-off (~30 µs of Python,
    more than sealing or writing a small blob): tens of thousands of small blobs spent a large
    part of a backup or restore there. Items heavier than `batch_bytes` still go one per task."""

    def run(batch: tuple[list[Any], int]) -> list[Any]:
        return [fn(item) for item in batch[0]]

    def batches() -> Iterator[tuple[list[Any], int]]:
        batch: list[Any] = []
        load = 0
        for item in items:
            w = weight(item)
            if batch and (len(batch) >= batch_items or load + w > batch_bytes):
                yield batch, load
                batch, load = [], 0
            batch.append(item)
            load += w
        if batch:
            yield batch, load

    for (batch, _), results in ordered_parallel(run, batches(), workers=workers,  # type: ignore[arg-type]
                                                 weight=lambda b: b[1], max_weight=max_weight):
        yield from zip(batch, results, strict=True)


def latest_for(repo: Repository, deployment_id: str, *, full: bool = True) -> dict[str, Any] | None:
    """The newest snapshot of the deployment (a full one: deltas hold no file tree), loaded whole.
    A damaged snapshot is passed over: it cannot be a parent, and `backup verify` reports it."""
    row = latest_row(repo, deployment_id, full=full)
    return repo.load_snapshot(row["id"]) if row else None


def latest_row(repo: Repository, deployment_id: str, *, full: bool = True) -> dict[str, Any] | None:
    """`latest_for`'s header row only (id, seq, stats; no tree)."""
    rows = [r for r in repo.snapshot_rows(damaged=[]) if r.get("deployment_id") == deployment_id
            and (not full or r.get("kind") != "delta")]
    return rows[-1] if rows else None


def _summaries(participants: list[Participant], ctx: RecoveryContext,
               reused: dict[str, Any] | None = None, extend: dict[str, Any] | None = None,
               extended: list[str] | None = None) -> dict[str, Any]:
    """Each participant's description and summary; `reused`: summaries taken over from the parent;
    `extend`: the parent's summaries to extend (`Participant.summary_after`), the names of those
    extended are appended to `extended`."""
    reused = reused or {}
    extend = extend or {}
    out = {}
    for p in participants:
        if p.name in reused:
            summary = reused[p.name]
        else:
            summary = p.summary_after(ctx, extend[p.name]) if p.name in extend else None
            if summary is None:
                summary = p.summary(ctx)
            elif extended is not None:
                extended.append(p.name)
        out[p.name] = {"describe": p.describe().to_dict(), "summary": summary}
    return out


class _Background:
    """fn(*args) on a thread; `result()` re-raises what it raised."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        import threading

        self._out: list[Any] = []
        self._err: list[BaseException] = []

        def run() -> None:
            try:
                self._out.append(fn(*args))
            except BaseException as e:  # noqa: BLE001 - re-raised by result() in the caller's thread
                self._err.append(e)

        self._thread = threading.Thread(target=run, name="anvil-backup-summaries", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self.wait()
        if self._err:
            raise self._err[0]
        return self._out[0]


class _RecordedSizes:
    """sha -> size as the first reference records it (a view of the references, no copy)."""

    def __init__(self, refs: dict[str, Any]):
        self.refs = refs

    def get(self, sha: str, default: int = 0) -> int:
        uses = self.refs.get(sha)
        return uses[0].size if uses else default


class _Unsorted(Exception):
    pass


def _sorted_entries(repo: Repository, snap_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    last = ""
    for sha, entry in iter_tree_blobs(repo, snap_id):
        if sha < last:
            raise _Unsorted
        last = sha
        yield sha, entry


def _split_refs(store: RefStore, repo: Repository, parent_id: str | None, known: dict[str, Any]) -> int:
    """Sort the referenced blobs into those the parent's tree holds (taken over) and those to
    encode; returns the recorded bytes of the latter. A merge of two streams sorted by hash: the
    references (read back sorted from the store) and the parent's blob tree, which was written in
    that order, so neither is ever in memory. A tree in another order (none is written so) is
    read whole and sorted, as before."""
    if parent_id is None:
        return store.split(None, known)[1]
    # A parent whose pages carry keys: merged page by page, unchanged pages taken over whole.
    # Not with an unreadable index file: then each entry's chunks are looked up (`split`), as a
    # page taken over whole relies on the index naming every chunk a live snapshot uses.
    if not repo.index_problems:
        try:
            ptree = repo.load_snapshot(parent_id, pages=False).get("tree") or {}
        except BackupError:
            ptree = {}
        pages = treepages.reusable_pages(ptree)
        if pages is not None:
            return store.split_pages(pages, lambda cid: treepages.read_page_texts(repo, cid), known)[1]
    try:
        return store.split(_sorted_entries(repo, parent_id), known)[1]
    except _Unsorted:
        store.reset_split()
        whole = dict(iter_tree_blobs(repo, parent_id))
        return store.split(iter(sorted(whole.items())), known)[1]


# An SQLite file (catalog.db, any a participant backs up) is cut into chunks of this size at fixed
# offsets, a whole number of its pages (a page size above it is used instead): a change rewrites
# pages in place, so every chunk whose pages it did not touch is the parent's and dedupes. Content-
# defined 512 KiB chunks re-cut the whole file and, with scattered page updates, rewrote half of
# them: at 100,000 inline bodies, 299 MB of a 600 MB catalog.db new after a 1 % change.
SQLITE_CHUNK = 64 * 1024
SQLITE_MAGIC = b"SQLite format 3\x00"
# Bytes read, hashed and sealed per task on the encoder threads (SHA-256, zstd, AES-GCM release the GIL).
SQLITE_BLOCK = 4 * 1024 * 1024


def sqlite_page_size(head: bytes) -> int | None:
    """The page size an SQLite database file's header records, or None if `head` is not one."""
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        return None
    n = int.from_bytes(head[16:18], "big")
    n = 65536 if n == 1 else n
    return n if 512 <= n <= 65536 and n & (n - 1) == 0 else None


def _store_sqlite_file(writer: PackWriter, path: Path, page_size: int) -> dict[str, Any]:
    """An SQLite file's tree entry, cut at fixed page-aligned offsets (`SQLITE_CHUNK`). A restore
    concatenates the chunks as for any file: nothing there depends on how a file was cut."""
    chunk = max(SQLITE_CHUNK, page_size)
    block = max(chunk, SQLITE_BLOCK // chunk * chunk)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size

        def encode(offset: int) -> tuple[bytes, list[tuple[str, int, bytes | None]]]:
            data = os.pread(fd, min(block, size - offset), offset)
            view = memoryview(data)
            return data, [writer.encode(view[i:i + chunk]) for i in range(0, len(data), chunk)]

        chunks: list[str] = []
        total = 0
        for _, (data, encoded) in ordered_parallel(encode, list(range(0, size, block)), window=2 * ENCODERS):
            total += len(data)
            chunks.extend(writer.add_encoded(cid, raw, blob) for cid, raw, blob in encoded)
    finally:
        os.close(fd)
    # No whole-file SHA-256 (a second pass over every byte: ~0.25 CPU-s at a 480 MB catalog): a
    # restore checks each chunk against its id (a keyed hash of its plaintext) instead, and the
    # manifest, authenticated as a whole, fixes their order.
    return {"size": total, "chunks": chunks, "chunking": {"method": "fixed", "size": chunk, "page_size": page_size}}


def _store_file(writer: PackWriter, path: Path) -> dict[str, Any]:
    """A file's tree entry, its chunks appended to the packs as they are cut: catalog.db holds
    the inline bodies (hundreds of MB for a store of small objects), and encoded whole it was
    the largest thing a backup held (its sealed chunks all at once). An SQLite file is cut at
    fixed page-aligned offsets instead (`_store_sqlite_file`)."""
    try:
        with open(path, "rb") as f:
            page_size = sqlite_page_size(f.read(100))
    except FileNotFoundError:
        raise BackupError(f"{path} disappeared while it was being backed up") from None
    if page_size is not None:
        return _store_sqlite_file(writer, path, page_size)
    if path.stat().st_size <= WHOLE_FILE:
        encoded = _must_encode(writer, path)  # read whole and cut in memory (faster), at most 32 MiB
        return {"size": encoded[2], "sha256": encoded[1], "chunks": _add_encoded(writer, encoded)}
    h = hashlib.sha256()
    size = 0
    chunks: list[str] = []
    with open(path, "rb") as f:
        for c in chunker().cut_stream(f):
            piece = bytes(c.data)
            h.update(piece)
            size += len(piece)
            chunks.append(writer.add(piece))
    return {"size": size, "sha256": h.hexdigest(), "chunks": chunks}


class _StoreRefs:
    """`refs[sha]` for the encoder's problem reports, looked up in the store."""

    def __init__(self, store: RefStore):
        self.store = store

    def __getitem__(self, sha: str) -> list[Any]:
        return self.store.uses(sha)


def _early_pools(store: RefStore, repo: Repository, blobs: BlobStore) -> workers.Pools:
    """The backup's worker pool, already starting (on a thread: ~0.4 s of spawning) while FORMAT
    and catalog.db are packed, if there are enough small blobs to encode to want it."""
    pools = workers.Pools(repo.enc_key, repo.id_key)
    if not blobs.remote and workers.worker_count():
        small, small_bytes = store.conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM todo WHERE size <= ?",
                                                (workers.SMALL_MAX,)).fetchone()
        if workers.use_processes(int(small), int(small_bytes)):
            pools.start_soon(int(small), int(small_bytes))
    return pools


def _encode_todo(store: RefStore, repo: Repository, writer: PackWriter, blobs: BlobStore, problems: list[str],
                 tick: Callable[[int], None], pools: workers.Pools) -> None:
    """Encode the blobs to encode a bounded batch at a time; each batch's entries go to the store."""
    refs = _StoreRefs(store)
    # One worker pool for every batch (started early, or by the first batch worth it), not one per batch.
    with pools:
        for todo, sizes in store.todo_batches():
            store.add_entries(_encode_new_blobs(repo, writer, blobs, todo, sizes, refs,  # type: ignore[arg-type]
                                                problems, tick, pools))


def create_snapshot(storage_root: Path, catalog_path: Path | str, blobs: BlobStore, tmp_dir: Path, deployment_id: str,
                    participants: list[Participant], repo: Repository, *, progress: Progress | None = None,
                    tag: str | None = None, config: dict[str, Any] | None = None,
                    escrow_secrets: bool | None = None, participants_factory: str | None = None) -> dict[str, Any]:
    """Checkpoint, then store FORMAT, catalog.db and every referenced blob; returns the manifest.

    `participants_factory` ("module:function" returning `participants` anew): the work after the
    checkpoint runs in a child process built with it (`backup.snapshot_process`), so the memory it
    allocates goes back whole when that process exits (a server's backups); None: in this process."""
    with repo.lock("shared", "create"):
        return _create_snapshot(storage_root, catalog_path, blobs, tmp_dir, deployment_id, participants, repo,
                                progress=progress, tag=tag, config=config, escrow_secrets=escrow_secrets,
                                participants_factory=participants_factory)


def _create_snapshot(storage_root: Path, catalog_path: Path | str, blobs: BlobStore, tmp_dir: Path, deployment_id: str,
                     participants: list[Participant], repo: Repository, *, progress: Progress | None = None,
                     tag: str | None = None, config: dict[str, Any] | None = None,
                     escrow_secrets: bool | None = None, participants_factory: str | None = None) -> dict[str, Any]:
    started = time.time()
    # Only the parent's header: its blob tree is streamed (`treestream`), never decoded whole.
    parent = latest_row(repo, deployment_id)
    if parent is not None and isinstance(catalog_path, Path):
        # Nothing happened since the parent: a manifest listing what it holds, written without
        # even reading the repository's index (orphan packs wait for the next full snapshot or prune).
        # It allocates little (a few queries, the parent's header): it stays in this process.
        same = _unchanged_snapshot(storage_root, catalog_path, blobs, participants, repo, parent, started,
                                   tag=tag, config=config, escrow_secrets=escrow_secrets)
        if same is not None:
            return same
    from anvil.backup import snapshot_process

    child = None
    # A PostgreSQL store's inline bodies and a remote blob backend are read through this
    # process's connections: those backups stay here (docs/backup.md, "The snapshot in a child process").
    if participants_factory and isinstance(catalog_path, Path) and not blobs.remote and \
            snapshot_process.wanted(catalog_path):
        child = snapshot_process.SnapshotProcess(participants_factory, tmp_dir)  # starts while we checkpoint
    else:
        # The index (the chunks the repository holds) is read while catalog.db is copied: both
        # mostly outside the GIL. (A child reads its own.)
        repo.prefetch_index()
    try:
        captured: dict[str, Any] = {}
        with checkpoint(catalog_path, tmp_dir, participants, captured) as cp:
            _checkpoint_participants(storage_root, cp, blobs, participants, escrow_secrets)
            job = SnapshotJob(str(storage_root), str(cp), captured["method"], deployment_id, parent, started, tag,
                              config, escrow_secrets)
            if child is not None:
                manifest = child.run(job, repo, blobs, progress)
            else:
                manifest = snapshot_from_checkpoint(job, repo, blobs, participants, progress)
    finally:
        if child is not None:
            child.close()
    if "tree" in manifest:
        manifest["tree"]["blobs"] = _saved_tree(repo, manifest["id"], blobs=manifest["stats"]["blobs"])
    else:  # the child's answer has none
        manifest["tree"] = _saved_tree(repo, manifest["id"])
    return manifest


def _saved_tree(repo: Repository, snap_id: str, *, blobs: int | None = None) -> SavedTree:
    """The returned manifest's tree (or, given their count, its `blobs`), read back from the saved
    snapshot only if used (the server never does). It names the snapshot by id, not through the
    manifest: a manifest holding a closure over itself is a reference cycle, which outlived the
    server's collection after a backup and kept the manifest (~1 MiB of objects at 100,000 blobs)
    until the next one."""
    if blobs is None:
        return SavedTree(lambda: repo.load_snapshot(snap_id)["tree"])
    return SavedTree(lambda: repo.load_snapshot(snap_id)["tree"]["blobs"], blobs)


def _checkpoint_participants(storage_root: Path, cp: Path, blobs: BlobStore, participants: list[Participant],
                             escrow_secrets: bool | None) -> None:
    """Each participant's `checkpoint` (its own files made consistent for the copy), right after the
    catalog's, in the process that took it."""
    conn = records.open_readonly(cp)
    try:
        ctx = RecoveryContext(storage_root, conn, blobs, participants, escrow_secrets=escrow_secrets)
        ctx.escrow_secrets = _escrow(participants, ctx, escrow_secrets)[0]
        for p in participants:
            p.checkpoint(ctx)
    finally:
        records.close(conn)


@dataclass(frozen=True)
class SnapshotJob:
    """What the work after the checkpoint needs, all plain data: it goes to the child process as JSON."""

    storage_root: str
    checkpoint: str  # the checkpoint's copy of catalog.db (in a scratch folder of its own)
    method: str  # the manifest's consistency method
    deployment_id: str
    parent: dict[str, Any] | None  # the parent snapshot's row, or None
    started: float
    tag: str | None
    config: dict[str, Any] | None
    escrow_secrets: bool | None


def snapshot_from_checkpoint(job: SnapshotJob, repo: Repository, blobs: BlobStore, participants: list[Participant],
                             progress: Progress | None = None) -> dict[str, Any]:
    """Everything after the checkpoint (summaries, references, encoding, tree pages, manifest,
    index), reading only the checkpoint's copy and the blob store; saves the snapshot and returns
    its manifest without `tree.blobs`. Called under the repository's lock, in the process that
    took the checkpoint or in its child (`backup.snapshot_process`)."""
    # Another create may be filling packs no index mentions yet: then leave every pack alone.
    if any(lock.get("operation") not in ("verify", "forget") for lock in repo.live_locks):
        orphans: dict[str, Any] = {"skipped": "another backup may be running", "packs": 0, "bytes": 0, "kept": 0}
    else:
        # Asked only when some pack is about to go: loading the parent's manifest costs an incremental
        # backup ~5 %, and there is nothing to protect while no pack looks orphaned.
        orphans = remove_orphan_packs(repo, unless=lambda: _parent_unindexed(repo, job.parent))
    writer = repo.writer()
    try:
        return _fill_snapshot(job, repo, blobs, participants, writer, orphans, progress)
    finally:
        writer.close()


def _parent_unindexed(repo: Repository, parent: dict[str, Any] | None) -> str | None:
    """Why packs no index names must be kept, or None. A lost index file makes the packs it named
    look like a killed create's leftovers: the cleanup deleted them once past the grace period,
    destroying every older snapshot's data (this create re-encodes what it needs, so it alone
    looked fine). The parent's files and tree pages (its manifest without the pages' contents:
    cheap) all indexed is the sign that nothing was lost; prune checks every snapshot's chunks."""
    if parent is None:
        return None
    try:
        m = repo.load_snapshot(parent["id"], pages=False)
    except BackupError:
        return f"the parent snapshot {parent['id']} cannot be read; run `anvil backup verify`"
    index = repo.index()
    wanted = [*treepages.page_ids(m), *(c for e in m["tree"]["files"].values() for c in e.get("chunks") or [])]
    missing = sum(1 for c in wanted if c not in index)
    if not missing:
        return None
    return (f"{missing} chunk(s) of the parent snapshot {parent['id']} are in no index (an index file lost?): "
            "packs no index names are kept; run `anvil backup verify`")


def _fill_snapshot(job: SnapshotJob, repo: Repository, blobs: BlobStore, participants: list[Participant],
                   writer: PackWriter, orphans: dict[str, Any], progress: Progress | None) -> dict[str, Any]:
    storage_root, cp, parent, started = Path(job.storage_root), Path(job.checkpoint), job.parent, job.started
    known = writer.known
    problems: list[str] = []
    conn = records.open_readonly(cp)
    try:
        ctx = RecoveryContext(storage_root, conn, blobs, participants, escrow_secrets=job.escrow_secrets)
        escrow_secrets, escrow_policy = _escrow(participants, ctx, job.escrow_secrets)
        ctx.escrow_secrets = escrow_secrets
        secret_key_ids = sorted({k for p in participants if isinstance(p, KeyHolder) for k in p.key_ids(ctx)})
        seq, chain_hash = journal.head(conn)
        # The references go to an on-disk sorted store (`refstore`), never held whole; the
        # summaries read them back from it in hash order.
        store = RefStore(cp.parent)
        store.load(ctx)  # closed below, or by the folder's removal if this raises
        ctx.stream_referenced_blobs(store.referenced)
        extra = sorted({f for p in participants if isinstance(p, FileOwner) for f in p.files(ctx)})
        # The participants' summaries (object digests, a stat per blob, the journal chain's
        # hashes) were a third of a small-blob backup's own time: they run on a thread, on the
        # checkpoint's connection (nothing else uses it from here on), while blobs are encoded.
        # Summaries that still hold at this head are the parent's (`backup.summaries`): a full
        # snapshot of an unchanged store no longer reads every row to find the same digests.
        inherited = summaries_mod.from_parent(repo, parent, conn, (seq, chain_hash), participants, now=started)
        reused = inherited.reused
        extended: list[str] = []
        summaries = _Background(_summaries, participants, ctx, reused, inherited.extend, extended)
    except BaseException:
        records.close(conn)
        raise
    pools: workers.Pools | None = None
    try:
        catalog_size = cp.stat().st_size
        # Sizes as the records give them (no stat per blob) make the progress total.
        todo_bytes = _split_refs(store, repo, parent["id"] if parent else None, known)
        pools = _early_pools(store, repo, blobs)
        total = catalog_size + todo_bytes
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, total, "")

        files: dict[str, Any] = {}
        fmt = (storage_root / FORMAT_FILE).read_bytes()
        files[FORMAT_FILE] = {"size": len(fmt), "sha256": hashlib.sha256(fmt).hexdigest(),
                              "chunks": [writer.add(fmt)]}
        files["catalog.db"] = _store_file(writer, cp)
        tick(files["catalog.db"]["size"])
        for path in extra:
            rel = str(Path(path).absolute().relative_to(storage_root))
            if rel in files or rel.startswith(("blobs/", "tmp/")):
                raise BackupError(f"participant file {rel} is not allowed in a snapshot")
            files[rel] = {**_store_file(writer, Path(path)), "mode": Path(path).stat().st_mode & 0o777}
        logical = files["catalog.db"]["size"] + len(fmt)
        _encode_todo(store, repo, writer, blobs, problems, tick, pools)
        reused_blobs = store.reused
        logical += store.tree_totals()[1]
        # The tree goes into content-addressed pages (`treepages`): those the parent already
        # stored (every page no new, changed or dropped blob falls in) are not written again.
        known_before = writer.new_chunks
        blob_pages, page_keys = treepages.write_pages(writer, store.tree_items())
        pages_new = writer.new_chunks - known_before
        tree_count = sum(n for _, n in blob_pages)
        parts = summaries.result()  # before the index: a failed summary leaves no index behind
        if reused_blobs < store.tree_totals()[0]:
            # Blobs were read although nothing was journaled (one missing at the parent is back):
            # a summary taken over because the head had not moved may count the blob store.
            for p in participants:
                if p.name in reused and p.summary_reuse == "head":
                    parts[p.name]["summary"] = p.summary(ctx)
                    reused.pop(p.name)
        writer.finish()
        finished = time.time()
        manifest = _manifest(
            repo, participants, parent_id=parent["id"] if parent else None, tag=job.tag, started=started,
            finished=finished, fmt=fmt, deployment_id=job.deployment_id,
            consistency={"method": job.method, "journal_seq": seq, "journal_hash": chain_hash},
            key_ids=(secret_key_ids, escrow_secrets, escrow_policy), config=job.config, parts=parts,
            problems=problems,
            stats={"logical_bytes": logical, "new_bytes": writer.new_bytes, "new_chunks": writer.new_chunks,
                   "blobs": tree_count, "blobs_reused_from_parent": reused_blobs,
                   "summaries_reused": sorted(reused), "summaries_extended": sorted(extended),
                   # When the extendable summaries (the journal chain) were last computed whole:
                   # now, unless each was taken over or extended from the parent's.
                   summaries_mod.CHAIN_FULL_KEY: _full_walk(participants, reused, extended, inherited, started),
                   "tree_pages": len(blob_pages), "tree_pages_new": pages_new,
                   "tree_pages_taken_over": len(store.pages),
                   "duration": round(finished - started, 3), "orphans": orphans},
            tree={"files": files, "blob_pages": blob_pages, "blob_page_keys": page_keys})
        repo.save_snapshot(manifest)
    finally:
        if pools is not None:
            pools.close()  # (already closed unless this failed before the blobs were encoded)
        summaries.wait()
        records.close(conn)
        store.close()
    return manifest


def _full_walk(participants: list[Participant], reused: dict[str, Any], extended: list[str],
               inherited: summaries_mod.FromParent, now: float) -> float | None:
    """The manifest's `journal_chain_full_walk`: `now` if every extendable summary (the journal's)
    was computed whole by this backup, else the parent's (None if it recorded none)."""
    names = [p.name for p in summaries_mod.extendable(participants)]
    if any(n in extended or n in reused for n in names):
        return inherited.chain_full_walk
    return now


def _manifest(repo: Repository, participants: list[Participant], *, parent_id: str | None, tag: str | None,
              started: float, finished: float, fmt: bytes, deployment_id: str, consistency: dict[str, Any],
              key_ids: tuple[list[str], bool, str], config: dict[str, Any] | None, parts: dict[str, Any],
              problems: list[str], stats: dict[str, Any], tree: dict[str, Any]) -> dict[str, Any]:
    """A new snapshot's manifest (a full one, or one unchanged since its parent), fields in the order
    every snapshot writes them. `key_ids`: (the secret key ids, whether escrowed, the escrow policy)."""
    secret_key_ids, escrowed, policy = key_ids
    return {
        "id": uuid.uuid4().hex[:16],
        "parent": parent_id,
        "tag": tag,
        "started": started,
        "finished": finished,
        "anvil_version": __version__,
        "repository_format": repo.config["format_version"],
        "storage_format": _storage_format(fmt),
        "deployment_id": deployment_id,
        "hostname": platform.node(),
        "consistency": consistency,
        "key_ids": {"repository_key": repo.key_id, "secret_keys": secret_key_ids,
                    "secrets_escrowed": escrowed, "escrow_policy": policy},
        "config": config or {},
        "participants": parts,
        "coverage": coverage(p.describe() for p in participants),
        "problems": problems,
        "stats": stats,
        "tree": tree,
    }


UNCHANGED_METHOD = ("unchanged since parent {parent}: journal head (seq, hash) and every summary computed from "
                    "the records equal the parent's, in one read transaction; catalog.db and the blob tree are the "
                    "parent's")


def _escrow(participants: list[Participant], ctx: RecoveryContext, escrow_secrets: bool | None) -> tuple[bool, str]:
    """Whether key material goes into the snapshot, and the policy that decided it (`key_ids.escrow_policy`)."""
    if escrow_secrets is None:
        reasons = [r for p in participants if isinstance(p, DefaultEscrow) and (r := p.default_escrow(ctx))]
        return bool(reasons), "default: " + ("; ".join(reasons) if reasons else "no key material to escrow "
                                              "(keys come from the environment or production mode)")
    return escrow_secrets, "explicit: --escrow-secrets" if escrow_secrets else "explicit: --no-escrow-secrets"


def _as_recorded(value: Any) -> Any:
    """A summary as a manifest records it (JSON: tuples become lists, keys strings)."""
    import json

    return json.loads(json.dumps(value))


def _same_file(path: Path, entry: Any) -> bool:
    """Whether a file is byte for byte the one a parent's tree entry describes (size, then SHA-256)."""
    if not isinstance(entry, dict):
        return False
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return len(data) == entry.get("size") and hashlib.sha256(data).hexdigest() == entry.get("sha256")


def _unchanged_snapshot(storage_root: Path, catalog_path: Path, blobs: BlobStore, participants: list[Participant],
                        repo: Repository, parent: dict[str, Any], started: float, *, tag: str | None,
                        config: dict[str, Any] | None, escrow_secrets: bool | None) -> dict[str, Any] | None:
    """A full snapshot of a store in which nothing happened since its parent, at the cost of a few
    queries: the parent's catalog.db copy, blob tree pages and files are listed again; nothing is
    copied or encoded, and the repository's index is not even read. None when anything may differ
    (then the full path runs).

    Sound because (1) every change to source records is journaled in the same transaction
    (architecture.md, "The journal"), so the same head (seq and chain hash) means the same
    source records and the same blob references; (2) what a participant keeps outside the journal
    (identity's configured keys, derived files, findings) shows in its summary, and every summary
    that is not declared journal-only (`summary_reuse`) is computed again, in the same read
    transaction as the head, and must equal the parent's; (3) the parent had no problems (a blob
    missing then may be back now: the full path reads it). Anything else (another Anvil version,
    a parent with an inline tree, a PostgreSQL store, a different escrow choice, FORMAT or a
    participant's file that is not the parent's) takes the full path."""
    if parent.get("problems") or parent.get("kind") == "delta":
        return None
    # The parent's tree is taken over as written: decoded without its chunk lists (`light_tree`).
    pm, tree_json = read_tree_text(repo, parent["id"])
    if tree_json is None:
        return None
    ptree = light_tree(tree_json)
    pfiles = ptree.get("files") or {}
    if ("blob_pages" not in ptree or pm.get("anvil_version") != __version__ or "catalog.db" not in pfiles
            or pm.get("problems")):
        return None
    recorded = pm.get("participants") or {}
    pcons = pm.get("consistency") or {}
    conn = records.open_readonly(catalog_path)
    try:
        with conn:  # one read transaction: the head and the summaries below are of one commit
            seq, chain_hash = journal.head(conn)
            if (seq, chain_hash) != (pcons.get("journal_seq"), pcons.get("journal_hash")):
                return None
            ctx = RecoveryContext(storage_root, conn, blobs, participants, escrow_secrets=escrow_secrets)
            escrow_secrets, escrow_policy = _escrow(participants, ctx, escrow_secrets)
            ctx.escrow_secrets = escrow_secrets
            if escrow_secrets != bool((pm.get("key_ids") or {}).get("secrets_escrowed")):
                return None
            for p in participants:
                p.checkpoint(ctx)
            parts: dict[str, Any] = {}
            reused: list[str] = []
            for p in participants:
                before = recorded.get(p.name)
                if not isinstance(before, dict) or "summary" not in before:
                    return None  # a participant the parent did not know
                if p.summary_reuse in ("events", "head"):
                    summary = before["summary"]  # journal-only state, and the head has not moved
                    reused.append(p.name)
                else:
                    summary = _as_recorded(p.summary(ctx))
                    if summary != before["summary"]:
                        return None  # changed outside the journal: a fresh checkpoint is needed
                parts[p.name] = {"describe": p.describe().to_dict(), "summary": summary}
            secret_key_ids = sorted({k for p in participants if isinstance(p, KeyHolder) for k in p.key_ids(ctx)})
            extra = sorted({f for p in participants if isinstance(p, FileOwner) for f in p.files(ctx)})
    finally:
        records.close(conn)
    # Every file is the parent's (FORMAT, the participants' own files): its entry is taken over.
    rels = {str(Path(path).absolute().relative_to(storage_root)): Path(path) for path in extra}
    if set(rels) | {FORMAT_FILE, "catalog.db"} != set(pfiles) or not _same_file(storage_root / FORMAT_FILE,
                                                                              pfiles[FORMAT_FILE]):
        return None
    for rel, path in rels.items():
        if not _same_file(path, pfiles[rel]) or pfiles[rel].get("mode") != path.stat().st_mode & 0o777:
            return None
    fmt = (storage_root / FORMAT_FILE).read_bytes()
    pstats = pm.get("stats") or {}
    blob_bytes = int(pstats.get("logical_bytes", 0)) - sum(
        int(pfiles[n]["size"]) for n in (FORMAT_FILE, "catalog.db") if n in pfiles)
    blob_pages = ptree["blob_pages"]
    tree_count = sum(n for _, n in blob_pages)
    finished = time.time()
    manifest = _manifest(
        repo, participants, parent_id=parent["id"], tag=tag, started=started, finished=finished, fmt=fmt,
        deployment_id=pm["deployment_id"],
        consistency={"method": UNCHANGED_METHOD.format(parent=parent["id"]), "journal_seq": seq,
                     "journal_hash": chain_hash},
        key_ids=(secret_key_ids, escrow_secrets, escrow_policy), config=config, parts=parts, problems=[],
        stats={"logical_bytes": blob_bytes + len(fmt) + int(pfiles["catalog.db"]["size"]),
               "new_bytes": 0, "new_chunks": 0,
               "blobs": tree_count, "blobs_reused_from_parent": tree_count,
               "summaries_reused": sorted(reused), "summaries_extended": [], "unchanged_since_parent": True,
               summaries_mod.CHAIN_FULL_KEY: pstats.get(summaries_mod.CHAIN_FULL_KEY),
               "tree_pages": len(blob_pages), "tree_pages_new": 0,
               "duration": round(finished - started, 3),
               "orphans": {"skipped": "nothing changed: left to the next full snapshot or prune", "packs": 0,
                           "bytes": 0, "kept": 0}},
        tree={})
    del manifest["tree"]  # the parent's, as written
    repo.save_snapshot(manifest, tree_json=tree_json)
    manifest["tree"] = _saved_tree(repo, manifest["id"])
    return manifest


def _refs_note(uses: list[Any]) -> str:
    labels = [r.label for r in uses]
    return ", ".join(labels[:3] + ([f"+{len(labels) - 3} more"] if len(labels) > 3 else []))


def _encode_new_blobs(repo: Repository, writer: PackWriter, blobs: BlobStore, todo: list[str],
                      sizes: _RecordedSizes, refs: dict[str, Any], problems: list[str],
                      tick: Callable[[int], None], pools: workers.Pools | None = None) -> dict[str, dict[str, Any]]:
    """Encode and pack the blobs the parent does not hold: sha -> tree entry (without refs).

    Many small blobs go to worker processes (`workers`: the per-blob Python work then uses every
    core); large ones, and all of them when there are few, are cut and sealed on threads and
    streamed. This thread appends every sealed chunk to the packs, so pack order and the index
    are kept in one place. Missing and corrupt blobs are reported in `problems` and left out."""
    entries: dict[str, dict[str, Any]] = {}

    def take(sha: str, encoded: Encoded | None) -> None:
        if encoded is None:
            problems.append(f"blob {sha} referenced by {_refs_note(refs[sha])} is missing from STORAGE_PATH")
            return
        actual, size = encoded[1], encoded[2]
        tick(size)
        if actual != sha:
            # Never keep bad bytes under the name of good ones: a restore would bring them back as
            # if intact. Left out, the blob is reported missing by restore and retried by the next
            # backup (it is not in this snapshot's tree), once it has been repaired.
            problems.append(f"blob {sha} in STORAGE_PATH is corrupt (hashes to {actual}); "
                            f"affects {_refs_note(refs[sha])}; not stored in the snapshot")
            return
        entries[sha] = {"size": size, "chunks": _add_encoded(writer, encoded)}

    small = [sha for sha in todo if sizes.get(sha, 0) <= workers.SMALL_MAX]
    # Workers read local files: bodies in a remote blob backend are read by the threads below.
    own = pools is None
    pools = pools or workers.Pools(repo.enc_key, repo.id_key)
    running = None if blobs.remote or not small else pools.get(len(small), sum(sizes.get(sha, 0) for sha in small))
    threaded = todo
    if running:
        ex, nproc = running
        small_set = set(small)
        threaded = [sha for sha in todo if sha not in small_set]
        inlined = blobs.inline_among(small)  # of this batch only: never a set of the whole store's

        def items() -> Iterator[tuple[str, str, bytes | None]]:
            for sha in small:
                # An inline body is read here (the worker has no catalog); a file, by the worker.
                body = blobs.inline_body(sha) if sha in inlined else None
                yield sha, blobs.file_path(sha), body

        try:
            for sha, actual, size, chunks in workers.encode_small(ex, nproc, items(), lambda s: sizes.get(s, 0)):
                if actual == "large":
                    threaded.append(sha)  # bigger than its record says: streamed below
                    continue
                take(sha, None if actual is None else ([(c, n, b) for c, n, b in chunks], actual, size))
        finally:
            if own:
                pools.close()

    def encode_one(sha: str) -> Encoded | None:
        if sizes.get(sha, 0) <= WHOLE_FILE:
            return _encode_local_small(writer, blobs, sha)
        return encode_blob(writer, blobs, sha)

    # Tiny blobs are encoded right here, one after another. On threads each of them hands the
    # GIL over several times (open, read, hash, compress, seal each release it for microseconds),
    # and on a busy machine every hand-over waits for the other thread to be scheduled: two
    # encoder threads made a 20,000-blob backup of 1-4 KiB blobs ~1.6x slower in wall time than
    # one, for the same CPU. Larger blobs go to threads, where zstd, SHA-256 and AES-GCM run long
    # without the GIL: large and mid-size ones in one stream, so the second core is busy from the
    # first blob (the 16 MiB blobs no longer wait for every 100 KiB one to be done).
    here = [sha for sha in threaded if sizes.get(sha, 0) <= INLINE_ENCODE_MAX]
    pooled = [sha for sha in threaded if sizes.get(sha, 0) > INLINE_ENCODE_MAX]
    left = iter(here)
    # Workers cut, hash, compress and encrypt; this thread appends to packs in a fixed order and,
    # while it waits for them, encodes a few of the tiny blobs itself.
    # Bounded by bytes: ~64 MiB of files in flight (many small ones, or a few big ones).
    for sha, encoded in ordered_batches(encode_one, pooled, workers=ENCODERS,
                                        weight=lambda s: sizes.get(s, 0) + 4096, max_weight=64 * 1024 * 1024):
        take(sha, encoded)
        for tiny in itertools.islice(left, INLINE_PER_RESULT):
            take(tiny, _encode_local_small(writer, blobs, tiny))
    for tiny in left:
        take(tiny, _encode_local_small(writer, blobs, tiny))
    return entries


# Blobs up to this size (as recorded) are encoded on the backup's own thread (`_encode_new_blobs`),
# up to INLINE_PER_RESULT of them each time a blob comes back from the encoder threads.
INLINE_ENCODE_MAX = 16 * 1024
INLINE_PER_RESULT = 2


def _encode_local_small(writer: PackWriter, blobs: BlobStore, sha: str) -> Encoded | None:
    """`encode_blob` with the fewest syscalls: a local file is opened, sized and read whole with `os`
    calls (a buffered `open()` adds an fstat, an ioctl and two lseeks per file); one over
    `WHOLE_FILE` (bigger than its record said) is streamed instead."""
    if blobs.remote:
        return encode_blob(writer, blobs, sha)
    try:
        fd = os.open(blobs.file_path(sha), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        data = blobs.inline_body(sha)
        return None if data is None else _encode_bytes(writer, data)
    try:
        size = os.fstat(fd).st_size
        if size > WHOLE_FILE:
            return _encode_file(writer, None, (os.fdopen(os.dup(fd), "rb"), size))
        parts = []
        got = 0
        while got < size:
            block = os.read(fd, size - got)
            if not block:
                break  # shorter than it said: its hash tells
            parts.append(block)
            got += len(block)
    finally:
        os.close(fd)
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if len(data) > CHUNKER["min_size"]:
        return _encode_bytes(writer, data)
    digest = hashlib.sha256(data).digest()
    return ([writer.encode(data, digest)] if data else []), digest.hex(), len(data)


def _storage_format(fmt: bytes) -> Any:
    import json

    try:
        return json.loads(fmt).get("format_version")
    except ValueError:
        return None


def snapshot_row(m: dict[str, Any]) -> dict[str, Any]:
    return {"id": m["id"], "time": m["started"], "parent": m["parent"], "tag": m.get("tag"),
            "kind": m.get("kind") or "full", "base": m.get("base"),
            "deployment_id": m["deployment_id"], "journal_seq": m["consistency"]["journal_seq"],
            "logical_bytes": m["stats"]["logical_bytes"], "new_bytes": m["stats"]["new_bytes"],
            "problems": len(m.get("problems", [])),
            "secrets_escrowed": bool(m.get("key_ids", {}).get("secrets_escrowed")),
            "escrow_policy": m.get("key_ids", {}).get("escrow_policy", "explicit")}


def inspect_rows(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The coverage checklist for one snapshot: item -> participant -> summary, or not present."""
    rows = []
    for item in m["coverage"]:
        if not item["participants"]:
            rows.append({"item": item["label"], "participant": None, "summary": NOT_PRESENT})
            continue
        for name in item["participants"]:
            rows.append({"item": item["label"], "participant": name,
                         # A journal delta records no summaries: its base's describe the checkpoint.
                         "summary": m["participants"].get(name, {}).get("summary", "journal delta: see its base")})
    return rows


# ------------------------------------------------------------------ verify


def _chunk_users(repo: Repository, snaps: list[dict[str, Any]]) -> dict[str, list[str]]:
    """chunk id -> what it affects ('snapshot S: catalog.db', 'snapshot S: blob X (bucket/key@v)')."""
    users: dict[str, list[str]] = {}
    for m in snaps:
        for cid in treepages.page_ids(m):
            users.setdefault(cid, []).append(f"snapshot {m['id']}: blob tree page")
        for name, entry in m["tree"]["files"].items():
            for c in entry["chunks"]:
                users.setdefault(c, []).append(f"snapshot {m['id']}: {name}")
        for sha, entry in m["tree"]["blobs"].items():
            label = f"snapshot {m['id']}: blob {sha[:16]}… ({', '.join(entry.get('refs', []))})"
            for c in entry["chunks"]:
                users.setdefault(c, []).append(label)
    return users


def _delta_problems(snaps: list[dict[str, Any]], snapshot_ids: set[str], segments: list[Any]) -> list[dict[str, Any]]:
    """A journal delta is restored as its base rolled forward through the archive: without its base
    snapshot, or with a segment of (base seq, delta seq] gone, it cannot be restored at all, although
    every chunk and segment still present reads back. Segment names say which events each holds."""
    by_id = {m["id"]: m for m in snaps}
    out: list[dict[str, Any]] = []
    for m in snaps:
        if m.get("kind") != "delta":
            continue
        what, base_id = f"snapshot {m['id']}", m.get("base")
        if base_id not in by_id:
            why = "cannot be read" if base_id in snapshot_ids else "is missing from the repository"
            out.append({"what": what, "problem": f"journal delta: its base snapshot {base_id} {why}; "
                                                 "this snapshot cannot be restored"})
            continue
        covered = int(by_id[base_id]["consistency"]["journal_seq"])
        to_seq = int(m["consistency"]["journal_seq"])
        for ref in segments:
            if ref.deployment_id == m.get("deployment_id") and ref.first_seq <= covered + 1:
                covered = max(covered, ref.last_seq)
        if covered < to_seq:
            out.append({"what": what, "problem": f"journal delta: the archive of deployment {m.get('deployment_id')} "
                                                 f"has no segment holding event {covered + 1} (it needs every "
                                                 f"event after its base {base_id} up to {to_seq}); this snapshot "
                                                 "cannot be restored"})
    return out


def verify(repo: Repository, *, read_data: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Structure (and with read_data every byte); each problem says what it affects."""
    with repo.lock("shared", "verify"):
        return _verify(repo, read_data=read_data, progress=progress)


def _verify(repo: Repository, *, read_data: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    errors: list[dict[str, Any]] = []
    try:
        pack_target(repo.config)
    except BackupError as e:
        errors.append({"what": "config", "problem": str(e)})
    index = repo.index()
    for p in repo.index_problems:
        errors.append({"what": "index", "problem": p})
    snaps: list[dict[str, Any]] = []
    unreadable_trees: list[dict[str, Any]] = []
    for sid in repo.snapshot_ids():
        try:
            m = repo.load_snapshot(sid, pages=False)
        except BackupError as e:
            errors.append({"what": f"snapshot {sid}", "problem": str(e)})
            continue
        try:
            snaps.append(treepages.expand(repo, m))
        except BackupError as e:
            # A damaged tree page: the snapshot's blobs are unknown, its pages and files still checked.
            errors.append({"what": f"snapshot {sid}", "problem": f"blob tree: {e}"})
            m["tree"]["blobs"] = {}
            unreadable_trees.append(m)
    users = _chunk_users(repo, snaps + unreadable_trees)
    from anvil.backup.archive import archive_summary, list_segments, load_segment

    segments = list_segments(repo)
    for ref in segments:
        try:
            seg = load_segment(repo, ref)
        except BackupError as e:
            errors.append({"what": f"archive segment {ref.name}", "problem": str(e)})
            continue
        for sha, entry in seg.get("blobs", {}).items():
            for c in entry["chunks"]:
                users.setdefault(c, []).append(f"archive seq {ref.first_seq}..{ref.last_seq}: blob {sha[:16]}…")

    errors.extend(_delta_problems(snaps + unreadable_trees, set(repo.snapshot_ids()), segments))

    def affects(cid: str) -> list[str]:
        u = users.get(cid, [])
        return u[:10] + ([f"+{len(u) - 10} more"] if len(u) > 10 else [])

    for cid in users:
        if cid not in index:
            errors.append({"what": f"chunk {cid}", "problem": "referenced by a snapshot but in no index",
                           "affects": affects(cid)})
    # A pack counts only where readers look for it (`pack_name`): one moved to another fan-out
    # folder was counted by its file name, so verify passed while every restore found it missing.
    stored_packs: dict[str, str] = {}
    misplaced: list[str] = []
    for n in repo.backend.list("data"):
        pack_id = n.rsplit("/", 1)[1]
        if n == pack_name(pack_id):
            stored_packs[pack_id] = n
        else:
            misplaced.append(n)
    by_pack: dict[str, list[tuple[str, Any]]] = {}
    for cid, loc in index.items():
        by_pack.setdefault(loc.pack, []).append((cid, loc))
    for pack_id, chunks in sorted(by_pack.items()):
        if pack_id not in stored_packs:
            for cid, _ in chunks:
                if cid in users:
                    errors.append({"what": f"chunk {cid}", "problem": f"pack {pack_id} is missing",
                                   "pack": pack_id, "affects": affects(cid)})
            continue
        size = repo.backend.size(stored_packs[pack_id])
        if size != repo.pack_sizes.get(pack_id, size):
            errors.append({"what": f"pack {pack_id}", "problem": f"size {size}, index says {repo.pack_sizes[pack_id]}"})
    unindexed = sorted(set(stored_packs) - set(by_pack))
    warnings = [f"pack {p} is not referenced by any readable index (left by an interrupted backup? the next "
                f"`backup create` or `forget --prune` removes it once older than {orphan_grace():g}s)"
                for p in unindexed]
    warnings += [f"{n} is not where a pack of that name is read from ({pack_name(n.rsplit('/', 1)[1])})"
                 for n in misplaced]
    # A hole between archive segments: a segment lost, or archiving off while the journal was
    # compacted (legitimate, hence a warning). Either way no point-in-time restore crosses it; a
    # journal delta that needs it is an error above.
    warnings += [f"the archive of deployment {a['deployment_id']} has no events {gap} (a segment lost, or "
                 "archiving was off while the journal was compacted): point-in-time restores cannot cross it"
                 for a in archive_summary(repo, segments) for gap in a["gaps"]]
    checked_chunks = 0
    if read_data:
        present = [p for p in sorted(by_pack) if p in stored_packs]
        total = sum(repo.pack_sizes.get(p, 0) for p in present)
        done = 0

        def check_pack(pack_id: str) -> tuple[int, int, list[dict[str, Any]]]:
            data = repo.backend.read(pack_name(pack_id))
            view = memoryview(data)
            found: list[dict[str, Any]] = []
            if hashlib.sha256(data).hexdigest() != pack_id:
                found.append({"what": f"pack {pack_id}", "problem": "content does not hash to its name"})
            chunks = sorted(by_pack[pack_id], key=lambda c: c[1].offset)
            for cid, loc in chunks:
                try:
                    repo.decode_chunk(cid, view[loc.offset:loc.offset + loc.length])
                except BackupError as e:
                    found.append({"what": f"chunk {cid}", "problem": f"{e}", "pack": pack_id, "offset": loc.offset,
                                  "affects": affects(cid) or ["no snapshot (unused chunk)"]})
            return len(data), len(chunks), found

        # Packs are read and checked on worker threads; hashing, AES-GCM and zstd release the GIL.
        for pack_id, (nbytes, nchunks, found) in ordered_parallel(check_pack, present, window=4):
            errors.extend(found)
            checked_chunks += nchunks
            done += nbytes
            if progress:
                progress(done, total, pack_id[:12])
    return {"ok": not errors, "snapshots": len(snaps) + len(unreadable_trees), "archive_segments": len(segments),
            "packs": len(stored_packs), "chunks": len(index),
            "read_data": read_data, "chunks_read": checked_chunks, "errors": errors, "warnings": warnings}


# ------------------------------------------------------------------ forget / prune


def select_keep(snaps: list[dict[str, Any]], keep_last: int = 0, keep_daily: int = 0,
                keep_weekly: int = 0) -> set[str]:
    """restic-style: newest N; newest per day for N days; newest per ISO week for N weeks."""
    newest_first = sorted(snaps, key=lambda m: m["started"], reverse=True)
    keep = {m["id"] for m in newest_first[:keep_last]}
    for count, bucket_of in ((keep_daily, lambda t: t.strftime("%Y-%m-%d")),
                             (keep_weekly, lambda t: "{}-W{:02d}".format(*t.isocalendar()[:2]))):
        seen: set[str] = set()
        for m in newest_first:
            if len(seen) >= count:
                break
            b = bucket_of(datetime.fromtimestamp(m["started"], UTC))
            if b not in seen:
                seen.add(b)
                keep.add(m["id"])
    return keep


def forget(repo: Repository, *, keep_last: int = 0, keep_daily: int = 0, keep_weekly: int = 0,
           prune: bool = False) -> dict[str, Any]:
    if keep_last + keep_daily + keep_weekly <= 0:
        raise BackupError("refusing to forget every snapshot: give --keep-last, --keep-daily or --keep-weekly")
    with repo.lock("exclusive", "prune" if prune else "forget"):
        return _forget(repo, keep_last, keep_daily, keep_weekly, prune)


def _forget(repo: Repository, keep_last: int, keep_daily: int, keep_weekly: int, prune: bool) -> dict[str, Any]:
    from anvil.backup.archive import list_segments

    snaps = repo.snapshot_rows()
    if prune:
        pack_target(repo.config)  # prune writes packs: a damaged config refuses before anything is forgotten
        repo.index()
        if repo.index_problems:  # checked before anything is forgotten: the command changes nothing
            raise BackupError("refusing to prune: " + "; ".join(repo.index_problems))
    keep = select_keep(snaps, keep_last, keep_daily, keep_weekly)
    # A kept journal delta needs the full snapshot it rolls forward from.
    keep |= {m["base"] for m in snaps if m["id"] in keep and m.get("kind") == "delta" and m.get("base")}
    removed = [m["id"] for m in snaps if m["id"] not in keep]
    for sid in removed:
        repo.backend.delete(f"snapshots/{sid}")
    # Archived journal segments: every retained snapshot must still roll forward to the next one
    # (and the newest to the archive's end), so a deployment keeps every segment after its oldest
    # retained snapshot's checkpoint; older ones go. A deployment with no retained snapshot keeps
    # its whole archive: forget never removes the only way back to its data.
    oldest: dict[str, int] = {}
    for m in snaps:
        if m["id"] in keep:
            seq = int(m["consistency"]["journal_seq"])
            oldest[m["deployment_id"]] = min(oldest.get(m["deployment_id"], seq), seq)
    segments_removed = []
    for ref in list_segments(repo):
        if ref.deployment_id in oldest and ref.last_seq <= oldest[ref.deployment_id]:
            repo.backend.delete(ref.name)
            segments_removed.append(ref.name.rsplit("/", 1)[1])
    result: dict[str, Any] = {"kept": sorted(keep), "removed": removed, "segments_removed": len(segments_removed)}
    if prune:
        try:
            result["prune"] = prune_repo(repo)
        except BackupError as e:
            if removed:
                raise BackupError(f"{e} (forgotten before pruning: {', '.join(removed)})") from None
            raise
    return result


def prune_repo(repo: Repository) -> dict[str, Any]:
    """Drop chunks no snapshot uses: delete empty packs, repack partly used ones, rewrite the index.

    Order keeps the repository readable at every step: new packs, then the new index, then
    removal of the old index files, then removal of old packs.
    """
    repo.index()
    if repo.index_problems:
        raise BackupError("refusing to prune: " + "; ".join(repo.index_problems))
    from anvil.backup.archive import list_segments, load_segment, segment_chunks

    snaps = repo.snapshots()
    used: set[str] = set()
    for m in snaps:
        used.update(treepages.page_ids(m))  # the tree's pages are chunks too, shared between snapshots
        for entry in [*m["tree"]["files"].values(), *m["tree"]["blobs"].values()]:
            used.update(entry["chunks"])
    for ref in list_segments(repo):  # archived journal segments keep their blobs' chunks
        used.update(segment_chunks(load_segment(repo, ref)))
    index = repo.index()
    # A chunk in use that no index names sits in a pack that looks unreferenced (an index file was
    # lost or deleted): pruning would delete that pack as an orphan, destroying data verify can
    # still point at. Refuse, as for an unreadable index file.
    unindexed = sum(1 for c in used if c not in index)
    if unindexed:
        raise BackupError(f"refusing to prune: {unindexed} chunk(s) that snapshots or archive segments use are in "
                          "no index (an index file is missing?), and the packs holding them would be deleted as "
                          "unreferenced; `anvil backup verify` names them")
    orphans = remove_orphan_packs(repo)
    by_pack: dict[str, list[str]] = {}
    for cid, loc in index.items():
        by_pack.setdefault(loc.pack, []).append(cid)
    old_indexes = repo.backend.list("index")
    drop_packs = [p for p, cids in by_pack.items() if not any(c in used for c in cids)]
    repack = [p for p, cids in by_pack.items() if p not in drop_packs and not all(c in used for c in cids)]
    reader = ChunkReader(repo)
    keep_entries = {p: list(cids) for p, cids in by_pack.items() if p not in drop_packs and p not in repack}
    writer = PackWriter(repo)
    writer.known = {}  # force every kept chunk of a repacked pack to be written again
    for p in repack:
        for cid in by_pack[p]:
            if cid in used:
                writer.add(reader.read(cid))
    writer.flush()
    packs = []
    for p, cids in keep_entries.items():
        packs.append({"id": p, "size": repo.pack_sizes[p],
                      "chunks": [[c, index[c].offset, index[c].length, index[c].raw_length] for c in cids]})
    new_index = uuid.uuid4().hex
    repo.assert_locked()
    repo.backend.write(f"index/{new_index}", writer.sealed_index(packs))
    for name in old_indexes:
        repo.backend.delete(name)
    freed = orphans["bytes"]
    for p in [*drop_packs, *repack]:
        freed += repo.pack_sizes.get(p, 0)
        repo.backend.delete(pack_name(p))
    repo._index = None
    return {"packs_deleted": len(drop_packs), "packs_repacked": len(repack), "bytes_freed": freed,
            "new_pack_bytes": writer.new_bytes, "orphans": orphans}


def orphan_grace() -> float:
    return env_seconds(ORPHAN_GRACE_ENV, ORPHAN_GRACE)


def remove_orphan_packs(repo: Repository, grace: float | None = None,
                        unless: Callable[[], str | None] | None = None) -> dict[str, Any]:
    """Delete packs no index mentions that are older than the grace period (call under a lock).

    A create writes its packs first and the index naming them last, so a create that died
    leaves packs nothing refers to. A running create's packs look the same: callers make sure
    no other create holds a live lock, and the grace period covers one that starts meanwhile.
    `unless`, asked once before the first pack would be deleted, may give a reason to delete none.
    """
    grace = orphan_grace() if grace is None else grace
    repo.index()
    if repo.index_problems:
        # An unreadable index may be the one naming these packs.
        return {"skipped": "an index file is unreadable", "packs": 0, "bytes": 0, "kept": 0}
    # Every pack an index file names (read with the index: a walk of every chunk's record to find
    # them took 0.5 s at 100,000 chunks), and the packs this Repository's own writers wrote: never
    # orphans. (A pack whose chunks all moved to later packs counts as indexed: prune removes it.)
    indexed = set(repo.pack_sizes)
    cutoff = time.time() - grace
    removed = kept = freed = 0
    for name in repo.backend.list("data"):
        if name.rsplit("/", 1)[1] in indexed:
            continue
        try:
            if repo.backend.modified(name) > cutoff:
                kept += 1
                continue
            size = repo.backend.size(name)
        except BackupError:
            continue  # gone since listed
        if unless is not None:
            if (why := unless()) is not None:
                return {"skipped": why, "packs": 0, "bytes": 0, "kept": 0}
            unless = None
        repo.backend.delete(name)
        removed += 1
        freed += size
    repo.backend.remove_incomplete(cutoff)
    return {"packs": removed, "bytes": freed, "kept": kept}


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def dir_is_empty(path: Path) -> bool:
    return not path.exists() or not any(os.scandir(path))
