"""Small public reads of what the object store references, for fsck, gc and backup.

Other subsystems must not read the objects tables directly; they call these. Every function
takes a connection so the caller can run several of them inside one read transaction and
get one consistent view (e.g. `with conn: versions = ...; parts = ...`). Rows are named
tuples: they are built per version or part, where a dataclass costs several times more.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from anvil.storage.records import (
    Connection,
    json_array_rows,
    json_int_item,
    json_item,
    json_length,
    json_text_at,
)

# The fragments are fixed strings: built once here, not per call.
_CHUNKS = json_array_rows("v.chunks", "c")  # one row per chunk [sha256, size] of version v
_SHA = json_item("c", 0)
_SIZE = json_int_item("c", 1)


class PartRef(NamedTuple):
    upload_id: str
    bucket: str | None  # None when the part's upload record is missing
    key: str | None
    tenant: str | None
    part_number: int
    sha256: str
    size: int


class UploadRecord(NamedTuple):
    upload_id: str
    bucket: str
    key: str
    tenant: str
    created: float
    bucket_exists: bool


def bucket_tenants(conn: Connection) -> dict[str, str]:
    """Every bucket name -> owning tenant."""
    return dict(conn.execute("SELECT name, tenant FROM buckets").fetchall())


# (sha256, size, label) rows of what versions and multipart parts reference, for a caller that
# copies them as they are (a backup's references store): one row per chunk, versions in the scan's
# order and chunks in their list's, as `iter_version_chunk_refs`; then one per part, as `iter_part_refs`,
# labelled "bucket/key upload U part N" ("(upload record missing)" for the bucket/key of a part
# whose upload is gone).
VERSION_CHUNK_ROWS = (f"SELECT {_SHA}, {_SIZE}, v.bucket || '/' || v.key || '@' || v.version_id "
                      f"FROM versions v, {_CHUNKS} WHERE v.delete_marker = 0")
PART_REF_ROWS = ("SELECT p.sha256, p.size, coalesce(u.bucket || '/' || u.key, '(upload record missing)') || "
                 "' upload ' || p.upload_id || ' part ' || p.part_number "
                 "FROM multipart_parts p LEFT JOIN multipart_uploads u ON u.upload_id = p.upload_id")


def iter_version_chunk_refs(conn: Connection) -> Iterator[tuple[str | None, str, str, str, str, int]]:
    """(tenant, bucket, key, version_id, sha256, size) per chunk of every version that has a body,
    a version's chunks in their order, one unordered scan. The record store reads the chunk lists
    (SQLite's JSON functions, C), not `json.loads` and a record per version in Python: ~2 µs less
    a version on fsck's main thread (10,000 versions: 0.065 -> 0.045 s for the references)."""
    tenants = bucket_tenants(conn)
    for bucket, key, version_id, sha, size in conn.execute(_VERSION_CHUNK_REFS):
        yield tenants.get(bucket), bucket, key, version_id, sha, size


_VERSION_CHUNK_REFS = (f"SELECT v.bucket, v.key, v.version_id, {_SHA}, {_SIZE} FROM versions v, {_CHUNKS} "
                       "WHERE v.delete_marker = 0")


def count_versions(conn: Connection) -> int:
    """Versions with a body (delete markers excluded)."""
    return conn.execute("SELECT count(*) FROM versions WHERE delete_marker = 0").fetchone()[0]


def inconsistent_versions(conn: Connection) -> list[tuple[str | None, str, str, str, str]]:
    """(tenant, bucket, key, version_id, problem) for version records that contradict
    themselves: a size that is not the sum of the chunk sizes, or a recorded SHA-256 that is
    not the single chunk's hash. Computed by the record store in one pass."""
    chunk_total = f"(SELECT coalesce(sum({_SIZE}), 0) FROM {_CHUNKS})"
    rows = conn.execute(
        f"SELECT b.tenant, v.bucket, v.key, v.version_id, "
        f"CASE WHEN v.size != {chunk_total} THEN 'size' ELSE 'sha256' END "
        f"FROM versions v LEFT JOIN buckets b ON b.name = v.bucket "
        f"WHERE v.delete_marker = 0 AND ("
        f"  v.size != {chunk_total} "
        f"  OR (v.sha256 IS NOT NULL AND {json_length('v.chunks')} = 1 "
        f"      AND {json_text_at('v.chunks', 0, 0)} != v.sha256))"
    ).fetchall()
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def iter_part_refs(conn: Connection) -> Iterator[PartRef]:
    """Every uploaded multipart part (the blob it holds), including parts whose upload vanished."""
    for row in conn.execute(
        "SELECT p.upload_id, u.bucket, u.key, u.tenant, p.part_number, p.sha256, p.size "
        "FROM multipart_parts p LEFT JOIN multipart_uploads u ON u.upload_id = p.upload_id"
    ):
        yield PartRef(*row)


def iter_uploads(conn: Connection) -> Iterator[UploadRecord]:
    """Every multipart upload in progress, and whether its bucket still exists."""
    for row in conn.execute(
        "SELECT u.upload_id, u.bucket, u.key, u.tenant, u.created, b.name IS NOT NULL "
        "FROM multipart_uploads u LEFT JOIN buckets b ON b.name = u.bucket"
    ):
        yield UploadRecord(row[0], row[1], row[2], row[3], row[4], bool(row[5]))
