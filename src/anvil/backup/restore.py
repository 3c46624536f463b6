"""Restore a snapshot into a STORAGE_PATH (all of it, or some buckets) and pull single objects."""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from anvil.backup import mode, workers
from anvil.backup.backends.local import LocalBackend
from anvil.backup.engine import ordered_batches
from anvil.backup.errors import BackupError
from anvil.backup.pack import ChunkReader, SpanReader
from anvil.backup.repository import Repository
from anvil.storage import inline, records
from anvil.storage.blobs import BlobStore, open_blob_store
from anvil.storage.layout import FOLDERS, FORMAT_FILE, Layout
from anvil.storage.recovery import BucketScoped, ObjectLocator, Participant, RecoveryContext, RestoreFixup

Progress = Callable[[int, int, str], None]


def _write_entry(reader: ChunkReader, entry: dict[str, Any], dest: Path, expected_sha: str | None = None,
                 *, fsync: bool = True, direct: bool = False) -> None:
    """Assemble a file from its chunks into `dest` via a temporary sibling, checking its hash.

    `direct`: write `dest` itself (no temporary name, no rename): for blobs of a restore into an
    empty target, which is marked incomplete until the end and never trusts a blob it did not
    finish (a bad one is removed here; a re-run rewrites any whose hash does not match)."""
    tmp = dest if direct else dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.restoring")
    h = hashlib.sha256()
    want = expected_sha or entry.get("sha256")
    # A recorded mode (participant files, e.g. escrowed secrets at 0600) applies from creation on.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, entry.get("mode", 0o644))
    try:
        try:
            if entry.get("size", 0) >= 1024 * 1024:
                # Big files get their extent up front (fewer allocation steps); small ones skip the syscall.
                with contextlib.suppress(OSError):
                    os.posix_fallocate(fd, 0, entry["size"])
            # The whole-file SHA-256 below covers every chunk: no per-chunk HMAC recomputation.
            for data in reader.iter_file(entry["chunks"], check_id=not want):
                h.update(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if want and h.hexdigest() != want:
            raise BackupError(f"restored content hashes to {h.hexdigest()}, the snapshot recorded {want}")
        if not direct:
            os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# Threads decoding pack windows when there is no worker pool (ANVIL_BACKUP_WORKERS=0, one core, or
# few small blobs).
# Most of a window's work releases the GIL (unseal, decompress, SHA-256, open, write). Measured
# on bench/backup.py's dataset (2 cores, other work running: load 4-7), 6 restores each, interleaved,
# median wall and CPU seconds: one thread 7.1 s / 4.7, two 5.0 s / 4.9; in a second run two threads
# 5.6 s / 5.8, three 6.6 s / 5.9 (the GIL changes hands more often), the worker pool 5.8 s / 6.1.
WINDOW_THREADS = 2
# A restore's small blobs go to worker processes at any load (a backup's only while a core is
# idle): the windows' Python work holds the GIL, so threads of one process use ~1.2 cores at
# most, and Linux shares a busy machine's CPU between sessions (autogroups), not between
# processes, so a restore's extra processes take nothing from other sessions' share. Measured
# at load 4.8-5.4 (2 cores), 3 restores each, interleaved: workers 4.73 s median (5.4 CPU-s),
# two threads 5.41 s (5.0 CPU-s), restic 6.53 s. See docs/backup.md, "restore12 round".
RESTORE_POOL_BY_LOAD = False
# Up to this many restored files are fdatasynced one by one (a point-in-time restore's few
# blobs from the archive); more, and one syncfs(2) of the target's file system is far cheaper:
# measured here, 20,000 small blobs took ~5 s of fdatasyncs against ~0.04 s for one sync.
SYNC_FILES_ONE_BY_ONE = 256
SYNC_THREADS = 16


def sync_paths(files: list[Path], dirs: set[Path] | list[Path]) -> None:
    """Make restored files and the folders naming them durable, waiting for as little else as possible.

    Many files: `syncfs(2)` on their file system (not `sync(2)`, which would also wait for every
    other file system's dirty pages). A few: `fdatasync` each on threads, then fsync the folders.
    Never a sync per chunk.
    """
    if not files and not dirs:
        return
    if len(files) > SYNC_FILES_ONE_BY_ONE:
        anchor = next(iter(dirs), None) or files[0].parent
        if _syncfs(anchor):
            return
        os.sync()  # no syncfs(2) here: everything, once
        return
    def sync_one(path: Path, *, directory: bool = False) -> None:
        fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
        try:
            if directory:
                os.fsync(fd)
            else:
                os.fdatasync(fd)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="anvil-restore-sync") as ex:
        for fut in [ex.submit(sync_one, f) for f in files]:
            fut.result()
        for fut in [ex.submit(sync_one, d, directory=True) for d in dirs]:
            fut.result()


