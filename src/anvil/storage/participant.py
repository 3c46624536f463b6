"""The storage core's recovery participants: the store itself, the journal and the blob store.

- `storage`: FORMAT, catalog.db's structural integrity and the manifests of derived
  generations under `derived/` (whatever family wrote them).
- `journal`: the hash chain, gapless from its base.
- `blobs`: every blob any participant references is present (a file, or a row of
  `inline_blobs`: small bodies stored inline), of the recorded size and (deep) hashes to its
  name; blobs nobody references are reported as orphans.
- `blob-digests` (derived): the per-chunk digest sidecars (`<hash>.chunks`) that verified reads
  use. A large blob without one, or one whose blob is gone, is a derived problem: `repair`
  recomputes them from the blobs (after checking each blob's SHA-256).

They use only `anvil.storage` itself; what references a blob comes from the other
participants through `RecoveryContext.references()`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from anvil.errors import AnvilError
from anvil.storage import inline, journal
from anvil.storage.blobs import CHUNK_ALGORITHM, CHUNK_ALGORITHMS, CHUNK_SIZE, BlobCorrupted, needs_sidecar
from anvil.storage.blobscan import HEX64, hash_file
from anvil.storage.layout import Layout
from anvil.storage.recovery import BlobRef, BucketScoped, Finding, Participant, RecoveryContext

MAX_FINDINGS = 50
MAX_REFERENCES = 20  # references listed in one finding; the count is always complete
MANIFEST = "MANIFEST.json"


def _affects(refs: list[BlobRef]) -> str:
    labels = [r.label for r in refs]
    return ", ".join(labels[:3]) + (f" (+{len(labels) - 3} more)" if len(labels) > 3 else "")


class StorageParticipant(Participant):
    """The store's own structure: nothing to back up beyond catalog.db and FORMAT, which the engine copies."""

    name = "storage"
    kind = "source"
    covers: list[str] = []
    # `reserve` is free space held back for a full disk (storage.space): not data, never backed up.
    owns = ["FORMAT", "catalog.db (structure)", "derived/*/MANIFEST.json", "reserve (free-space reserve)"]

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        try:
            info = Layout(ctx.root).read_format()
            return {"format": info.version}
        except AnvilError:
            return {"format": None}

    @classmethod
    def format_findings(cls, root: Path, stats: dict[str, dict[str, Any]] | None = None) -> list[Finding]:
        """FORMAT is readable and of a version this code knows (checkable even without a catalog)."""
        try:
            info = Layout(root).read_format()
        except AnvilError as e:
            if stats is not None:
                stats["format"] = {"ok": False}
            return [Finding(cls.name, "error", "FORMAT", e.message, "storage.format", {"file": "FORMAT"})]
        if stats is not None:
            stats["format"] = {"ok": True, "version": info.version, "deployment_id": info.deployment_id}
        return []

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        ctx.checked.add("storage.format")
        out = self.format_findings(ctx.root, ctx.stats)
        ctx.checked.add("storage.catalog_integrity")
        problems = ctx.catalog_problems()  # started early by fsck on its own thread (start_catalog_check)
        ctx.stats["catalog"] = {"ok": not problems, "messages": len(problems)}
        if problems:
            out.append(self.finding(
                "error", "catalog.db", f"integrity check reported {len(problems)} problem(s) in catalog.db: "
                f"{problems[0]}", "storage.catalog_integrity", {"file": "catalog.db", "messages": problems[:20]},
                identity={"file": "catalog.db"}))
        out += self._derived(ctx)
        return out

    def _derived(self, ctx: RecoveryContext) -> list[Finding]:
        """Every published generation's MANIFEST: files present, of their size, (deep) of their hash,
        and a cursor no later than the journal head."""
        root = ctx.root / "derived"
        manifests = sorted(Path(d) / MANIFEST for d, _, files in os.walk(root) if MANIFEST in files)
        if not manifests:
            ctx.stats["derived"] = {"skipped": "no derived manifests"}
            return []
        out: list[Finding] = []
        head = journal.head(ctx.conn)[0]
        advance = ctx.progress.phase("derived manifests", len(manifests))
        ctx.checked.update({"derived.manifest_invalid", "derived.file_missing", "derived.file_size",
                            "derived.cursor_ahead"})
        if ctx.deep:
            ctx.checked.add("derived.file_hash")
        files = 0
        for m in manifests:
            rel = m.relative_to(root)
            base = {"family": rel.parts[0], "generation": str(rel.parent), "manifest": f"derived/{rel}"}
            name = base["manifest"]
            try:
                body = json.loads(m.read_text())
                entries = body.get("files")
                if not isinstance(entries, list):
                    raise ValueError("'files' must be a list")
            except (OSError, ValueError, AttributeError) as e:
                out.append(self.finding("error", name, f"{name} is unreadable: {e}", "derived.manifest_invalid", base))
                continue
            cursor = body.get("cursor")
            if isinstance(cursor, int) and cursor > head:
                out.append(self.finding("error", name, f"{name} claims cursor {cursor}, beyond the journal head "
                                        f"{head}", "derived.cursor_ahead", {**base, "cursor": cursor, "head": head},
                                        identity=base, cursor=str(cursor)))
            for entry in entries:
                path = entry.get("path") if isinstance(entry, dict) else None
                sha = entry.get("sha256") if isinstance(entry, dict) else None
                if (not isinstance(path, str) or not isinstance(sha, str) or path.startswith("/")
                        or ".." in Path(path).parts):
                    out.append(self.finding("error", name, f"{name} lists an invalid file entry",
                                            "derived.manifest_invalid", {**base, "entry": entry}))
                    continue
                files += 1
                f = m.parent / path
                aff = {**base, "file": path}
                try:
                    size = f.stat().st_size
                except OSError:
                    out.append(self.finding("error", name, f"{name}: {path} is missing", "derived.file_missing", aff))
                    continue
                if isinstance(entry.get("size"), int) and entry["size"] != size:
                    out.append(self.finding("error", name, f"{name}: {path} is {size} bytes, the manifest says "
                                            f"{entry['size']}", "derived.file_size",
                                            {**aff, "expected": entry["size"], "actual": size}, identity=aff))
                    continue
                if ctx.deep:
                    actual, _, err = hash_file(str(f))
                    if actual != sha:
                        out.append(self.finding("error", name, f"{name}: {path} does not match its SHA-256"
                                                + (f" ({err})" if err else ""), "derived.file_hash",
                                                {**aff, "expected": sha, "actual": actual}, identity=aff))
            advance(1)
        ctx.stats["derived"] = {"manifests": len(manifests), "files": files}
        return out


