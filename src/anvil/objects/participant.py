"""The objects subsystem's recovery participant: buckets, versions, delete markers, multipart state.

It is the only recovery code that knows the objects tables; backup, restore, fsck, gc and the
drill reach them only through this participant (and `objects.references`, whose queries it uses).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, NamedTuple

from anvil.objects import references as refs
from anvil.storage import jsonfast
from anvil.storage.records import (
    Connection,
    json_array_is_compact,
    json_boolean,
    json_compact_array,
    table_exists,
    text_position,
)
from anvil.storage.recovery import BlobRef, Finding, Participant, RecoveryContext
from anvil.storage.spill import Sorter, sorted_strings

MAX_FINDINGS = 50
MAX_PREFIXES = 100


# `json.dumps(..., separators=(",", ":"), ensure_ascii=False)` builds a new encoder at every call (a
# few microseconds, twice per version in every summary): one encoder, the same text.
_compact = jsonfast.compact(ensure_ascii=False)


def _listing_row(bucket: str, key: str, version_id: str, is_latest: int, delete_marker: int, size: int,
                 etag: str) -> str:
    """The fields a client sees in a version listing; the drill recomputes this digest over the API."""
    return _compact([bucket, key, version_id, bool(is_latest), bool(delete_marker), size, etag])


def listing_digest(rows: Iterable[str]) -> str:
    """SHA-256 over the rows in sorted order; a `spill.Sorter` is read back sorted as it is."""
    h = hashlib.sha256()
    for r in (rows if isinstance(rows, Sorter) else sorted_strings(rows)):
        h.update(r.encode())
        h.update(b"\n")
    return h.hexdigest()


def iter_versions(conn: Connection) -> Iterator[dict[str, Any]]:
    """Every version row (bucket, key order), as the drill needs it to prove reads."""
    for row in conn.execute(
        "SELECT bucket, key, version_id, delete_marker, size, sha256, chunks, etag FROM versions "
        "ORDER BY bucket, key, seq"
    ):
        yield {"bucket": row[0], "key": row[1], "version_id": row[2], "delete_marker": bool(row[3]),
               "size": row[4], "sha256": row[5], "chunks": [tuple(c) for c in json.loads(row[6])], "etag": row[7]}


class VersionsDigest(NamedTuple):
    rows: str  # SHA-256 over every version row, in (bucket, key, version_id) order
    listing: str  # `listing_digest` of the API-visible versions
    tagged: int
    tags: str


def _bucket_counters(versioning: str) -> dict[str, Any]:
    return {"versioning": versioning, "objects": 0, "versions": 0, "delete_markers": 0, "bytes": 0, "prefixes": {}}


_VERSION_ROW = "bucket, key, version_id, seq, is_latest, delete_marker, size, etag, sha256, chunks"
# Never visible through the API, so not part of what the drill can prove (nor of the counters).
_VISIBLE = "substr(key, 1, 7) != '_anvil/'"


def _tags_line(bucket: str, key: str, vid: str, extra: str | None) -> str | None:
    """A tagged version's line of the tags digest. Only a document naming "tags" can hold them
    (ours are written by json.dumps, which never escapes an ASCII letter): the others are not parsed."""
    if extra and '"tags"' in extra and (tags := json.loads(extra).get("tags")):
        return json.dumps([bucket, key, vid, tags], separators=(",", ":"), ensure_ascii=False) + "\n"
    return None


def _version_digests_rows(ctx: RecoveryContext, per_bucket: dict[str, dict[str, Any]]) -> VersionsDigest:
    """The versions' digests and `per_bucket`'s counters in one Python pass over the rows."""
    rows_digest = hashlib.sha256()
    # Sorted on disk past a run of rows: a summary of a large store (every backup takes one)
    # holds one run of listing rows, not one per version.
    listing = Sorter(ctx.root / "tmp")
    # S3 object tags (in versions.extra) and bucket settings (tagging, lifecycle, cors) are source
    # records too: digested so a restore that lost or changed one is caught. The tags are read
    # in the same pass over the versions (one scan of the table, not two).
    tags_digest = hashlib.sha256()
    tagged = 0
    # Per row only what differs per row: the digest's lines are hashed a batch at a time (the
    # same bytes), the bucket's counters looked up when the bucket changes (rows come in bucket
    # order), the totals summed from the buckets' at the end.
    lines: list[str] = []
    add_line, add_listing = lines.append, listing.add
    current: str | None = None
    b: dict[str, Any] = {}
    prefixes: dict[str, int] = {}
    for bucket, key, vid, seq, latest, dm, size, etag, sha, chunks, extra in ctx.conn.execute(
        f"SELECT {_VERSION_ROW}, extra FROM versions ORDER BY bucket, key, version_id"
    ):
        add_line(_compact([bucket, key, vid, seq, latest, dm, size, etag, sha, chunks]))
        if len(lines) >= 1024:
            rows_digest.update(("\n".join(lines) + "\n").encode())
            lines.clear()
        if extra and (line := _tags_line(bucket, key, vid, extra)):
            tagged += 1
            tags_digest.update(line.encode())
        if key.startswith("_anvil/"):
            continue
        add_listing(_compact([bucket, key, vid, bool(latest), bool(dm), size, etag]))  # = _listing_row
        if bucket != current:
            current = bucket
            b = per_bucket.setdefault(bucket, _bucket_counters("?"))
            prefixes = b["prefixes"]
        b["versions"] += 1
        if dm:
            b["delete_markers"] += 1
        b["bytes"] += size
        if latest and not dm:
            b["objects"] += 1
            head, sep, _ = key.partition("/")
            if sep:
                head += "/"
                if head in prefixes or len(prefixes) < MAX_PREFIXES:
                    prefixes[head] = prefixes.get(head, 0) + 1
    if lines:
        rows_digest.update(("\n".join(lines) + "\n").encode())
    try:
        return VersionsDigest(rows_digest.hexdigest(), listing_digest(listing), tagged, tags_digest.hexdigest())
    finally:
        listing.close()


def _digest_lines(h: Any, cursor: Iterator[Any]) -> None:
    """Each one-column row's text and a newline into `h`, a batch of rows per update (the same bytes)."""
    while batch := [r[0] for r in islice(cursor, 2048)]:
        h.update(("\n".join(batch) + "\n").encode())


