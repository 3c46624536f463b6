"""The objects subsystem's recovery participant: buckets, versions, delete markers, multipart state.

It is the only backup-related code that knows the objects tables; the backup engine,
restore, validation and the drill reach them only through this participant.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import apsw

from anvil.backup.participant import Finding, Participant, RecoveryContext

MAX_FINDINGS = 50
MAX_PREFIXES = 100


def _listing_row(bucket: str, key: str, version_id: str, is_latest: int, delete_marker: int, size: int,
                 etag: str) -> str:
    """The fields a client sees in a version listing; the drill recomputes this digest over the API."""
    return json.dumps([bucket, key, version_id, bool(is_latest), bool(delete_marker), size, etag],
                      separators=(",", ":"), ensure_ascii=False)


def listing_digest(rows: list[str]) -> str:
    h = hashlib.sha256()
    for r in sorted(rows):
        h.update(r.encode())
        h.update(b"\n")
    return h.hexdigest()


def find_version(conn: apsw.Connection, bucket: str, key: str, version_id: str | None = None) -> dict[str, Any] | None:
    """A version's record as stored (latest when `version_id` is None), for `anvil backup get`."""
    if version_id is None:
        row = conn.execute(
            "SELECT version_id, delete_marker, size, sha256, chunks, etag, content_type FROM versions "
            "WHERE bucket = ? AND key = ? AND is_latest = 1", (bucket, key)).fetchone()
    else:
        row = conn.execute(
            "SELECT version_id, delete_marker, size, sha256, chunks, etag, content_type FROM versions "
            "WHERE bucket = ? AND key = ? AND version_id = ?", (bucket, key, version_id)).fetchone()
    if row is None:
        return None
    return {"version_id": row[0], "delete_marker": bool(row[1]), "size": row[2], "sha256": row[3],
            "chunks": [tuple(c) for c in json.loads(row[4])], "etag": row[5], "content_type": row[6]}


def iter_versions(conn: apsw.Connection) -> Iterator[dict[str, Any]]:
    """Every version row (bucket, key order), as the drill needs it to prove reads."""
    for row in conn.execute(
        "SELECT bucket, key, version_id, delete_marker, size, sha256, chunks, etag FROM versions "
        "ORDER BY bucket, key, seq"
    ):
        yield {"bucket": row[0], "key": row[1], "version_id": row[2], "delete_marker": bool(row[3]),
               "size": row[4], "sha256": row[5], "chunks": [tuple(c) for c in json.loads(row[6])], "etag": row[7]}


