"""A server's snapshot, after its checkpoint, in a child process: its memory goes back whole at exit.

The work after the checkpoint (summaries, the references store, encoding blobs into packs, the
tree pages, the manifest and index) allocates hundreds of thousands of small objects. In the
server's own process that memory stayed: freed, but pymalloc's arenas are returned only when
wholly empty, and a few surviving objects pin them (docs/backup.md, "Back to idle"). So the
server keeps what must happen inside it (the consistent checkpoint, the holds that keep gc from
deleting the blobs it needs, the repository lock and its heartbeat, progress and the reply) and
runs `engine.snapshot_from_checkpoint`, the one code path for that work, here:

    python -m anvil.backup.snapshot_process MODULE:FUNCTION    (spawned, never forked: the
                                    server's threads hold SQLite connections and locks)

The server starts it before taking the checkpoint: meanwhile it imports the engine and builds
its participants with MODULE:FUNCTION (the runtime's `participants_factory`). Then the server
writes one JSON line on stdin (the job, the repository's keys, the lock it holds) and keeps stdin
open; the child answers with JSON lines on stdout: `{"progress": [done, total]}` a few times a
second, then `{"manifest": ...}` (without its tree) or `{"error": ...}`. The child reads the
checkpoint's copy of catalog.db (inline bodies too) and the blob files, never the live store: it
opens no catalog for writing and takes no storage lock; the server keeps the holds and the
repository lock's heartbeat meanwhile. The child exits when its stdin closes (the server is gone).
A child that dies fails the backup (`BackupError`): the snapshot is saved last, so none is left
half written; its packs are orphans the next backup or prune removes.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from anvil.backup import engine
from anvil.backup.backends import open_backend
from anvil.backup.errors import BackupError
from anvil.backup.repository import Repository
from anvil.storage.blobs import BlobStore

# Progress lines at most this often (a tick per blob would be a line per blob).
PROGRESS_EVERY = 0.2
STDERR_TAIL = 2000
# "auto" (the default): in a child process when the store's catalog (with its WAL) holds at least
# FROM_ENV bytes. What a snapshot leaves allocated in the server grows with the store's rows (+26-29
# MiB at 20,000 objects), while the child costs a fixed ~0.25-0.3 s (a Python start, the engine's and
# participants' imports, the repository's index read again): for a small store that was half of an
# incremental backup's time (bench/backup.py, 10,000 objects: 0.56-0.76 s in process, 0.71-0.96 s in
# the child) for a few MiB of memory. "on": always a child; "off": always in the server's process.
ENV = "ANVIL_BACKUP_PROCESS"
FROM_ENV = "ANVIL_BACKUP_PROCESS_FROM"
DEFAULT_FROM = 32 * 1024 * 1024


def wanted(catalog_path: Path) -> bool:
    """Whether a server's snapshot of the catalog at `catalog_path` runs in a child process (`ENV`)."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in ("on", "off", "auto"):
        raise BackupError(f"{ENV} must be on, off or auto, got {value!r}")
    if value != "auto":
        return value == "on"
    try:
        threshold = int(os.environ.get(FROM_ENV, DEFAULT_FROM))
    except ValueError:
        raise BackupError(f"{FROM_ENV} must be a number of bytes, got {os.environ[FROM_ENV]!r}") from None
    size = 0
    for path in (catalog_path, catalog_path.with_name(catalog_path.name + "-wal")):
        with contextlib.suppress(FileNotFoundError):
            size += path.stat().st_size
    return size >= threshold


