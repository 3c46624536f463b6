"""Continuous archiving of the journal into a backup repository (point-in-time recovery).

`anvil serve --archive-repo URL [--archive-interval 1s]` runs an `Archiver`: every interval
it reads the journal events after its cursor, stores the blobs they reference (object bodies,
multipart parts) as chunks in packs like a snapshot does, then writes one encrypted
**segment** naming the events and those blobs (docs/backup-format.md, "Archive segments").
The segment is written last, so a segment never names data that is not stored.

Cost follows the change, not the store: the delta is read from the journal, and a blob already
in the archive or in the newest snapshot is recognised by its SHA-256 and not read again.

Nothing blocks writes: the archiver reads through its own reader connection, and if the
repository is unreachable it records the error, backs off and catches up later; the lag (events
and seconds) is visible in `/anvil/health/ready` and `anvil backup status`. While events are
unshipped, journal compaction keeps them and gc keeps the blobs they reference: the archiver keeps
its cursor as the `archive` hold in the record store (`storage.holds`), which every node's
compaction and gc read, whichever node archives.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from anvil.backup.engine import _add_encoded, encode_blob, ordered_parallel
from anvil.backup.errors import BackupError
from anvil.backup.repository import Repository
from anvil.storage import Storage, holds, journal
from anvil.storage.recovery import Participant, blobs_of_events

log = logging.getLogger("anvil.backup.archive")

ARCHIVE_DIR = "archive"
SEGMENT_VERSION = 1
MAX_EVENTS = 5000  # per segment: bounds a segment's size and one shipment's memory
_NAME = re.compile(r"^archive/([^/]+)/(\d{16})-(\d{16})-(\d{15})-(\d{15})$")

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class SegmentRef:
    """What a segment's name says (no decryption needed to pick the ones a restore reads)."""

    name: str
    deployment_id: str
    first_seq: int
    last_seq: int
    first_ts: float
    last_ts: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "first_seq": self.first_seq, "last_seq": self.last_seq,
                "first_ts": self.first_ts, "last_ts": self.last_ts}


def segment_name(deployment_id: str, first: int, last: int, first_ts: float, last_ts: float) -> str:
    return (f"{ARCHIVE_DIR}/{deployment_id}/{first:016d}-{last:016d}-{int(first_ts * 1000):015d}-"
            f"{int(last_ts * 1000):015d}")


def list_segments(repo: Repository, deployment_id: str | None = None) -> list[SegmentRef]:
    """Every segment (of one deployment), in seq order; names that do not parse are ignored."""
    folder = f"{ARCHIVE_DIR}/{deployment_id}" if deployment_id else ARCHIVE_DIR
    out = []
    for name in repo.backend.list(folder):
        m = _NAME.match(name)
        if m:
            out.append(SegmentRef(name, m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)) / 1000,
                                  int(m.group(5)) / 1000))
    return sorted(out, key=lambda s: (s.deployment_id, s.first_seq, s.last_seq))


def load_segment(repo: Repository, ref: SegmentRef | str) -> dict[str, Any]:
    name = ref if isinstance(ref, str) else ref.name
    try:
        return repo.unseal_json(repo.backend.read(name), f"segment:{name}".encode())
    except BackupError:
        raise
    except Exception:  # noqa: BLE001 - InvalidTag, zstd or JSON errors all mean the same thing here
        raise BackupError(f"archive segment {name} cannot be decrypted (corrupted)") from None


def segment_chunks(seg: dict[str, Any]) -> Iterable[str]:
    for entry in seg.get("blobs", {}).values():
        yield from entry["chunks"]


def ensure_format(repo: Repository) -> None:
    """Archive segments need repository format 2: an older Anvil must refuse (it would prune
    chunks only segments use). Upgrading rewrites `config` once; version 1 data stays as is."""
    if int(repo.config.get("format_version", 1)) >= 2:
        return
    import json

    repo.config["format_version"] = 2
    repo.backend.write("config", (json.dumps(repo.config, indent=2) + "\n").encode())


@dataclass
class ArchiveConfig:
    repo: str
    interval: float
    passphrase: str
    s3_endpoint: str | None = None


