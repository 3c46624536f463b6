"""Point-in-time restore: the newest snapshot before the target, then the archived events up to it.

`anvil restore --to-time T | --to-seq N` picks the newest snapshot whose checkpoint is before
the target (for a time: a snapshot that *finished* by then, so no event in it is later),
restores it, replays the archived events after its checkpoint up to the target through the
participants' `Replayer` capability (each event's link in the hash chain is checked), restores
the blobs the replayed records reference, and leaves the target in recovery mode like any
restore, with the replayed head recorded so validation checks the chain up to it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from anvil.backup import mode
from anvil.backup.archive import events_between, list_segments
from anvil.backup.errors import BackupError
from anvil.backup.pack import ChunkReader
from anvil.backup.repository import Repository
from anvil.backup.restore import Progress, _restore_remote, _write_entry, restore, sync_paths
from anvil.storage import inline, records
from anvil.storage.blobs import open_blob_store
from anvil.storage.layout import Layout
from anvil.storage.recovery import Participant, RecoveryContext, replay_into

# Events applied per catalog transaction during a replay: each commit of the restored catalog is
# a WAL fsync, so a long journal costs a few dozen of them, not one per thousand events.
REPLAY_BATCH = 10_000


def parse_time(text: str) -> float:
    """ISO 8601 (`2026-12-01T10:15:00Z`, with or without offset: UTC if none) or unix seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise BackupError(f"--to-time must be ISO 8601 like 2026-12-01T10:15:00Z or unix seconds, got {text!r}") \
            from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z") if ts else None


def choose_snapshot(repo: Repository, *, to_seq: int | None = None, to_time: float | None = None,
                    deployment_id: str | None = None) -> dict[str, Any]:
    """The newest snapshot a point-in-time restore to the target can start from."""
    # Headers only (cached locally): the chosen manifest alone is loaded whole, at the end.
    # Full snapshots only: a journal delta holds no files to start from (it is its base rolled
    # forward, which this restore does anyway). Choosing one crashed every point-in-time restore to
    # or past the newest delta's seq with a KeyError ('FORMAT') traceback.
    snaps = [m for m in repo.snapshot_rows() if (deployment_id is None or m["deployment_id"] == deployment_id)
             and m.get("kind") != "delta"]
    if not snaps:
        raise BackupError(f"{repo.backend.url} holds no snapshots" + (f" of deployment {deployment_id}"
                                                                        if deployment_id else ""))
    if to_seq is not None:
        fit = [m for m in snaps if int(m["consistency"]["journal_seq"]) <= to_seq]
        what = f"seq {to_seq}"
    else:
        assert to_time is not None
        fit = [m for m in snaps if m["finished"] <= to_time]
        what = iso(to_time)
    if not fit:
        oldest = snaps[0]
        raise BackupError(f"no snapshot is older than {what}: the oldest, {oldest['id']}, finished at "
                          f"{iso(oldest['finished'])} at journal seq {oldest['consistency']['journal_seq']}")
    # By checkpoint seq, then time: the newest start means the least to replay.
    return repo.load_snapshot(max(fit, key=lambda m: (int(m["consistency"]["journal_seq"]), m["finished"]))["id"])


