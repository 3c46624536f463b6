"""`fsck`: check every verifiable invariant of one `STORAGE_PATH` and record findings.

Read-only on source records: it writes nothing but findings (and their journal events).
The same code runs offline (a stopped store, opened under its lock) and inside a running
server (admin API); the ordering below is what makes the online run safe against
concurrent writes:

- blobs are listed *before* the references are read, so a blob written after the listing
  can never look like an orphan, and a referenced blob missing from the listing is checked
  again on disk before it is reported (it may have been written after the listing);
- all references (versions, multipart parts, uploads, journal head) come from one read
  transaction, i.e. one consistent snapshot.

With `--deep` every blob is hashed on a small thread pool while the main thread runs the
catalog checks, so the SQLite work hides behind the hashing.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apsw

from anvil.diagnostics import findings as fnd
from anvil.diagnostics.findings import Finding, make_finding
from anvil.diagnostics.scan import HEX64, HashResult, ScanResult, hash_file, scan_blobs
from anvil.errors import AnvilError
from anvil.objects import references as refs
from anvil.storage import Catalog, Layout, journal
from anvil.watch import durable_cursors

MAX_REFERENCES = 20  # references listed in one finding; the count is always complete
MANIFEST = "MANIFEST.json"

class Progress:
    """What fsck reports while it runs; the CLI renders it as a rich progress bar.

    `phase` announces a step and returns the function that advances *that* step: the blob
    scan advances from worker threads while the main thread moves through other phases."""

    def phase(self, name: str, total: int | None = None) -> Callable[[int], None]:
        return _ignore


def _ignore(n: int) -> None:
    pass


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
    findings: list[Finding] = field(default_factory=list)
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


class _Run:
    def __init__(self, target: Target, deep: bool, mode: str, progress: Progress, hash_threads: int):
        self.t = target
        self.deep = deep
        self.progress = progress
        self.hash_threads = hash_threads
        self.report = FsckReport(uuid.uuid4().hex, mode, deep, time.time())
        self.checked: set[str] = set()  # invariants evaluated this run (for auto-resolve)

    def add(self, subsystem: str, severity: str, invariant: str, detail: str, affected: dict[str, Any], *,
            identity: dict[str, Any] | None = None, cursor: str | None = None) -> None:
        self.report.findings.append(make_finding(
            subsystem, severity, invariant, detail, affected, identity=identity, cursor=cursor,
            run_id=self.report.run_id, origin="fsck", operator_action_required=severity == "error",
        ))

    # ------------------------------------------------------------------ checks

    def check_format(self) -> None:
        self.checked.add("storage.format")
        try:
            info = self.t.layout.read_format()
            self.report.checks["format"] = {"ok": True, "version": info.version,
                                            "deployment_id": info.deployment_id}
        except AnvilError as e:
            self.report.checks["format"] = {"ok": False}
            self.add("storage", "error", "storage.format", e.message, {"file": "FORMAT"})

    def check_integrity(self, conn: apsw.Connection) -> None:
        self.checked.add("storage.catalog_integrity")
        try:
            rows = [r[0] for r in conn.execute("PRAGMA integrity_check(100)").fetchall()]
        except apsw.Error as e:
            # Damage bad enough that SQLite aborts the check is the same finding, not a different one.
            rows = [f"integrity_check aborted: {e}"]
        ok = rows == ["ok"]
        self.report.checks["catalog"] = {"ok": ok, "messages": 0 if ok else len(rows)}
        if not ok:
            self.add("storage", "error", "storage.catalog_integrity",
                     f"SQLite integrity_check reported {len(rows)} problem(s) in catalog.db: {rows[0]}",
                     {"file": "catalog.db", "messages": rows[:20]}, identity={"file": "catalog.db"})

    def check_journal(self, conn: apsw.Connection) -> None:
        done = self.progress.phase("journal chain", 1)
        self.checked.update({"journal.chain", "journal.gapless"})
        checked, problems = journal.verify_chain(conn)
        done(1)
        self.report.checks["journal"] = {"events": checked, "problems": len(problems)}
        for p in problems:
            inv = "journal.gapless" if p.problem.startswith("gap") else "journal.chain"
            self.add("storage", "error", inv, f"journal event {p.seq}: {p.problem}", {"seq": p.seq},
                     cursor=str(p.seq))

    def check_watch_cursors(self, conn: apsw.Connection, head: int) -> None:
        sources = {"watch_consumers": durable_cursors(conn)}
        self.checked.add("watch.cursor_ahead")
        n = 0
        for source, rows in sources.items():
            for name, cursor in rows:
                n += 1
                if isinstance(cursor, int) and cursor > head:
                    self.add("watch", "error", "watch.cursor_ahead",
                             f"consumer {name!s} in {source} is at cursor {cursor}, beyond the journal head {head}",
                             {"source": source, "consumer": str(name), "cursor": cursor, "head": head},
                             identity={"source": source, "consumer": str(name)}, cursor=str(cursor))
        self.report.checks["watch"] = {"cursors": n, "head": head}

    def check_derived(self, head: int | None) -> None:
        root = self.t.layout.derived
        manifests = sorted(Path(d) / MANIFEST for d, _, files in os.walk(root) if MANIFEST in files)
        if not manifests:
            self.report.checks["derived"] = {"skipped": "no derived manifests"}
            return
        advance = self.progress.phase("derived manifests", len(manifests))
        self.checked.update({"derived.manifest_invalid", "derived.file_missing", "derived.file_size",
                             "derived.cursor_ahead"})
        if self.deep:
            self.checked.add("derived.file_hash")
        files = 0
        for m in manifests:
            rel = m.relative_to(root)
            base = {"family": rel.parts[0], "generation": str(rel.parent), "manifest": f"derived/{rel}"}
            try:
                body = json.loads(m.read_text())
                entries = body.get("files")
                if not isinstance(entries, list):
                    raise ValueError("'files' must be a list")
            except (OSError, ValueError, AttributeError) as e:
                self.add("derived", "error", "derived.manifest_invalid", f"{base['manifest']} is unreadable: {e}",
                         base)
                continue
            cursor = body.get("cursor")
            if isinstance(cursor, int) and head is not None and cursor > head:
                self.add("derived", "error", "derived.cursor_ahead",
                         f"{base['manifest']} claims cursor {cursor}, beyond the journal head {head}",
                         {**base, "cursor": cursor, "head": head}, identity=base, cursor=str(cursor))
            for entry in entries:
                path = entry.get("path") if isinstance(entry, dict) else None
                sha = entry.get("sha256") if isinstance(entry, dict) else None
                if (not isinstance(path, str) or not isinstance(sha, str) or path.startswith("/")
                        or ".." in Path(path).parts):
                    self.add("derived", "error", "derived.manifest_invalid",
                             f"{base['manifest']} lists an invalid file entry", {**base, "entry": entry})
                    continue
                files += 1
                f = m.parent / path
                aff = {**base, "file": path}
                try:
                    size = f.stat().st_size
                except OSError:
                    self.add("derived", "error", "derived.file_missing", f"{base['manifest']}: {path} is missing", aff)
                    continue
                if isinstance(entry.get("size"), int) and entry["size"] != size:
                    self.add("derived", "error", "derived.file_size",
                             f"{base['manifest']}: {path} is {size} bytes, the manifest says {entry['size']}",
                             {**aff, "expected": entry["size"], "actual": size}, identity=aff)
                    continue
                if self.deep:
                    actual, _, err = hash_file(str(f))
                    if actual != sha:
                        self.add("derived", "error", "derived.file_hash",
                                 f"{base['manifest']}: {path} does not match its SHA-256"
                                 + (f" ({err})" if err else ""),
                                 {**aff, "expected": sha, "actual": actual}, identity=aff)
            advance(1)
        self.report.checks["derived"] = {"manifests": len(manifests), "files": files}

    # ------------------------------------------------------------------ the blob store against references

    def check_blobs(self, found: ScanResult, versions: int, chunks: list[tuple[str, int]],
                    parts: list[refs.PartRef], uploads: list[refs.UploadRecord], conn: apsw.Connection,
                    inconsistent: list[tuple]) -> None:
        done = self.progress.phase("references", 1)
        self.checked.add("objects.record_inconsistent")
        for tenant, bucket, key, version_id, what in inconsistent:
            ref = {"tenant": tenant, "bucket": bucket, "key": key, "version_id": version_id}
            detail = ("its size is not the sum of its chunk sizes" if what == "size"
                      else "its SHA-256 is not the hash of its only chunk")
            self.add("objects", "error", "objects.record_inconsistent",
                     f"version {version_id} of {bucket}/{key}: {detail}", {"problem": what, "references": [ref]},
                     identity={"problem": what, "reference": ref})
        listing, misplaced = found.blobs, found.misplaced
        self.checked.update({"objects.blob_missing", "multipart.part_blob_missing", "blobs.orphan",
                             "blobs.misplaced", "multipart.bucket_missing", "multipart.part_without_upload"})
        version_refs: dict[str, int] = {}
        get = version_refs.get
        for sha, _size in chunks:
            version_refs[sha] = get(sha, 0) + 1
        chunk_count = len(chunks)
        part_refs: dict[str, int] = {}
        for p in parts:
            part_refs[p.sha256] = part_refs.get(p.sha256, 0) + 1
        referenced = version_refs.keys() | part_refs.keys()

        def absent(shas: Iterable[str]) -> list[str]:
            # Not in the listing: look once more, it may have been written after the listing.
            out = []
            for sha in shas:
                if not isinstance(sha, str) or HEX64.fullmatch(sha) is None:
                    out.append(str(sha))  # a malformed reference can never be satisfied
                elif not os.path.exists(self.t.layout.blobs / sha[:2] / sha):
                    out.append(sha)
            return sorted(out)

        missing_v = absent(s for s in version_refs if s not in listing)
        missing_p = absent(s for s in part_refs if s not in listing)
        by_blob = self._references(conn, missing_v)
        for sha in missing_v:
            rs = by_blob.get(sha, [])
            self.add("objects", "error", "objects.blob_missing",
                     f"blob {sha} is referenced by {version_refs[sha]} version(s) but is not in the blob store",
                     {"blob": sha, "reference_count": version_refs[sha], "references": rs[:MAX_REFERENCES]},
                     identity={"blob": sha})
        part_by_blob: dict[str, list[dict[str, Any]]] = {}
        for p in parts:
            if p.sha256 in missing_p:
                part_by_blob.setdefault(p.sha256, []).append(
                    {"tenant": p.tenant, "bucket": p.bucket, "key": p.key, "upload_id": p.upload_id,
                     "part_number": p.part_number})
        for sha in missing_p:
            rs = part_by_blob.get(sha, [])
            self.add("multipart", "error", "multipart.part_blob_missing",
                     f"blob {sha} holds {len(rs)} uploaded multipart part(s) but is not in the blob store",
                     {"blob": sha, "references": rs[:MAX_REFERENCES]}, identity={"blob": sha})
        for p in parts:
            if p.bucket is None:
                self.add("multipart", "error", "multipart.part_without_upload",
                         f"part {p.part_number} belongs to upload {p.upload_id}, which does not exist",
                         {"upload_id": p.upload_id, "part_number": p.part_number})
        for u in uploads:
            if not u.bucket_exists:
                self.add("multipart", "error", "multipart.bucket_missing",
                         f"multipart upload {u.upload_id} is for bucket {u.bucket}, which does not exist",
                         {"tenant": u.tenant, "bucket": u.bucket, "key": u.key, "upload_id": u.upload_id})

        for path in misplaced:
            self.add("storage", "warning", "blobs.misplaced", f"{path} is named like a blob but stored elsewhere",
                     {"path": os.path.relpath(path, self.t.layout.root)})

        now = time.time()
        orphans = sorted(s for s in listing if s not in referenced)
        if orphans:
            # The walk overlapped the reference snapshot: a blob whose record committed
            # meanwhile is not an orphan. Only paid for when there are candidates.
            with conn:
                current = refs.referenced_blobs(conn)
            orphans = [s for s in orphans if s not in current]
        for sha in orphans:
            try:
                st = os.stat(listing[sha])
            except FileNotFoundError:
                continue  # removed meanwhile (gc)
            age = max(0, int(now - st.st_mtime))
            self.add("storage", "warning", "blobs.orphan",
                     f"blob {sha} ({st.st_size} bytes, {age} s old) is referenced by no version or part",
                     {"blob": sha, "size": st.st_size, "age_seconds": age}, identity={"blob": sha})

        stats: dict[str, Any] = {
            "on_disk": len(listing), "referenced": len(referenced), "version_chunks": chunk_count,
            "part_references": sum(part_refs.values()),
            "shared": sum(1 for s in referenced if version_refs.get(s, 0) + part_refs.get(s, 0) > 1),
            "missing": len(set(missing_v) | set(missing_p)), "orphans": len(orphans),
        }
        if self.deep:
            self.checked.update({"blobs.hash_mismatch", "objects.chunk_size"})
            stats["hashed"] = len(found.sizes)
            self._report_hashes(conn, found.bad, found.sizes, chunks, parts)
        self.report.checks["blobs"] = stats
        self.report.checks["objects"] = {"versions": versions, "inconsistent": len(inconsistent)}
        self.report.checks["multipart"] = {"uploads": len(uploads), "parts": len(parts)}
        done(1)

    @staticmethod
    def _references(conn: apsw.Connection, shas: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        shas = list(shas)
        if not shas:
            return out
        with conn:
            for sha, v in refs.versions_referencing(conn, shas):
                out.setdefault(sha, []).append(
                    {"tenant": v.tenant, "bucket": v.bucket, "key": v.key, "version_id": v.version_id})
        return out

    def _report_hashes(self, conn: apsw.Connection, bad: list[HashResult], sizes: dict[str, int],
                       chunks: list[tuple[str, int]], parts: list[refs.PartRef]) -> None:
        bad_names = {b.name for b in bad}
        by_blob = self._references(conn, bad_names)
        for b in sorted(bad, key=lambda r: r.name):
            if b.error is not None and not os.path.exists(b.path):
                continue  # removed after the listing (gc): the reference check covers it
            rs = by_blob.get(b.name, [])
            what = f"could not be read ({b.error})" if b.error else f"hashes to {b.actual}"
            self.add("storage", "error", "blobs.hash_mismatch",
                     f"blob {b.name} {what}: its content no longer matches its name",
                     {"blob": b.name, "actual_sha256": b.actual, "size": b.size, "references": rs[:MAX_REFERENCES]},
                     identity={"blob": b.name})
        wrong_size = {sha for sha, size in chunks
                      if sha not in bad_names and sizes.get(sha, size) != size}
        if wrong_size:
            with conn:
                affected = refs.versions_referencing(conn, wrong_size)
            for sha, v in affected:
                actual = sizes[sha]
                for csha, size in v.chunks:
                    if csha != sha or size == actual:
                        continue
                    ref = {"tenant": v.tenant, "bucket": v.bucket, "key": v.key, "version_id": v.version_id}
                    self.add("objects", "error", "objects.chunk_size",
                             f"version {v.version_id} of {v.bucket}/{v.key} records blob {sha} as {size} bytes; "
                             f"it is {actual}",
                             {"blob": sha, "expected": size, "actual": actual, "references": [ref]},
                             identity={"blob": sha, "reference": ref})
                    break
        for p in parts:
            actual = sizes.get(p.sha256)
            if actual is not None and actual != p.size and p.sha256 not in bad_names:
                ref = {"tenant": p.tenant, "bucket": p.bucket, "key": p.key, "upload_id": p.upload_id,
                       "part_number": p.part_number}
                self.add("multipart", "error", "objects.chunk_size",
                         f"part {p.part_number} of upload {p.upload_id} records {p.size} bytes; the blob is {actual}",
                         {"blob": p.sha256, "expected": p.size, "actual": actual, "references": [ref]},
                         identity={"blob": p.sha256, "reference": ref})

    # ------------------------------------------------------------------ orchestration

    def run(self) -> FsckReport:
        self.check_format()
        # The blob walk (and, deep, the hashing) runs on worker threads while this thread does
        # the catalog checks; SQLite and the file syscalls release the GIL, so they overlap.
        advance_scan = self.progress.phase("hashing blobs" if self.deep else "listing blobs")
        box: dict[str, Any] = {}

        def scan() -> None:
            try:
                box["scan"] = scan_blobs(self.t.layout.blobs, deep=self.deep, threads=self.hash_threads,
                                         on_progress=advance_scan)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                box["error"] = e

        scanner = threading.Thread(target=scan, name="anvil-fsck-scan", daemon=True)
        scanner.start()
        head: int | None = None
        catalog = self.t.catalog
        try:
            snapshot: dict[str, Any] = {}
            if catalog is None:
                self.add("storage", "error", "storage.catalog_open",
                         f"catalog.db cannot be opened: {self.t.open_error}", {"file": "catalog.db"})
            else:
                self.checked.add("storage.catalog_open")
                conn = catalog.reader()
                # integrity_check runs in SQLite's C code without the GIL: on its own read-only
                # connection and thread it overlaps the Python-heavy journal walk.
                integrity = threading.Thread(target=self._integrity_on_own_connection, args=(catalog,),
                                             name="anvil-fsck-integrity", daemon=True)
                integrity.start()
                self._guarded("journal", lambda: self.check_journal(conn))

                def read_refs() -> None:
                    with conn:  # one read transaction: one consistent view of every reference
                        snapshot["head"] = journal.head(conn)[0]
                        snapshot["versions"] = refs.count_versions(conn)
                        snapshot["chunks"] = refs.chunk_refs(conn)
                        snapshot["inconsistent"] = refs.inconsistent_versions(conn)
                        snapshot["parts"] = list(refs.iter_part_refs(conn))
                        snapshot["uploads"] = list(refs.iter_uploads(conn))
                        self.check_watch_cursors(conn, snapshot["head"])

                self._guarded("references", read_refs)
                head = snapshot.get("head")
                integrity.join()
            scanner.join()
            if "error" in box:
                raise box["error"]
            found: ScanResult = box["scan"]
            if "uploads" in snapshot:
                assert catalog is not None
                self.check_blobs(found, snapshot["versions"], snapshot["chunks"], snapshot["parts"],
                                 snapshot["uploads"], catalog.reader(), snapshot["inconsistent"])
            self.check_derived(head)
        finally:
            scanner.join()
        self.report.finished = time.time()
        return self.report

    def _integrity_on_own_connection(self, catalog: Catalog) -> None:
        def check() -> None:
            conn = apsw.Connection(str(catalog.path), flags=apsw.SQLITE_OPEN_READONLY)
            try:
                conn.setbusytimeout(10_000)
                self.check_integrity(conn)
            finally:
                conn.close()

        self._guarded("catalog", check)

    def _guarded(self, name: str, fn: Callable[[], None]) -> None:
        """A damaged catalog must not stop the other checks: the failure itself is a finding."""
        try:
            fn()
            self.checked.add(f"{name}.unreadable")
        except apsw.Error as e:
            self.report.checks[name] = {"ok": False, "error": str(e)}
            self.add("storage", "error", f"{name}.unreadable", f"the {name} check could not read catalog.db: {e}",
                     {"file": "catalog.db", "check": name}, identity={"file": "catalog.db", "check": name})


def run_fsck(
    target: Target, *, deep: bool = False, mode: str = "offline", progress: Progress | None = None,
    record: bool = True, actor: str = "system/fsck", request_id: str | None = None, hash_threads: int = 2,
) -> FsckReport:
    """Check everything, then record the findings (deduplicated against unresolved ones) and
    resolve earlier fsck findings this run checked again and no longer sees."""
    run = _Run(target, deep, mode, progress or Progress(), hash_threads)
    report = run.run()
    if record and target.catalog is not None:
        rid = request_id or report.run_id
        try:
            recorded = fnd.record_many(target.catalog, report.findings, actor=actor, request_id=rid, dedupe=True)
            report.new_findings = sum(1 for f in recorded if f.run_id == report.run_id)
            report.findings = recorded
            report.resolved = fnd.resolve_missing(
                target.catalog, origin="fsck", invariants=run.checked,
                still_present={f.fingerprint for f in recorded},
                resolution=f"not detected by fsck run {report.run_id}", actor=actor, request_id=rid,
            )
            mine = {f.id for f in recorded}
            report.unresolved_earlier = sum(
                1 for (fid,) in target.catalog.reader().execute("SELECT id FROM findings WHERE resolved_at IS NULL")
                if fid not in mine)
        except (apsw.Error, AnvilError) as e:
            report.record_error = f"findings could not be recorded: {e}"
    elif record:
        report.record_error = "findings could not be recorded: catalog.db cannot be opened"
    return report
