"""Rebuild the objects tables from journal events (point-in-time restore, the replay property).

Each function writes exactly the rows the live mutation wrote, from the event alone: its
payload, `ts` (the mutation's `txn.now`, which every `created` and `updated` column holds), `seq`
(a version's order) and `tenant`. `tests/test_replay.py` holds the two stores side by side.

The S3 additions replay here too: `object.tagging` and `object.acl` (the tag set and the public
flag in a version's `extra`), `bucket.tagging` / `bucket.lifecycle` / `bucket.cors` (the
`bucket_settings` rows, which `bucket.delete` drops with their bucket). Lifecycle actions are
ordinary `object.delete` / `multipart.abort` events (actor `<tenant>/system-lifecycle`).
"""

from __future__ import annotations

import json
from typing import Any

from anvil.objects.service import _VERSION_COLUMNS, BUCKET_SETTING_KINDS, COMPLETED_UPLOAD_RETENTION
from anvil.storage.records import Connection


def apply(conn: Connection, ev: Any) -> None:
    p: dict[str, Any] = ev.payload
    kind = ev.kind
    if kind == "bucket.create":
        conn.execute("INSERT INTO buckets(name, tenant, created, versioning) VALUES (?,?,?,?)",
                     (p["bucket"], p.get("tenant", ev.tenant), ev.ts, p.get("versioning", "")))
    elif kind == "bucket.delete":
        conn.execute("DELETE FROM bucket_settings WHERE bucket = ?", (p["bucket"],))
        conn.execute("DELETE FROM buckets WHERE name = ?", (p["bucket"],))
    elif kind == "bucket.versioning":
        conn.execute("UPDATE buckets SET versioning = ? WHERE name = ?", (p["status"], p["bucket"]))
    elif kind == "bucket.public":
        conn.execute("UPDATE buckets SET public = ? WHERE name = ?", (int(bool(p["public"])), p["bucket"]))
    elif kind.startswith("bucket.") and kind.removeprefix("bucket.") in BUCKET_SETTING_KINDS:
        setting = kind.removeprefix("bucket.")
        conn.execute("DELETE FROM bucket_settings WHERE bucket = ? AND kind = ?", (p["bucket"], setting))
        if p.get("document") is not None:
            conn.execute("INSERT INTO bucket_settings(bucket, kind, document, updated) VALUES (?,?,?,?)",
                         (p["bucket"], setting, json.dumps(p["document"], sort_keys=True), ev.ts))
    elif kind == "object.tagging":
        # The whole new tag set; an empty one removes the field, as DeleteObjectTagging did.
        tags = [list(t) for t in p.get("tags") or []]
        _set_extra(conn, p, "tags", tags or None)
    elif kind == "object.acl":
        _set_extra(conn, p, "public", True if p.get("public") else None)
    elif kind == "object.put":
        _put(conn, ev, p)
    elif kind == "object.delete":
        _delete(conn, ev, p)
    elif kind == "multipart.create":
        conn.execute(
            "INSERT INTO multipart_uploads(upload_id, bucket, key, tenant, content_type, metadata, created, extra) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (p["upload_id"], p["bucket"], p["key"], ev.tenant, p["content_type"],
             json.dumps(p.get("metadata") or {}, sort_keys=True), ev.ts,
             json.dumps(p.get("extra") or {}, sort_keys=True)))
    elif kind == "multipart.part":
        conn.execute("DELETE FROM multipart_parts WHERE upload_id = ? AND part_number = ?",
                     (p["upload_id"], p["part_number"]))
        conn.execute(
            "INSERT INTO multipart_parts(upload_id, part_number, sha256, md5, size, created, checksums) "
            "VALUES (?,?,?,?,?,?,?)",
            (p["upload_id"], p["part_number"], p["sha256"], p["md5"], p["size"], ev.ts,
             json.dumps(p.get("checksums") or {}, sort_keys=True)))
    elif kind == "multipart.abort":
        conn.execute("DELETE FROM multipart_parts WHERE upload_id = ?", (p["upload_id"],))
        conn.execute("DELETE FROM multipart_uploads WHERE upload_id = ?", (p["upload_id"],))
    else:
        raise ValueError(f"objects cannot replay event kind {kind!r}")


