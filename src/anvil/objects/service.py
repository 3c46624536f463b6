"""Buckets, objects, versions, preconditions, copy and multipart, on top of `anvil.storage`.

Every mutation is one call to `Catalog.mutate`: preconditions are checked, rows written and
the journal event appended in the same transaction. Bodies are stored as content-addressed
blobs before that transaction, or (small ones, `storage.inline`) inline inside it; a version
records its body as an ordered list of chunks (one for a simple PUT, one per part after a
multipart upload), so copy never copies bytes.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from anvil import jsontext
from anvil.context import RequestContext
from anvil.errors import AnvilError, not_found
from anvil.frozen import fast_init
from anvil.objects import validation as v
from anvil.objects.checksums import combine_crcs, new_checksum
from anvil.storage import BlobInfo, BlobWriter, Storage, Txn, idempotency, inline, jsonfast, listing, records
from anvil.storage.blobs import BlobCorrupted, InlineBody, digest_bytes, needs_sidecar
from anvil.storage.catalog import Settled
from anvil.storage.records import Connection

log = logging.getLogger("anvil.objects")

# Called with what a failed verification found: tenant, bucket, key, version_id, sha256, detail,
# quarantined. The runtime wires it to diagnostics (objects may not import diagnostics).
CorruptionListener = Callable[[dict[str, Any]], None]
# Runs inside a bucket delete's transaction (txn, bucket, tenant), after the emptiness checks.
BucketDeleteHook = Callable[[Txn, str, str], None]

MIGRATIONS = [
    """
    CREATE TABLE buckets(
        name TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        created REAL NOT NULL,
        versioning TEXT NOT NULL DEFAULT '',
        public INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE versions(
        bucket TEXT NOT NULL,
        key TEXT NOT NULL,
        version_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        is_latest INTEGER NOT NULL,
        delete_marker INTEGER NOT NULL,
        size INTEGER NOT NULL,
        etag TEXT NOT NULL,
        sha256 TEXT,
        content_type TEXT NOT NULL,
        metadata TEXT NOT NULL,
        chunks TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY(bucket, key, version_id)
    );
    CREATE INDEX versions_latest ON versions(bucket, key) WHERE is_latest = 1;
    CREATE INDEX versions_order ON versions(bucket, key, seq DESC);
    CREATE TABLE multipart_uploads(
        upload_id TEXT PRIMARY KEY,
        bucket TEXT NOT NULL,
        key TEXT NOT NULL,
        tenant TEXT NOT NULL,
        content_type TEXT NOT NULL,
        metadata TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE INDEX multipart_by_bucket ON multipart_uploads(bucket, key, created);
    CREATE TABLE multipart_parts(
        upload_id TEXT NOT NULL REFERENCES multipart_uploads(upload_id) ON DELETE CASCADE,
        part_number INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        md5 TEXT NOT NULL,
        size INTEGER NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY(upload_id, part_number)
    );
    """,
    # Completed uploads are remembered for a day so a retried complete (same Idempotency-Key)
    # can find its upload again and replay the first result instead of answering NotFound.
    """
    CREATE TABLE multipart_completed(
        upload_id TEXT PRIMARY KEY,
        bucket TEXT NOT NULL,
        key TEXT NOT NULL,
        completed REAL NOT NULL
    );
    CREATE INDEX multipart_completed_at ON multipart_completed(completed);
    """,
    # 3: S3 system metadata and checksums ride beside the user metadata: `extra` holds
    # {"system": {header: value}, "checksums": {algorithm: base64}} (absent keys mean none).
    """
    ALTER TABLE versions ADD COLUMN extra TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE multipart_uploads ADD COLUMN extra TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE multipart_parts ADD COLUMN checksums TEXT NOT NULL DEFAULT '{}';
    """,
    # 4: ListMultipartUploads pages in SQL in (key, upload_id) order (upload ids sort by creation
    # time, see _new_upload_id); the old (bucket, key, created) index no longer serves any query.
    """
    CREATE INDEX multipart_by_key ON multipart_uploads(bucket, key, upload_id);
    DROP INDEX multipart_by_bucket;
    """,
    # 5: per-bucket S3 configuration documents (tagging, lifecycle, cors), source records: one row per
    # (bucket, kind), `document` JSON as the gateway parsed it; they go with their bucket.
    """
    CREATE TABLE bucket_settings(
        bucket TEXT NOT NULL,
        kind TEXT NOT NULL,
        document TEXT NOT NULL,
        updated REAL NOT NULL,
        PRIMARY KEY(bucket, kind)
    );
    """,
    # 6: a covering index of the listed latest versions: an S3 page (key, LastModified, ETag, Size) is
    # read from the index alone, in key order, instead of one lookup per key into the table, where
    # keys written over time lie on scattered pages (a read from the OS per key once the table is
    # bigger than the page cache: ~40 % of a page's CPU at 200k keys, and growing with the store).
    """
    CREATE INDEX versions_listed ON versions(bucket, key, created, etag, size)
        WHERE is_latest = 1 AND delete_marker = 0;
    """,
]

# The kinds of bucket_settings rows (each journaled as `bucket.<kind>`).
BUCKET_SETTING_KINDS = ("tagging", "lifecycle", "cors")

COMPLETED_UPLOAD_RETENTION = 24 * 3600

VERSIONING_STATES = ("", "Enabled", "Suspended")
NULL_VERSION = "null"

# JSON columns are written by json.dumps (no surrounding whitespace), so raw_decode reads them whole.
_json_value = json.JSONDecoder().raw_decode

_VERSION_COLUMNS = (
    "bucket, key, version_id, seq, is_latest, delete_marker, size, etag, sha256, "
    "content_type, metadata, chunks, created, extra"
)

# JSON columns of a version, encoded as `json.dumps(x, sort_keys=True)` encodes them (the stored text is
# unchanged) by encoders built once, C encoder included: json.dumps with options builds a new encoder
# per call, and `JSONEncoder.encode` a new C encoder per call.
_dumps_sorted = jsonfast.encoder(sort_keys=True)
_dumps = jsonfast.encoder()
_quote_ascii = json.encoder.encode_basestring_ascii  # (what `_dumps` quotes a str with)


def _json_sorted(value: dict[str, Any] | None) -> str:
    return _dumps_sorted(value) if value else "{}"


def _chunks_json(chunks: list[tuple[str, int]]) -> str:
    """`_dumps(chunks)`, the same text. One chunk of a str digest and an int size (every small PUT's) is
    written directly, its digest quoted by the encoder's own string function: the whole encoder's call
    cost ~7 k instructions per PUT in the writer thread, more than the text is long."""
    if len(chunks) == 1:
        chunk = chunks[0]
        if len(chunk) == 2:
            digest, size = chunk
            if type(size) is int and type(digest) is str:
                return f"[[{_quote_ascii(digest)}, {size}]]"
    return _dumps(chunks)


# A bucket row and every configuration document of the bucket, in one statement (a cache miss).
_BUCKET_WITH_SETTINGS = (
    "SELECT 0, name, tenant, created, versioning, public, NULL, NULL FROM buckets WHERE name = ?"
    " UNION ALL SELECT 1, NULL, NULL, NULL, NULL, NULL, kind, document FROM bucket_settings WHERE bucket = ?"
)
# Bucket names cached at most (a full cache starts again: a miss costs one indexed read).
BUCKET_CACHE_SIZE = 4096


@dataclass(frozen=True)
class _CachedBucket:
    """A bucket as the request path reads it: its row and its configuration documents, as stored (JSON
    text, parsed per use so no caller shares a mutable document)."""

    bucket: Bucket
    settings: dict[str, str]


class _Unread:
    """`_write_version(current=_UNREAD)`: the caller has not read the key's latest version."""


_UNREAD = _Unread()


# A bucket and the latest version of one of its keys, in one statement: a row tagged 0 for the
# bucket, one tagged 1 for the version (if any). Two SELECTs under UNION ALL are planned each on its
# own, so the version is found through the partial index `versions_latest` as `_latest` finds it (a
# LEFT JOIN let SQLite pick `versions_order` instead, which walks every version of the key).
_BUCKET_AND_LATEST = (
    "SELECT 0" + ", NULL" * 14 + ", name, tenant, created, versioning, public FROM buckets WHERE name = ?"
    f" UNION ALL SELECT 1, {_VERSION_COLUMNS}" + ", NULL" * 5
    + " FROM versions WHERE bucket = ? AND key = ? AND is_latest = 1"
)  # each column is typed in one branch and NULL in the other, as PostgreSQL's UNION requires


# The small GET's one statement (api/fastget.py): the latest version of a key, its bucket's tenant, and
# its body when that is stored inline, as one row. A GET that reads nothing else costs one statement
# instead of two (bucket + latest version, then the inline body), and the version and the body come
# from the same snapshot. HEAD reads no body (`_LATEST_SMALL_HEAD`).
_LATEST_SMALL_COLUMNS = (
    "(SELECT tenant FROM buckets WHERE name = v.bucket), v.version_id, v.delete_marker, v.size, v.etag, v.sha256, "
    "v.content_type, v.metadata, v.chunks, v.created, v.extra"
)
# Scalar subqueries rather than joins: on SQLite the same row through two joins cost 17 us, this 6 us.
_LATEST_SMALL = (
    f"SELECT {_LATEST_SMALL_COLUMNS}, (SELECT body FROM inline_blobs WHERE sha256 = v.sha256) FROM versions v"
    " WHERE v.bucket = ? AND v.key = ? AND v.is_latest = 1"
)
_LATEST_SMALL_HEAD = (
    f"SELECT {_LATEST_SMALL_COLUMNS}, NULL FROM versions v WHERE v.bucket = ? AND v.key = ? AND v.is_latest = 1"
)


def _rendered_listing_args(prefix: str, delimiter: str, max_keys: int) -> str | None:
    """The argument checks of a listing rendered in SQL, then the delimiter's same-length successor its
    statement needs ("" without a delimiter); None when there is none (the caller lists in Python)."""
    if v.is_reserved_key(prefix):
        raise v.reserved_error()
    if not 1 <= max_keys <= 1000:
        raise AnvilError("InvalidArgument", "page size must be between 1 and 1000")
    delimiter_next = _prefix_upper(delimiter) if delimiter else ""
    if delimiter_next is None or len(delimiter_next) != len(delimiter):
        return None
    return delimiter_next


@fast_init
@dataclass(frozen=True)
class Bucket:
    name: str
    tenant: str
    created: float
    versioning: str
    public: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tenant": self.tenant,
            "created": self.created,
            "versioning": self.versioning or "Unversioned",
            "public": self.public,
        }


@fast_init
@dataclass(frozen=True)
class ObjectVersion:
    bucket: str
    key: str
    version_id: str
    seq: int
    is_latest: bool
    delete_marker: bool
    size: int
    etag: str
    sha256: str | None
    content_type: str
    metadata: dict[str, str]
    chunks: list[tuple[str, int]]
    created: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: tuple) -> ObjectVersion:
        # The hot loop of every listing (1,000 rows a page): most objects carry no metadata, and the
        # decoder is called directly, one Python frame instead of json.loads' three.
        return cls(
            row[0], row[1], row[2], row[3], bool(row[4]), bool(row[5]), row[6], row[7], row[8],
            row[9], {} if row[10] == "{}" else _json_value(row[10])[0],
            [tuple(c) for c in _json_value(row[11])[0]], row[12],
            _json_value(row[13])[0] if len(row) > 13 and row[13] and row[13] != "{}" else {},
        )

    @property
    def system_metadata(self) -> dict[str, str]:
        """Stored HTTP headers such as Cache-Control or Content-Disposition (lower-case names)."""
        return dict(self.extra.get("system") or {})

    @property
    def checksums(self) -> dict[str, str]:
        """Client-declared, server-verified checksums: {"crc32": base64, ...}."""
        return dict(self.extra.get("checksums") or {})

    @property
    def parts_count(self) -> int | None:
        return len(self.chunks) if "-" in self.etag else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "key": self.key,
            "version_id": self.version_id,
            "is_latest": self.is_latest,
            "delete_marker": self.delete_marker,
            "size": self.size,
            "etag": self.etag,
            "sha256": self.sha256,
            "content_type": self.content_type,
            "metadata": self.metadata,
            "last_modified": self.created,
            "parts_count": self.parts_count,
        }