class JournalParticipant(Participant):
    name = "journal"
    kind = "source"
    covers = ["object-journal"]
    owns = ["catalog.db: journal, journal_base, idempotency"]
    tables = ["journal", "idempotency"]
    summary_depends_on_buckets = False  # a partial restore appends to the chain; it never rewrites it
    # The recovery process's own events: a resume changes no rows; a partial restore drops the
    # other buckets' records again, through every bucket-scoped participant. Idempotency records
    # (`idempotency.record`, written with the mutation they answer) come back as they were.
    replays = ("recovery.", "idempotency.")
    summary_reuse = "head"  # the chain's head and length: the parent's while no event was appended

    def migrations(self) -> dict[str, list[str]]:
        from anvil.storage import holds, idempotency, inline, leases

        # The inline bodies', the leases' and the holds' tables are no event's to replay, but a
        # PostgreSQL store needs them created.
        return {"journal": journal.MIGRATIONS, "idempotency": idempotency.MIGRATIONS, "blobs": inline.MIGRATIONS,
                "leases": leases.MIGRATIONS, "holds": holds.MIGRATIONS}

    def apply(self, ctx: RecoveryContext, event: Any) -> None:
        if event.kind.startswith("idempotency."):
            from anvil.storage import idempotency

            if event.kind == idempotency.EVENT:
                idempotency.apply_event(ctx.conn, event)
            return
        if event.kind == "recovery.partial_restore":
            keep = set(event.payload.get("kept") or [])
            for p in ctx.participants:
                if isinstance(p, BucketScoped):
                    p.restrict_to_buckets(ctx.conn, keep)

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        seq, h = journal.head(ctx.conn)
        checked, problems = journal.verify_chain(ctx.conn)
        return {"head_seq": seq, "head_hash": h, "events": checked, "chain_verified": not problems,
                "chain_problems": len(problems)}

    def summary_after(self, ctx: RecoveryContext, recorded: dict[str, Any]) -> dict[str, Any] | None:
        """The parent's verified chain, extended: only the events after its head are hashed, anchored
        on the head hash it recorded (re-hashing every event was ~10 % of an incremental backup's
        CPU). Events at or before that head are not hashed again here: damage done to one since the
        parent was taken is found by a restore's validation (every event, `validate` above, and the
        summary it computes then differs from this one), by `anvil fsck` and `journal verify`, and by
        the full walk the backup engine asks for periodically (`backup.summaries`). None (a full
        walk) when the parent's chain was not verified, its head event is no longer the one it
        recorded, the journal was compacted past it, or the events after it do not verify."""
        try:
            seq0, h0, events0 = int(recorded["head_seq"]), str(recorded["head_hash"]), int(recorded["events"])
        except (KeyError, TypeError, ValueError):
            return None
        if recorded.get("chain_verified") is not True or recorded.get("chain_problems") or events0 < 0:
            return None
        conn = ctx.conn
        base_seq, base_hash = journal.base(conn)
        if base_seq > seq0:
            return None  # compacted past the parent's head: its anchor is gone
        row = conn.execute("SELECT hash FROM journal WHERE seq = ?", (seq0,)).fetchone()
        if (str(row[0]) if row else base_hash if base_seq == seq0 else None) != h0:
            return None  # not the event the parent verified: walk (and report) the whole chain
        _, problems = journal.verify_chain(conn, after=(seq0, h0))
        if problems:
            return None
        seq, h = journal.head(conn)
        # Every event still held (as the full walk counts them); a count runs in SQLite, not in Python.
        events = int(conn.execute("SELECT count(*) FROM journal").fetchone()[0])
        return {"head_seq": seq, "head_hash": h, "events": events, "chain_verified": True, "chain_problems": 0}

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        findings: list[Finding] = []
        done = ctx.progress.phase("journal chain", 1)
        ctx.checked.update({"journal.chain", "journal.gapless"})
        checked, problems = journal.verify_chain(ctx.conn)
        done(1)
        ctx.stats["journal"] = {"events": checked, "problems": len(problems)}
        for p in problems:
            inv = "journal.gapless" if p.problem.startswith("gap") else "journal.chain"
            findings.append(self.finding("error", f"journal seq {p.seq}", f"journal event {p.seq}: {p.problem}", inv,
                                         {"seq": p.seq}, cursor=str(p.seq)))
        if recorded:
            seq_s, hash_s = int(recorded["head_seq"]), recorded["head_hash"]
            row = ctx.conn.execute("SELECT hash FROM journal WHERE seq = ?", (seq_s,)).fetchone()
            head_seq, head_hash = journal.head(ctx.conn)
            if head_seq < seq_s:
                findings.append(self.finding("error", "journal head",
                                             f"head seq {head_seq} is before the recorded checkpoint seq {seq_s}",
                                             "journal.head_behind"))
            elif (row[0] if row else head_hash if head_seq == seq_s else None) != hash_s:
                findings.append(self.finding("error", f"journal seq {seq_s}",
                                             "hash at the checkpoint seq differs from the recorded chain hash",
                                             "journal.head_hash"))
        if not findings:
            findings.append(self.finding("info", "journal", f"{checked} events, hash chain intact"))
        return findings

    def smoke(self, client: Any, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        res = client.verify_journal()
        if not res.get("ok"):
            return [self.finding("error", "journal", f"server reports a broken chain: {res.get('problems')[:5]}")]
        head = client.health()["journal"]
        if recorded and head["seq"] < recorded["head_seq"]:
            return [self.finding("error", "journal", f"server head {head['seq']} < recorded {recorded['head_seq']}")]
        return [self.finding("info", "journal", f"server verified {res.get('checked')} events")]


class BlobsParticipant(Participant):
    """Blobs belong to the records that reference them; this participant checks the store against them."""

    name = "blobs"
    kind = "source"
    covers = ["object-bodies"]
    # Inline bodies travel inside catalog.db; the table is not replayed (no event carries bytes).
    owns = ["blobs/sha256/", "catalog.db: inline_blobs"]
    tables = ["inline_blobs"]
    # The referenced blobs change only with events; a snapshot whose head is its parent's takes
    # every blob over from the parent's tree (none is read again), so the parent's count holds.
    summary_reuse = "head"

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        # Counted from the blob store (files and inline bodies alike), so the summary is the same
        # whichever of the two holds a body.
        # Streamed in hash order (the references, the inline bodies): a backup's summary of a large
        # store holds neither set; inline sizes are merged as the two sorted streams go.
        present = 0
        total = 0
        referenced = 0
        inline_sizes = ctx.blobs.iter_inline_sizes()
        inline_cur = next(inline_sizes, None)
        # A remote backend is listed once (paged), not asked once per blob.
        stored = {b.sha256: b.size for b in ctx.blobs.list_blobs()} if ctx.blobs.remote else None
        # A blob file's path as a string: `BlobStore.path`'s Path objects cost more than the stat.
        root = None if stored is not None else os.fspath(ctx.blobs.root) + os.sep
        digest = hashlib.sha256()  # of the hashes joined by newlines
        for sha, _ in ctx.referenced_blobs():
            digest.update(b"\n" + sha.encode() if referenced else sha.encode())
            referenced += 1
            while inline_cur is not None and inline_cur[0] < sha:
                inline_cur = next(inline_sizes, None)
            if inline_cur is not None and inline_cur[0] == sha and root is not None:
                # An inline body (its size is its content's, as a file of the same hash would have):
                # no failed stat per small body (~1 s of a summary at 100,000 inline bodies).
                present += 1
                total += inline_cur[1]
                continue
            # One stat per blob (not exists() and then stat()): every snapshot pays this per blob.
            try:
                if root is None:
                    size = stored[sha]  # type: ignore[index]
                elif HEX64.fullmatch(sha):
                    size = os.stat(f"{root}{sha[:2]}{os.sep}{sha}").st_size
                else:
                    raise ValueError("not a sha256 hex digest")  # as BlobStore.path refuses a malformed reference
            except (FileNotFoundError, KeyError):
                if inline_cur is None or inline_cur[0] != sha:
                    continue
                size = inline_cur[1]
            present += 1
            total += size
        return {"referenced": referenced, "present": present, "bytes": total, "digest": digest.hexdigest()}

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        # The walk starts before references are read: a blob written after the walk can never look
        # like an orphan, and a referenced blob missing from the walk is looked up again on disk.
        ctx.start_blob_scan()
        refs = ctx.references()
        found = ctx.blob_scan()
        done = ctx.progress.phase("references", 1)
        listing = found.blobs
        inlined = inline.rows(ctx.conn)  # sha256 -> size, from the same catalog as refs
        out: list[Finding] = []
        invariants = {r.missing_invariant for rs in refs.values() for r in rs}
        ctx.checked.update({"blobs.orphan", "blobs.misplaced", "objects.blob_missing", *invariants})

        def absent(sha: str) -> bool:
            if HEX64.fullmatch(sha or "") is None:
                return True  # a malformed reference can never be satisfied
            return sha not in listing and sha not in inlined and ctx.blobs.stat(sha) is None

        missing = [sha for sha in refs if absent(sha)]
        # `affected.sha256` is the key `anvil repair blobs --from-backup` closes findings by.
        for sha in missing:
            rs = refs[sha]
            n = len(rs)
            out.append(self.finding(
                "error", f"blob {sha}", f"blob {sha} is missing from the blob store; it is referenced {n} time(s); "
                f"affects {_affects(rs)}", rs[0].missing_invariant,
                {"blob": sha, "sha256": sha, "reference_count": n,
                 "references": [r.ref for r in rs[:MAX_REFERENCES]]},
                identity={"blob": sha}))
        for path in found.misplaced:
            out.append(self.finding("warning", path, f"{path} is named like a blob but stored elsewhere",
                                    "blobs.misplaced", {"path": os.path.relpath(path, ctx.root)}))
        orphans = [s for s in listing if s not in refs]
        inline_orphans = [s for s in inlined if s not in refs]
        if orphans or inline_orphans:
            # The walk overlapped the reference read: a blob whose record committed meanwhile is no
            # orphan. Read the references once more, only when there are candidates.
            ctx.clear_references()
            current = ctx.references()
            orphans = sorted(s for s in orphans if s not in current)
            inline_orphans = sorted(s for s in inline_orphans if s not in current)
        now = time.time()
        for sha in orphans:
            st = ctx.blobs.stat(sha)
            if st is None:
                continue  # removed meanwhile (gc)
            age = max(0, int(now - st[1]))
            out.append(self.finding("warning", f"blob {sha}",
                                    f"blob {sha} ({st[0]} bytes, {age} s old) is referenced by no record",
                                    "blobs.orphan", {"blob": sha, "size": st[0], "age_seconds": age},
                                    identity={"blob": sha}))
        stored_at = inline.stored_at(ctx.conn, inline_orphans)
        for sha in inline_orphans:
            size, stored = inlined[sha], stored_at.get(sha)
            if stored is None:
                continue  # removed meanwhile (gc)
            age = max(0, int(now - stored))
            out.append(self.finding("warning", f"blob {sha}",
                                    f"inline blob {sha} ({size} bytes, {age} s old) is referenced by no record",
                                    "blobs.orphan", {"blob": sha, "size": size, "age_seconds": age,
                                                     "inline": True},
                                    identity={"blob": sha}))
        orphans += inline_orphans
        stats: dict[str, Any] = {
            "on_disk": len(listing), "inline": len(inlined), "referenced": len(refs),
            "references": sum(len(rs) for rs in refs.values()),
            "shared": sum(1 for rs in refs.values() if len(rs) > 1),
            "missing": len(missing), "orphans": len(orphans),
        }
        if ctx.deep:
            ctx.checked.update({"blobs.hash_mismatch", "objects.chunk_size"})
            hashed_inline, inline_bad = ctx.inline_check()
            stats["hashed"] = len(found.sizes) + hashed_inline
            out += self._hashes(ctx, refs, found)
            out += self._inline_hashes(refs, listing, inlined, inline_bad)
        ctx.stats["blobs"] = stats
        if recorded and recorded.get("digest") and recorded["digest"] != self.summary(ctx)["digest"]:
            out.append(self.finding("error", "blobs", "the set of referenced blobs differs from the recorded one",
                                    "blobs.reference_set"))
        if not out:
            out.append(self.finding("info", "blobs", f"{len(refs)} referenced blobs present"
                                    + (" and re-hashed" if ctx.deep else "")))
        done(1)
        return out

    def _inline_hashes(self, refs: dict[str, list[BlobRef]], listing: dict[str, str], inlined: dict[str, int],
                       bad: list[tuple[str, int, int, str]]) -> list[Finding]:
        """Deep: every inline body hashes to its address (`bad`: those that do not, or whose length
        differs from their row's size) and has the size its references record. A body that
        passed has its row's size, so the references are compared with `inlined` (sha -> size)."""
        out: list[Finding] = []
        failed = set()
        for sha, recorded, size, actual in sorted(bad):
            failed.add(sha)
            rs = refs.get(sha, [])
            out.append(self.finding(
                "error", f"blob {sha}", f"inline blob {sha} hashes to {actual} ({size} bytes, {recorded} "
                "recorded): its content no longer matches its name" + (f"; affects {_affects(rs)}" if rs else ""),
                "blobs.hash_mismatch",
                {"blob": sha, "sha256": sha, "actual_sha256": actual, "size": size, "inline": True,
                 "references": [r.ref for r in rs[:MAX_REFERENCES]]}, identity={"blob": sha}))
        for sha, size in inlined.items():
            if sha in failed or sha in listing:
                continue  # reported above; or also stored as a file: its sizes are checked against the file
            for r in refs.get(sha, ()):
                if r.size != size:
                    out.append(self.finding(
                        "error", r.label, f"{r.label} records blob {sha} as {r.size} bytes; it is {size}",
                        "objects.chunk_size",
                        {"blob": sha, "expected": r.size, "actual": size, "references": [r.ref]},
                        identity={"blob": sha, "reference": r.ref}))
        return out

    def _hashes(self, ctx: RecoveryContext, refs: dict[str, list[BlobRef]], found: Any) -> list[Finding]:
        out: list[Finding] = []
        bad = {b.name for b in found.bad}
        for b in sorted(found.bad, key=lambda r: r.name):
            if b.error is not None and ctx.blobs.stat(b.name) is None:
                continue  # removed after the listing (gc): the reference check covers it
            rs = refs.get(b.name, [])
            what = f"could not be read ({b.error})" if b.error else f"hashes to {b.actual}"
            out.append(self.finding(
                "error", f"blob {b.name}", f"blob {b.name} {what}: its content no longer matches its name"
                + (f"; affects {_affects(rs)}" if rs else ""), "blobs.hash_mismatch",
                {"blob": b.name, "sha256": b.name, "actual_sha256": b.actual, "size": b.size,
                 "references": [r.ref for r in rs[:MAX_REFERENCES]]}, identity={"blob": b.name}))
        for sha, rs in refs.items():
            actual = found.sizes.get(sha)
            if actual is None or sha in bad:
                continue
            for r in rs:
                if r.size != actual:
                    out.append(self.finding(
                        "error", r.label, f"{r.label} records blob {sha} as {r.size} bytes; it is {actual}",
                        "objects.chunk_size",
                        {"blob": sha, "expected": r.size, "actual": actual, "references": [r.ref]},
                        identity={"blob": sha, "reference": r.ref}))
        return out


# A sidecar is written just before its blob is named: one younger than this without its blob may
# belong to a write in progress, so it is neither reported nor removed.
SIDECAR_GRACE = 300.0


class BlobDigestsParticipant(Participant):
    """Per-chunk digests of large blobs (`blobs/sha256/ab/<hash>.chunks`), derived from the blobs.

    Not backed up: a restored store has none, and reads (or `repair`) recompute them from blobs
    whose SHA-256 matched their address."""

    name = "blob-digests"
    kind = "derived"
    covers: list[str] = []
    owns = ["blobs/sha256/*/*.chunks"]
    summary_depends_on_buckets = False

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        # Nothing store-specific: the sidecars are recomputed, not restored.
        return {"chunk_size": CHUNK_SIZE, "algorithm": CHUNK_ALGORITHMS[CHUNK_ALGORITHM][0]}

    def _large(self, ctx: RecoveryContext) -> dict[str, int]:
        """Referenced blobs over one chunk (hash -> recorded size): the ones that need a sidecar."""
        return {sha: rs[0].size for sha, rs in ctx.references().items()
                if rs and needs_sidecar(rs[0].size) and HEX64.fullmatch(sha or "")}

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        ctx.checked.update({"blobs.sidecar_missing", "blobs.sidecar_invalid", "blobs.sidecar_orphan"})
        out: list[Finding] = []
        sidecars = dict(ctx.blobs.list_sidecars())
        checked = 0
        missing: list[str] = []
        for sha, size in sorted(self._large(ctx).items()):
            st = ctx.blobs.stat(sha)
            if st is None:
                continue  # the blobs participant reports the missing blob
            if st[0] != size:
                continue  # ... and a blob of the wrong size
            checked += 1
            problem = ctx.blobs.sidecar_problem(sha, size) if sha in sidecars else "missing"
            if problem == "missing":
                missing.append(sha)
            elif problem is not None:
                out.append(self.finding(
                    "error", f"blob {sha}", f"the chunk digests of blob {sha} are damaged ({problem}); "
                    "`anvil repair` rewrites them", "blobs.sidecar_invalid",
                    {"blob": sha, "sha256": sha, "problem": problem}, identity={"blob": sha}))
        if missing:
            # One finding, not one per blob: a store upgraded from before sidecars (or restored: they
            # are not backed up) has every large blob in this state, and reads handle it anyway.
            out.append(self.finding(
                "warning", "blob-digests", f"{len(missing)} blob(s) over {CHUNK_SIZE // 1024 // 1024} MiB have no "
                "chunk digests: reads verify them by their full SHA-256 until `anvil repair blob-digests` (or "
                "their first read) writes them", "blobs.sidecar_missing",
                {"count": len(missing), "blobs": missing[:MAX_REFERENCES]},
                identity={"invariant": "blobs.sidecar_missing"}))
        now = time.time()
        for sha, mtime in sorted(sidecars.items()):
            if ctx.blobs.stat(sha) is not None:
                continue
            if now - mtime >= SIDECAR_GRACE:
                where = (ctx.blobs.location(sha) + ".chunks" if ctx.blobs.remote
                         else os.path.relpath(ctx.blobs.sidecar_path(sha), ctx.root))
                out.append(self.finding(
                    "warning", f"sidecar {sha}", f"chunk digests for blob {sha}, which is not in the blob store",
                    "blobs.sidecar_orphan", {"blob": sha, "sha256": sha, "path": where},
                    identity={"blob": sha}))
        ctx.stats["blob_digests"] = {"large_blobs": checked, "sidecars": len(sidecars)}
        return out

    def rebuild(self, ctx: RecoveryContext) -> list[Finding]:
        """Write the missing or damaged sidecars of large blobs (each blob's SHA-256 checked first)
        and drop sidecars whose blob is gone."""
        out: list[Finding] = []
        written = 0
        for blob in ctx.blobs.list_blobs():
            sha, size = blob.sha256, blob.size
            if not needs_sidecar(size) or ctx.blobs.sidecar_problem(sha, size) is None:
                continue
            try:
                written += ctx.blobs.rebuild_sidecar(sha)
            except BlobCorrupted as e:
                out.append(self.finding(
                    "warning", f"blob {sha}", f"blob {sha} {e.detail}: no digests written (fsck --deep reports it)",
                    "blobs.hash_mismatch", {"blob": sha, "sha256": sha}, identity={"blob": sha}))
        removed = 0
        now = time.time()
        for sha, mtime in list(ctx.blobs.list_sidecars()):
            if ctx.blobs.stat(sha) is None and now - mtime >= SIDECAR_GRACE:
                removed += ctx.blobs.remove_sidecar(sha)
        out.append(self.finding("info", "blob-digests", f"wrote {written} chunk-digest sidecar(s), removed "
                                f"{removed} without a blob", affected={"written": written, "removed": removed}))
        return out