def _version_digests_sql(ctx: RecoveryContext, per_bucket: dict[str, dict[str, Any]]) -> VersionsDigest:
    """`_version_digests_rows`, the rows' text written, sorted and counted by SQLite: the same
    bytes (`records.json_array_is_compact`), orders (SQLite compares text as UTF-8 bytes, which is
    code point order, as Python sorts) and counters."""
    conn = ctx.conn
    rows_digest = hashlib.sha256()
    _digest_lines(rows_digest, conn.execute(
        f"SELECT {json_compact_array(_VERSION_ROW)} FROM versions ORDER BY bucket, key, version_id"))
    listing = hashlib.sha256()
    listing_row = json_compact_array("bucket", "key", "version_id", json_boolean("is_latest != 0"),
                                     json_boolean("delete_marker != 0"), "size", "etag")  # = _listing_row
    _digest_lines(listing, conn.execute(
        f"SELECT {listing_row} AS line FROM versions WHERE {_VISIBLE} ORDER BY line"))
    tags_digest = hashlib.sha256()
    tagged = 0
    names_tags = text_position("extra", "'\"tags\"'")
    for bucket, key, vid, extra in conn.execute(
            f"SELECT bucket, key, version_id, extra FROM versions WHERE {names_tags} > 0 "
            "ORDER BY bucket, key, version_id"):
        if line := _tags_line(bucket, key, vid, extra):
            tagged += 1
            tags_digest.update(line.encode())
    live = "is_latest != 0 AND delete_marker = 0"
    for bucket, versions, markers, size, objects in conn.execute(
            f"SELECT bucket, count(*), sum(delete_marker != 0), sum(size), sum({live}) FROM versions "
            f"WHERE {_VISIBLE} GROUP BY bucket ORDER BY bucket"):
        b = per_bucket.setdefault(bucket, _bucket_counters("?"))
        b.update(versions=versions, delete_markers=markers, bytes=size, objects=objects)
    # The first MAX_PREFIXES prefixes in key order (as the row pass meets them), each counted whole.
    slash = text_position("key", "'/'")
    for bucket, head, n in conn.execute(
            f"SELECT bucket, substr(key, 1, {slash}) AS head, count(*) FROM versions "
            f"WHERE {_VISIBLE} AND {live} AND {slash} > 0 GROUP BY bucket, head ORDER BY bucket, min(key)"):
        prefixes = per_bucket[bucket]["prefixes"]
        if len(prefixes) < MAX_PREFIXES:
            prefixes[head] = n
    return VersionsDigest(rows_digest.hexdigest(), listing.hexdigest(), tagged, tags_digest.hexdigest())