def restore_to_point(repo: Repository, target: Path, participants: list[Participant], *,
                     to_seq: int | None = None, to_time: float | None = None, force: bool = False,
                     deployment_id: str | None = None, progress: Progress | None = None,
                     base: dict[str, Any] | None = None) -> dict[str, Any]:
    """`base`: start from this snapshot instead of the newest fitting one (it must precede the target)."""
    if (to_seq is None) == (to_time is None):
        raise BackupError("give exactly one of --to-seq or --to-time")
    if to_seq is not None and to_seq < 0:
        raise BackupError("--to-seq must be 0 or more")
    started = time.time()
    manifest = base or choose_snapshot(repo, to_seq=to_seq, to_time=to_time, deployment_id=deployment_id)
    if base is not None and ((to_seq is not None and int(base["consistency"]["journal_seq"]) > to_seq)
                             or (to_time is not None and base["finished"] > to_time)):
        raise BackupError(f"snapshot {base['id']} is later than the target")
    dep = manifest["deployment_id"]
    base_seq = int(manifest["consistency"]["journal_seq"])
    # Read (and check) the archive before touching the target: a missing segment changes nothing.
    events, seg_blobs, end = events_between(repo, dep, base_seq, to_seq=to_seq, to_time=to_time)
    reached = events[-1].seq if events else base_seq
    if to_seq is not None and reached < to_seq:
        raise BackupError(f"the archive of deployment {dep} reaches journal seq {end['last_seq']}"
                          f"{' at ' + iso(end['last_ts']) if end['last_ts'] else ''}; cannot restore to seq "
                          f"{to_seq}; nothing was written")
    warnings: list[str] = []
    if to_time is not None and (end["last_ts"] or 0) < to_time and not _archive_passes(repo, dep, to_time):
        warnings.append(f"the archive ends at seq {end['last_seq']} ({iso(end['last_ts'])}), before the target "
                        f"{iso(to_time)}: events after that were not archived (yet) and are not in this restore")
    res = restore(repo, manifest, target, participants, force=force, progress=progress)
    root = Path(res["target"])
    layout = Layout(root)
    layout.acquire_lock()
    try:
        store = open_blob_store(layout.blobs, layout.tmp)  # local files, or ANVIL_BLOBS_URL's backend
        def replayed_so_far(n: int) -> None:
            if progress:
                progress(n, len(events), "replaying the journal")

        replayed = replay_into(root / "catalog.db", events, participants, root=root, blobs=store,
                               batch=REPLAY_BATCH, on_batch=replayed_so_far)
        problems = list(res["problems"])
        # The blobs the replayed records reference that the snapshot did not restore.
        conn = records.open_readonly(root / "catalog.db")
        try:
            refs = RecoveryContext(root, conn, store, participants).references()
            # Restored with catalog.db; asked a batch at a time, not read as a dict of the whole store's.
            inlined = inline.among(conn, refs)
        finally:
            records.close(conn)
        reader = ChunkReader(repo)
        tree = manifest["tree"]["blobs"]
        fetched = 0
        written: list[Path] = []
        for sha, uses in refs.items():
            dest = store.path(sha)
            if sha in inlined or (store.stat(sha) is not None if store.remote else dest.exists()):
                continue
            entry = seg_blobs.get(sha) or tree.get(sha)
            if entry is None or entry.get("missing"):
                labels = ", ".join(r.label for r in uses[:3])
                problems.append(f"blob {sha} is in neither the snapshot nor the archive; affects {labels}")
                continue
            if store.remote:
                outcome, why = _restore_remote(reader, store, sha, entry, layout.tmp)
                if outcome == "failed":
                    problems.append(f"blob {sha}: {why}")
                fetched += outcome == "restored"
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                _write_entry(reader, entry, dest, expected_sha=sha, fsync=False)  # one batch below
                written.append(dest)
                fetched += 1
            except BackupError as e:
                problems.append(f"blob {sha}: {e}")
        # The blobs are durable before the marker says the restore is complete.
        sync_paths(written, {d.parent for d in written})
        head_seq, head_hash = (events[-1].seq, events[-1].hash) if events else (
            base_seq, manifest["consistency"]["journal_hash"])
        marker = mode.read_marker(root) or {}
        point = {"to_seq": to_seq, "to_time": to_time, "to_time_iso": iso(to_time), "snapshot_seq": base_seq,
                 "events_replayed": replayed, "head_seq": head_seq,
                 "head_ts": events[-1].ts if events else None, "archive_end": end, "warnings": warnings}
        # The snapshot's summaries describe its checkpoint, not the replayed state: only the chain up
        # to the replayed head is a recorded fact validation can hold the restore to.
        marker.update({"journal_seq": head_seq, "journal_hash": head_hash, "point_in_time": point,
                       "recorded": {"journal": {"head_seq": head_seq, "head_hash": head_hash}},
                       "problems": problems})
        mode.write_marker(root, marker)
    finally:
        layout.release_lock()
    return {**res, "ok": not problems, "problems": problems, "point_in_time": point, "blobs_from_archive": fetched,
            "duration": round(time.time() - started, 3)}


def _archive_passes(repo: Repository, dep: str, to_time: float) -> bool:
    """True when some archived segment starts after `to_time` (so nothing before it is missing)."""
    return any(r.first_ts > to_time for r in list_segments(repo, dep))


def restore_any(repo: Repository, manifest: dict[str, Any], target: Path, participants: list[Participant], *,
                force: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Restore a snapshot of either kind: a full one as it is, a journal delta as its base snapshot
    rolled forward to the delta's seq."""
    if manifest.get("kind") != "delta":
        return restore(repo, manifest, target, participants, force=force, progress=progress)
    base = repo.load_snapshot(manifest["base"])
    res = restore_to_point(repo, target, participants, to_seq=int(manifest["consistency"]["journal_seq"]),
                           base=base, force=force, progress=progress)
    return {**res, "snapshot": manifest["id"], "base": base["id"]}


def delta_catalog(repo: Repository, manifest: dict[str, Any], participants: list[Participant], path: Path,
                  reader: ChunkReader) -> dict[str, Any]:
    """Write at `path` the catalog a journal delta stands for: its base's catalog with the archived
    events up to the delta's seq replayed onto it. Returns sha256 -> stored blob (archive, then base)."""
    base_id = manifest.get("base")
    try:
        base = repo.load_snapshot(base_id)
    except BackupError:
        raise BackupError(f"the base snapshot {base_id} of journal delta {manifest['id']} is gone") from None
    base_seq = int(base["consistency"]["journal_seq"])
    to_seq = int(manifest["consistency"]["journal_seq"])
    events, seg_blobs, end = events_between(repo, manifest["deployment_id"], base_seq, to_seq=to_seq)
    if (events[-1].seq if events else base_seq) < to_seq:
        raise BackupError(f"the archive reaches journal seq {end['last_seq']}, journal delta {manifest['id']} "
                          f"needs {to_seq}")
    _write_entry(reader, base["tree"]["files"]["catalog.db"], path)
    replay_into(path, events, participants, root=path.parent, blobs=None, batch=REPLAY_BATCH)
    return {**base["tree"]["blobs"], **seg_blobs}