@dataclass(frozen=True)
class Conditions:
    """Preconditions on the current object (ETag and version id)."""

    if_match: list[str] | None = None  # ETags, or ["*"]
    if_none_match: list[str] | None = None  # ETags, or ["*"] for create-only
    if_version_match: str | None = None
    if_version_none_match: str | None = None

    @property
    def empty(self) -> bool:
        return (self.if_match is None and self.if_none_match is None and self.if_version_match is None
                and self.if_version_none_match is None)


def parse_etag_list(header: str | None) -> list[str] | None:
    if header is None:
        return None
    items = [p.strip() for p in header.split(",") if p.strip()]
    if not items:
        raise AnvilError("InvalidArgument", "empty ETag list in precondition")
    # Weak tags (W/"...") compare on their opaque tag; strip the W/ before the quotes.
    return [i if i == "*" else i.removeprefix("W/").strip('"') for i in items]


# The message of the PreconditionFailed an If-Match write gets when there is no current object (none, or a
# delete marker): the S3 gateway answers that one 404 NoSuchKey, as S3 does.
IF_MATCH_NO_OBJECT = "If-Match: there is no current object to match"


def check_write_conditions(current: ObjectVersion | None, cond: Conditions) -> None:
    live = current if current is not None and not current.delete_marker else None
    if cond.if_none_match is not None:
        if "*" in cond.if_none_match:
            if live is not None:
                raise AnvilError("PreconditionFailed", "object already exists (If-None-Match: *)")
        elif live is not None and live.etag in cond.if_none_match:
            raise AnvilError("PreconditionFailed", "If-None-Match matched the current ETag")
    if cond.if_match is not None:
        if live is None:
            raise AnvilError("PreconditionFailed", IF_MATCH_NO_OBJECT)
        if "*" not in cond.if_match and live.etag not in cond.if_match:
            raise AnvilError("PreconditionFailed", "If-Match did not match the current ETag")
    if cond.if_version_match is not None:
        if current is None or current.version_id != cond.if_version_match:
            raise AnvilError("PreconditionFailed", "the current version id does not match")
    if cond.if_version_none_match is not None and current is not None:
        if current.version_id == cond.if_version_none_match:
            raise AnvilError("PreconditionFailed", "the current version id matches")


def check_read_conditions(obj: ObjectVersion, cond: Conditions) -> None:
    if cond.if_match is not None and "*" not in cond.if_match and obj.etag not in cond.if_match:
        raise AnvilError("PreconditionFailed", "If-Match did not match the ETag")
    if cond.if_version_match is not None and obj.version_id != cond.if_version_match:
        raise AnvilError("PreconditionFailed", "the version id does not match")
    if cond.if_none_match is not None and ("*" in cond.if_none_match or obj.etag in cond.if_none_match):
        raise AnvilError("NotModified", "not modified", headers={"ETag": f'"{obj.etag}"'})
    if cond.if_version_none_match is not None and obj.version_id == cond.if_version_none_match:
        raise AnvilError("NotModified", "not modified", headers={"ETag": f'"{obj.etag}"'})


def new_version_id(seq: int) -> str:
    """The record's seq (fixed-width hex), a dot, then randomness.

    The seq makes a version id a position as well as a name: a version listing resumes after its
    marker even when that version was deleted between pages. (Ids made before this format are 32
    hex digits with no dot; they still work everywhere except as the marker of a deleted version.)
    """
    return f"{seq:016x}.{secrets.token_hex(8)}"


def version_id_seq(version_id: str) -> int | None:
    seq, dot, rand = version_id.partition(".")
    if not dot or len(seq) != 16 or len(rand) != 16:
        return None
    try:
        int(rand, 16)
        return int(seq, 16)
    except ValueError:
        return None


def fingerprint(*parts: Any) -> str:
    """A stable digest of a request's meaning, for idempotency comparison."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def multipart_etag(md5s: list[str]) -> str:
    joined = b"".join(bytes.fromhex(m) for m in md5s)
    return f"{hashlib.md5(joined).hexdigest()}-{len(md5s)}"


def composite_checksum(algorithm: str, part_checksums: list[str]) -> str:
    """S3's checksum of a multipart object: the checksum of the parts' raw checksums, then `-N`."""
    h = new_checksum(algorithm)
    for c in part_checksums:
        h.update(base64.b64decode(c))
    return f"{h.b64()}-{len(part_checksums)}"


def _encode_token(payload: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode_token(token: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        # Strict: a token is the client's to tamper with (deep nesting raised RecursionError, a
        # "\ud800" key failed in SQLite: both were 500s).
        payload = jsontext.loads(raw)
        if not isinstance(payload, dict):
            raise ValueError
        return payload
    except (ValueError, UnicodeDecodeError):
        raise AnvilError("InvalidArgument", "malformed continuation token") from None


def _prefix_upper(prefix: str) -> str | None:
    """The smallest string greater than every string starting with `prefix` (None: no bound)."""
    chars = list(prefix)
    while chars:
        last = ord(chars[-1])
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:
                nxt = 0xE000
            chars[-1] = chr(nxt)
            return "".join(chars)
        chars.pop()
    return None


@dataclass(frozen=True)
class _After:
    """A place in a listing ordered by (key, tie): the rows after it have a greater key, or the same
    key and (`inclusive`) any tie or (`tie` set) a tie that comes after this one."""

    key: str
    inclusive: bool = False
    tie: Any = None


def _keyed_page(
    conn: Connection, select: str, args: list[Any], tie: tuple[str, list[Any]] | None, after: _After,
    upper: str | None, n: int, *, order: str,
) -> Iterator[tuple]:
    """At most `n` rows of `select` (a query ending in its WHERE conditions, bound by `args`) placed
    after `after` and below `upper` in `order`. `tie` is the condition, with its arguments, that
    places rows when `after` carries a tie; without one, the key alone decides.

    The rows come from the open cursor, not a fetched list: `order` follows an index, so SQLite
    steps one row per row taken, and a caller that stops early (a delimiter walk after a common
    prefix) reads no more rows than it used."""
    cond, cond_args = tie or (f"key {'>=' if after.inclusive else '>'} ?", [after.key])
    sql, params = f"{select} AND {cond}", [*args, *cond_args]
    if upper is not None:
        sql += " AND key < ?"
        params.append(upper)
    return iter(conn.execute(f"{sql} ORDER BY {order} LIMIT ?", [*params, n]))


def _split_entries(entries: list[Any]) -> tuple[list[str], list[tuple]]:
    """A walk's page as (common prefixes, rows), each in listing order."""
    return [e for e in entries if isinstance(e, str)], [e for e in entries if not isinstance(e, str)]


def _walk(
    fetch: Callable[[_After, str | None, int], Iterator[tuple]], *, key_of: Callable[[tuple], str],
    tie_of: Callable[[tuple], Any], prefix: str, delimiter: str, limit: int, after: _After,
) -> tuple[list[Any], bool]:
    """One page of a listing ordered by (key, tie), with S3's roll-up of keys into common prefixes.

    `fetch(after, upper, n)` gives up to n rows after `after` (and keys below `upper` when it is not
    None), in listing order, lazily. Returns (entries, truncated); an entry is a row, or a common
    prefix as a str. A common prefix is one entry however many rows it covers: once it is emitted,
    the walk drops the open query and seeks, with one indexed query, to the first key past every
    key it covers (the prefix's successor), so a common prefix costs one seek and one row, a page
    costs O(limit) rows, and the next page (marker = that prefix) cannot repeat it. Reserved
    (`_anvil/`) keys never appear.
    """
    entries: list[Any] = []
    if prefix and after.key < prefix:
        after = _After(prefix, inclusive=True)
    upper = _prefix_upper(prefix) if prefix else None
    while True:
        want = limit - len(entries) + 1  # one more than fits tells whether the page is truncated
        taken = 0
        last: tuple | None = None
        jumped = False
        for row in fetch(after, upper, want):
            taken += 1
            last = row
            key = key_of(row)
            if v.is_reserved_key(key):
                continue
            if len(entries) == limit:
                return entries, True
            if delimiter:
                pos = key.find(delimiter, len(prefix))
                if pos >= 0:
                    cp = key[: pos + len(delimiter)]
                    entries.append(cp)
                    nxt = _prefix_upper(cp)
                    if nxt is None:
                        return entries, False
                    after, jumped = _After(nxt, inclusive=True), True
                    break
            entries.append(row)
        if not jumped:
            if taken < want or last is None:
                return entries, False
            after = _After(key_of(last), tie=tie_of(last))


def marks_common_prefix(marker: str, prefix: str, delimiter: str) -> bool:
    """Whether a key marker is a common prefix an earlier page returned (S3 then sets NextKeyMarker to
    it): the listing resumes after every key it rolled up, not inside it."""
    return bool(delimiter) and marker.startswith(prefix) and marker.endswith(delimiter) and (
        marker.find(delimiter, len(prefix)) == len(marker) - len(delimiter))


def token_after_prefix(common_prefix: str) -> str:
    """A continuation token that resumes a listing after every key under `common_prefix`."""
    return _encode_token({"k": common_prefix, "p": True})