class ObjectsParticipant(Participant):
    name = "objects"
    kind = "source"
    covers = ["object-bodies", "bucket-metadata", "path-indexes"]
    owns = ["catalog.db: buckets, versions, multipart_uploads, multipart_parts, bucket_settings"]
    tables = ["buckets", "versions", "multipart_uploads", "multipart_parts", "bucket_settings"]
    replays = ("bucket.", "object.", "multipart.")
    summary_reuse = "events"  # buckets, versions, uploads and settings change only through those events

    def migrations(self) -> dict[str, list[str]]:
        from anvil.objects.service import MIGRATIONS

        return {"objects": MIGRATIONS}

    def apply(self, ctx: RecoveryContext, event: Any) -> None:
        from anvil.objects import replay

        replay.apply(ctx.conn, event)

    def event_blobs(self, event: Any) -> list[tuple[str, int]]:
        p = event.payload
        if event.kind == "object.put":
            return [(c[0], int(c[1])) for c in p.get("chunks") or []]
        if event.kind == "multipart.part":
            return [(p["sha256"], int(p["size"]))]
        return []

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        conn = ctx.conn
        per_bucket: dict[str, dict[str, Any]] = {}
        for name, versioning in conn.execute("SELECT name, versioning FROM buckets ORDER BY name"):
            per_bucket[name] = _bucket_counters(versioning or "Unversioned")
        # Every backup with an object change digests every version: on SQLite the engine writes
        # the rows' text and counts (C), else a Python pass per row; the same summary either way.
        digests = _version_digests_sql if json_array_is_compact(conn) else _version_digests_rows
        versions_digest = digests(ctx, per_bucket)
        totals = {k: sum(pb[k] for pb in per_bucket.values())
                  for k in ("versions", "delete_markers", "objects", "bytes")}
        uploads = conn.execute("SELECT count(*) FROM multipart_uploads").fetchone()[0]
        parts = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM multipart_parts").fetchone()
        settings_digest = hashlib.sha256()
        settings = 0
        if table_exists(conn, "bucket_settings"):
            for bucket, kind, document in conn.execute(
                    "SELECT bucket, kind, document FROM bucket_settings ORDER BY bucket, kind"):
                settings += 1
                settings_digest.update(json.dumps([bucket, kind, document], separators=(",", ":"),
                                                  ensure_ascii=False).encode() + b"\n")
        return {
            "buckets": len(per_bucket), **totals,
            "multipart_uploads": uploads, "multipart_parts": parts[0], "multipart_part_bytes": parts[1],
            "rows_digest": versions_digest.rows, "listing_digest": versions_digest.listing,
            "per_bucket": per_bucket,
            "tagged_versions": versions_digest.tagged, "tags_digest": versions_digest.tags,
            "bucket_settings": settings, "settings_digest": settings_digest.hexdigest(),
        }

    def blob_references(self, ctx: RecoveryContext) -> Iterator[BlobRef]:
        version: tuple[str, str, str] | None = None
        for tenant, bucket, key, version_id, sha, size in refs.iter_version_chunk_refs(ctx.conn):
            if version != (bucket, key, version_id):  # a version's chunks share its referrer
                version = (bucket, key, version_id)
                ref = {"tenant": tenant, "bucket": bucket, "key": key, "version_id": version_id}
                label = f"{bucket}/{key}@{version_id}"
            yield BlobRef(sha, size, label, ref, "objects.blob_missing")
        # Parts whose upload record is gone are referenced too: gc keeps them and backup copies
        # them, and validate() reports them (`multipart.part_without_upload`) for the operator.
        yield from self._part_references(ctx)

    def blob_reference_queries(self) -> list[str]:
        """SELECTs of (sha256, size, label) giving, run in turn, `blob_references` in the same order:
        what a backup keeps of each (`RecoveryContext.blob_reference_sources`)."""
        return [refs.VERSION_CHUNK_ROWS, refs.PART_REF_ROWS]

    def _part_references(self, ctx: RecoveryContext) -> Iterator[BlobRef]:
        for p in refs.iter_part_refs(ctx.conn):
            ref = {"tenant": p.tenant, "bucket": p.bucket, "key": p.key, "upload_id": p.upload_id,
                   "part_number": p.part_number}
            where = f"{p.bucket}/{p.key}" if p.bucket is not None else "(upload record missing)"
            yield BlobRef(p.sha256, p.size, f"{where} upload {p.upload_id} part {p.part_number}", ref,
                          "multipart.part_blob_missing")

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        """Records that contradict themselves or their bucket/upload; blob presence, sizes and hashes
        are the blobs participant's check, over the references this participant reports."""
        conn = ctx.conn
        out: list[Finding] = []
        ctx.checked.update({"objects.record_inconsistent", "objects.latest_duplicate", "objects.bucket_missing",
                            "multipart.part_without_upload", "multipart.bucket_missing"})
        with conn:  # one read transaction: one consistent view of every record
            inconsistent = refs.inconsistent_versions(conn)
            versions = refs.count_versions(conn)
            uploads = list(refs.iter_uploads(conn))
            orphan_parts = [p for p in refs.iter_part_refs(conn) if p.bucket is None]
            part_count = conn.execute("SELECT count(*) FROM multipart_parts").fetchone()[0]
            latest_twice = conn.execute(
                "SELECT bucket, key, count(*) FROM versions WHERE is_latest = 1 "
                "GROUP BY bucket, key HAVING count(*) > 1").fetchall()
            no_bucket = conn.execute(
                "SELECT count(*) FROM versions WHERE bucket NOT IN (SELECT name FROM buckets)").fetchone()[0]
        for tenant, bucket, key, version_id, what in inconsistent[:MAX_FINDINGS]:
            ref = {"tenant": tenant, "bucket": bucket, "key": key, "version_id": version_id}
            detail = ("its size is not the sum of its chunk sizes" if what == "size"
                      else "its SHA-256 is not the hash of its only chunk")
            out.append(self.finding("error", f"{bucket}/{key}@{version_id}",
                                    f"version {version_id} of {bucket}/{key}: {detail}", "objects.record_inconsistent",
                                    {"problem": what, "references": [ref]},
                                    identity={"problem": what, "reference": ref}))
        for bucket, key, n in latest_twice[:MAX_FINDINGS]:
            out.append(self.finding("error", f"{bucket}/{key}", f"{n} versions of {bucket}/{key} are marked latest",
                                    "objects.latest_duplicate", {"bucket": bucket, "key": key}))
        if no_bucket:
            out.append(self.finding("error", "versions", f"{no_bucket} versions belong to no bucket",
                                    "objects.bucket_missing", {"versions": no_bucket}, identity={}))
        for p in orphan_parts[:MAX_FINDINGS]:
            out.append(self.finding("error", f"upload {p.upload_id}",
                                    f"part {p.part_number} belongs to upload {p.upload_id}, which does not exist",
                                    "multipart.part_without_upload",
                                    {"upload_id": p.upload_id, "part_number": p.part_number}))
        for u in uploads:
            if not u.bucket_exists:
                out.append(self.finding("error", f"upload {u.upload_id}",
                                        f"multipart upload {u.upload_id} is for bucket {u.bucket}, which does not "
                                        "exist", "multipart.bucket_missing",
                                        {"tenant": u.tenant, "bucket": u.bucket, "key": u.key,
                                         "upload_id": u.upload_id}))
        ctx.stats["objects"] = {"versions": versions, "inconsistent": len(inconsistent)}
        ctx.stats["multipart"] = {"uploads": len(uploads), "parts": part_count}
        if recorded:
            now = self.summary(ctx)
            for field in ("rows_digest", "versions", "buckets", "multipart_uploads", "multipart_parts",
                          "tagged_versions", "tags_digest", "bucket_settings", "settings_digest"):
                if field in recorded and recorded[field] != now[field]:
                    out.append(self.finding("error", f"objects {field}",
                                            f"restored {now[field]!r}, recorded {recorded[field]!r}",
                                            "objects.summary_differs", {"field": field}))
        if not out:
            out.append(self.finding("info", "objects", f"{versions} versions: records consistent"))
        return out

    def locate_object(self, conn: Connection, bucket: str, key: str,
                      version_id: str | None = None) -> dict[str, Any] | None:
        """A version's record as stored (latest when `version_id` is None), for `anvil backup get`."""
        cols = "version_id, delete_marker, size, sha256, chunks, etag, content_type"
        if version_id is None:
            row = conn.execute(f"SELECT {cols} FROM versions WHERE bucket = ? AND key = ? AND is_latest = 1",
                               (bucket, key)).fetchone()
        else:
            row = conn.execute(f"SELECT {cols} FROM versions WHERE bucket = ? AND key = ? AND version_id = ?",
                               (bucket, key, version_id)).fetchone()
        if row is None:
            return None
        return {"version_id": row[0], "delete_marker": bool(row[1]), "size": row[2], "sha256": row[3],
                "chunks": [tuple(c) for c in json.loads(row[4])], "etag": row[5], "content_type": row[6]}

    def restrict_to_buckets(self, conn: Connection, buckets: set[str]) -> dict[str, Any]:
        present = {r[0] for r in conn.execute("SELECT name FROM buckets")}
        dropped = sorted(present - buckets)
        marks = ",".join("?" * len(dropped))
        if dropped:
            conn.execute(f"DELETE FROM multipart_parts WHERE upload_id IN "
                         f"(SELECT upload_id FROM multipart_uploads WHERE bucket IN ({marks}))", dropped)
            conn.execute(f"DELETE FROM multipart_uploads WHERE bucket IN ({marks})", dropped)
            conn.execute(f"DELETE FROM versions WHERE bucket IN ({marks})", dropped)
            if table_exists(conn, "bucket_settings"):
                conn.execute(f"DELETE FROM bucket_settings WHERE bucket IN ({marks})", dropped)
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

    def smoke_resumed(self, client: Any, ctx: RecoveryContext,
                      recorded: dict[str, Any] | None = None) -> list[Finding]:
        """A client performs ordinary operations on the resumed server: create, put, get, list, delete."""
        name = f"drill-{uuid.uuid4().hex[:10]}"
        body = uuid.uuid4().bytes * 64
        client.create_bucket(name)
        client.put_object(name, "drill/check.bin", body)
        if client.get_object(name, "drill/check.bin") != body:
            return [self.finding("error", "ordinary operations", "read-after-write returned different bytes")]
        if [o["key"] for o in client.list_objects(name)["objects"]] != ["drill/check.bin"]:
            return [self.finding("error", "ordinary operations", "listing after write is wrong")]
        client.delete_object(name, "drill/check.bin")
        client.delete_bucket(name)
        if not client.verify_journal().get("ok"):
            return [self.finding("error", "journal", "chain broken after ordinary operations")]
        return [self.finding("info", "ordinary operations", "create bucket, put, get, list, delete: ok")]
