"""Recovery participants of artefacts: `artefacts` (source: manifests, tags, signing keys) and
`tensors` (derived: the tensor index of each safetensors and GGUF component)."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from anvil import artefact_format as mf
from anvil.artefacts.service import (
    MIGRATIONS,
    TENSOR_DIR,
    compute_tensor_index,
    load_tensor_index,
    tensor_index_path,
    write_tensor_index,
)
from anvil.errors import AnvilError
from anvil.storage.blobs import BlobCorrupted
from anvil.storage.records import Connection, table_exists
from anvil.storage.recovery import BlobRef, Finding, Participant, RecoveryContext

MAX_FINDINGS = 50


def _present(conn: Connection) -> bool:
    return table_exists(conn, "artefacts")


def _safetensors_components(conn: Connection) -> dict[str, tuple[int, str]]:
    """sha256 -> (size, a path) of every safetensors component any manifest lists."""
    out: dict[str, tuple[int, str]] = {}
    if not _present(conn):
        return out
    for path, sha, size in conn.execute("SELECT path, sha256, size FROM artefact_components ORDER BY sha256, path"):
        if mf.is_indexed(path):
            out.setdefault(sha, (size, path))
    return out


class ArtefactsParticipant(Participant):
    name = "artefacts"
    kind = "source"
    covers = ["artefacts"]
    owns = ["catalog.db: artefacts, artefact_components, artefact_tags, artefact_keys, artefact_uploads"]
    tables = ["artefacts", "artefact_components", "artefact_tags", "artefact_keys", "artefact_uploads"]
    replays = ("artefact.",)

    def migrations(self) -> dict[str, list[str]]:
        return {"artefacts": MIGRATIONS}

    def apply(self, ctx: RecoveryContext, event: Any) -> None:
        from anvil.artefacts import replay

        replay.apply(ctx.conn, event)

    def event_blobs(self, event: Any) -> list[tuple[str, int]]:
        """An uploaded component's blob (a push only references blobs uploaded before it)."""
        p = event.payload
        if event.kind == "artefact.upload":
            return [(p["sha256"], int(p["size"]))]
        return []

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        conn = ctx.conn
        if not _present(conn):
            return {"artefacts": 0, "components": 0, "tags": 0, "keys": 0, "digest": hashlib.sha256().hexdigest(),
                    "per_bucket": {}}
        h = hashlib.sha256()
        per_bucket: dict[str, dict[str, int]] = {}
        n = 0
        for bucket, aid, sigs in conn.execute("SELECT bucket, id, signatures FROM artefacts ORDER BY bucket, id"):
            h.update(json.dumps(["a", bucket, aid, sigs]).encode() + b"\n")
            per_bucket.setdefault(bucket, {"artefacts": 0, "tags": 0})["artefacts"] += 1
            n += 1
        comps = 0
        for row in conn.execute("SELECT bucket, artefact_id, path, sha256, size FROM artefact_components "
                                "ORDER BY bucket, artefact_id, path"):
            h.update(json.dumps(["c", *row]).encode() + b"\n")
            comps += 1
        tags = 0
        for row in conn.execute("SELECT bucket, name, tag, artefact_id, required_key FROM artefact_tags "
                                "ORDER BY bucket, name, tag"):
            h.update(json.dumps(["t", *row]).encode() + b"\n")
            per_bucket.setdefault(row[0], {"artefacts": 0, "tags": 0})["tags"] += 1
            tags += 1
        keys = 0
        for row in conn.execute("SELECT tenant, key_id, public_key FROM artefact_keys ORDER BY tenant, key_id"):
            h.update(json.dumps(["k", *row]).encode() + b"\n")
            keys += 1
        return {"artefacts": n, "components": comps, "tags": tags, "keys": keys, "digest": h.hexdigest(),
                "per_bucket": per_bucket}

    def blob_references(self, ctx: RecoveryContext) -> Iterator[BlobRef]:
        if not _present(ctx.conn):
            return
        for bucket, aid, path, sha, size, tenant, name in ctx.conn.execute(
            "SELECT c.bucket, c.artefact_id, c.path, c.sha256, c.size, a.tenant, a.name FROM artefact_components c "
            "LEFT JOIN artefacts a ON a.bucket = c.bucket AND a.id = c.artefact_id ORDER BY c.sha256"
        ):
            ref = {"tenant": tenant, "bucket": bucket, "artefact": aid, "name": name, "path": path}
            yield BlobRef(sha, size, f"artefact {bucket}/{name}@{aid[:12]}:{path}", ref, "artefacts.component_missing")

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        """Each manifest hashes to its id and lists exactly its component rows; each component blob
        is present with its size (its hash is the blobs participant's deep check); each signature
        verifies with its tenant's key; each tag points to an existing artefact of its name."""
        conn = ctx.conn
        out: list[Finding] = []
        invariants = ["artefacts.manifest_id", "artefacts.components_differ", "artefacts.component_missing",
                      "artefacts.signature_invalid", "artefacts.tag_target_missing", "artefacts.base_missing",
                      "artefacts.summary_differs"]
        ctx.checked.update(invariants)

        def add(sev: str, subject: str, message: str, inv: str, affected: dict[str, Any]) -> None:
            if len(out) < MAX_FINDINGS:
                out.append(self.finding(sev, subject, message, inv, affected))  # type: ignore[arg-type]

        if not _present(conn):
            return out
        n = 0
        with conn:
            keys = {(t, k): base64.b64decode(p) for t, k, p in
                    conn.execute("SELECT tenant, key_id, public_key FROM artefact_keys")}
            comps: dict[tuple[str, str], list[tuple[str, str, int]]] = {}
            component_blobs: set[str] = set()
            for bucket, aid, path, sha, size in conn.execute(
                    "SELECT bucket, artefact_id, path, sha256, size FROM artefact_components ORDER BY path"):
                comps.setdefault((bucket, aid), []).append((path, sha, size))
                component_blobs.add(sha)
            ids = set()
            for bucket, aid, tenant, name, body, sigs in conn.execute(
                    "SELECT bucket, id, tenant, name, manifest, signatures FROM artefacts ORDER BY bucket, id"):
                n += 1
                ids.add((bucket, aid, name))
                subject = f"artefact {bucket}/{name}@{aid[:12]}"
                aff = {"tenant": tenant, "bucket": bucket, "artefact": aid, "name": name}
                if hashlib.sha256(body.encode()).hexdigest() != aid:
                    add("error", subject, f"{subject}: the stored manifest does not hash to its id",
                        "artefacts.manifest_id", aff)
                    continue
                m = json.loads(body)
                listed = sorted((c["path"], c["sha256"], c["size"]) for c in m["components"])
                if listed != sorted(comps.pop((bucket, aid), [])):
                    add("error", subject, f"{subject}: component records differ from the manifest",
                        "artefacts.components_differ", aff)
                for s in json.loads(sigs):
                    key = keys.get((tenant, s["key_id"]))
                    if key is None or not mf.verify_signature(body.encode(), s, key):
                        add("error", subject, f"{subject}: signature by {s['key_id']!r} does not verify"
                            + (" (key not registered)" if key is None else ""), "artefacts.signature_invalid",
                            {**aff, "key_id": s["key_id"]})
            for bucket, aid, name, body in conn.execute("SELECT bucket, id, name, manifest FROM artefacts"):
                base = json.loads(body).get("base")
                if base and not any(b == bucket and i == base for b, i, _ in ids):
                    add("error", f"artefact {bucket}/{name}@{aid[:12]}", f"base artefact {base} is missing",
                        "artefacts.base_missing", {"bucket": bucket, "artefact": aid, "base": base})
            for (bucket, aid), _ in comps.items():
                add("error", f"artefact {bucket}@{aid[:12]}", f"component records of a missing artefact {aid}",
                    "artefacts.components_differ", {"bucket": bucket, "artefact": aid})
            for bucket, name, tag, aid in conn.execute(
                    "SELECT bucket, name, tag, artefact_id FROM artefact_tags WHERE artefact_id IS NOT NULL"):
                if (bucket, aid, name) not in ids:
                    add("error", f"tag {bucket}/{name}:{tag}", f"tag {tag} of {bucket}/{name} points to missing "
                        f"artefact {aid}", "artefacts.tag_target_missing",
                        {"bucket": bucket, "name": name, "tag": tag, "artefact": aid})
            # Presence and size of every component blob (hashes: the blobs participant, when deep). Only
            # the components' blobs are looked up: not a pass over every object's references.
            references = ctx.references()
            for sha in sorted(component_blobs):
                mine = [r for r in references.get(sha, ()) if r.missing_invariant == "artefacts.component_missing"]
                if not mine:
                    continue
                try:
                    size: int | None = ctx.blobs.size(sha)  # a file or an inline body
                except FileNotFoundError:
                    size = None
                if size != mine[0].size:
                    add("error", mine[0].label, f"component blob {sha} is "
                        + ("missing" if size is None else f"{size} bytes, {mine[0].size} recorded"),
                        "artefacts.component_missing", {"sha256": sha, "references": [r.ref for r in mine[:10]]})
        ctx.stats["artefacts"] = {"artefacts": n}
        if recorded:
            now = self.summary(ctx)
            for field in ("digest", "artefacts", "components", "tags", "keys"):
                if field in recorded and recorded[field] != now[field]:
                    add("error", f"artefacts {field}", f"restored {now[field]!r}, recorded {recorded[field]!r}",
                        "artefacts.summary_differs", {"field": field})
        if not out:
            out.append(self.finding("info", "artefacts", f"{n} artefacts: manifests, signatures and tags consistent"))
        return out

    def restrict_to_buckets(self, conn: Connection, buckets: set[str]) -> dict[str, Any]:
        if not _present(conn):
            return {"kept": [], "dropped": []}
        present = {r[0] for r in conn.execute("SELECT bucket FROM artefacts")}
        present |= {r[0] for r in conn.execute("SELECT bucket FROM artefact_tags")}
        dropped = sorted(present - buckets)
        if dropped:
            marks = ",".join("?" * len(dropped))
            for table in ("artefact_components", "artefact_tags", "artefacts"):
                conn.execute(f"DELETE FROM {table} WHERE bucket IN ({marks})", dropped)
        return {"kept": sorted(present & buckets), "dropped": dropped}

    def smoke(self, client: Any, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        """Pull one artefact whole through the Hugging Face-compatible path and verify every file."""
        if not _present(ctx.conn):
            return []
        row = ctx.conn.execute(
            "SELECT bucket, name, id FROM artefacts WHERE kind = 'model' ORDER BY seq DESC LIMIT 1").fetchone()
        if row is None:
            return [self.finding("info", "artefacts", "no model artefact to pull")]
        bucket, name, aid = row
        subject = f"artefact {bucket}/{name}@{aid[:12]}"
        try:
            files = client.hf_pull_verified(bucket, name, aid)
        except Exception as e:  # noqa: BLE001 - any failure of the pull is the finding
            return [self.finding("error", subject, f"pull through the Hugging Face-compatible API failed: {e}",
                                 "artefacts.smoke_pull")]
        return [self.finding("info", subject, f"pulled {files} file(s) through the Hugging Face-compatible API "
                             "and verified every SHA-256")]


class ArtefactTensorsParticipant(Participant):
    """The tensor index of each safetensors component (`derived/artefact-tensors/ab/<sha256>.json`),
    parsed from the component's header; backed up, checked against the header, rebuilt from blobs."""

    name = "tensors"
    kind = "derived"
    covers = ["artefacts"]
    owns = [TENSOR_DIR]
    summary_depends_on_buckets = True

    def files(self, ctx: RecoveryContext) -> list[Path]:
        root = ctx.root / TENSOR_DIR
        return sorted(p for p in root.rglob("*.json")) if root.is_dir() else []

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        comps = _safetensors_components(ctx.conn)
        h = hashlib.sha256()
        tensors = 0
        for sha in sorted(comps):
            ts = load_tensor_index(ctx.root, sha)
            h.update(json.dumps([sha, ts], sort_keys=True).encode() + b"\n")
            tensors += len(ts or [])
        return {"files": len(comps), "tensors": tensors, "digest": h.hexdigest()}

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        ctx.checked.update({"artefacts.tensor_index_missing", "artefacts.tensor_index_differs"})
        out: list[Finding] = []
        for sha, (size, path) in sorted(_safetensors_components(ctx.conn).items()):
            if len(out) >= MAX_FINDINGS:
                break
            aff = {"sha256": sha, "path": path, "file": str(tensor_index_path(ctx.root, sha).relative_to(ctx.root))}
            stored = load_tensor_index(ctx.root, sha)
            if stored is None:
                out.append(self.finding("error", f"tensor index {sha[:12]}", f"the tensor index of {path} ({sha}) "
                                        "is missing or unreadable; `anvil repair tensors` rebuilds it",
                                        "artefacts.tensor_index_missing", aff))
                continue
            try:
                fresh = compute_tensor_index(ctx.blobs, sha, size, path)
            except (AnvilError, BlobCorrupted):
                continue  # the blob itself is missing or damaged: the blobs/artefacts findings say so
            if fresh != stored:
                out.append(self.finding("error", f"tensor index {sha[:12]}", f"the tensor index of {path} ({sha}) "
                                        "does not match the file's header", "artefacts.tensor_index_differs", aff))
        return out

    def rebuild(self, ctx: RecoveryContext) -> list[Finding]:
        written = 0
        out: list[Finding] = []
        for sha, (size, path) in sorted(_safetensors_components(ctx.conn).items()):
            try:
                fresh = compute_tensor_index(ctx.blobs, sha, size, path)
            except (AnvilError, BlobCorrupted) as e:
                out.append(self.finding("warning", f"tensor index {sha[:12]}", f"cannot index {path}: {e}",
                                        "artefacts.tensor_index_missing", {"sha256": sha, "path": path}))
                continue
            if load_tensor_index(ctx.root, sha) != fresh:
                write_tensor_index(ctx.root, sha, fresh)
                written += 1
        out.append(self.finding("info", "tensors", f"rewrote {written} tensor index file(s)",
                                affected={"written": written}))
        return out