class Archiver:
    """Ships the journal continuously; one per server. `status()` is what health and the CLI show."""

    def __init__(self, storage: Storage, participants: list[Participant], config: ArchiveConfig,
                 open_repo: Callable[[], Repository], *, hold: bool = True):
        self.storage = storage
        self.participants = participants
        self.config = config
        self._open_repo = open_repo
        self._repo: Repository | None = None
        self._index_names: list[str] | None = None
        self.deployment_id = storage.format.deployment_id
        self.cursor: int | None = None  # last seq the archive holds (None: not read from the repository yet)
        self.cursor_ts: float | None = None
        self.cursor_hash: str | None = None
        self.blob_chunks: dict[str, dict[str, Any]] = {}  # sha256 -> {"size", "chunks"}: what the repository holds
        self.segments_written = 0
        self.events_shipped = 0
        self.bytes_written = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_success: float | None = None
        self.gap: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # one shipment at a time (the loop, a final flush, a test)
        self._thread: threading.Thread | None = None
        self._blob_map_loaded = False
        # Many nodes (docs/scale-out.md): the runtime's lease runner, so one node archives at a time.
        self.guard: Callable[[Callable[[], Any]], Any] = lambda fn: fn()
        # The archive's cursor as a hold in the record store (storage.holds): compaction on any node
        # keeps the events after it, gc the blobs they reference. A one-off shipment (a journal-delta
        # backup) writes none: the continuous archiver of the deployment owns the hold.
        self.hold = hold
        self.holder = f"{platform.node()}/{os.getpid()}"
        self._hold_written: tuple[int, float] | None = None  # (seq, when) of the last hold written

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.storage.catalog.add_commit_listener(lambda _seq: self._wake.set())
        self._thread = threading.Thread(target=self._run, name="anvil-archiver", daemon=True)
        self._thread.start()

    def stop(self, *, flush: bool = True, release: bool = False) -> None:
        """Stop shipping. The hold stays (another node, or this one restarted, archives on from the
        cursor) unless `release`: archiving is switched off, so compaction and gc decide alone again."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if flush:
            try:
                self.guard(self.catch_up)
            except Exception as e:  # noqa: BLE001 - stopping: reported, never raised
                self._failed(e)
        if release and self.hold:
            try:
                holds.release(self.storage.catalog, holds.ARCHIVE)
            except Exception as e:  # noqa: BLE001 - it lapses after ANVIL_ARCHIVE_HOLD_SECONDS
                log.warning("could not release the archive hold: %s", e)

    def _run(self) -> None:
        backoff = self.config.interval
        while not self._stop.is_set():
            try:
                self.guard(self.catch_up)
                backoff = self.config.interval
            except Exception as e:  # noqa: BLE001 - an unreachable repository must never stop the server
                self._failed(e)
                backoff = min(max(backoff * 2, self.config.interval), 30.0)
                self._stop.wait(backoff)
                continue
            # Ship at most once per interval, sooner never: one segment per interval bounds their count.
            self._stop.wait(self.config.interval)
            self._wake.wait(max(0.0, 60.0 - self.config.interval))
            self._wake.clear()

    def _failed(self, e: BaseException) -> None:
        self.last_error = f"{type(e).__name__}: {e}"
        self.last_error_at = time.time()
        self._repo = None  # reopen next time: the repository may have moved, been re-created, unlocked
        log.warning("archive to %s failed (will retry): %s", self.config.repo, self.last_error)

    # -------------------------------------------------------------- state

    def _reader(self):
        return self.storage.catalog.reader()

    def repo(self) -> Repository:
        if self._repo is None:
            try:
                repo = self._open_repo()
            except BackupError as e:
                gone = " is not an Anvil backup repository (no config)"
                if self.cursor is not None and gone in str(e):
                    # It held one when archiving started: it moved or was unmounted. Say so on every
                    # retry, not "run backup init" (a new, empty repository in its place).
                    raise BackupError(str(e).split(gone)[0] + " no longer holds a repository (no config)") from None
                raise
            self._load_state(repo)
            self._repo = repo
        return self._repo

    def _load_state(self, repo: Repository) -> None:
        """The archive's cursor, from the repository (the only truth): segment names, the newest
        segment, snapshot headers. Cheap: what blobs the archive holds is read only when needed."""
        segments = list_segments(repo, self.deployment_id)
        rows = [r for r in repo.snapshot_rows(damaged=[]) if r.get("deployment_id") == self.deployment_id]
        cursor, cursor_ts, cursor_hash = None, None, None
        if segments:
            newest = max(segments, key=lambda r: r.last_seq)
            seg = load_segment(repo, newest)
            cursor, cursor_ts, cursor_hash = seg["last_seq"], seg["last_ts"], seg["last_hash"]
        if rows and (cursor is None or int(rows[-1]["consistency"]["journal_seq"]) > cursor):
            # Nothing archived since the newest snapshot: start at its checkpoint (restores begin there).
            c = rows[-1]["consistency"]
            cursor, cursor_ts, cursor_hash = int(c["journal_seq"]), None, c["journal_hash"]
        if cursor is None:
            cursor = journal.oldest_seq(self._reader()) - 1  # never archived, never snapshotted
        elif cursor_hash is not None:
            # A store restored to an earlier point keeps its deployment id but writes a new history:
            # appending it to the old one would make an archive no restore can cross. Refuse.
            conn = self._reader()
            row = conn.execute("SELECT hash FROM journal WHERE seq = ?", (cursor,)).fetchone()
            head_seq, head_hash = journal.head(conn)
            local = row[0] if row else (head_hash if head_seq == cursor else None)
            if head_seq < cursor or (local is not None and local != cursor_hash):
                raise BackupError(f"the archive of deployment {self.deployment_id} holds a different history at "
                                  f"seq {cursor} than this store (restored to an earlier point?); archive into "
                                  "a new repository")
        self.cursor, self.cursor_ts, self.cursor_hash = cursor, cursor_ts, cursor_hash
        self.blob_chunks = {}
        self._blob_map_loaded = False
        self._index_names = None

    def _load_blob_map(self, repo: Repository) -> None:
        """sha256 -> chunks of every blob the archive and the newest full snapshot hold."""
        blob_chunks: dict[str, dict[str, Any]] = {}
        rows = [r for r in repo.snapshot_rows(damaged=[]) if r.get("deployment_id") == self.deployment_id
                and r.get("kind") != "delta"]
        if rows:
            for sha, entry in repo.load_snapshot(rows[-1]["id"])["tree"]["blobs"].items():
                blob_chunks[sha] = {"size": entry["size"], "chunks": entry["chunks"]}
        for ref in list_segments(repo, self.deployment_id):
            for sha, entry in load_segment(repo, ref).get("blobs", {}).items():
                if not entry.get("missing"):
                    blob_chunks[sha] = entry
        blob_chunks.update(self.blob_chunks)
        self.blob_chunks = blob_chunks
        self._blob_map_loaded = True

    def _write_hold(self, seq: int | None = None) -> None:
        """Move the `archive` hold to `seq` (default: the cursor; runs under the archive lease, so it is
        fenced: a node that lost the lease cannot move it). Rewritten when it moves, else renewed
        well before it lapses."""
        seq = self.cursor if seq is None else seq
        if not self.hold or seq is None:
            return
        ttl = holds.archive_ttl()
        now = time.time()
        last = self._hold_written
        if last is not None and last[0] == seq and now - last[1] < ttl / 10:
            return
        holds.put(self.storage.catalog, holds.ARCHIVE, holder=self.holder, seq=seq, blobs=holds.EVENTS, ttl=ttl)
        self._hold_written = (seq, now)

    def status(self) -> dict[str, Any]:
        conn = self.storage.catalog.reader()
        head, _ = journal.head(conn)
        lag_events = max(0, head - self.cursor) if self.cursor is not None else None
        lag_seconds = 0.0
        if lag_events:
            first = journal.read(conn, self.cursor or 0, 1)
            if first:
                lag_seconds = round(max(0.0, time.time() - first[0].ts), 3)
        return {
            "enabled": True, "repository": self.config.repo, "interval_seconds": self.config.interval,
            "deployment_id": self.deployment_id, "archived_seq": self.cursor, "archived_ts": self.cursor_ts,
            "head_seq": head, "lag_events": lag_events, "lag_seconds": lag_seconds,
            "last_success": self.last_success, "last_error": self.last_error, "last_error_at": self.last_error_at,
            "segments_written": self.segments_written, "events_shipped": self.events_shipped,
            "bytes_written": self.bytes_written, "gap": self.gap,
            "ok": self.last_error is None or (self.last_success or 0) > (self.last_error_at or 0),
        }

    # -------------------------------------------------------------- shipping

    def catch_up(self, progress: Progress | None = None) -> int:
        """Ship until the archive holds the journal head (as it was when called); events shipped."""
        total = 0
        with self._lock:
            target = journal.head(self._reader())[0]
            while True:
                n = self._ship_once(progress, target)
                total += n
                self._write_hold()
                if n == 0 or (self.cursor or 0) >= target:
                    break
        return total

    def _ship_once(self, progress: Progress | None, target: int) -> int:
        repo = self.repo()
        assert self.cursor is not None
        conn = self._reader()
        events = journal.read(conn, self.cursor, MAX_EVENTS)
        if not repo.backend.exists("config"):
            # Moved, unmounted or deleted: never recreate a repository by writing into its path.
            raise BackupError(f"{repo.backend.url} no longer holds a repository (no config)")
        if not events:
            self.last_success = time.time()
            return 0
        if events[0].seq != self.cursor + 1:
            # Compaction removed events the archive never held: a restore cannot cross this gap
            # and needs a snapshot taken after it.
            self.gap = (f"events {self.cursor + 1}..{events[0].seq - 1} were compacted before they were archived; "
                        "take a snapshot: point-in-time restore works from snapshots after the gap")
            log.error("archive gap: %s", self.gap)
        names = repo.backend.list("index")
        if self._index_names is not None and names != self._index_names:
            # Another process pruned or repacked: never reuse a chunk location from before it.
            repo._index = None
        with repo.lock("shared", "archive"):
            ensure_format(repo)
            known = repo.index()
            self._index_names = None
            writer = repo.writer()
            try:
                blobs: dict[str, dict[str, Any]] = {}
                wanted = blobs_of_events(self.participants, events)
                if wanted and not self._blob_map_loaded:
                    self._load_blob_map(repo)
                done_bytes, total_bytes = 0, sum(wanted.values())
                for sha, size in wanted.items():
                    have = self.blob_chunks.get(sha)
                    if have is not None and all(c in known for c in have["chunks"]):
                        # The SHA-256 is the blob's identity: stored once, never read again.
                        blobs[sha] = have
                        continue
                    encoded = encode_blob(writer, self.storage.blobs, sha)
                    if encoded is None or encoded[1] != sha:
                        # Deleted before it could be shipped (it was created and dropped before the
                        # archiver started), or corrupt: recorded, the restore reports what it affects.
                        blobs[sha] = {"size": size, "chunks": [], "missing": True}
                        continue
                    blobs[sha] = {"size": encoded[2], "chunks": _add_encoded(writer, encoded)}
                    done_bytes += size
                    if progress:
                        progress(done_bytes, total_bytes, sha[:12])
                writer.finish()
                self.bytes_written += writer.new_bytes
            finally:
                writer.close()
            first, last = events[0], events[-1]
            body = {"version": SEGMENT_VERSION, "deployment_id": self.deployment_id,
                    "first_seq": first.seq, "last_seq": last.seq, "first_ts": first.ts, "last_ts": last.ts,
                    "prev_hash": first.prev_hash, "last_hash": last.hash,
                    "events": [e.to_dict() for e in events], "blobs": blobs}
            name = segment_name(self.deployment_id, first.seq, last.seq, first.ts, last.ts)
            repo.assert_locked()
            data = repo.seal_json(body, f"segment:{name}".encode())
            repo.backend.write(name, data)
            self.bytes_written += len(data)
        self._index_names = repo.backend.list("index")
        for sha, entry in blobs.items():
            if not entry.get("missing"):
                self.blob_chunks[sha] = entry
        # The hold moves before the cursor: once the status shows the archive at a seq (no lag), gc
        # and compaction already see they may go past it (they read the hold, not the cursor).
        self._write_hold(last.seq)
        self.cursor, self.cursor_ts, self.cursor_hash = last.seq, last.ts, last.hash
        self.segments_written += 1
        self.events_shipped += len(events)
        self.last_success = time.time()
        return len(events)


# ------------------------------------------------------------------ journal-delta snapshots


DELTA_METHOD = "journal delta: the archived events after the base snapshot's checkpoint, up to S"


def create_delta(storage: Storage, participants: list[Participant], repo: Repository, *, tag: str | None = None,
                 config: dict[str, Any] | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """An incremental snapshot that costs what changed: the journal events since the newest snapshot
    (and the blobs they reference) are archived, and a small manifest names the full snapshot they
    roll forward from. Restoring it is a point-in-time restore to its seq (docs/backup.md)."""
    from anvil import __version__
    from anvil.storage.recovery import coverage

    started = time.time()
    dep = storage.format.deployment_id
    rows = [r for r in repo.snapshot_rows(damaged=[]) if r.get("deployment_id") == dep]
    if not rows:
        raise BackupError("no earlier snapshot of this deployment to build on: take a full snapshot first "
                          "(anvil backup create without --incremental)")
    parent = rows[-1]
    base_id = parent["base"] if parent.get("kind") == "delta" else parent["id"]
    base = next((r for r in rows if r["id"] == base_id), None)
    if base is None:
        raise BackupError(f"the base snapshot {base_id} of {parent['id']} is gone: take a full snapshot")
    archiver = Archiver(storage, participants, ArchiveConfig(repo.backend.url, 1.0, ""), lambda: repo, hold=False)
    shipped = archiver.catch_up(progress)
    if archiver.gap:
        raise BackupError(f"cannot take a journal delta: {archiver.gap}")
    assert archiver.cursor is not None
    base_seq = int(base["consistency"]["journal_seq"])
    covered = base_seq
    for ref in list_segments(repo, dep):
        if ref.first_seq <= covered + 1:
            covered = max(covered, ref.last_seq)
    if covered < archiver.cursor:
        raise BackupError(f"the archive does not hold every event from seq {base_seq + 1} (base snapshot "
                          f"{base_id}) to {archiver.cursor}: take a full snapshot")
    finished = time.time()
    manifest = {
        "id": uuid.uuid4().hex[:16], "kind": "delta", "parent": parent["id"], "base": base_id, "tag": tag,
        "started": started, "finished": finished, "anvil_version": __version__,
        "repository_format": repo.config["format_version"], "storage_format": None, "deployment_id": dep,
        "hostname": platform.node(),
        "consistency": {"method": DELTA_METHOD, "journal_seq": archiver.cursor,
                        "journal_hash": archiver.cursor_hash or base["consistency"]["journal_hash"]},
        "key_ids": base.get("key_ids") or {}, "config": config or {}, "participants": {},
        "coverage": coverage(p.describe() for p in participants), "problems": [],
        "stats": {"logical_bytes": 0, "new_bytes": archiver.bytes_written, "new_chunks": 0, "blobs": 0,
                  "blobs_reused_from_parent": 0, "events": shipped, "duration": round(finished - started, 3),
                  "orphans": {}},
        "tree": {"files": {}, "blobs": {}},
    }
    with repo.lock("shared", "create"):
        repo.save_snapshot(manifest)
    return manifest


# ------------------------------------------------------------------ reading the archive


def archive_summary(repo: Repository, segments: list[SegmentRef] | None = None) -> list[dict[str, Any]]:
    """Per deployment: how far the archive reaches and where it has holes (names only, no decryption).
    `segments`: `list_segments(repo)` when the caller has it already."""
    by_dep: dict[str, list[SegmentRef]] = {}
    for ref in list_segments(repo) if segments is None else segments:
        by_dep.setdefault(ref.deployment_id, []).append(ref)
    out = []
    for dep, refs in sorted(by_dep.items()):
        gaps = [f"{a.last_seq + 1}..{b.first_seq - 1}" for a, b in zip(refs, refs[1:], strict=False)
                if b.first_seq > a.last_seq + 1]
        out.append({"deployment_id": dep, "segments": len(refs), "first_seq": refs[0].first_seq,
                    "last_seq": refs[-1].last_seq, "first_ts": refs[0].first_ts, "last_ts": refs[-1].last_ts,
                    "gaps": gaps})
    return out


Archived = tuple[list[journal.Event], dict[str, dict[str, Any]], dict[str, Any]]


def events_between(repo: Repository, deployment_id: str, after: int, *, to_seq: int | None = None,
                   to_time: float | None = None) -> Archived:
    """The archived events after `after`, up to `to_seq` or the last one at or before `to_time`,
    with the blobs they reference; plus where the archive ends. Raises if a segment is missing."""
    refs = [r for r in list_segments(repo, deployment_id) if r.last_seq > after]
    events: list[journal.Event] = []
    blobs: dict[str, dict[str, Any]] = {}
    expected = after + 1
    reached_end = False
    archive_end = {"last_seq": after, "last_ts": None}
    # Names say which segments can hold the range: those are read ahead, a few at a time, on
    # threads (reading, AES-GCM and zstd release the GIL) while this one decodes events.
    refs = [r for r in refs if not ((to_seq is not None and r.first_seq > to_seq)
                                    or (to_time is not None and r.first_ts > to_time))]
    loaded = ordered_parallel(lambda ref: load_segment(repo, ref), refs, window=3)
    try:
        for ref in refs:
            if ref.first_seq > expected:
                raise BackupError(f"the archive has no events {expected}..{ref.first_seq - 1} of deployment "
                                  f"{deployment_id}: cannot roll forward across the gap")
            _, seg = next(loaded)
            blobs.update(seg.get("blobs", {}))
            for d in seg["events"]:
                if d["seq"] < expected:
                    continue
                if (to_seq is not None and d["seq"] > to_seq) or (to_time is not None and d["ts"] > to_time):
                    reached_end = True
                    break
                events.append(journal.event_from_dict(d))
                expected = d["seq"] + 1
            archive_end = {"last_seq": ref.last_seq, "last_ts": ref.last_ts}
            if reached_end:
                break
    finally:
        loaded.close()  # segments still being read ahead are waited for, then dropped
    return events, blobs, archive_end