class ObjectsParticipant(Participant):
    name = "objects"
    kind = "source"
    covers = ["object-bodies", "bucket-metadata", "path-indexes"]
    owns = ["catalog.db: buckets, versions, multipart_uploads, multipart_parts"]

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        conn = ctx.conn
        rows_digest = hashlib.sha256()
        listing: list[str] = []
        per_bucket: dict[str, dict[str, Any]] = {}
        for name, versioning in conn.execute("SELECT name, versioning FROM buckets ORDER BY name"):
            per_bucket[name] = {"versioning": versioning or "Unversioned", "objects": 0, "versions": 0,
                                "delete_markers": 0, "bytes": 0, "prefixes": {}}
        totals = {"versions": 0, "delete_markers": 0, "objects": 0, "bytes": 0}
        for row in conn.execute(
            "SELECT bucket, key, version_id, seq, is_latest, delete_marker, size, etag, sha256, chunks "
            "FROM versions ORDER BY bucket, key, version_id"
        ):
            bucket, key, vid, seq, latest, dm, size, etag, sha, chunks = row
            rows_digest.update(json.dumps([bucket, key, vid, seq, latest, dm, size, etag, sha, chunks],
                                          separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
            if key.startswith("_anvil/"):
                continue  # never visible through the API, so not part of what the drill can prove
            listing.append(_listing_row(bucket, key, vid, latest, dm, size, etag))
            b = per_bucket.setdefault(bucket, {"versioning": "?", "objects": 0, "versions": 0,
                                               "delete_markers": 0, "bytes": 0, "prefixes": {}})
            b["versions"] += 1
            totals["versions"] += 1
            if dm:
                b["delete_markers"] += 1
                totals["delete_markers"] += 1
            b["bytes"] += size
            totals["bytes"] += size
            if latest and not dm:
                b["objects"] += 1
                totals["objects"] += 1
                head, sep, _ = key.partition("/")
                if sep:
                    prefixes = b["prefixes"]
                    if head + "/" in prefixes or len(prefixes) < MAX_PREFIXES:
                        prefixes[head + "/"] = prefixes.get(head + "/", 0) + 1
        uploads = conn.execute("SELECT count(*) FROM multipart_uploads").fetchone()[0]
        parts = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM multipart_parts").fetchone()
        return {
            "buckets": len(per_bucket), **totals,
            "multipart_uploads": uploads, "multipart_parts": parts[0], "multipart_part_bytes": parts[1],
            "rows_digest": rows_digest.hexdigest(), "listing_digest": listing_digest(listing),
            "per_bucket": per_bucket,
        }

    def blob_references(self, ctx: RecoveryContext) -> Iterator[tuple[str, str]]:
        for bucket, key, vid, chunks in ctx.conn.execute(
            "SELECT bucket, key, version_id, chunks FROM versions WHERE delete_marker = 0"
        ):
            for sha, _size in json.loads(chunks):
                yield sha, f"{bucket}/{key}@{vid}"
        for bucket, key, upload_id, part, sha in ctx.conn.execute(
            "SELECT u.bucket, u.key, u.upload_id, p.part_number, p.sha256 FROM multipart_parts p "
            "JOIN multipart_uploads u USING(upload_id)"
        ):
            yield sha, f"{bucket}/{key} upload {upload_id} part {part}"

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        findings: list[Finding] = []
        conn = ctx.conn

        def add(severity: str, subject: str, message: str) -> None:
            if len(findings) < MAX_FINDINGS:
                findings.append(self.finding(severity, subject, message))  # type: ignore[arg-type]

        checked = 0
        for bucket, key, vid, dm, size, sha, chunks in conn.execute(
            "SELECT bucket, key, version_id, delete_marker, size, sha256, chunks FROM versions"
        ):
            checked += 1
            subject = f"{bucket}/{key}@{vid}"
            chunk_list = json.loads(chunks)
            if dm:
                continue
            if sum(c[1] for c in chunk_list) != size:
                add("error", subject, "chunk sizes do not add up to the recorded size")
            if sha is not None and (len(chunk_list) != 1 or chunk_list[0][0] != sha):
                add("error", subject, "recorded sha256 does not match its single chunk")
            for c_sha, c_size in chunk_list:
                p = ctx.blobs.path(c_sha)
                if not p.exists():
                    add("error", subject, f"body chunk {c_sha} is missing")
                elif p.stat().st_size != c_size:
                    add("error", subject, f"body chunk {c_sha} has size {p.stat().st_size}, recorded {c_size}")
        for bucket, key, n in conn.execute(
            "SELECT bucket, key, count(*) FROM versions WHERE is_latest = 1 GROUP BY bucket, key HAVING count(*) > 1"
        ):
            add("error", f"{bucket}/{key}", f"{n} versions marked latest")
        orphans = conn.execute(
            "SELECT count(*) FROM versions WHERE bucket NOT IN (SELECT name FROM buckets)").fetchone()[0]
        if orphans:
            add("error", "versions", f"{orphans} versions belong to no bucket")
        if recorded:
            now = self.summary(ctx)
            for field in ("rows_digest", "versions", "buckets", "multipart_uploads", "multipart_parts"):
                if field in recorded and recorded[field] != now[field]:
                    add("error", f"objects {field}", f"restored {now[field]!r}, recorded {recorded[field]!r}")
        if not findings:
            findings.append(self.finding("info", "objects", f"{checked} versions: records and body chunks consistent"))
        return findings

    def restrict_to_buckets(self, conn: apsw.Connection, buckets: set[str]) -> dict[str, Any]:
        present = {r[0] for r in conn.execute("SELECT name FROM buckets")}
        dropped = sorted(present - buckets)
        marks = ",".join("?" * len(dropped))
        if dropped:
            conn.execute(f"DELETE FROM multipart_parts WHERE upload_id IN "
                         f"(SELECT upload_id FROM multipart_uploads WHERE bucket IN ({marks}))", dropped)
            conn.execute(f"DELETE FROM multipart_uploads WHERE bucket IN ({marks})", dropped)
            conn.execute(f"DELETE FROM versions WHERE bucket IN ({marks})", dropped)
            conn.execute(f"DELETE FROM buckets WHERE name IN ({marks})", dropped)
        return {"kept": sorted(present & buckets), "dropped": dropped}

    def smoke(self, client: Any, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        from anvil.client import AnvilAPIError

        findings: list[Finding] = []

        def add(severity: str, subject: str, message: str) -> None:
            if len(findings) < MAX_FINDINGS:
                findings.append(self.finding(severity, subject, message))  # type: ignore[arg-type]

        # 1. Listings through the API reproduce the recorded digest and per-prefix counts.
        seen: list[str] = []
        buckets = [b["name"] for b in client.list_buckets()]
        for b in buckets:
            key_marker = version_marker = ""
            while True:
                page = client.list_versions(b, key_marker=key_marker, version_marker=version_marker)
                for v in page["versions"]:
                    seen.append(_listing_row(b, v["key"], v["version_id"], v["is_latest"], v["delete_marker"],
                                             v["size"], v["etag"]))
                if not page["truncated"]:
                    break
                key_marker, version_marker = page["next_key_marker"], page["next_version_marker"] or ""
        if recorded:
            if listing_digest(seen) != recorded.get("listing_digest"):
                add("error", "listing", f"version listings ({len(seen)} rows) differ from the recorded digest")
            for b, info in recorded.get("per_bucket", {}).items():
                if b not in buckets:
                    add("error", f"bucket {b}", "recorded bucket is not listed")
                    continue
                live = sum(1 for _ in client.iter_objects(b))
                if live != info["objects"]:
                    add("error", f"bucket {b}", f"lists {live} objects, recorded {info['objects']}")
                for prefix, count in info.get("prefixes", {}).items():
                    n = sum(1 for _ in client.iter_objects(b, prefix=prefix))
                    if n != count:
                        add("error", f"{b}/{prefix}", f"prefix lists {n} objects, recorded {count}")
        # 2. Every version reads back by key and version with matching checksums.
        read = 0
        for v in iter_versions(ctx.conn):
            if v["delete_marker"] or v["key"].startswith("_anvil/"):
                continue
            subject = f"{v['bucket']}/{v['key']}@{v['version_id']}"
            try:
                body = client.get_object(v["bucket"], v["key"], version_id=v["version_id"])
            except AnvilAPIError as e:
                add("error", subject, f"read failed: {e.code}: {e.message}")
                continue
            offset = 0
            ok = len(body) == v["size"]
            for sha, size in v["chunks"]:
                ok = ok and hashlib.sha256(body[offset:offset + size]).hexdigest() == sha
                offset += size
            if not ok:
                add("error", subject, "body read through the API does not match the recorded checksums")
            read += 1
        # 3. The reserved namespace stays closed on a restored server too.
        probe = buckets[0] if buckets else None
        if probe:
            for what, call in (
                ("GET", lambda: client.get_object(probe, "_anvil/probe")),
                ("LIST", lambda: client.list_objects(probe, prefix="_anvil/")),
                ("PUT", lambda: client.put_object(probe, "_anvil/probe", b"x")),
            ):
                try:
                    call()
                    add("error", f"_anvil/ {what}", "reserved namespace was accessible")
                except AnvilAPIError as e:
                    if e.code != "UnauthorizedReservedNamespace":
                        add("error", f"_anvil/ {what}", f"answered {e.code}, expected UnauthorizedReservedNamespace")
        if not findings:
            findings.append(self.finding("info", "objects",
                                         f"{len(seen)} listed versions match; {read} bodies verified; "
                                         "reserved namespace closed"))
        return findings