@dataclass
class ListResult:
    objects: list[ObjectVersion] = field(default_factory=list)
    common_prefixes: list[str] = field(default_factory=list)
    truncated: bool = False
    next_token: str | None = None
    # With `list_objects(rows=True)`: the page's rows as read (`_VERSION_COLUMNS` order) instead of
    # `objects`, for answers built straight from them (api/native.py, api/s3/listings.py).
    rows: list[tuple] = field(default_factory=list)


@dataclass
class RenderedPage:
    """A page of `list_objects_rendered`: the rendered entries, and the token of the next page."""

    page: listing.Page
    next_token: str | None


@dataclass
class RenderedVersions:
    """A page of `list_versions_rendered`: the rendered entries and the next page's markers."""

    page: listing.Page
    next_key_marker: str | None
    next_version_marker: str | None


def _list_position(start_after: str, token: str | None) -> _After | None:
    """Where a `list_objects` page starts: after `start_after`, or where `token` says; None when the
    token resumes past every possible key (nothing left)."""
    if not token:
        return _After(start_after)
    t = _decode_token(token)
    if not isinstance(t.get("k"), str):
        raise AnvilError("InvalidArgument", "malformed continuation token")
    if t.get("p"):
        nxt = _prefix_upper(t["k"])
        return None if nxt is None else _After(nxt, inclusive=True)
    return _After(t["k"])


# Reserved keys (`_anvil/...`) as a key range, for listings filtered in SQL.
_RESERVED_RANGE = (v.RESERVED_PREFIX, _prefix_upper(v.RESERVED_PREFIX) or "")


def row_parts_count(row: tuple) -> int | None:
    """`ObjectVersion.parts_count` of a listed row, decoding its chunks only for multipart objects."""
    return len(_json_value(row[11])[0]) if "-" in row[7] else None


@dataclass
class VersionListResult:
    versions: list[ObjectVersion] = field(default_factory=list)
    common_prefixes: list[str] = field(default_factory=list)
    truncated: bool = False
    next_key_marker: str | None = None
    next_version_marker: str | None = None


@dataclass
class UploadListResult:
    uploads: list[dict[str, Any]] = field(default_factory=list)
    common_prefixes: list[str] = field(default_factory=list)
    truncated: bool = False
    next_key_marker: str | None = None
    next_upload_id_marker: str | None = None


def _new_upload_id() -> str:
    """32 hex digits that sort by creation time: nanoseconds since the epoch, then 64 random bits.

    S3 lists a key's uploads in initiation order yet compares upload-id-marker lexicographically;
    with such ids the two orders are one, and paging needs no lookup of the marker's upload (which
    may have been completed or aborted since the previous page). Uploads made before these ids were
    uuid4s: they still page exactly once each, only not in initiation order among themselves.
    """
    return f"{time.time_ns():016x}{secrets.token_hex(8)}"


