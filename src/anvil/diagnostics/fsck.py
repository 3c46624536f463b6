"""`fsck`: every recovery participant's `validate`, over one `STORAGE_PATH`, recorded as findings.

There is no second copy of any check here: the storage participants check FORMAT, catalog.db,
the journal chain, the blob store and derived manifests; each subsystem's participant checks
its own records. fsck only runs them, and records what they find (deduplicated against
unresolved findings, resolving earlier ones that a run checked again and no longer sees).

Read-only on source records: it writes nothing but findings (and their journal events). The
same code runs offline (a stopped store, opened under its lock) and inside a running server;
the blob participant walks the blob store before any reference is read, so a blob written
after the walk never looks like an orphan (see `RecoveryContext.start_blob_scan`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from anvil.diagnostics import findings as fnd
from anvil.diagnostics.findings import FindingRecord, make_finding
from anvil.errors import AnvilError
from anvil.storage import Catalog, Layout, records
from anvil.storage.blobs import open_blob_store
from anvil.storage.participant import StorageParticipant
from anvil.storage.recovery import Finding, Participant, Progress, RecoveryContext


@dataclass
class Target:
    """What fsck looks at. `catalog` is None when catalog.db could not even be opened."""

    layout: Layout
    catalog: Catalog | None
    open_error: str | None = None


@dataclass
class FsckReport:
    run_id: str
    mode: str
    deep: bool
    started: float
    finished: float = 0.0
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    findings: list[FindingRecord] = field(default_factory=list)
    new_findings: int = 0
    resolved: list[str] = field(default_factory=list)
    unresolved_earlier: int = 0  # unresolved findings this run did not re-detect (e.g. deep-only ones)
    record_error: str | None = None

    @property
    def errors(self) -> int:
        return sum(1 for f in self.findings if f.severity == "error")

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.record_error is None

    def to_dict(self) -> dict[str, Any]:
        counts = dict.fromkeys(fnd.SEVERITIES, 0)
        for f in self.findings:
            counts[f.severity] += 1
        return {
            "run_id": self.run_id, "mode": self.mode, "deep": self.deep, "started": self.started,
            "finished": self.finished, "ok": self.ok, "counts": counts, "checks": self.checks,
            "findings": [f.to_dict() for f in self.findings], "new_findings": self.new_findings,
            "resolved": self.resolved, "unresolved_earlier": self.unresolved_earlier,
            "record_error": self.record_error,
        }


def _validate_all(target: Target, participants: list[Participant], deep: bool, progress: Progress,
                  hash_threads: int) -> tuple[list[Finding], set[str], dict[str, dict[str, Any]]]:
    """(findings worth recording, invariants checked, figures) from every participant's validate."""
    layout = target.layout
    if target.catalog is None:
        # Nothing but the files can be looked at; FORMAT is still worth checking.
        found = StorageParticipant.format_findings(layout.root)
        found.append(Finding("storage", "error", "catalog.db", f"catalog.db cannot be opened: {target.open_error}",
                             "storage.catalog_open", {"file": "catalog.db"}))
        return found, {"storage.format"}, {}
    ctx = RecoveryContext(layout.root, target.catalog.reader(), open_blob_store(layout.blobs, layout.tmp), participants,
                          deep=deep, progress=progress, hash_threads=hash_threads)
    ctx.checked.add("storage.catalog_open")
    # The walk (and, deep, the hashing of files and then inline bodies) and catalog.db's
    # integrity check run on worker threads while participants check records: SQLite, hashlib
    # and the file syscalls release the GIL, so they overlap the Python of the record checks.
    ctx.start_catalog_check()
    ctx.start_blob_scan()
    # The storage participant, which waits for the integrity check, goes last, so the others'
    # checks run meanwhile; findings are still listed in the participants' order.
    order = sorted(participants, key=lambda p: isinstance(p, StorageParticipant))
    by_participant: dict[int, list[Finding]] = {}
    for p in order:
        try:
            by_participant[id(p)] = [f for f in p.validate(ctx) if f.severity != "info"]
            ctx.checked.add(f"{p.name}.unreadable")
        except records.RecordError as e:
            # A damaged catalog must not stop the other checks: the failure itself is a finding.
            ctx.stats[p.name] = {"ok": False, "error": str(e)}
            by_participant[id(p)] = [Finding(
                p.name, "error", "catalog.db", f"the {p.name} check could not read catalog.db: {e}",
                f"{p.name}.unreadable", {"file": "catalog.db", "check": p.name})]
    ctx.blob_scan()  # never leave the walk running behind the report
    ctx.catalog_problems()
    found = [f for p in participants for f in by_participant[id(p)]]
    return found, ctx.checked, ctx.stats


def run_fsck(
    target: Target, participants: list[Participant], *, deep: bool = False, mode: str = "offline",
    progress: Progress | None = None, record: bool = True, actor: str = "system/fsck", request_id: str | None = None,
    hash_threads: int = 2,
) -> FsckReport:
    """Check everything, then record the findings (deduplicated against unresolved ones) and
    resolve earlier fsck findings this run checked again and no longer sees."""
    report = FsckReport(uuid.uuid4().hex, mode, deep, time.time())
    found, checked, report.checks = _validate_all(target, participants, deep, progress or Progress(), hash_threads)
    report.findings = [
        make_finding(f.participant, f.severity, f.invariant or f"{f.participant}.unnamed", f.message, f.affected,
                     identity=f.identity, cursor=f.cursor, run_id=report.run_id, origin="fsck",
                     operator_action_required=f.severity == "error")
        for f in found
    ]
    report.finished = time.time()
    if record and target.catalog is not None:
        rid = request_id or report.run_id
        try:
            recorded = fnd.record_many(target.catalog, report.findings, actor=actor, request_id=rid, dedupe=True)
            report.new_findings = sum(1 for f in recorded if f.run_id == report.run_id)
            report.findings = recorded
            report.resolved = fnd.resolve_missing(
                target.catalog, origin="fsck", invariants=checked,
                still_present={f.fingerprint for f in recorded},
                resolution=f"not detected by fsck run {report.run_id}", actor=actor, request_id=rid,
            )
            mine = {f.id for f in recorded}
            report.unresolved_earlier = sum(
                1 for (fid,) in target.catalog.reader().execute("SELECT id FROM findings WHERE resolved_at IS NULL")
                if fid not in mine)
        except (records.RecordError, AnvilError) as e:
            report.record_error = f"findings could not be recorded: {e}"
    elif record:
        report.record_error = "findings could not be recorded: catalog.db cannot be opened"
    return report
