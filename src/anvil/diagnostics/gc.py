"""`gc`: remove orphan blobs past a grace period and expire abandoned multipart uploads.

Safe beside a running server because of how blobs are written: a PUT stores its blob before
committing the record that references it, and when the content already exists
`BlobWriter.commit` refreshes the blob's mtime instead. So an unreferenced blob younger
than the grace period may belong to a write in flight and is kept. For an old one, gc
first *renames* it into `tmp/` (quarantine) and looks at its mtime again: a deduplicating
PUT that refreshed it just before the rename is caught (the blob is put back), and one
arriving just after the rename finds no blob and stores its own copy (or fails cleanly),
never a record pointing at bytes gc removed.

Inline bodies (`storage.inline`, small bodies kept in catalog.db) follow the same rule with the
row's `stored` time in place of the mtime: a write that deduplicates onto a row refreshes it in the
transaction that adds its reference, and gc deletes a row in its own mutation only if it is still
older than the grace period there, so a row a new record uses is never taken.

Upload expiry goes through `ObjectService.abort_multipart` (one mutation, one journal
event each); the parts' blobs then become orphans and go in the same run, since they are
old. Everything removed is recorded as one `info` finding.

Holds in the record store (`storage.holds`, read by gc on every node): the blobs referenced by
journal events continuous archiving has not shipped yet stay; while a backup runs (an `all` hold)
no blob is deleted, since its snapshot may reference blobs that lost their last reference since.

Many nodes (docs/scale-out.md): gc runs under the `gc` lease (the runtime takes it, `Leases.exclusive`)
and `fence` is called before every batch of deletes: a node paused past its lease stops with
`StaleFence` before it deletes anything more.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from anvil.context import RequestContext
from anvil.diagnostics import findings as fnd
from anvil.errors import AnvilError
from anvil.objects import references as refs
from anvil.storage import Storage, Txn, holds, inline, journal
from anvil.storage.blobscan import scan_blobs
from anvil.storage.layout import fsync_dir
from anvil.storage.recovery import Participant, RecoveryContext, blobs_of_events
from anvil.storage.space import is_full_error

if TYPE_CHECKING:  # only annotated: fsck, gc and repair offline need none of the object service
    from anvil.objects import ObjectService

DEFAULT_GRACE = 3600.0
# While the store refuses writes for lack of space, the grace is at most this: deleting objects
# must free their space now, not in an hour. A blob is named only just before its record commits
# (seconds, not minutes), and the quarantine below still catches a deduplicating PUT.
FULL_DISK_GRACE = 60.0
DEFAULT_UPLOAD_EXPIRY = 7 * 24 * 3600.0
MAX_LISTED = 100
# Deletes between two checks of the gc lease's fence (each check is one small transaction).
FENCE_BATCH = 64


@dataclass
class GcReport:
    run_id: str
    dry_run: bool
    grace_seconds: float
    upload_expiry_seconds: float
    blobs_removed: list[dict[str, Any]] = field(default_factory=list)
    bytes_removed: int = 0
    young_orphans_kept: int = 0
    restored: int = 0
    uploads_expired: list[dict[str, Any]] = field(default_factory=list)
    tmp_files_removed: int = 0
    disk_full: bool = False
    sidecars_removed: int = 0
    held_kept: int = 0
    holds: list[dict[str, Any]] = field(default_factory=list)
    finding: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "dry_run": self.dry_run, "grace_seconds": self.grace_seconds,
            "upload_expiry_seconds": self.upload_expiry_seconds, "blobs_removed": self.blobs_removed,
            "blob_count": len(self.blobs_removed), "bytes_removed": self.bytes_removed,
            "young_orphans_kept": self.young_orphans_kept, "restored": self.restored,
            "uploads_expired": self.uploads_expired, "tmp_files_removed": self.tmp_files_removed,
            "disk_full": self.disk_full, "sidecars_removed": self.sidecars_removed,
            "held_kept": self.held_kept, "holds": self.holds, "finding": self.finding,
        }


def check_seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value < 0:
        raise AnvilError("InvalidArgument", f"{name} must be a number of seconds >= 0")
    return float(value)


class _Fence:
    """Calls `check` before the first delete and then before every FENCE_BATCH-th."""

    def __init__(self, check: Callable[[], None]):
        self.check = check
        self.count = 0

    def tick(self) -> None:
        if self.count % FENCE_BATCH == 0:
            self.check()
        self.count += 1


def run_gc(
    storage: Storage, objects: ObjectService, participants: list[Participant], ctx: RequestContext, *,
    grace: float = DEFAULT_GRACE,
    upload_expiry: float = DEFAULT_UPLOAD_EXPIRY, dry_run: bool = False,
    fence: Callable[[], None] | None = None,
) -> GcReport:
    grace = check_seconds("grace", grace)
    upload_expiry = check_seconds("upload expiry", upload_expiry)
    disk_full = not storage.space.accepting_writes()
    if disk_full:
        grace = min(grace, FULL_DISK_GRACE)
    report = GcReport(uuid.uuid4().hex, dry_run, grace, upload_expiry, disk_full=disk_full)
    batches = _Fence(fence or (lambda: None))
    conn = storage.catalog.reader()
    now = time.time()

    # 1. Expired uploads first, so their parts' blobs are collected in this same run.
    expired = [u for u in refs.iter_uploads(conn) if now - u.created >= upload_expiry]
    for u in expired:
        entry = {"tenant": u.tenant, "bucket": u.bucket, "key": u.key, "upload_id": u.upload_id,
                 "age_seconds": int(now - u.created)}
        if dry_run:
            report.uploads_expired.append(entry)
            continue
        try:
            objects.abort_multipart(ctx, u.bucket, u.upload_id)
        except AnvilError as e:
            if e.code != "NotFound":  # completed or aborted meanwhile: nothing to expire
                raise
            continue
        report.uploads_expired.append(entry)

    # 2. Orphan blobs: list first, then read references (see fsck for why this order).
    remote = storage.blobs.remote
    listing = {} if remote else scan_blobs(storage.layout.blobs, deep=False, threads=1).blobs
    remote_listing = {b.sha256 for b in storage.blobs.list_blobs()} if remote else set()
    # Taken before the references are read: an inline row refreshed by a record committed after
    # that read has a later `stored` and survives the delete below.
    inline_cutoff = time.time() - grace
    # The one blob-reference query fsck and backup use too: what any participant references stays.
    referenced = RecoveryContext(storage.root, conn, storage.blobs, participants, deep=False).references().keys()
    # Blobs of journal events continuous archiving has not shipped yet: a point-in-time restore
    # to before their delete needs them, so they stay until the archive holds them. The holds are in
    # the record store: the archiver may run on another node.
    held, keep_all = _held_blobs(conn, participants)
    report.holds = [h.to_dict() for h in holds.active(conn)]
    orphans = (remote_listing | listing.keys()) - referenced
    report.held_kept = len(orphans & held) + (len(orphans - held) if keep_all else 0)
    referenced = referenced | held
    touched_dirs: set[str] = set()
    if keep_all:
        # A backup is running (on this node or another): its snapshot may reference blobs that lost
        # their last reference since, and it has yet to read them. No blob goes until it is done.
        remote_listing, listing = set(), {}
    if remote:
        _remote_orphans(storage, sorted(remote_listing - referenced), grace, dry_run, report, batches)
    for sha in sorted(listing.keys() - referenced):
        path = listing[sha]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if time.time() - st.st_mtime < grace:
            report.young_orphans_kept += 1
            continue
        entry = {"blob": sha, "size": st.st_size, "age_seconds": int(time.time() - st.st_mtime)}
        if dry_run:
            report.blobs_removed.append(entry)
            report.bytes_removed += st.st_size
            continue
        batches.tick()
        quarantine = storage.quarantine_path(sha)
        try:
            _rename(storage, path, quarantine)
        except FileNotFoundError:
            continue
        touched_dirs.add(os.path.dirname(path))
        if time.time() - os.stat(quarantine).st_mtime < grace:
            # A PUT of the same content refreshed it just now: it is about to be referenced.
            try:
                os.link(quarantine, path)
            except FileExistsError:
                pass  # that PUT already stored a fresh copy
            os.unlink(quarantine)
            report.restored += 1
            continue
        os.unlink(quarantine)
        storage.blobs.remove_sidecar(sha)  # its chunk digests go with it
        report.blobs_removed.append(entry)
        report.bytes_removed += st.st_size

    # 2a. Inline bodies nobody references, past the grace period.
    doomed = []
    # Streamed in hash order past the references (never a dict of the whole store's inline bodies):
    # a body stored after the references were read is younger than the cutoff, and stays.
    candidates = {sha: size for sha, size in inline.iter_sizes(conn) if sha not in referenced}
    stored_at = inline.stored_at(conn, candidates)
    for sha, size in candidates.items():
        stored = stored_at.get(sha)
        if stored is None:
            continue  # removed meanwhile
        if stored >= inline_cutoff:
            report.young_orphans_kept += 1
            continue
        doomed.append({"blob": sha, "size": size, "age_seconds": int(time.time() - stored), "inline": True})
    if doomed and not dry_run:
        def drop(txn: Txn) -> set[str]:
            return {d["blob"] for d in doomed if inline.delete(txn.conn, d["blob"], stored_before=inline_cutoff)}

        gone = storage.catalog.mutate(drop, actor=ctx.actor, request_id=ctx.request_id)
        doomed = [d for d in doomed if d["blob"] in gone]
    for d in doomed:
        report.blobs_removed.append(d)
        report.bytes_removed += d["size"]

    # 2b. Chunk-digest sidecars whose blob is gone (removed before sidecars were, or quarantined).
    # A sidecar is written just before its blob is named, so young ones are left alone.
    for sha, mtime in list(storage.blobs.list_sidecars()) if remote else ():
        if time.time() - mtime < grace or storage.blobs.stat(sha) is not None:
            continue
        if not dry_run:
            batches.tick()
            storage.blobs.remove_sidecar(sha)
        report.sidecars_removed += 1
    for sha, path in [] if remote else list(storage.blobs.iter_sidecars()):
        try:
            if storage.blobs.path(sha).exists() or time.time() - path.stat().st_mtime < grace:
                continue
            if not dry_run:
                path.unlink()
                touched_dirs.add(os.path.dirname(path))
        except FileNotFoundError:
            continue
        report.sidecars_removed += 1
    for path in list(storage.blobs.sidecar_leftovers()):  # a sidecar being written when a process died
        try:
            if time.time() - path.stat().st_mtime < grace:
                continue
            if not dry_run:
                path.unlink()
                touched_dirs.add(os.path.dirname(path))
        except FileNotFoundError:
            continue
        report.tmp_files_removed += 1

    # 3. Leftovers of uploads that died mid-body (a crash between tmp write and rename).
    with os.scandir(storage.layout.tmp) as it:
        for f in it:
            if f.name.startswith("upload-") and f.is_file(follow_symlinks=False):
                try:
                    if time.time() - f.stat().st_mtime >= grace:
                        if not dry_run:
                            os.unlink(f.path)
                        report.tmp_files_removed += 1
                except FileNotFoundError:
                    pass
    for d in touched_dirs:
        fsync_dir(d)
    if report.tmp_files_removed and not dry_run:
        fsync_dir(storage.layout.tmp)

    if report.bytes_removed and not dry_run:
        storage.space.accepting_writes()  # re-creates the reserve if the freed space allows it
    if not dry_run and (report.blobs_removed or report.uploads_expired or report.tmp_files_removed):
        affected = {
            "blob_count": len(report.blobs_removed), "bytes": report.bytes_removed,
            "blobs": [b["blob"] for b in report.blobs_removed[:MAX_LISTED]],
            "references": [{k: u[k] for k in ("tenant", "bucket", "key", "upload_id")}
                           for u in report.uploads_expired[:MAX_LISTED]],
            "upload_count": len(report.uploads_expired), "tmp_files": report.tmp_files_removed,
        }
        f = fnd.make_finding(
            "diagnostics", "info", "gc.removed",
            f"gc removed {len(report.blobs_removed)} orphan blob(s) ({report.bytes_removed} bytes), "
            f"{len(report.uploads_expired)} expired multipart upload(s) and {report.tmp_files_removed} "
            "abandoned temporary file(s)",
            affected, identity={"run_id": report.run_id}, origin="gc", run_id=report.run_id,
            repair_attempted=True, repair_result="removed", resolved_at=now,
            resolution="garbage removed; nothing left to do",
        )
        recorded = fnd.record(storage.catalog, f, actor=ctx.actor, request_id=ctx.request_id)
        report.finding = recorded.to_dict()
    return report


def _held_blobs(conn: Any, participants: list[Participant]) -> tuple[set[str], bool]:
    """(blobs referenced by the events after an `events` hold's seq, whether an `all` hold lasts)."""
    active = holds.active(conn)
    seqs = [h.seq for h in active if h.blobs == holds.EVENTS]
    keep_all = any(h.blobs == holds.ALL for h in active)
    if not seqs:
        return set(), keep_all
    return set(blobs_of_events(participants, journal.iterate(conn, min(seqs)))), keep_all


def _remote_orphans(storage: Storage, candidates: list[str], grace: float, dry_run: bool, report: GcReport,
                    batches: _Fence) -> None:
    """Orphans in a remote backend (S3). No rename exists there, so each candidate's age is read
    again just before its delete: a deduplicating PUT refreshes LastModified (a copy onto itself)
    before its record commits, and such a blob is kept. What remains is the moment between that
    last look and the delete (one round trip), documented in docs/scale-out.md."""
    for sha in candidates:
        st = storage.blobs.stat(sha)
        if st is None:
            continue
        size, mtime = st
        if time.time() - mtime < grace:
            report.young_orphans_kept += 1
            continue
        entry = {"blob": sha, "size": size, "age_seconds": int(time.time() - mtime)}
        if not dry_run:
            batches.tick()
            try:
                storage.blobs.remove(sha)  # its chunk digests go with it
            except FileNotFoundError:
                continue
        report.blobs_removed.append(entry)
        report.bytes_removed += size


def _rename(storage: Storage, src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename within the store; at 0 bytes free the target folder may need a block: use the reserve."""
    try:
        os.rename(src, dst)
    except OSError as exc:
        if not is_full_error(exc) or not storage.space.release():
            raise
        os.rename(src, dst)