class ObjectService:
    def __init__(self, storage: Storage):
        self.storage = storage
        self.catalog = storage.catalog
        self.blobs = storage.blobs
        # Writes that grow the store are admitted only above the free-space threshold
        # (storage.space); deletes, aborts and bucket removal are never refused for space.
        self.space = storage.space
        self.catalog.migrate("objects", MIGRATIONS)
        self._corruption_listeners: list[CorruptionListener] = []
        self._bucket_delete_hooks: list[BucketDeleteHook] = []
        # Bucket rows and settings read on every request (the gate's tenant check, prepare_write, the
        # lifecycle lookup of S3 PUT): cached per name, dropped by every committed `bucket.*` event --
        # this node's in the writer before the change is answered (Catalog.add_event_listener), other
        # nodes' through the journal follower (`journal_changed`). The generation keeps a read that
        # raced a change from storing what it read before it.
        self._buckets: dict[str, _CachedBucket] = {}
        self._buckets_generation = 0
        self._buckets_lock = threading.Lock()
        self.catalog.add_event_listener(self.journal_changed)

    # ---------------------------------------------------------------- helpers

    def _submit(self, ctx: RequestContext, fn, fp: str, then=None) -> concurrent.futures.Future:
        key = ctx.idempotency_key
        if key is None:  # nothing to look up or record (`idempotency.run` would only call `fn`)
            return self.catalog.submit(fn, actor=ctx.actor, request_id=ctx.request_id, then=then)
        idempotency.validate_key(key)
        return self.catalog.submit(
            lambda txn: idempotency.run(txn, key, fp, fn), actor=ctx.actor, request_id=ctx.request_id, then=then
        )

    def _mutate(self, ctx: RequestContext, fn, fp: str) -> dict[str, Any]:
        return self._submit(ctx, fn, fp).result()

    @staticmethod
    def _bucket_row(conn: Connection, name: str) -> Bucket | None:
        row = conn.execute(
            "SELECT name, tenant, created, versioning, public FROM buckets WHERE name = ?", (name,)
        ).fetchone()
        return Bucket(row[0], row[1], row[2], row[3], bool(row[4])) if row else None

    def _require_bucket(self, conn: Connection, name: str) -> Bucket:
        b = self._bucket_row(conn, name)
        if b is None:
            raise AnvilError("NotFound", "bucket not found")
        return b

    def _cached_bucket(self, name: str) -> _CachedBucket | None:
        """The bucket and its settings as last committed (None: no such bucket; absence is not cached)."""
        hit = self._buckets.get(name)
        if hit is not None:
            return hit
        generation = self._buckets_generation
        conn = self.catalog.reader()
        bucket: Bucket | None = None
        settings: dict[str, str] = {}
        for row in conn.execute(_BUCKET_WITH_SETTINGS, (name, name)).fetchall():
            if row[0] == 0:
                bucket = Bucket(row[1], row[2], row[3], row[4], bool(row[5]))
            else:
                settings[row[6]] = row[7]
        if bucket is None:
            return None
        entry = _CachedBucket(bucket, settings)
        # Not kept when read inside a caller's read transaction (its snapshot may predate a change
        # already dropped from the cache), nor when a change was dropped while this read ran.
        if not records.in_transaction(conn):
            with self._buckets_lock:
                if generation == self._buckets_generation:
                    if len(self._buckets) >= BUCKET_CACHE_SIZE:
                        self._buckets.clear()
                    self._buckets[name] = entry
        return entry

    def forget_buckets(self, names: set[str] | None = None) -> None:
        """Drop cached buckets (None: all): after a change to their rows or settings."""
        with self._buckets_lock:
            self._buckets_generation += 1
            if names is None:
                self._buckets.clear()
            else:
                for name in names:
                    self._buckets.pop(name, None)

    def journal_changed(self, events: list[Any]) -> None:
        """Committed journal events (this node's from the writer, other nodes' from the follower): a
        `bucket.*` event drops its bucket from the cache."""
        names = None
        for ev in events:
            if ev.kind.startswith("bucket."):
                name = ev.payload.get("bucket") if isinstance(ev.payload, dict) else None
                if not isinstance(name, str):
                    self.forget_buckets()
                    return
                if names is None:
                    names = {name}
                else:
                    names.add(name)
        if names is not None:
            self.forget_buckets(names)

    @staticmethod
    def _latest(conn: Connection, bucket: str, key: str) -> ObjectVersion | None:
        row = conn.execute(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE bucket = ? AND key = ? AND is_latest = 1",
            (bucket, key),
        ).fetchone()
        return ObjectVersion.from_row(row) if row else None

    @staticmethod
    def _bucket_and_latest(conn: Connection, bucket: str, key: str) -> tuple[Bucket | None, ObjectVersion | None]:
        """The bucket and the key's latest version, in one statement (a PUT's commit reads both)."""
        found: Bucket | None = None
        latest: ObjectVersion | None = None
        for row in conn.execute(_BUCKET_AND_LATEST, (bucket, bucket, key)).fetchall():
            if row[0] == 0:
                found = Bucket(row[15], row[16], row[17], row[18], bool(row[19]))
            else:
                latest = ObjectVersion.from_row(row[1:15])
        return found, latest

    @staticmethod
    def _version(conn: Connection, bucket: str, key: str, version_id: str) -> ObjectVersion | None:
        row = conn.execute(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE bucket = ? AND key = ? AND version_id = ?",
            (bucket, key, version_id),
        ).fetchone()
        return ObjectVersion.from_row(row) if row else None

    @staticmethod
    def _clear_latest(conn: Connection, bucket: str, key: str) -> None:
        conn.execute("UPDATE versions SET is_latest = 0 WHERE bucket = ? AND key = ? AND is_latest = 1", (bucket, key))

    # ---------------------------------------------------------------- buckets

    def create_bucket(self, ctx: RequestContext, name: str, *, versioning: str = "") -> dict[str, Any]:
        v.check_bucket_name(name)
        if versioning not in ("", "Enabled"):
            # Suspended only means something for a bucket that was once Enabled (S3 agrees).
            raise AnvilError("InvalidArgument", "a new bucket's versioning is Enabled or unset")
        self.space.admit()

        def fn(txn: Txn) -> dict[str, Any]:
            existing = self._bucket_row(txn.conn, name)
            if existing is not None:
                raise AnvilError("AlreadyExists", "bucket already exists")
            txn.conn.execute(
                "INSERT INTO buckets(name, tenant, created, versioning) VALUES (?,?,?,?)",
                (name, ctx.tenant, txn.now, versioning),
            )
            payload = {"bucket": name, "tenant": ctx.tenant, "versioning": versioning}
            txn.emit(ctx.tenant, "bucket.create", name, payload)
            return Bucket(name, ctx.tenant, txn.now, versioning, False).to_dict()

        return self._mutate(ctx, fn, fingerprint("bucket.create", name, versioning))

    def list_buckets(self, tenant: str | None = None) -> list[Bucket]:
        conn = self.catalog.reader()
        if tenant is None:
            rows = conn.execute("SELECT name, tenant, created, versioning, public FROM buckets ORDER BY name")
        else:
            rows = conn.execute(
                "SELECT name, tenant, created, versioning, public FROM buckets WHERE tenant = ? ORDER BY name",
                (tenant,),
            )
        return [Bucket(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def get_bucket(self, name: str) -> Bucket:
        entry = self._cached_bucket(name)
        if entry is None:
            raise AnvilError("NotFound", "bucket not found")
        return entry.bucket

    def find_bucket(self, name: str) -> Bucket | None:
        entry = self._cached_bucket(name)
        return entry.bucket if entry is not None else None

    def delete_bucket(self, ctx: RequestContext, name: str) -> dict[str, Any]:
        def fn(txn: Txn) -> dict[str, Any]:
            b = self._require_bucket(txn.conn, name)
            if txn.conn.execute("SELECT 1 FROM versions WHERE bucket = ? LIMIT 1", (name,)).fetchone():
                raise AnvilError("BucketNotEmpty", "bucket is not empty (objects, versions or delete markers remain)")
            if txn.conn.execute("SELECT 1 FROM multipart_uploads WHERE bucket = ? LIMIT 1", (name,)).fetchone():
                raise AnvilError("BucketNotEmpty", "bucket has multipart uploads in progress")
            self._bucket_deleting(txn, name, b.tenant)
            self._drop_bucket_config(txn, name)
            txn.conn.execute("DELETE FROM buckets WHERE name = ?", (name,))
            txn.emit(b.tenant, "bucket.delete", name, {"bucket": name})
            return {"bucket": name, "deleted": True}

        return self._mutate(ctx, fn, fingerprint("bucket.delete", name))

    def delete_bucket_aborting_uploads(self, ctx: RequestContext, name: str) -> dict[str, Any]:
        """DeleteBucket as the S3 gateway offers it: a bucket with no versions left is deleted even
        while multipart uploads are in progress; they are aborted in the same transaction (one
        `multipart.abort` event each, then `bucket.delete`), as Ceph RGW does. Any version or delete
        marker still makes it BucketNotEmpty, and then nothing is aborted."""
        def fn(txn: Txn) -> dict[str, Any]:
            b = self._require_bucket(txn.conn, name)
            if txn.conn.execute("SELECT 1 FROM versions WHERE bucket = ? LIMIT 1", (name,)).fetchone():
                raise AnvilError("BucketNotEmpty", "bucket is not empty (objects, versions or delete markers remain)")
            # Before any abort: a hook that refuses leaves the uploads in progress too.
            self._bucket_deleting(txn, name, b.tenant)
            uploads = txn.conn.execute(
                "SELECT upload_id, key, tenant FROM multipart_uploads WHERE bucket = ? ORDER BY key, upload_id",
                (name,)).fetchall()
            for upload_id, key, tenant in uploads:
                txn.conn.execute("DELETE FROM multipart_uploads WHERE upload_id = ?", (upload_id,))
                txn.emit(tenant, "multipart.abort", f"{name}/{key}",
                         {"bucket": name, "key": key, "upload_id": upload_id})
            self._drop_bucket_config(txn, name)
            txn.conn.execute("DELETE FROM buckets WHERE name = ?", (name,))
            txn.emit(b.tenant, "bucket.delete", name, {"bucket": name})
            return {"bucket": name, "deleted": True, "aborted_uploads": len(uploads)}

        return self._mutate(ctx, fn, fingerprint("bucket.delete", name))

    def on_bucket_delete(self, hook: BucketDeleteHook) -> None:
        """Subsystems above objects that keep per-bucket records (index definitions, artefacts) are
        asked inside the delete's transaction: a hook refuses by raising (nothing is written) or drops
        its rows with their own journal events, which commit with the `bucket.delete`."""
        self._bucket_delete_hooks.append(hook)

    def _bucket_deleting(self, txn: Txn, name: str, tenant: str) -> None:
        for hook in self._bucket_delete_hooks:
            hook(txn, name, tenant)

    @staticmethod
    def _drop_bucket_config(txn: Txn, name: str) -> None:
        """Per-bucket S3 configuration rows go with their bucket."""
        txn.conn.execute("DELETE FROM bucket_settings WHERE bucket = ?", (name,))

    def set_versioning(self, ctx: RequestContext, name: str, status: str) -> dict[str, Any]:
        if status not in ("Enabled", "Suspended"):
            raise AnvilError("InvalidArgument", "versioning status must be Enabled or Suspended")

        def fn(txn: Txn) -> dict[str, Any]:
            b = self._require_bucket(txn.conn, name)
            if b.versioning != status:
                txn.conn.execute("UPDATE buckets SET versioning = ? WHERE name = ?", (status, name))
                txn.emit(b.tenant, "bucket.versioning", name, {"bucket": name, "status": status})
            return {"bucket": name, "versioning": status}

        return self._mutate(ctx, fn, fingerprint("bucket.versioning", name, status))

    def set_public(self, ctx: RequestContext, name: str, public: bool) -> dict[str, Any]:
        def fn(txn: Txn) -> dict[str, Any]:
            b = self._require_bucket(txn.conn, name)
            if b.public != public:
                txn.conn.execute("UPDATE buckets SET public = ? WHERE name = ?", (int(public), name))
                txn.emit(b.tenant, "bucket.public", name, {"bucket": name, "public": public})
            return {"bucket": name, "public": public}

        return self._mutate(ctx, fn, fingerprint("bucket.public", name, public))

    # ---------------------------------------------------------------- writing objects

    def prepare_write(self, bucket: str, key: str, *, incoming: int = 0) -> Bucket:
        """Everything checkable before a body is read: reserved namespace first, then names.
        `incoming`: the body's declared size, admitted here (`store_bytes(admitted=True)` then skips
        its own check: one free-space query per small PUT, not two)."""
        v.check_object_key(key)
        bucket_row = self.get_bucket(bucket)
        self.space.admit(incoming)  # before the body is read: a full store answers without taking it
        return bucket_row

    def body_writer(self, *, max_size: int | None = None, expected_size: int | None = None) -> BlobWriter:
        """An uncommitted blob for a body as it streams in; `store_body` makes it durable, `abort` drops it.

        `expected_size` (a declared Content-Length) is admitted up front: a body that would take the
        free space below the threshold is refused before any of it is read."""
        fits = expected_size is not None and (max_size is None or expected_size <= max_size)
        self.space.admit(expected_size if fits else 0)  # an oversized one fails EntityTooLarge instead
        return self.blobs.writer(max_size=max_size)

    def store_body(
        self, writer: BlobWriter, *, expected_sha256: str | None = None, expected_md5: str | None = None
    ) -> BlobInfo:
        """Verify the caller's expected checksums, then make the body durable. Mismatch stores nothing."""
        info = writer.digests()
        if expected_sha256 is not None and expected_sha256.lower() != info.sha256:
            writer.abort()
            raise AnvilError("BadDigest", "the body does not match the expected SHA-256")
        if expected_md5 is not None and expected_md5.lower() != info.md5:
            writer.abort()
            raise AnvilError("BadDigest", "the body does not match the expected MD5")
        if info.size <= self.blobs.inline_max:
            data = writer.held()
            if data is not None:
                writer.abort()  # the body goes inline with its record: no file, no fsync
                return InlineBody(info.sha256, info.md5, info.size, data)
        return writer.commit()

    def store_bytes(
        self, data: bytes, *, expected_sha256: str | None = None, expected_md5: str | None = None,
        digests: BlobInfo | None = None, admitted: bool = False,
    ) -> BlobInfo:
        """`store_body` for a body already in memory (small PUTs). Mismatch stores nothing.
        `digests`: `digest_bytes(data)`, when the caller has computed it already. `admitted`: its size
        was admitted already (`prepare_write(incoming=len(data))`)."""
        info = digests if digests is not None else digest_bytes(data)
        if expected_sha256 is not None and expected_sha256.lower() != info.sha256:
            raise AnvilError("BadDigest", "the body does not match the expected SHA-256")
        if expected_md5 is not None and expected_md5.lower() != info.md5:
            raise AnvilError("BadDigest", "the body does not match the expected MD5")
        if not admitted:
            self.space.admit(len(data))
        if info.size <= self.blobs.inline_max:
            # Stored by the mutation that references it, in the same transaction (`_store_inline`):
            # one group-commit flush covers body, record and journal event.
            return InlineBody(info.sha256, info.md5, info.size, data)
        return self.blobs.put_bytes(data, info)

    @staticmethod
    def _store_inline(txn: Txn, body: BlobInfo, *, defer: bool = False) -> None:
        """Write a small body inline inside the mutation that references it (no-op for a blob file).
        `defer`: at the end of the batch, with the batch's other bodies (Txn.defer), for a mutation after
        which nothing in the batch needs to read the row (a simple PUT: copies and gc in the same batch
        only refresh or drop rows, and the upsert then rewrites it whole)."""
        if isinstance(body, InlineBody):
            if defer:
                txn.defer(inline.PUT, (body.sha256, len(body.data), body.data, txn.now))
            else:
                inline.put(txn.conn, body.sha256, body.data, txn.now)

    def _write_version(
        self, txn: Txn, ctx: RequestContext, bucket: Bucket, key: str, *, size: int, etag: str,
        sha256: str | None, content_type: str, metadata: dict[str, str], chunks: list[tuple[str, int]],
        cond: Conditions, source: dict[str, Any], extra: dict[str, Any] | None = None,
        current: ObjectVersion | None | _Unread = _UNREAD,
    ) -> dict[str, Any]:
        """Apply S3 versioning semantics for a new body and emit `object.put`. `current`: the key's
        latest version as the caller read it in this transaction (`_UNREAD`: read it here)."""
        conn = txn.conn
        name = bucket.name
        if isinstance(current, _Unread):
            current = self._latest(conn, name, key)
        check_write_conditions(current, cond)
        replaced: list[str] = []
        # Only the statements the bucket's state needs: a new key writes one row.
        if bucket.versioning == "Enabled":
            version_id = new_version_id(txn.next_seq)
            if current is not None:
                conn.execute("UPDATE versions SET is_latest = 0 WHERE bucket = ? AND key = ? AND version_id = ?",
                             (name, key, current.version_id))
        else:
            version_id = NULL_VERSION
            if current is not None and current.version_id == NULL_VERSION:
                # The null version is the latest: replaced, and no other version of the key is latest.
                conn.execute("DELETE FROM versions WHERE bucket = ? AND key = ? AND version_id = ?",
                             (name, key, NULL_VERSION))
                replaced.append(NULL_VERSION)
            elif bucket.versioning or current is not None:
                # Suspended (or, never versioned, a latest that is not the null version: not a state
                # this service writes, handled as the general case rather than trusted): a null
                # version further back goes, and the latest stops being it.
                if self._version(conn, name, key, NULL_VERSION) is not None:
                    conn.execute("DELETE FROM versions WHERE bucket = ? AND key = ? AND version_id = ?",
                                 (name, key, NULL_VERSION))
                    replaced.append(NULL_VERSION)
                if current is not None:
                    conn.execute("UPDATE versions SET is_latest = 0 WHERE bucket = ? AND key = ? AND version_id = ?",
                                 (name, key, current.version_id))
            # Never versioned and no latest version: a key there has no other version (every write
            # replaces the null version, every delete removes rows), so there is nothing to look up.
        seq = txn.next_seq
        meta_json = _json_sorted(metadata)
        chunks_json = _chunks_json(chunks)
        txn.run.execute(
            f"INSERT INTO versions({_VERSION_COLUMNS}) VALUES (?,?,?,?,1,0,?,?,?,?,?,?,?,?)",
            (name, key, version_id, seq, size, etag, sha256, content_type, meta_json, chunks_json, txn.now,
             _json_sorted(extra)),
        )
        # Keys in the canonical (sorted) order the journal writes them in: the encoder still sorts them, but
        # a list already in order is one comparison per key (out of order, the sort was ~8 k instructions
        # per PUT in the writer thread). `source`'s and `extra` may land out of order: the text is the same.
        payload = {
            "bucket": name, "chunks": chunks, "content_type": content_type, "etag": etag, "key": key,
            "metadata": metadata, "replaced": replaced, "sha256": sha256, "size": size, **source,
            "version_id": version_id, "versioning": bucket.versioning,
        }
        if extra:
            payload["extra"] = extra
        txn.emit(bucket.tenant, "object.put", f"{name}/{key}", payload)
        # `cursor`: the journal seq of this write, for queries that must see it (indexes' min_cursor).
        return {
            "bucket": name, "key": key, "version_id": version_id, "etag": etag,
            "sha256": sha256, "size": size, "cursor": seq,
        }

    def put_object(
        self, ctx: RequestContext, bucket: str, key: str, body: BlobInfo, *, content_type: str | None = None,
        metadata: dict[str, str] | None = None, cond: Conditions = Conditions(),
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return self.submit_put_object(
            ctx, bucket, key, body, content_type=content_type, metadata=metadata, cond=cond, extra=extra
        ).result()

    def submit_put_object(
        self, ctx: RequestContext, bucket: str, key: str, body: BlobInfo, *, content_type: str | None = None,
        metadata: dict[str, str] | None = None, cond: Conditions = Conditions(),
        extra: dict[str, Any] | None = None, then: Callable[[Settled], None] | None = None,
        checked: bool = False,
    ) -> concurrent.futures.Future:
        """`put_object` without waiting: the future resolves once the version is durably committed.

        Validation errors raise here, before anything is queued. An event loop awaits the future
        (asyncio.wrap_future) instead of parking a worker thread on it. `then`: handed the outcome (a
        `Settled`) from the writer thread instead (`Catalog.submit`). `checked`: the caller has already
        checked the key (`check_object_key`) and the content type (`check_content_type`, so not None)
        and normalised the metadata, as the small PUT's plan does (api/fastput.py): not done again.
        """
        if checked:
            ct, meta = content_type, metadata or {}
        else:
            v.check_object_key(key)
            ct = v.check_content_type(content_type)
            meta = v.normalise_metadata(metadata)
        # Compared only for a request with an Idempotency-Key (idempotency.run): not worth its JSON otherwise.
        fp = (fingerprint("object.put", bucket, key, body.sha256, ct, meta, cond.__dict__, extra)
              if ctx.idempotency_key is not None else "")

        def fn(txn: Txn) -> dict[str, Any]:
            b, current = self._bucket_and_latest(txn.run, bucket, key)
            if b is None:
                raise AnvilError("NotFound", "bucket not found")
            self._store_inline(txn, body, defer=True)
            return self._write_version(
                txn, ctx, b, key, size=body.size, etag=body.md5, sha256=body.sha256, content_type=ct,
                metadata=meta, chunks=[(body.sha256, body.size)], cond=cond, source={"source": "put"},
                extra=extra, current=current,
            )

        return self._submit(ctx, fn, fp, then)

    def delete_object(
        self, ctx: RequestContext, bucket: str, key: str, *, version_id: str | None = None,
        cond: Conditions = Conditions(),
    ) -> dict[str, Any]:
        v.check_object_key(key)
        fp = fingerprint("object.delete", bucket, key, version_id, cond.__dict__)

        def fn(txn: Txn) -> dict[str, Any]:
            conn = txn.conn
            b = self._require_bucket(conn, bucket)
            current = self._latest(conn, bucket, key)
            check_write_conditions(current, cond)
            payload: dict[str, Any] = {"bucket": bucket, "key": key, "versioning": b.versioning}
            if version_id is not None:
                target = self._version(conn, bucket, key, version_id)
                if target is None:
                    raise AnvilError("NotFound", "version not found")
                conn.execute(
                    "DELETE FROM versions WHERE bucket = ? AND key = ? AND version_id = ?", (bucket, key, version_id)
                )
                promoted = None
                if target.is_latest:
                    row = conn.execute(
                        "SELECT version_id FROM versions WHERE bucket = ? AND key = ? ORDER BY seq DESC LIMIT 1",
                        (bucket, key),
                    ).fetchone()
                    if row:
                        promoted = row[0]
                        conn.execute(
                            "UPDATE versions SET is_latest = 1 WHERE bucket = ? AND key = ? AND version_id = ?",
                            (bucket, key, promoted),
                        )
                payload.update(version_id=version_id, delete_marker=False, removed=[version_id],
                               promoted=promoted, was_delete_marker=target.delete_marker)
                cursor = txn.next_seq
                txn.emit(b.tenant, "object.delete", f"{bucket}/{key}", payload)
                return {"bucket": bucket, "key": key, "version_id": version_id,
                        "delete_marker": target.delete_marker, "cursor": cursor}
            if b.versioning == "":
                if current is None:
                    # S3 answers success for deleting an absent key; nothing changes, no event.
                    return {"bucket": bucket, "key": key, "version_id": None, "delete_marker": False}
                conn.execute("DELETE FROM versions WHERE bucket = ? AND key = ?", (bucket, key))
                payload.update(version_id=None, delete_marker=False, removed=[current.version_id], promoted=None)
                cursor = txn.next_seq
                txn.emit(b.tenant, "object.delete", f"{bucket}/{key}", payload)
                return {"bucket": bucket, "key": key, "version_id": None, "delete_marker": False, "cursor": cursor}
            removed: list[str] = []
            if b.versioning == "Enabled":
                marker_id = new_version_id(txn.next_seq)
            else:
                marker_id = NULL_VERSION
                if self._version(conn, bucket, key, NULL_VERSION) is not None:
                    conn.execute(
                        "DELETE FROM versions WHERE bucket = ? AND key = ? AND version_id = ?",
                        (bucket, key, NULL_VERSION),
                    )
                    removed.append(NULL_VERSION)
            self._clear_latest(conn, bucket, key)
            conn.execute(
                f"INSERT INTO versions({_VERSION_COLUMNS}) VALUES (?,?,?,?,1,1,0,'',NULL,'',?,?,?,'{{}}')",
                (bucket, key, marker_id, txn.next_seq, "{}", "[]", txn.now),
            )
            payload.update(version_id=marker_id, delete_marker=True, removed=removed, promoted=None)
            cursor = txn.next_seq
            txn.emit(b.tenant, "object.delete", f"{bucket}/{key}", payload)
            return {"bucket": bucket, "key": key, "version_id": marker_id, "delete_marker": True, "cursor": cursor}

        return self._mutate(ctx, fn, fp)

    def copy_object(
        self, ctx: RequestContext, *, src_bucket: str, src_key: str, src_version: str | None, bucket: str,
        key: str, metadata_directive: str = "COPY", content_type: str | None = None,
        metadata: dict[str, str] | None = None, cond: Conditions = Conditions(),
        src_cond: Conditions = Conditions(), system_metadata: dict[str, str] | None = None,
        tags: list[list[str]] | None = None, replace_tags: bool = False, public: bool = False,
    ) -> dict[str, Any]:
        """`replace_tags`: the copy gets `tags` (None or []: none) instead of the source's (S3's
        `x-amz-tagging-directive: REPLACE`); `public`: the copy is publicly readable (canned
        `public-read`). Both are part of the copy's one mutation, so no reader ever sees the copy
        with the source's tags or ACL."""
        v.check_object_key(src_key)
        v.check_object_key(key)
        if metadata_directive not in ("COPY", "REPLACE"):
            raise AnvilError("InvalidArgument", "metadata directive must be COPY or REPLACE")
        new_meta = v.normalise_metadata(metadata) if metadata_directive == "REPLACE" else None
        new_ct = v.check_content_type(content_type) if metadata_directive == "REPLACE" else None
        fp = fingerprint("object.copy", src_bucket, src_key, src_version, bucket, key, metadata_directive,
                         new_meta, new_ct, cond.__dict__, src_cond.__dict__, system_metadata,
                         tags if replace_tags else "COPY", public)
        self.space.admit()
        # A copy shares the source's blobs: verify them first, so a corrupt source fails the copy
        # (DataCorrupted) and writes nothing instead of spreading bad bytes under a new name.
        # Not-found and other source errors are left to the mutation, which decides them atomically.
        reader = self.catalog.reader()
        pre = (self._version(reader, src_bucket, src_key, src_version) if src_version
               else self._latest(reader, src_bucket, src_key))
        if pre is not None and not pre.delete_marker:
            self.verify_body(pre)

        def fn(txn: Txn) -> dict[str, Any]:
            conn = txn.conn
            self._require_bucket(conn, src_bucket)
            src = (self._version(conn, src_bucket, src_key, src_version) if src_version
                   else self._latest(conn, src_bucket, src_key))
            if src is None or (src.delete_marker and not src_version):
                raise AnvilError("NotFound", "copy source not found")
            if src.delete_marker:
                raise AnvilError("InvalidArgument", "a delete marker cannot be copied")
            if not src_cond.empty:
                try:
                    check_read_conditions(src, src_cond)
                except AnvilError as err:
                    # S3: a copy whose source-if-none-match matches fails with 412, never 304.
                    if err.code != "NotModified":
                        raise
                    raise AnvilError("PreconditionFailed", "the copy source matched If-None-Match") from None
            dst = self._require_bucket(conn, bucket)
            if metadata_directive == "COPY" and src_bucket == bucket and src_key == key and not src_version:
                raise AnvilError("InvalidArgument", "copying an object onto itself needs metadata directive REPLACE")
            extra = dict(src.extra)
            extra.pop("public", None)  # S3: a copy gets its own ACL (private unless the request says otherwise)
            if public:
                extra["public"] = True
            if replace_tags:
                extra.pop("tags", None)
                if tags:
                    extra["tags"] = [list(t) for t in tags]
            if metadata_directive == "REPLACE":
                # REPLACE swaps the stored headers too; the checksums still describe the same bytes.
                extra = {k: val for k, val in extra.items() if k != "system"}
                if system_metadata:
                    extra["system"] = dict(system_metadata)
            # The copy now references the source's bodies too: an inline one is refreshed as a
            # deduplicating write refreshes a blob file, so gc's grace period covers it.
            inline.touch(conn, (sha for sha, size in src.chunks if size <= inline.LIMIT), txn.now)
            return self._write_version(
                txn, ctx, dst, key, size=src.size, etag=src.etag, sha256=src.sha256, extra=extra,
                content_type=new_ct if new_ct is not None else src.content_type,
                metadata=new_meta if new_meta is not None else src.metadata, chunks=src.chunks, cond=cond,
                source={"source": "copy", "copy_source": {"bucket": src_bucket, "key": src_key,
                                                           "version_id": src.version_id}},
            )

        return self._mutate(ctx, fn, fp)

    # ---------------------------------------------------------------- reading objects

    def head_object(
        self, bucket: str, key: str, *, version_id: str | None = None, cond: Conditions = Conditions()
    ) -> ObjectVersion:
        return self.head_object_in(bucket, key, version_id=version_id, cond=cond)[1]

    def head_object_in(
        self, bucket: str, key: str, *, version_id: str | None = None, cond: Conditions = Conditions()
    ) -> tuple[Bucket, ObjectVersion]:
        """`head_object`, with the bucket it is in (read in the same query when no version is named)."""
        v.check_object_key(key)
        conn = self.catalog.reader()
        if version_id is None:
            # The bucket and its latest version in one statement instead of two (every small GET).
            found: Bucket | None = None
            latest: ObjectVersion | None = None
            for row in conn.execute(_BUCKET_AND_LATEST, (bucket, bucket, key)).fetchall():
                if row[0] == 0:
                    found = Bucket(row[15], row[16], row[17], row[18], bool(row[19]))
                else:
                    latest = ObjectVersion.from_row(row[1:15])
            if found is None:
                raise AnvilError("NotFound", "bucket not found")
            b = found
        else:
            b = self._require_bucket(conn, bucket)
        if version_id is not None:
            obj = self._version(conn, bucket, key, version_id)
            if obj is None:
                raise AnvilError("NotFound", "version not found")
            if obj.delete_marker:
                raise AnvilError(
                    "MethodNotAllowed", "the version is a delete marker",
                    headers={"x-anvil-delete-marker": "true", "x-anvil-version-id": obj.version_id},
                )
        else:
            obj = latest
            if obj is None:
                raise not_found("object")
            if obj.delete_marker:
                raise AnvilError(
                    "NotFound", "object not found",
                    headers={"x-anvil-delete-marker": "true", "x-anvil-version-id": obj.version_id},
                )
        if not cond.empty:
            check_read_conditions(obj, cond)
        return b, obj

    def latest_small(self, bucket: str, key: str, *, body: bool = True) -> tuple | None:
        """(tenant, version_id, delete_marker, size, etag, sha256, content_type, metadata, chunks, created,
        extra, inline body or None) of a key's latest version, in one statement; None when the key has no
        latest version. Unchecked and unverified: the caller (api/fastget.py)
        checks the key, verifies the body and sends anything unusual down the general path."""
        return self.catalog.reader().execute(_LATEST_SMALL if body else _LATEST_SMALL_HEAD, (bucket, key)).fetchone()

    def read_body(self, obj: ObjectVersion, rng: v.ByteRange | None = None) -> Iterator[bytes]:
        """The object's bytes (or a range) across its chunks, verified as they stream.

        Every blob the read touches is checked for presence and recorded size now, before the
        caller sends anything (a truncated blob fails before any header). The returned iterator
        verifies each piece before yielding it (see `BlobStore.read_verified`) and raises
        `DataCorrupted` instead of handing out a bad byte.
        """
        segments = self._segments(obj, rng)
        if len(segments) == 1 and not needs_sidecar(segments[0][1]):
            # One blob of at most a chunk (every small GET): read and verified here, at once.
            sha, size, lo, n = segments[0]
            try:
                return iter((self.blobs.read_small(sha, size, lo, n),))
            except BlobCorrupted as e:
                raise self._corrupted(obj, e) from None
        for sha, size, _, _ in segments:
            try:
                self.blobs.check_size(sha, size)
            except BlobCorrupted as e:
                raise self._corrupted(obj, e) from None
        return self._stream(obj, segments)

    @staticmethod
    def _segments(obj: ObjectVersion, rng: v.ByteRange | None) -> list[tuple[str, int, int, int]]:
        """(blob, blob size, offset, length) for each blob the read touches."""
        start, end = (rng.start, rng.end) if rng else (0, obj.size - 1)
        out = []
        offset = 0
        for sha, size in obj.chunks:
            chunk_start, chunk_end = offset, offset + size - 1
            offset += size
            if chunk_end < start or size == 0:
                continue
            if chunk_start > end:
                break
            lo = max(start, chunk_start) - chunk_start
            hi = min(end, chunk_end) - chunk_start
            out.append((sha, size, lo, hi - lo + 1))
        return out

    def _stream(self, obj: ObjectVersion, segments: list[tuple[str, int, int, int]]) -> Iterator[bytes]:
        for sha, size, lo, n in segments:
            try:
                yield from self.blobs.read_verified(sha, size, lo, n)
            except BlobCorrupted as e:
                raise self._corrupted(obj, e) from None

    def verify_body(self, obj: ObjectVersion) -> None:
        """Read and verify every byte of a version (the source of a copy); `DataCorrupted` if bad."""
        for _ in self.read_body(obj):
            pass

    def on_corruption(self, listener: CorruptionListener) -> None:
        """Be told of every failed verification (the runtime records a finding)."""
        self._corruption_listeners.append(listener)

    def _corrupted(self, obj: ObjectVersion, e: BlobCorrupted) -> AnvilError:
        """Quarantine a blob proven bad, tell the listeners, and return the error for the caller."""
        quarantined = False
        if e.confirmed:
            try:
                quarantined = self.blobs.quarantine(e.sha256)
            except (OSError, AnvilError):  # (AnvilError: a remote blob backend did not answer)
                log.exception("could not quarantine blob %s", e.sha256)
        bucket = self.find_bucket(obj.bucket)
        report = {
            "tenant": bucket.tenant if bucket else None, "bucket": obj.bucket, "key": obj.key,
            "version_id": obj.version_id, "sha256": e.sha256, "detail": e.detail, "missing": e.missing,
            "quarantined": quarantined,
        }
        log.error("object %s/%s version %s: blob %s %s%s", obj.bucket, obj.key, obj.version_id, e.sha256,
                  e.detail, " (quarantined)" if quarantined else "")
        for listener in self._corruption_listeners:
            try:
                listener(report)
            except Exception:  # noqa: BLE001 - reporting must not hide the error from the caller
                log.exception("corruption listener failed")
        return AnvilError("DataCorrupted", "the object's stored data failed its integrity check"
                          + (" and was quarantined" if quarantined else "")
                          + "; it must be re-uploaded or repaired")

    # ---------------------------------------------------------------- listing

    def list_objects(
        self, bucket: str, *, prefix: str = "", delimiter: str = "", start_after: str = "",
        max_keys: int = 1000, token: str | None = None, rows: bool = False,
    ) -> ListResult:
        """A page of the latest versions; `rows=True` leaves them as rows (`ListResult.rows`): a page
        of 1,000 then costs no `ObjectVersion` (and no JSON decoding of chunks and metadata) per row."""
        if v.is_reserved_key(prefix):
            raise v.reserved_error()
        if not 1 <= max_keys <= 1000:
            raise AnvilError("InvalidArgument", "page size must be between 1 and 1000")
        conn = self.catalog.reader()
        with conn:  # one read transaction: the page is a consistent view
            self._require_bucket(conn, bucket)
            after = _list_position(start_after, token)
            if after is None:
                return ListResult()

            def fetch(after: _After, upper: str | None, n: int) -> Iterator[tuple]:
                return _keyed_page(conn, f"SELECT {_VERSION_COLUMNS} FROM versions WHERE bucket = ? AND is_latest = 1 "
                                   "AND delete_marker = 0", [bucket], None, after, upper, n, order="key")

            entries, truncated = _walk(fetch, key_of=lambda r: r[1], tie_of=lambda r: None, prefix=prefix,
                                       delimiter=delimiter, limit=max_keys, after=after)
        result = ListResult(truncated=truncated)
        result.common_prefixes, found = _split_entries(entries)
        if rows:
            result.rows = found
        else:
            result.objects = [ObjectVersion.from_row(r) for r in found]
        if truncated and entries:
            last = entries[-1]
            result.next_token = _encode_token({"k": last, "p": True} if isinstance(last, str)
                                              else {"k": last[1], "p": False})
        return result

    def _rendered_reader(self, prefix: str, delimiter: str, max_keys: int) -> tuple[Any, str] | None:
        """A reader and the delimiter's successor for a listing rendered in SQL (arguments checked);
        None where the engine cannot render it or the delimiter has no same-length successor."""
        delimiter_next = _rendered_listing_args(prefix, delimiter, max_keys)
        if delimiter_next is None:
            return None
        conn = self.catalog.reader()
        return (conn, delimiter_next) if listing.supported(conn) else None

    def list_objects_rendered(
        self, bucket: str, *, prefix: str = "", delimiter: str = "", start_after: str = "",
        max_keys: int = 1000, token: str | None = None, xml: bool = False, who: str = "",
    ) -> RenderedPage | None:
        """`list_objects` rendered by the record store (`storage.listing`): the native API's JSON
        objects, or (`xml`) S3's <Contents> with `who` as each one's owner element. The statement runs
        without the GIL and Python handles the page, not its rows, so a listing neither delays the
        event loop nor costs Python per key (SQLite and PostgreSQL alike). None where the engine
        cannot or the delimiter has no same-length successor: the caller then lists with `list_objects`."""
        rendered = self._rendered_reader(prefix, delimiter, max_keys)
        if rendered is None:
            return None
        conn, delimiter_next = rendered
        with conn:  # one read transaction: the page is a consistent view
            self._require_bucket(conn, bucket)
            after = _list_position(start_after, token)
            if after is None:
                return RenderedPage(listing.Page("", "", 0, False, None, False, False), None)
            if prefix and after.key < prefix:
                after = _After(prefix, inclusive=True)
            page = listing.latest_page(
                conn, bucket, prefix=prefix, delimiter=delimiter, delimiter_next=delimiter_next, after=after.key,
                inclusive=after.inclusive, upper=_prefix_upper(prefix) if prefix else None, limit=max_keys,
                reserved=_RESERVED_RANGE, xml=xml, who=who)
        next_token = None
        if page.truncated and page.last is not None:
            next_token = _encode_token({"k": page.last, "p": page.last_is_prefix})
        return RenderedPage(page, next_token)

    @staticmethod
    def _versions_position(conn: Connection, bucket: str, prefix: str, delimiter: str, key_marker: str,
                           version_marker: str) -> _After | None:
        """Where a `list_versions` page starts: strictly after (key_marker, version_marker) in (key asc,
        seq desc) order; None when it resumes past every possible key (nothing left)."""
        after = _After(key_marker)
        if marks_common_prefix(key_marker, prefix, delimiter):
            nxt = _prefix_upper(key_marker)
            if nxt is None:
                return None
            after = _After(nxt, inclusive=True)
        elif version_marker:
            if not key_marker:
                raise AnvilError("InvalidArgument", "a version marker needs a key marker")
            row = conn.execute(
                "SELECT seq FROM versions WHERE bucket = ? AND key = ? AND version_id = ?",
                (bucket, key_marker, version_marker),
            ).fetchone()
            after_seq = row[0] if row is not None else version_id_seq(version_marker)
            if after_seq is None:
                raise AnvilError("InvalidArgument", "unknown version marker")
            after = _After(key_marker, tie=after_seq)
        return after

    def list_versions_rendered(
        self, bucket: str, *, prefix: str = "", delimiter: str = "", key_marker: str = "",
        version_marker: str = "", max_keys: int = 1000, who: str = "",
    ) -> RenderedVersions | None:
        """`list_versions` rendered by the record store (`storage.listing.versions_page`) as
        ListObjectVersions' <Version>/<DeleteMarker> and <CommonPrefixes>, `who` as each entry's owner
        element. None where the engine cannot or the delimiter has no same-length successor: the
        caller then lists with `list_versions`."""
        rendered = self._rendered_reader(prefix, delimiter, max_keys)
        if rendered is None:
            return None
        conn, delimiter_next = rendered
        with conn:  # one read transaction: the page is a consistent view
            self._require_bucket(conn, bucket)
            after = self._versions_position(conn, bucket, prefix, delimiter, key_marker, version_marker)
            if after is None:
                return RenderedVersions(listing.Page("", "", 0, False, None, False, False), None, None)
            if prefix and after.key < prefix:
                after = _After(prefix, inclusive=True)
            page = listing.versions_page(
                conn, bucket, prefix=prefix, delimiter=delimiter, delimiter_next=delimiter_next, after=after.key,
                inclusive=after.inclusive, tie=after.tie, upper=_prefix_upper(prefix) if prefix else None,
                limit=max_keys, reserved=_RESERVED_RANGE, who=who)
        return RenderedVersions(page, page.last, page.last_version)

    def list_versions(
        self, bucket: str, *, prefix: str = "", delimiter: str = "", key_marker: str = "",
        version_marker: str = "", max_keys: int = 1000,
    ) -> VersionListResult:
        if v.is_reserved_key(prefix):
            raise v.reserved_error()
        if not 1 <= max_keys <= 1000:
            raise AnvilError("InvalidArgument", "page size must be between 1 and 1000")
        conn = self.catalog.reader()
        with conn:
            self._require_bucket(conn, bucket)
            after = self._versions_position(conn, bucket, prefix, delimiter, key_marker, version_marker)
            if after is None:
                return VersionListResult()

            def fetch(after: _After, upper: str | None, n: int) -> Iterator[tuple]:
                # `key >= ?` bounds the index range (the OR alone makes SQLite scan up to the marker);
                # seq runs against key order here, so a row value cannot say it.
                tie = None if after.tie is None else (
                    "key >= ? AND (key > ? OR seq < ?)", [after.key, after.key, after.tie])
                return _keyed_page(conn, f"SELECT {_VERSION_COLUMNS} FROM versions WHERE bucket = ?", [bucket],
                                   tie, after, upper, n, order="key, seq DESC")

            entries, truncated = _walk(fetch, key_of=lambda r: r[1], tie_of=lambda r: r[3], prefix=prefix,
                                       delimiter=delimiter, limit=max_keys, after=after)
        result = VersionListResult(truncated=truncated)
        result.common_prefixes, rows = _split_entries(entries)
        result.versions = [ObjectVersion.from_row(r) for r in rows]
        if truncated and entries:
            last = entries[-1]
            if isinstance(last, str):
                result.next_key_marker = last
            else:
                result.next_key_marker, result.next_version_marker = last[1], last[2]
        return result

    # ---------------------------------------------------------------- multipart

    def create_multipart(
        self, ctx: RequestContext, bucket: str, key: str, *, content_type: str | None = None,
        metadata: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """`extra` may hold "system" headers, and a "checksum_algorithm" the parts will carry with its
        "checksum_type" (COMPOSITE, the default, or FULL_OBJECT: see `complete_multipart`)."""
        v.check_object_key(key)
        ct = v.check_content_type(content_type)
        meta = v.normalise_metadata(metadata)
        upload_id = _new_upload_id()
        extra_json = json.dumps(extra or {}, sort_keys=True)
        self.space.admit()

        def fn(txn: Txn) -> dict[str, Any]:
            b = self._require_bucket(txn.conn, bucket)
            txn.conn.execute(
                "INSERT INTO multipart_uploads(upload_id, bucket, key, tenant, content_type, metadata, created, extra) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (upload_id, bucket, key, b.tenant, ct, json.dumps(meta, sort_keys=True), txn.now, extra_json),
            )
            payload = {"bucket": bucket, "key": key, "upload_id": upload_id, "content_type": ct, "metadata": meta}
            if extra:
                payload["extra"] = extra
            txn.emit(b.tenant, "multipart.create", f"{bucket}/{key}", payload)
            return {"bucket": bucket, "key": key, "upload_id": upload_id}

        return self._mutate(ctx, fn, fingerprint("multipart.create", bucket, key, ct, meta, extra))

    def get_upload(self, bucket: str, upload_id: str, *, include_completed: bool = False) -> dict[str, Any]:
        conn = self.catalog.reader()
        row = conn.execute(
            "SELECT upload_id, bucket, key, tenant, content_type, metadata, created, extra FROM multipart_uploads "
            "WHERE upload_id = ? AND bucket = ?",
            (upload_id, bucket),
        ).fetchone()
        if row is None and include_completed:
            done = conn.execute(
                "SELECT upload_id, bucket, key FROM multipart_completed WHERE upload_id = ? AND bucket = ?",
                (upload_id, bucket),
            ).fetchone()
            if done is not None:
                if v.is_reserved_key(done[2]):
                    raise v.reserved_error()
                return {"upload_id": done[0], "bucket": done[1], "key": done[2], "completed": True}
        if row is None:
            raise AnvilError("NotFound", "upload not found")
        if v.is_reserved_key(row[2]):
            raise v.reserved_error()
        return {"upload_id": row[0], "bucket": row[1], "key": row[2], "tenant": row[3],
                "content_type": row[4], "metadata": json.loads(row[5]), "created": row[6],
                "extra": json.loads(row[7] or "{}")}

    def upload_part(
        self, ctx: RequestContext, bucket: str, upload_id: str, part_number: int, body: BlobInfo,
        *, checksums: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        v.check_part_number(part_number)
        fp = fingerprint("multipart.part", bucket, upload_id, part_number, body.sha256, checksums)

        def fn(txn: Txn) -> dict[str, Any]:
            row = txn.conn.execute(
                "SELECT key, tenant FROM multipart_uploads WHERE upload_id = ? AND bucket = ?", (upload_id, bucket)
            ).fetchone()
            if row is None:
                raise AnvilError("NotFound", "upload not found")
            self._store_inline(txn, body)
            # Uploading a part number again replaces that part (S3 semantics).
            txn.conn.execute(
                "INSERT INTO multipart_parts(upload_id, part_number, sha256, md5, size, created, checksums) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT (upload_id, part_number) DO UPDATE SET "
                "sha256 = excluded.sha256, md5 = excluded.md5, size = excluded.size, created = excluded.created, "
                "checksums = excluded.checksums",
                (upload_id, part_number, body.sha256, body.md5, body.size, txn.now,
                 json.dumps(checksums or {}, sort_keys=True)),
            )
            payload = {
                "bucket": bucket, "key": row[0], "upload_id": upload_id, "part_number": part_number,
                "sha256": body.sha256, "md5": body.md5, "size": body.size,
            }
            if checksums:
                payload["checksums"] = checksums
            txn.emit(row[1], "multipart.part", f"{bucket}/{row[0]}", payload)
            return {"upload_id": upload_id, "part_number": part_number, "etag": body.md5, "size": body.size}

        return self._mutate(ctx, fn, fp)

    def list_parts(self, bucket: str, upload_id: str) -> list[dict[str, Any]]:
        self.get_upload(bucket, upload_id)
        rows = self.catalog.reader().execute(
            "SELECT part_number, md5, size, sha256, created, checksums FROM multipart_parts WHERE upload_id = ? "
            "ORDER BY part_number",
            (upload_id,),
        ).fetchall()
        return [{"part_number": r[0], "etag": r[1], "size": r[2], "sha256": r[3], "last_modified": r[4],
                 "checksums": json.loads(r[5] or "{}")} for r in rows]

    def list_uploads(
        self, bucket: str, *, prefix: str = "", delimiter: str = "", key_marker: str = "",
        upload_id_marker: str = "", max_uploads: int = 1000,
    ) -> UploadListResult:
        """One page of the uploads in progress, in (key, upload id) order, as S3's ListMultipartUploads.

        As in S3, upload_id_marker counts only with a key_marker: the page starts after that upload of
        that key; a key_marker alone starts after every upload of that key.
        """
        if v.is_reserved_key(prefix):
            raise v.reserved_error()
        if not 1 <= max_uploads <= 1000:
            raise AnvilError("InvalidArgument", "page size must be between 1 and 1000")
        conn = self.catalog.reader()
        with conn:
            self._require_bucket(conn, bucket)
            after = _After(key_marker)
            if marks_common_prefix(key_marker, prefix, delimiter):
                nxt = _prefix_upper(key_marker)
                if nxt is None:
                    return UploadListResult()
                after = _After(nxt, inclusive=True)
            elif key_marker and upload_id_marker:
                after = _After(key_marker, tie=upload_id_marker)

            def fetch(after: _After, upper: str | None, n: int) -> Iterator[tuple]:
                # A row value, so that SQLite seeks the index to the marker instead of scanning to it.
                tie = None if after.tie is None else ("(key, upload_id) > (?, ?)", [after.key, after.tie])
                select = "SELECT upload_id, key, created, extra FROM multipart_uploads WHERE bucket = ?"
                return _keyed_page(conn, select, [bucket], tie, after, upper, n, order="key, upload_id")

            entries, truncated = _walk(fetch, key_of=lambda r: r[1], tie_of=lambda r: r[0], prefix=prefix,
                                       delimiter=delimiter, limit=max_uploads, after=after)
        result = UploadListResult(truncated=truncated)
        result.common_prefixes, rows = _split_entries(entries)
        for e in rows:
            up: dict[str, Any] = {"upload_id": e[0], "key": e[1], "created": e[2]}
            extra = json.loads(e[3] or "{}")
            if extra.get("checksum_algorithm"):
                up["checksum_algorithm"] = extra["checksum_algorithm"]
                up["checksum_type"] = extra.get("checksum_type", "COMPOSITE")
            result.uploads.append(up)
        if truncated and entries:
            last = entries[-1]
            if isinstance(last, str):
                result.next_key_marker = last
            else:
                result.next_key_marker, result.next_upload_id_marker = last[1], last[0]
        return result

    def complete_multipart(
        self, ctx: RequestContext, bucket: str, upload_id: str, parts: list[tuple[int, str]],
        cond: Conditions = Conditions(), *, expected_checksum: str | None = None,
    ) -> dict[str, Any]:
        """Assemble the parts into the object. An upload made with a checksum algorithm gets the
        object's checksum from its parts' checksums: COMPOSITE (the checksum of the parts' checksums,
        `-N`) or FULL_OBJECT (a CRC of the whole object, combined from the parts' CRCs and sizes).
        `expected_checksum` is the client's value for it; a mismatch stores nothing (BadDigest)."""
        if not parts:
            raise AnvilError("InvalidArgument", "the part list is empty")
        numbers = [p[0] for p in parts]
        if any(b <= a for a, b in zip(numbers, numbers[1:], strict=False)):
            raise AnvilError("InvalidPartOrder", "parts must be listed in ascending order without repeats")
        for n, _ in parts:
            v.check_part_number(n)
        fp = fingerprint("multipart.complete", bucket, upload_id, parts, cond.__dict__, expected_checksum)
        self.space.admit()

        def fn(txn: Txn) -> dict[str, Any]:
            conn = txn.conn
            up = conn.execute(
                "SELECT key, content_type, metadata, extra FROM multipart_uploads WHERE upload_id = ? AND bucket = ?",
                (upload_id, bucket),
            ).fetchone()
            if up is None:
                raise AnvilError("NotFound", "upload not found")
            key, ct, meta, up_extra = up[0], up[1], json.loads(up[2]), json.loads(up[3] or "{}")
            stored = {
                r[0]: r[1:]
                for r in conn.execute(
                    "SELECT part_number, sha256, md5, size, checksums FROM multipart_parts WHERE upload_id = ?",
                    (upload_id,),
                )
            }
            chunks: list[tuple[str, int]] = []
            md5s: list[str] = []
            for i, (n, etag) in enumerate(parts):
                part = stored.get(n)
                if part is None or part[1] != etag.strip('"').lower():
                    raise AnvilError("InvalidPart", f"part {n} was not uploaded or its ETag does not match")
                if part[2] < v.MIN_PART_SIZE and i != len(parts) - 1:
                    raise AnvilError("EntityTooSmall", f"part {n} is smaller than 5 MiB and is not the last part")
                chunks.append((part[0], part[2]))
                md5s.append(part[1])
            b = self._require_bucket(conn, bucket)
            extra: dict[str, Any] = {}
            if up_extra.get("system"):
                extra["system"] = up_extra["system"]
            if up_extra.get("tags"):  # S3 x-amz-tagging given at CreateMultipartUpload
                extra["tags"] = up_extra["tags"]
            if up_extra.get("public"):  # S3 canned public-read given at CreateMultipartUpload
                extra["public"] = True
            algorithm = up_extra.get("checksum_algorithm")
            if algorithm:
                part_sums = [json.loads(stored[n][3] or "{}").get(algorithm) for n, _ in parts]
                if any(s is None for s in part_sums):
                    raise AnvilError("InvalidPart", f"a part was uploaded without its {algorithm} checksum")
                if up_extra.get("checksum_type") == "FULL_OBJECT":
                    value = combine_crcs(algorithm, [(s, c[1]) for s, c in zip(part_sums, chunks, strict=True)])
                else:
                    value = composite_checksum(algorithm, part_sums)
                # A composite value may be claimed with or without its `-N`.
                if expected_checksum is not None and expected_checksum not in (value, value.split("-")[0]):
                    raise AnvilError("BadDigest", f"the {algorithm.upper()} you specified did not match the "
                                     "calculated checksum")
                extra["checksums"] = {algorithm: value}
                # Each part's checksum, in part order: GetObjectAttributes' ObjectParts lists them
                # (the parts' sizes are the chunks').
                extra["part_checksums"] = part_sums
            elif expected_checksum is not None:
                raise AnvilError("InvalidArgument", "this upload was created without a checksum algorithm")
            result = self._write_version(
                txn, ctx, b, key, size=sum(c[1] for c in chunks), etag=multipart_etag(md5s), sha256=None,
                content_type=ct, metadata=meta, chunks=chunks, cond=cond,
                source={"source": "multipart", "upload_id": upload_id}, extra=extra or None,
            )
            if extra.get("checksums"):
                result["checksums"] = extra["checksums"]
            conn.execute("DELETE FROM multipart_uploads WHERE upload_id = ?", (upload_id,))
            conn.execute(
                "INSERT INTO multipart_completed(upload_id, bucket, key, completed) VALUES (?,?,?,?) "
                "ON CONFLICT (upload_id) DO UPDATE SET bucket = excluded.bucket, key = excluded.key, "
                "completed = excluded.completed",
                (upload_id, bucket, key, txn.now),
            )
            conn.execute(
                "DELETE FROM multipart_completed WHERE upload_id IN "
                "(SELECT upload_id FROM multipart_completed WHERE completed < ? LIMIT 16)",
                (txn.now - COMPLETED_UPLOAD_RETENTION,),
            )
            return result

        return self._mutate(ctx, fn, fp)

    def abort_multipart(self, ctx: RequestContext, bucket: str, upload_id: str) -> dict[str, Any]:
        def fn(txn: Txn) -> dict[str, Any]:
            row = txn.conn.execute(
                "SELECT key, tenant FROM multipart_uploads WHERE upload_id = ? AND bucket = ?", (upload_id, bucket)
            ).fetchone()
            if row is None:
                raise AnvilError("NotFound", "upload not found")
            txn.conn.execute("DELETE FROM multipart_uploads WHERE upload_id = ?", (upload_id,))
            txn.emit(row[1], "multipart.abort", f"{bucket}/{row[0]}",
                     {"bucket": bucket, "key": row[0], "upload_id": upload_id})
            return {"upload_id": upload_id, "aborted": True}

        return self._mutate(ctx, fn, fingerprint("multipart.abort", bucket, upload_id))

    # ---------------------------------------------------------------- S3 tags and bucket settings

    def set_object_tags(self, ctx: RequestContext, bucket: str, key: str, version_id: str | None,
                        tags: list[list[str]] | None) -> dict[str, Any]:
        """Replace (None or []: remove) the tag set of a version (the latest when `version_id` is
        None). Tags live in the version's `extra` (so copies carry them, and the version's removal
        removes them) and are journaled as `object.tagging` with the whole new set."""
        v.check_object_key(key)
        fp = fingerprint("object.tagging", bucket, key, version_id, tags)

        def fn(txn: Txn) -> dict[str, Any]:
            b = self._require_bucket(txn.conn, bucket)
            obj = (self._version(txn.conn, bucket, key, version_id) if version_id is not None
                   else self._latest(txn.conn, bucket, key))
            if obj is None:
                raise AnvilError("NotFound", "version not found") if version_id is not None else not_found("object")
            if obj.delete_marker:
                if version_id is None:
                    raise not_found("object")
                raise AnvilError("MethodNotAllowed", "a delete marker has no tags")
            extra = dict(obj.extra)
            if tags:
                extra["tags"] = [list(t) for t in tags]
            else:
                extra.pop("tags", None)
            txn.conn.execute("UPDATE versions SET extra = ? WHERE bucket = ? AND key = ? AND version_id = ?",
                             (json.dumps(extra, sort_keys=True), bucket, key, obj.version_id))
            txn.emit(b.tenant, "object.tagging", f"{bucket}/{key}",
                     {"bucket": bucket, "key": key, "version_id": obj.version_id, "tags": extra.get("tags", [])})
            return {"bucket": bucket, "key": key, "version_id": obj.version_id}

        return self._mutate(ctx, fn, fp)

    def put_bucket_setting(self, ctx: RequestContext, bucket: str, kind: str,
                           document: Any | None) -> dict[str, Any]:
        """Set (None: remove) a bucket's `kind` document; journaled as `bucket.<kind>`."""
        if kind not in BUCKET_SETTING_KINDS:
            raise AnvilError("InvalidArgument", f"unknown bucket setting {kind!r}")
        fp = fingerprint("bucket.setting", bucket, kind, document)

        def fn(txn: Txn) -> dict[str, Any]:
            b = self._require_bucket(txn.conn, bucket)
            txn.conn.execute("DELETE FROM bucket_settings WHERE bucket = ? AND kind = ?", (bucket, kind))
            if document is not None:
                txn.conn.execute("INSERT INTO bucket_settings(bucket, kind, document, updated) VALUES (?,?,?,?)",
                                 (bucket, kind, json.dumps(document, sort_keys=True), txn.now))
            txn.emit(b.tenant, f"bucket.{kind}", bucket, {"bucket": bucket, "document": document})
            return {"bucket": bucket, "kind": kind}

        return self._mutate(ctx, fn, fp)

    def bucket_setting(self, bucket: str, kind: str) -> Any | None:
        """The bucket's `kind` document (None: none, or no such bucket), from the bucket cache."""
        entry = self._cached_bucket(bucket)
        document = entry.settings.get(kind) if entry is not None else None
        return json.loads(document) if document is not None else None

    def bucket_settings(self, kind: str) -> list[tuple[str, str, Any]]:
        """Every (bucket, tenant, document) with a `kind` document, by bucket name."""
        rows = self.catalog.reader().execute(
            "SELECT s.bucket, b.tenant, s.document FROM bucket_settings s JOIN buckets b ON b.name = s.bucket "
            "WHERE s.kind = ? ORDER BY s.bucket", (kind,))
        return [(r[0], r[1], json.loads(r[2])) for r in rows]

    def set_object_public(self, ctx: RequestContext, bucket: str, key: str, version_id: str | None,
                          public: bool) -> dict[str, Any]:
        """Make a version (the latest when `version_id` is None) publicly readable or not: `public`
        in its `extra`, journaled as `object.acl`. The S3 gateway's canned `public-read` on objects."""
        v.check_object_key(key)
        fp = fingerprint("object.acl", bucket, key, version_id, public)

        def fn(txn: Txn) -> dict[str, Any]:
            b = self._require_bucket(txn.conn, bucket)
            obj = (self._version(txn.conn, bucket, key, version_id) if version_id is not None
                   else self._latest(txn.conn, bucket, key))
            if obj is None or (obj.delete_marker and version_id is None):
                raise AnvilError("NotFound", "version not found") if version_id is not None else not_found("object")
            if obj.delete_marker:
                raise AnvilError("MethodNotAllowed", "a delete marker has no ACL")
            extra = dict(obj.extra)
            if public:
                extra["public"] = True
            else:
                extra.pop("public", None)
            txn.conn.execute("UPDATE versions SET extra = ? WHERE bucket = ? AND key = ? AND version_id = ?",
                             (json.dumps(extra, sort_keys=True), bucket, key, obj.version_id))
            txn.emit(b.tenant, "object.acl", f"{bucket}/{key}",
                     {"bucket": bucket, "key": key, "version_id": obj.version_id, "public": public})
            return {"bucket": bucket, "key": key, "version_id": obj.version_id, "public": public}

        return self._mutate(ctx, fn, fp)