def _set_extra(conn: Connection, p: dict[str, Any], field: str, value: Any) -> None:
    """Set (None: remove) one field of a version's `extra`, as the live mutation rewrote it."""
    where = (p["bucket"], p["key"], p["version_id"])
    row = conn.execute("SELECT extra FROM versions WHERE bucket = ? AND key = ? AND version_id = ?",
                       where).fetchone()
    if row is None:
        raise ValueError(f"{p['bucket']}/{p['key']}@{p['version_id']}: no such version to change")
    extra = json.loads(row[0] or "{}")
    if value is None:
        extra.pop(field, None)
    else:
        extra[field] = value
    conn.execute("UPDATE versions SET extra = ? WHERE bucket = ? AND key = ? AND version_id = ?",
                 (json.dumps(extra, sort_keys=True), *where))


def _put(conn: Connection, ev: Any, p: dict[str, Any]) -> None:
    bucket, key = p["bucket"], p["key"]
    for vid in p.get("replaced") or []:
        conn.execute("DELETE FROM versions WHERE bucket = ? AND key = ? AND version_id = ?", (bucket, key, vid))
    conn.execute("UPDATE versions SET is_latest = 0 WHERE bucket = ? AND key = ? AND is_latest = 1", (bucket, key))
    conn.execute(
        f"INSERT INTO versions({_VERSION_COLUMNS}) VALUES (?,?,?,?,1,0,?,?,?,?,?,?,?,?)",
        (bucket, key, p["version_id"], ev.seq, p["size"], p["etag"], p.get("sha256"), p["content_type"],
         json.dumps(p.get("metadata") or {}, sort_keys=True), json.dumps(p["chunks"]), ev.ts,
         json.dumps(p.get("extra") or {}, sort_keys=True)))
    if p.get("source") == "multipart":
        upload_id = p["upload_id"]
        conn.execute("DELETE FROM multipart_parts WHERE upload_id = ?", (upload_id,))
        conn.execute("DELETE FROM multipart_uploads WHERE upload_id = ?", (upload_id,))
        conn.execute("DELETE FROM multipart_completed WHERE upload_id = ?", (upload_id,))
        conn.execute("INSERT INTO multipart_completed(upload_id, bucket, key, completed) VALUES (?,?,?,?)",
                     (upload_id, bucket, key, ev.ts))
        conn.execute("DELETE FROM multipart_completed WHERE upload_id IN "
                     "(SELECT upload_id FROM multipart_completed WHERE completed < ? LIMIT 16)",
                     (ev.ts - COMPLETED_UPLOAD_RETENTION,))


def _delete(conn: Connection, ev: Any, p: dict[str, Any]) -> None:
    bucket, key = p["bucket"], p["key"]
    if p.get("delete_marker"):
        for vid in p.get("removed") or []:
            conn.execute("DELETE FROM versions WHERE bucket = ? AND key = ? AND version_id = ?", (bucket, key, vid))
        conn.execute("UPDATE versions SET is_latest = 0 WHERE bucket = ? AND key = ? AND is_latest = 1",
                     (bucket, key))
        conn.execute(
            f"INSERT INTO versions({_VERSION_COLUMNS}) VALUES (?,?,?,?,1,1,0,'',NULL,'',?,?,?,'{{}}')",
            (bucket, key, p["version_id"], ev.seq, "{}", "[]", ev.ts))
    elif p.get("version_id") is None:
        # An unversioned bucket's delete removes the key outright.
        conn.execute("DELETE FROM versions WHERE bucket = ? AND key = ?", (bucket, key))
    else:
        conn.execute("DELETE FROM versions WHERE bucket = ? AND key = ? AND version_id = ?",
                     (bucket, key, p["version_id"]))
        if p.get("promoted"):
            conn.execute("UPDATE versions SET is_latest = 1 WHERE bucket = ? AND key = ? AND version_id = ?",
                         (bucket, key, p["promoted"]))