def _syncfs(folder: Path) -> bool:
    """syncfs(2) of the file system holding `folder` (Linux); False where it is not available."""
    import ctypes

    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), f"syncfs of {folder} failed")
    finally:
        os.close(fd)
    return True


class _Flusher:
    """Writes the restored store's dirty pages back while the restore goes on: `syncfs(2)` of its
    file system every `FLUSH_INTERVAL` on a thread, then drops the page cache of the files that
    sync made clean (`written`).

    Until the end nothing asks for write-back (the kernel starts on its own only past 10 % of
    memory dirty, or after 30 s), so the final sync waited for the whole restore's bytes at once:
    ~0.9 s a GiB on this disk, after all the decoding. Flushed as it goes, the disk writes while
    the cores decode, and the final sync finds little left. Durability is still the final
    sync's: this only starts it early. Off for a remote blob backend (no local blobs).

    Why drop the clean pages: a page the kernel has not used for a while costs ~7x more to write
    into than one just freed (~1.8 s of system time a GiB against ~0.25 here: a virtual machine
    whose freed memory goes back to the host after ~2 s, `virtio_balloon` free page reporting),
    and a restore fills the page cache with its whole size. Dropped as soon as they are on disk,
    the same few hundred MiB of pages are reused for the next files, as a restore never reads
    what it wrote. See docs/backup.md, "restore12 round"."""

    def __init__(self, folder: Path):
        import threading

        self._stop = threading.Event()
        self._folder = folder
        self.written: deque[str] = deque()  # files finished (closed), not yet dropped
        self._dropping = True
        self._thread = threading.Thread(target=self._run, name="anvil-restore-flush", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            finished = len(self.written)  # closed before this sync starts: clean once it returns
            try:
                synced = _syncfs(self._folder)  # False: no syncfs(2) here, the final sync does it all
            except OSError:
                synced = False  # the final sync reports what is wrong
            if not synced:
                self._dropping = False
                self.written.clear()
                return
            for _ in range(finished):
                _drop_cached(self.written.popleft())

    def finished(self, path: str) -> None:
        """A restored file is complete (closed, called from any thread): its pages go after the next sync."""
        if self._dropping:
            self.written.append(path)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _advise(path: str, offset: int, length: int, advice_name: str) -> None:
    """`posix_fadvise(2)` on a file by its path: a hint, so failures (no such call, no such file)
    change nothing."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.posix_fadvise(fd, offset, length, getattr(os, advice_name))
        finally:
            os.close(fd)


def _drop_cached(path: str) -> None:
    """Give a clean file's page cache back to the kernel."""
    _advise(path, 0, 0, "POSIX_FADV_DONTNEED")


FLUSH_INTERVAL = 0.5


# FS_IOC_GETFLAGS / FS_IOC_SETFLAGS (linux/fs.h, 64-bit) and FS_TOPDIR_FL.
_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


def _spread_subfolders(folder: Path) -> None:
    """Mark `folder` a top of a directory hierarchy (chattr +T): ext4 then places its subfolders (the
    blob fan-out) over the file system's block groups as it does top-level folders, instead of all
    in the group of `folder`, and each folder's files go to its own (flex) group.

    Why: ext4 without a journal avoids reusing an inode freed a short while ago (a minute or more),
    and looks for a free one from the start of the group each time, past
    every such inode (`find_inode_bit`, `recently_deleted`). A restore into a folder whose previous
    store was just deleted (a re-run after a failed restore, a drill, the bench) then scanned the
    ~10,000 freed inodes for each of its 10,000 files: `perf` put 42 % of the restore's samples there,
    3-5 s of system time. Spread out, each group holds a few dozen of them. Elsewhere (a journal, another
    file system) placement changes nothing measurable; where the flag is refused, nothing is done. Not
    inherited: only the fan-out folders themselves are spread."""
    import fcntl
    import struct

    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, b"\0" * 4))[0]
        if not flags & _FS_TOPDIR_FL:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", flags | _FS_TOPDIR_FL))
    except OSError:
        pass  # not ext2/3/4 (or not allowed): placement is the file system's
    finally:
        os.close(fd)


