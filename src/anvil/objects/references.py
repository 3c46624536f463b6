"""Small public reads of what the object store references, for fsck, gc and backup.

Other subsystems must not read the objects tables directly; they call these. Every function
takes a connection so the caller can run several of them inside one read transaction and
get one consistent view (e.g. `with conn: versions = ...; parts = ...`). Rows are named
tuples: they are built per version or part, where a dataclass costs several times more.
"""

from __future__ import annotations

import json
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


class VersionChunks(NamedTuple):
    tenant: str | None  # None when the version's bucket record is missing
    bucket: str
    key: str
    version_id: str
    chunks: list[tuple[str, int]]


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


def iter_version_chunks(conn: Connection) -> Iterator[VersionChunks]:
    """Every version that has a body (delete markers have none), with the blobs it is made of.

    One unordered scan: at 10k+ versions an ORDER BY or a per-bucket query costs more than
    the whole check that uses this.
    """
    tenants = bucket_tenants(conn)
    loads = json.loads
    for bucket, key, version_id, chunks in conn.execute(_VERSION_CHUNKS):
        yield VersionChunks(tenants.get(bucket), bucket, key, version_id, [(c[0], c[1]) for c in loads(chunks)])


_VERSION_CHUNKS = "SELECT bucket, key, version_id, chunks FROM versions WHERE delete_marker = 0"
# (sha256, size, label) rows of what versions and multipart parts reference, for a caller that
# copies them as they are (a backup's references store): one row per chunk, versions in the scan's
# order and chunks in their list's, as `iter_version_chunks`; then one per part, as `iter_part_refs`,
# labelled "bucket/key upload U part N" ("(upload record missing)" for the bucket/key of a part
# whose upload is gone).
VERSION_CHUNK_ROWS = (f"SELECT {_SHA}, {_SIZE}, v.bucket || '/' || v.key || '@' || v.version_id "
                      f"FROM versions v, {_CHUNKS} WHERE v.delete_marker = 0")
PART_REF_ROWS = ("SELECT p.sha256, p.size, coalesce(u.bucket || '/' || u.key, '(upload record missing)') || "
                 "' upload ' || p.upload_id || ' part ' || p.part_number "
                 "FROM multipart_parts p LEFT JOIN multipart_uploads u ON u.upload_id = p.upload_id")


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