class SnapshotProcess:
    """The child, started before the checkpoint is taken: it imports the engine and builds the
    participants (~0.2 s) while the server copies the catalog. `run` hands it the job; `close`
    ends it if it never got one (the checkpoint failed)."""

    def __init__(self, participants_factory: str, tmp_dir: Path):
        self._stderr = tempfile.TemporaryFile(dir=tmp_dir)  # quoted if it dies; gone when closed
        self._tail = ""
        self.proc = subprocess.Popen([sys.executable, "-m", "anvil.backup.snapshot_process", participants_factory],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)

    def run(self, job: engine.SnapshotJob, repo: Repository, blobs: BlobStore,
            progress: engine.Progress | None) -> dict[str, Any]:
        """`engine.snapshot_from_checkpoint(job, ...)` in the child; its manifest (without
        `tree`), or BackupError with the child's message, or saying how it died."""
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None
        request = {"job": asdict(job),
                   "repository": {"url": repo.backend.url, "s3_endpoint": repo.backend.s3_endpoint,
                                  "config": repo.config, "key_id": repo.key_id,
                                  "master": (repo.enc_key + repo.id_key).hex(),
                                  "held": repo.held_locks, "live_locks": repo.live_locks},
                   "blobs": {"root": str(blobs.root), "tmp": str(blobs.tmp)}}
        answer: dict[str, Any] | None = None
        try:
            # The keys go through the pipe, never the command line or the environment.
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.flush()
            for line in proc.stdout:
                try:
                    message = json.loads(line)
                except ValueError:
                    break  # a line cut short: it died while writing it (told below)
                if "progress" in message:
                    if progress:
                        done, total = message["progress"]
                        progress(done, total, "")
                else:
                    answer = message
            proc.wait()
        except BrokenPipeError:
            proc.wait()  # it died before reading its job: told below
        finally:
            self.close()
        if answer is not None and "manifest" in answer and proc.returncode == 0:
            return answer["manifest"]
        if answer is not None and "error" in answer:
            raise BackupError(answer["error"])
        how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with {proc.returncode}"
        raise BackupError(f"the backup's process (pid {proc.pid}) {how} before it reported a snapshot (a "
                          "snapshot is recorded as its last step; the packs of an unfinished one are removed by "
                          "a later backup or prune)" + (f": {self._tail}" if self._tail else ""))

    def close(self) -> None:
        """End the child if it still runs (this thread failed, or it never got its job); idempotent."""
        proc = self.proc
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()
        if not self._stderr.closed:
            self._stderr.seek(0)
            self._tail = self._stderr.read()[-STDERR_TAIL:].decode(errors="replace").strip()
            self._stderr.close()


def _participants(spec: str) -> list[Any]:
    module, _, name = spec.partition(":")
    return list(getattr(importlib.import_module(module), name)())


def _exit_with_parent(stdin: IO[bytes]) -> None:
    """Its parent keeps stdin open while it waits: end of input means the server is gone."""
    while stdin.read(65536):
        pass
    os._exit(3)


def _child(participants_factory: str, stdin: IO[bytes], stdout: IO[bytes]) -> int:
    participants = _participants(participants_factory)  # meanwhile, its parent takes the checkpoint
    line = stdin.readline()
    if not line:
        return 2  # no job: the checkpoint failed
    request = json.loads(line)
    threading.Thread(target=_exit_with_parent, args=(stdin,), name="anvil-snapshot-parent", daemon=True).start()
    write_lock = threading.Lock()

    def send(message: dict[str, Any]) -> None:
        with write_lock:
            stdout.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
            stdout.flush()

    last = 0.0

    def progress(done: int, total: int, _what: str) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY or done >= total:
            last = now
            send({"progress": [done, total]})

    try:
        job = engine.SnapshotJob(**request["job"])
        spec = request["repository"]
        backend = open_backend(spec["url"], s3_endpoint=spec["s3_endpoint"], storage_path=job.storage_root)
        repo = Repository(backend, spec["config"], bytes.fromhex(spec["master"]), spec["key_id"])
        repo.write_under(spec["held"], spec["live_locks"])
        blobs = BlobStore(Path(request["blobs"]["root"]), Path(request["blobs"]["tmp"]))
        blobs.inline_catalog = Path(job.checkpoint)  # inline bodies as of the checkpoint, not the live catalog
        manifest = engine.snapshot_from_checkpoint(job, repo, blobs, participants, progress)
    except BackupError as e:
        send({"error": str(e)})
        return 1
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it as a BackupError
        import traceback

        traceback.print_exc()  # to the log the parent quotes
        send({"error": f"{type(e).__name__}: {e}"})
        return 1
    # Without its tree (the files' chunk lists: ~0.5 MB of JSON for a 350 MB catalog): the server
    # never reads it, and decoding it there left pymalloc arenas pinned (docs/backup.md, "Back to idle").
    send({"manifest": {k: v for k, v in manifest.items() if k != "tree"}})
    return 0


def main() -> None:
    # The answers go on a private copy of stdout; fd 1 becomes the log (stderr). Processes this
    # one spawns (its encoding workers) inherit fds 0-2: holding the pipe's write end, they would
    # keep the server from seeing its end when this process dies.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    code = _child(sys.argv[1], sys.stdin.buffer, answers)
    answers.flush()
    os._exit(code)  # not waiting for the parent-watching thread's read


if __name__ == "__main__":
    main()