def _make_parent(dest: Path, made: set[Path]) -> None:
    """mkdir the blob's fan-out folder once per restore (one syscall when its parent exists)."""
    parent = dest.parent
    if parent in made:
        return
    try:
        os.mkdir(parent)
    except FileNotFoundError:
        os.makedirs(parent, exist_ok=True)
    except FileExistsError:
        pass
    made.add(parent)


def _refuse_target_sharing_the_repository(repo: Repository, target: Path) -> None:
    """A local repository and a restore target must not overlap. With --force a restore into the
    repository (or a folder of it) wrote FORMAT, catalog.db, blobs/ and secrets/ among its objects:
    into `snapshots/` it made every later `backup list` and restore fail on a "snapshot" named
    secrets/...; into `data/`, restored files became "packs" a cleanup may delete. A target holding
    the repository is refused for the same reason (`backup init` refuses a repository inside a
    STORAGE_PATH)."""
    if not isinstance(repo.backend, LocalBackend):
        return
    root, where = repo.backend.root.resolve(), target.resolve()
    if where == root or root in where.parents or where in root.parents:
        raise BackupError(f"the target {target} and the repository {repo.backend.root} overlap: restore into a "
                          "folder outside the repository that does not contain it; nothing was written")


def restore(repo: Repository, manifest: dict[str, Any], target: Path, participants: list[Participant], *,
            buckets: list[str] | None = None, force: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Write FORMAT, catalog.db and the referenced blobs; mark the target to start in recovery mode."""
    started = time.time()
    target = Path(target).absolute()
    _refuse_target_sharing_the_repository(repo, target)
    if manifest.get("kind") == "delta":
        raise BackupError(f"snapshot {manifest['id']} is a journal delta: it is restored as its base snapshot "
                          f"{manifest.get('base')} rolled forward (pitr.restore_any); nothing was written")
    was_empty = not target.exists() or not any(target.iterdir())
    if not was_empty and not force:
        entries = sorted(p.name for p in target.iterdir())
        raise BackupError(f"target {target} is not empty ({len(entries)} entries: {', '.join(entries[:5])}); "
                          "nothing was written; use --force to restore into it anyway")
    existed = target.exists()
    target.mkdir(parents=True, exist_ok=True)
    layout = Layout(target)
    layout.acquire_lock()  # a running server on the target makes this fail clearly
    try:
        with repo.lock("shared"):
            return _restore_locked(repo, manifest, layout, participants, buckets, progress, started,
                                   fresh=was_empty)
    except BaseException:
        layout.release_lock()
        if was_empty:
            empty_folder(target)  # nothing was there before: leave nothing half-restored behind
            if not existed:  # nor the folder itself (a refused restore said "nothing was written")
                with contextlib.suppress(OSError):
                    target.rmdir()
        raise
    finally:
        layout.release_lock()


def _restore_locked(repo: Repository, manifest: dict[str, Any], layout: Layout, participants: list[Participant],
                    buckets: list[str] | None, progress: Progress | None, started: float, *,
                    fresh: bool = False) -> dict[str, Any]:
    root = layout.root
    for folder in FOLDERS:
        (root / folder).mkdir(parents=True, exist_ok=True)
    if fresh:
        # Before the first fan-out folder is made (below, as the blobs are written).
        _spread_subfolders(layout.blobs)
    for stale in ("catalog.db", "catalog.db-wal", "catalog.db-shm", mode.MARKER_FILE):
        (root / stale).unlink(missing_ok=True)
    shutil.rmtree(root / mode.REPORT_DIR, ignore_errors=True)
    # Marked first: a restore that dies partway leaves a store that starts in recovery mode and
    # fails validation (so it is never resumed by accident); the final marker replaces this one.
    mode.write_marker(root, {"snapshot": manifest["id"], "incomplete": True,
                                 "problems": ["the restore did not finish: run `anvil restore` again"]})
    reader = ChunkReader(repo)
    files = manifest["tree"]["files"]
    file_dirs: set[Path] = set()  # folders naming restored participant files: synced at the end
    # Worker processes whatever the load (`RESTORE_POOL_BY_LOAD`).
    pools = workers.Pools(repo.enc_key, repo.id_key, by_load=RESTORE_POOL_BY_LOAD)
    flusher: _Flusher | None = None
    # The manifest's tree and the chunk index (~10^5 objects for 10^4 blobs) live until the end:
    # kept out of the cyclic GC's full collections, which traversed them again and again as the
    # blob phase allocated (~2.5 % of the restore's samples, in its own process).
    gc.freeze()
    try:
        if not open_blob_store(layout.blobs, layout.tmp).remote:
            flusher = _Flusher(root)
            # The worker processes start (~0.4 s of spawning) while catalog.db is written and the
            # references are read, when the snapshot has enough small blobs to want them.
            _prestart(pools, manifest["tree"]["blobs"])
        return _restore_files(repo, manifest, layout, participants, buckets, progress, started, reader, files,
                              file_dirs, pools, flusher, fresh=fresh)
    finally:
        gc.unfreeze()
        if flusher is not None:
            flusher.stop()
        pools.close()


def _prestart(pools: workers.Pools, tree_blobs: Any) -> None:
    small = sum(1 for e in tree_blobs.values() if 0 < e.get("size", 0) <= workers.SMALL_MAX)
    if small >= max(1, workers.process_min()) and workers.worker_count(by_load=RESTORE_POOL_BY_LOAD):
        pools.start_soon(small)


def _restore_files(repo: Repository, manifest: dict[str, Any], layout: Layout, participants: list[Participant],
                   buckets: list[str] | None, progress: Progress | None, started: float, reader: ChunkReader,
                   files: dict[str, Any], file_dirs: set[Path], pools: workers.Pools, flusher: _Flusher | None, *,
                   fresh: bool = False) -> dict[str, Any]:
    root = layout.root
    _write_entry(reader, files[FORMAT_FILE], root / FORMAT_FILE)
    try:
        _write_entry(reader, files["catalog.db"], root / "catalog.db")
    except BackupError as e:
        raise BackupError(f"catalog.db cannot be restored: {e}; every object's records live in it, "
                          "so this snapshot cannot be restored") from None
    for rel, entry in files.items():
        if rel not in (FORMAT_FILE, "catalog.db"):  # participants' own files (derived generations, ...)
            dest = (root / rel).resolve()
            if root.resolve() not in dest.parents:
                raise BackupError(f"snapshot file {rel!r} would be written outside the target")
            dest.parent.mkdir(parents=True, exist_ok=True)
            _write_entry(reader, entry, dest)
            file_dirs.update(d for d in dest.parents if d == root.resolve() or root.resolve() in d.parents)
            if "mode" in entry:
                os.chmod(dest, entry["mode"])  # os.open's mode is subject to the umask
    for p in participants:
        if isinstance(p, RestoreFixup):
            p.after_restore(root)
    recorded = {name: p["summary"] for name, p in manifest["participants"].items()}
    partial: dict[str, Any] | None = None
    if buckets:
        partial = _restrict(root, manifest, participants, set(buckets))
        # Counts and digests of a subset differ from the whole by design; some (the chain) do not.
        keep = {p.name for p in participants if not p.describe().summary_depends_on_buckets}
        recorded = {k: v for k, v in recorded.items() if k in keep}
    conn = records.open_readonly(root / "catalog.db")
    try:
        ctx = RecoveryContext(root, conn, open_blob_store(layout.blobs, layout.tmp), participants)
        refs = ctx.references()
        # Small bodies stored inline came back with catalog.db: they need no file.
        inlined = inline.among(conn, refs)  # a batch at a time: never a dict of the whole store's
    finally:
        records.close(conn)
    tree_blobs = manifest["tree"]["blobs"]
    total = sum(tree_blobs[s]["size"] for s in refs if s in tree_blobs)
    done = 0
    restored = skipped = 0
    problems: list[str] = []
    store = open_blob_store(layout.blobs, layout.tmp)  # local files, or ANVIL_BLOBS_URL's backend (S3)
    made: set[Path] = set()  # fan-out folders made here (`_make_parent`)
    worker_dirs: set[str] = set()  # those the pack windows are written into (made as they are)
    written: list[Path] = []

    def restore_blob(sha: str, via: ChunkReader) -> tuple[str, str | None]:
        """'missing', 'present', 'restored' or 'failed' + why (`via`: the reader of its packs)."""
        if sha in inlined:
            return "restored", None  # it came back inside catalog.db, as it was stored
        entry = tree_blobs.get(sha)
        if entry is None:
            return "missing", None
        if store.remote:
            return _restore_remote(via, store, sha, entry, layout.tmp)
        dest = store.path(sha)
        # An empty target has no blobs to keep: skip the per-blob look.
        if not fresh and dest.exists() and _hash_file(dest) == sha:
            return "present", None
        _make_parent(dest, made)
        try:
            # No fsync per blob: one batch below makes everything durable before the marker.
            _write_entry(via, entry, dest, expected_sha=sha, fsync=False, direct=fresh)
            return "restored", None
        except BackupError as e:
            return "failed", str(e)

    lock = threading.Lock()  # record() runs on the restore's thread and on the other blobs' threads

    def record(sha: str, outcome: str, why: str | None) -> None:
        nonlocal done, restored, skipped
        with lock:
            if outcome == "missing":
                problems.append(f"blob {sha} is not in the snapshot; affects {_affects(refs[sha])}")
                return
            if outcome == "failed":
                problems.append(f"blob {sha}: {why}; affects {_affects(refs[sha])}")
            restored += outcome == "restored"
            skipped += outcome == "present"
            if outcome == "restored" and sha not in inlined and not store.remote:
                written.append(sha)  # a path only if it is synced one by one (few blobs)
                if flusher is not None:
                    flusher.finished(store.file_path(sha))
            done += tree_blobs.get(sha, {}).get("size", 0)
            if progress:
                progress(done, total, sha[:12])

    # Small blobs whose chunks sit in one pack are decoded and written a pack window at a time
    # (`workers.restore_window`): by the worker processes when the pool runs, else on
    # WINDOW_THREADS threads of this process. A window is read once, into a buffer of its own
    # size, not through the reader's cache of whole packs. Windows write local files: a remote
    # blob backend takes every blob through `restore_blob`.
    by_pack = {} if store.remote else _small_by_pack(reader, tree_blobs, [s for s in refs if s not in inlined])
    n_small = sum(len(v) for v in by_pack.values())
    windowed = {sha for items in by_pack.values() for sha, _ in items}
    rest = [sha for sha in refs if sha not in windowed]
    # Every other blob (larger than a window takes, spread over packs, inline in catalog.db, or all
    # of them with a remote blob backend) is restored on threads of its own from the start, beside
    # the windows: the large ones' work is native (AES-GCM, zstd, SHA-256, write(2), all without the
    # GIL), so neither part leaves a core idle while the other finishes. Small ones among them were
    # restored on this thread after the windows, each reading the whole packs it spans: on
    # bench/backup.py's dataset ~0.3 s at the end with nothing else running. One reader, of the
    # chunks' spans only: the windows read the small blobs that share the large ones' packs.
    rest_reader = SpanReader(repo) if rest else None
    stop = threading.Event()

    def restore_rest() -> None:
        def one(sha: str) -> tuple[str, str | None]:
            return ("failed", "the restore stopped") if stop.is_set() else restore_blob(sha, rest_reader)

        # ~64 MiB of blobs in flight at most; small ones a batch per task.
        for sha, (outcome, why) in ordered_batches(one, rest, weight=lambda s: _size_of(tree_blobs, s),
                                                   max_weight=64 * 1024 * 1024):
            record(sha, outcome, why)

    with (ThreadPoolExecutor(1, thread_name_prefix="anvil-restore-rest") as rest_ex,
          ThreadPoolExecutor(WINDOW_THREADS, thread_name_prefix="anvil-restore-window") as window_ex):
        rest_done = rest_ex.submit(restore_rest)
        try:
            # (After the other blobs' start: this may wait for the pool's processes to be spawned.)
            running = pools.get(n_small) if n_small else None
            tasks = _restore_tasks(repo, store, by_pack, worker_dirs, fresh, record)
            if running:
                ex, nproc = running
                outcomes = workers.run_ordered(ex, workers.restore_batch, tasks, nproc * workers.INFLIGHT_PER_WORKER)
            else:
                outcomes = workers.run_ordered(window_ex, functools.partial(workers.restore_window, repo.enc_key),
                                               tasks, WINDOW_THREADS * workers.INFLIGHT_PER_WORKER)
            for sha, outcome, why in outcomes:
                record(sha, outcome, why)
        except BaseException:
            stop.set()  # nothing may still write into a target the caller is about to empty
            window_ex.shutdown(cancel_futures=True)
            raise
        rest_done.result()
    pools.close()  # the workers exit while the last bytes go to disk
    if flusher is not None:
        flusher.stop()
    # The blobs (and the fan-out folders naming them) are durable before the marker says done.
    # `worker_dirs` names the folders the windows were to write into; a window whose every blob
    # failed (a corrupted chunk) never made its folder, and fsyncing it failed the whole restore
    # with a bare "No such file or directory" instead of the report naming the damaged chunks.
    sync_paths(written if len(written) > SYNC_FILES_ONE_BY_ONE else [store.path(sha) for sha in written],
               {*made, *(Path(d) for d in worker_dirs if os.path.isdir(d)), *file_dirs, layout.blobs, root})
    marker = {
        "snapshot": manifest["id"], "repository": repo.backend.url, "restored_at": time.time(),
        "journal_seq": manifest["consistency"]["journal_seq"], "journal_hash": manifest["consistency"]["journal_hash"],
        "buckets": sorted(buckets) if buckets else None, "partial": partial, "recorded": recorded,
        "problems": problems,
    }
    mode.write_marker(root, marker)
    return {"ok": not problems, "snapshot": manifest["id"], "target": str(root), "blobs_restored": restored,
            "blobs_already_present": skipped, "bytes": total, "problems": problems, "partial": partial,
            "duration": round(time.time() - started, 3), "recovery_mode": True}


def _restore_remote(reader: ChunkReader, store: BlobStore, sha: str, entry: dict[str, Any],
                    tmp: Path) -> tuple[str, str | None]:
    """A blob restored into a remote backend: a body already there is kept if it hashes to its name
    (the backend never overwrites one), replaced if not; else assembled in tmp/, checked, uploaded."""
    if store.stat(sha) is not None:
        if store.full_sha256(sha) == sha:
            return "present", None
        store.remove(sha)  # bad bytes under a good name: the upload below would be deduplicated onto them
    spool = tmp / f"restore-{uuid.uuid4().hex}"
    try:
        _write_entry(reader, entry, spool, expected_sha=sha, fsync=False, direct=True)
        store.store_file(sha, spool, entry["size"])
        return "restored", None
    except BackupError as e:
        return "failed", str(e)
    finally:
        spool.unlink(missing_ok=True)


def _small_by_pack(reader: ChunkReader, tree_blobs: dict[str, Any],
                   shas: list[str]) -> dict[str, list[tuple[str, list[Any]]]]:
    """pack id -> [(sha, its chunks' locations)] for small blobs whose chunks all sit in one pack."""
    out: dict[str, list[tuple[str, list[Any]]]] = {}
    for sha in shas:
        entry = tree_blobs.get(sha)
        if entry is None or entry.get("size", 0) > workers.SMALL_MAX or not entry.get("chunks"):
            continue
        locs = [(c, reader.index.get(c)) for c in entry["chunks"]]
        if any(loc is None for _, loc in locs) or len({loc.pack for _, loc in locs}) != 1:
            continue  # `restore_blob` reports (or reads across packs)
        out.setdefault(locs[0][1].pack, []).append((sha, locs))
    return out


def _restore_tasks(repo: Repository, store: BlobStore, by_pack: dict[str, list[tuple[str, list[Any]]]],
                   dirs: set[str], fresh: bool,
                   record: Callable[[str, str, str | None], None]) -> Any:
    """(pack window, items, fresh) tasks for `workers.restore_window`, a pack read at a time; `dirs`
    gets the folders they write into (made as the windows are written)."""
    from anvil.backup.pack import pack_name

    local = repo.backend.local_path if isinstance(repo.backend, LocalBackend) else None
    packs = sorted(by_pack)
    if local is not None:
        for ahead in packs[:READ_AHEAD_PACKS]:
            _read_ahead(str(local(pack_name(ahead))), by_pack[ahead])
    for n, pack_id in enumerate(packs):
        items = sorted(by_pack[pack_id], key=lambda it: it[1][0][1].offset)
        if local is not None and n + READ_AHEAD_PACKS < len(packs):
            # Later packs' windows come off the disk while this one's are decoded.
            ahead = packs[n + READ_AHEAD_PACKS]
            _read_ahead(str(local(pack_name(ahead))), by_pack[ahead])
        try:
            if local is not None:
                # A local pack is read by the workers, each its own window: the parent neither
                # reads the pack nor copies windows through the pipe.
                path = str(local(pack_name(pack_id)))
                if not os.path.isfile(path):
                    raise BackupError(pack_id)
                view = None
            else:
                view = memoryview(repo.backend.read(pack_name(pack_id)))
        except BackupError:
            for sha, locs in items:
                record(sha, "failed", f"chunk {locs[0][0]}: pack {pack_id} is missing from the repository")
            continue
        i = 0
        while i < len(items):
            batch = items[i:i + workers.BATCH_ITEMS]
            start = batch[0][1][0][1].offset
            # Cut the window where it passes BATCH_BYTES (always at least one blob).
            n = next((k for k, (_, locs) in enumerate(batch, 1)
                      if max(loc.offset + loc.length for _, loc in locs) - start >= workers.BATCH_BYTES), len(batch))
            batch = batch[:n]
            i += n
            lo = min(loc.offset for _, locs in batch for _, loc in locs)
            hi = max(loc.offset + loc.length for _, locs in batch for _, loc in locs)
            task_items = []
            for sha, locs in batch:
                dest = store.file_path(sha)  # a string: a Path per blob cost more than the rest of this loop
                dirs.add(os.path.dirname(dest))
                task_items.append((sha, dest, 0o644, [(c, loc.offset - lo, loc.length) for c, loc in locs]))
            yield (bytes(view[lo:hi]) if view is not None else (path, lo, hi - lo)), task_items, fresh


# Packs whose windows are read ahead of the one being cut into windows (~16 MiB each): on a disk
# other work keeps busy, more reads in flight get more of it (workers waited in pread(2) for ~1/3
# of the samples with one pack ahead, at an I/O pressure of 25-40 %).
READ_AHEAD_PACKS = 3


def _read_ahead(path: str, items: list[tuple[str, list[Any]]]) -> None:
    """Ask the kernel to read the part of a pack these blobs sit in (POSIX_FADV_WILLNEED: the read
    starts, nothing waits for it). A window's worker reads it with one pread, which without this
    waited for the disk: the repository was written dropping behind, so its packs are not cached,
    and at ~400 MB/s a 4 MiB window is ~10 ms of a worker doing nothing. A hint: failures change
    nothing (a missing pack is reported per blob by its windows)."""
    lo = min(loc.offset for _, locs in items for _, loc in locs)
    hi = max(loc.offset + loc.length for _, locs in items for _, loc in locs)
    _advise(path, lo, hi - lo, "POSIX_FADV_WILLNEED")


def empty_folder(target: Path) -> None:
    """Remove everything inside `target` (a restore that failed into a folder that was empty)."""
    for child in target.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _restrict(root: Path, manifest: dict[str, Any], participants: list[Participant], keep: set[str]) -> dict[str, Any]:
    """Drop other buckets' records through the one mutation path, so the journal records the cut."""
    from anvil.storage.catalog import Catalog

    catalog = Catalog(root / "catalog.db")
    try:
        def fn(txn: Any) -> dict[str, Any]:
            outcome = {p.name: p.restrict_to_buckets(txn.conn, keep) for p in participants
                       if isinstance(p, BucketScoped)}
            kept = {b for o in outcome.values() for b in o.get("kept", [])}
            missing = sorted(keep - kept)
            if missing:
                raise BackupError(f"bucket(s) {', '.join(missing)} are not in snapshot {manifest['id']}")
            txn.emit("system", "recovery.partial_restore", "recovery", {
                "snapshot": manifest["id"], "snapshot_journal_seq": manifest["consistency"]["journal_seq"],
                "kept": sorted(kept), "dropped": sorted({b for o in outcome.values() for b in o.get("dropped", [])}),
            })
            return outcome

        return catalog.mutate(fn, actor="system/restore", request_id=uuid.uuid4().hex)
    finally:
        catalog.close()


def _affects(uses: list[Any]) -> str:
    """The objects a blob's problem affects (built only for a problem: labels cost per blob)."""
    labels = [r.label for r in uses]
    return ", ".join(labels[:3]) + (f" (+{len(labels) - 3} more)" if len(labels) > 3 else "")


def _size_of(tree_blobs: dict[str, Any], sha: str) -> int:
    return int(tree_blobs.get(sha, {}).get("size", 0)) + 4096


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1024 * 1024):
            h.update(block)
    return h.hexdigest()


def get_object(repo: Repository, manifest: dict[str, Any], participants: list[Participant], bucket: str, key: str,
               version_id: str | None = None) -> tuple[dict[str, Any], bytes]:
    """One object version's bytes out of a snapshot, without restoring anything else.

    A journal delta has no catalog of its own: its base's catalog is rolled forward to the delta's
    seq in a temporary folder (`pitr.delta_catalog`), and bodies come from the archive or the base."""
    reader = ChunkReader(repo)
    with tempfile.TemporaryDirectory(prefix="anvil-get-") as tmp:
        path = Path(tmp) / "catalog.db"
        if manifest.get("kind") == "delta":
            from anvil.backup.pitr import delta_catalog

            blob_entries = delta_catalog(repo, manifest, participants, path, reader)
        else:
            _write_entry(reader, manifest["tree"]["files"]["catalog.db"], path)
            blob_entries = manifest["tree"]["blobs"]
        version = locate_object(path, participants, bucket, key, version_id)
    what = f"{bucket}/{key}" + (f" version {version_id}" if version_id else "")
    if version is None:
        raise BackupError(f"{what} is not in snapshot {manifest['id']}")
    if version["delete_marker"]:
        raise BackupError(f"{what} is a delete marker in snapshot {manifest['id']}")
    body = bytearray()
    for sha, size in version["chunks"]:
        entry = blob_entries.get(sha)
        if entry is None or entry.get("missing"):
            raise BackupError(f"{what}: body chunk {sha} is not in the snapshot")
        # Each blob against its own address: a multipart object has no whole-object SHA-256.
        h = hashlib.sha256()
        n = 0
        for data in reader.iter_file(entry["chunks"]):
            h.update(data)
            n += len(data)
            body += data
        if h.hexdigest() != sha or n != size:
            raise BackupError(f"{what}: restored body chunk {sha} does not match its SHA-256 and size "
                              f"({n} bytes, {size} recorded)")
    if version["sha256"] and hashlib.sha256(body).hexdigest() != version["sha256"]:
        raise BackupError(f"{what}: restored bytes do not match the recorded sha256")
    return {k: version[k] for k in ("version_id", "size", "sha256", "etag", "content_type")}, bytes(body)


def locate_object(catalog_path: Path, participants: list[Participant], bucket: str, key: str,
                  version_id: str | None) -> dict[str, Any] | None:
    locators = [p for p in participants if isinstance(p, ObjectLocator)]
    if not locators:
        raise BackupError("no participant can locate objects in a snapshot")
    conn = records.open_readonly(catalog_path)
    try:
        return next((v for p in locators if (v := p.locate_object(conn, bucket, key, version_id))), None)
    finally:
        records.close(conn)


def describe_marker(root: Path) -> str:
    m = mode.read_marker(root)
    return json.dumps(m, indent=2) if m else "not in recovery mode"
