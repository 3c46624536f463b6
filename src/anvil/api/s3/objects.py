"""Object operations: PutObject, Get/HeadObject, DeleteObject(s), CopyObject, and what they share with
the multipart handlers: receiving a body, metadata headers, conditions, copy sources."""

from __future__ import annotations

import asyncio
import email.errors
import email.header
import functools
import hashlib
import re
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from typing import Any

from starlette.responses import Response

from anvil.api.common import (
    HASH_ON_LOOP_LIMIT,
    RawResponse,
    blocking,
    body_response,
    committed,
    file_io,
    raw_headers,
)
from anvil.api.fastreq import amz_items
from anvil.api.s3 import xmlutil as X
from anvil.api.s3.acl import canned
from anvil.api.s3.body import BodyReader
from anvil.api.s3.config import header_tags
from anvil.api.s3.errors import S3Error, from_anvil, reserved_namespace
from anvil.api.s3.lifecycle import expiration_headers
from anvil.api.s3.request import (
    S3Request,
    body_algorithms,
    checksum_type,
    content_md5,
    declared_checksums,
    trailer_algorithms,
    version_headers,
    xml,
)
from anvil.errors import AnvilError
from anvil.identity import authorize
from anvil.objects import Conditions, ObjectVersion
from anvil.objects import validation as v
from anvil.objects.checksums import new_checksum
from anvil.objects.service import IF_MATCH_NO_OBJECT, parse_etag_list
from anvil.storage.blobs import BlobInfo, digest_bytes

SINK_CHUNK = 1024 * 1024
MAX_DELETE_KEYS = 1000
SYSTEM_HEADERS = ("cache-control", "content-disposition", "content-encoding", "content-language", "expires")
RESPONSE_OVERRIDES = {
    "response-content-type": "content-type", "response-content-language": "content-language",
    "response-expires": "expires", "response-cache-control": "cache-control",
    "response-content-disposition": "content-disposition", "response-content-encoding": "content-encoding",
}
# What S3 stores when a write names no Content-Type (the native API's default is application/octet-stream).
S3_DEFAULT_CONTENT_TYPE = "binary/octet-stream"
# The largest body one PutObject (or UploadPart) may carry; larger objects need a multipart upload.
MAX_PUT_SIZE = 5 * 1024**3


def _http_date(ts: float) -> str:
    # One-second resolution: formatted once per second of creation time (formatdate was ~5 us, twice a GET).
    return _http_second(int(ts))


@functools.lru_cache(maxsize=4096)
def _http_second(second: int) -> str:
    return formatdate(second, usegmt=True)


def _parse_http_date(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None  # S3 ignores an unparsable date condition


def _header_to_text(value: str) -> str:
    """Starlette decodes headers as latin-1; clients send UTF-8 bytes. Recover the real text."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def _text_to_header(value: str) -> str:
    return value.encode("utf-8").decode("latin-1")


# One RFC 2047 encoded-word: =?charset?B|Q?text?=
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[BbQq]\?[^?\s]*\?=")
_MAIL_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")


def _meta_from_header(value: str) -> str:
    """A user metadata value as stored: RFC 2047 encoded-words decoded, raw UTF-8 read as UTF-8.
    AWS, "Working with object metadata": values with non-US-ASCII characters "are character decoded as
    per RFC 2047 before storing and encoded as per RFC 2047 to make them mail-safe before returning"."""
    text = _header_to_text(value)
    stripped = text.strip()
    if stripped.startswith("=?") and stripped.endswith("?=") and _ENCODED_WORD.search(stripped):
        try:
            return str(email.header.make_header(email.header.decode_header(stripped)))
        except (LookupError, ValueError, UnicodeDecodeError, email.errors.HeaderParseError):
            return text
    return text


def _meta_to_header(value: str) -> str:
    """A stored metadata value as S3 returns it: as is when printable US-ASCII, else one RFC 2047 Q
    encoded-word of its UTF-8 (`=?UTF-8?Q?=04mymeta?=`, the form S3 answers)."""
    if value.isascii() and value.isprintable():
        return value
    out = "".join(chr(b) if b in _MAIL_SAFE else "_" if b == 0x20 else f"={b:02X}" for b in value.encode())
    return f"=?UTF-8?Q?{out}?="


def _override_value(param: str, value: str) -> str:
    """A `response-*` query value as a response header: UTF-8 on the wire, as stored metadata goes out.
    A control character (CR, LF, NUL...) cannot be sent in a header at all: refused, never a 500."""
    if any(c < " " and c != "\t" or c == "\x7f" for c in value):
        raise S3Error("InvalidArgument", f"the {param} parameter must not contain control characters")
    return _text_to_header(value)


@contextmanager
def if_match_needs_object() -> Iterator[None]:
    """An If-Match write (PutObject, CopyObject, CompleteMultipartUpload) with no current object to match
    -- none, or a delete marker -- is 404 NoSuchKey in S3, not 412."""
    try:
        yield
    except AnvilError as e:
        if e.code == "PreconditionFailed" and e.message == IF_MATCH_NO_OBJECT:
            raise S3Error("NoSuchKey", "The specified key does not exist.", 404) from None
        raise


# ------------------------------------------------------------------ object bodies in


@dataclass
class Received:
    """A verified request body not yet stored: in memory (small) or in an uncommitted BlobWriter."""

    writer: Any
    data: bytes | None
    md5: str | None
    computed: dict[str, str]
    digests: BlobInfo | None = None  # of `data`, when already computed (small bodies)
    admitted: bool = False  # `data`'s size was admitted before it was read (prepare_write)

    def commit(self, objects: Any) -> Any:
        """Store it (blocking: file I/O and fsync); a Content-MD5 mismatch stores nothing (BadDigest)."""
        if self.data is not None:
            return objects.store_bytes(self.data, expected_md5=self.md5, digests=self.digests,
                                       admitted=self.admitted)
        return objects.store_body(self.writer, expected_md5=self.md5)


async def receive(r: S3Request, *, max_size: int = v.MAX_OBJECT_SIZE,
                  also: str | None = None) -> tuple[Any, dict[str, str]]:
    """Stream the body into a blob, verifying payload hash, Content-MD5 and checksums; nothing is
    committed unless every check passes. Returns (BlobInfo, {algorithm: base64 checksum}), with
    the `also` algorithm computed too when the client sent no value for it."""
    body = await receive_uncommitted(r, max_size=max_size, also=also)
    info = await file_io(body.commit, r.objects)
    return info, body.computed


async def receive_uncommitted(r: S3Request, *, max_size: int = v.MAX_OBJECT_SIZE,
                              also: str | None = None) -> Received:
    """`receive` up to the commit: every check but Content-MD5 passed (the commit checks that and
    stores nothing on a mismatch). Bodies under SINK_CHUNK stay in memory and are stored in one go
    (`objects.store_bytes`, the native API's small-PUT path); larger ones stream into a body writer."""
    h = r.h
    reader = BodyReader(r.request, r.auth)
    if not reader.chunked and h.get("content-length") is None:
        # S3 needs the length of an object or part up front (aws-chunked declares it in
        # x-amz-decoded-content-length): a body of unknown length, Transfer-Encoding: chunked or none,
        # is 411 MissingContentLength (AWS S3 API reference, "Error responses").
        raise S3Error("MissingContentLength", "You must provide the Content-Length HTTP header.", 411)
    # Refuse a body declared too large before reading any of it: nothing is received or stored.
    raw_length = h.get("x-amz-decoded-content-length") if reader.chunked else h.get("content-length")
    declared_length = v.decimal_length(raw_length)
    if declared_length is not None and declared_length > max_size:
        raise S3Error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size",
                      fields={"ProposedSize": raw_length, "MaxSizeAllowed": str(max_size)})
    declared = declared_checksums(h)
    trailer_algs = trailer_algorithms(h)
    algs = body_algorithms(h, declared, trailer_algs)
    if also:
        algs.add(also)
    md5 = content_md5(h.get("content-md5"))
    sums = {a: new_checksum(a) for a in algs}
    writer = None

    def sink(pieces: list[bytes]) -> None:
        assert writer is not None
        writer.write_pieces(pieces)
        for c in sums.values():
            for piece in pieces:
                c.update(piece)

    # The received pieces are gathered by reference, not copied (api.common.BodyBlocks).
    blocks = reader.blocks(SINK_CHUNK)
    loop = asyncio.get_running_loop()
    inflight: asyncio.Future | None = None
    try:
        async for block in blocks:
            # Hash and write whole MiBs in a worker thread (hashlib and zlib release the GIL) while
            # the next MiB arrives: one MiB in flight keeps order and bounds memory per upload.
            if writer is None:
                writer = r.objects.body_writer(max_size=max_size, expected_size=declared_length)
            if inflight is not None:
                await inflight
            inflight = loop.run_in_executor(None, sink, block)
        if inflight is not None:
            await inflight
            inflight = None
        pending = blocks.tail
        small: bytes | None = None
        digests: BlobInfo | None = None
        if writer is None:
            small = b"".join(pending)
            if len(small) > max_size:
                raise OverflowError("body larger than allowed")
            for c in sums.values():
                c.update(small)
            if len(small) <= HASH_ON_LOOP_LIMIT:
                # SHA-256 (the content address, and what x-amz-content-sha256 is checked against) and
                # MD5 (the ETag) once, here: the store takes them instead of hashing the body again.
                digests = digest_bytes(small)
                reader.check_sha256(digests.sha256)
            elif reader.declared_sha256 is not None:
                reader.check_sha256(hashlib.sha256(small).hexdigest())
        else:
            if pending:
                sink(pending)
            reader.check_sha256(writer.digests().sha256)
        computed = {a: c.b64() for a, c in sums.items()}
        expected = dict(declared)
        for alg in trailer_algs:
            value = reader.trailers.get(f"x-amz-checksum-{alg}")
            if value is None:
                raise S3Error("InvalidRequest", f"the x-amz-checksum-{alg} trailer is missing")
            expected[alg] = value
        for alg, value in expected.items():
            if computed[alg] != value:
                raise S3Error("BadDigest", f"the {alg.upper()} you specified did not match the calculated "
                              "checksum")
    except BaseException as exc:
        blocks.close()
        if inflight is not None:
            # The worker may still be writing: let it finish before the file is closed and removed.
            await asyncio.wait([inflight])
        if writer is not None:
            writer.abort()
        if isinstance(exc, OverflowError):
            raise S3Error("EntityTooLarge", "your proposed upload exceeds the maximum allowed size")
        raise
    return Received(writer, small, md5, computed, digests)


def metadata(r: S3Request) -> tuple[dict[str, str], dict[str, str]]:
    """(user metadata from `x-amz-meta-*`, system metadata from the standard headers) of a write."""
    h = r.h
    user: dict[str, str] = {}
    system: dict[str, str] = {}
    for k, val in amz_items(h):
        if k.startswith("x-amz-meta-"):
            user[k[len("x-amz-meta-"):]] = _meta_from_header(val)
    for name in SYSTEM_HEADERS:
        val = h.get(name)
        if val is None:
            continue
        if name == "content-encoding":
            # aws-chunked is transport framing, not a property of the stored object; everything else is
            # kept exactly as sent (spacing and case included), as S3 returns it.
            items = val.split(",")
            kept = [e for e in items if e.strip().lower() != "aws-chunked"]
            if len(kept) != len(items):
                val = ",".join(kept).strip()
            if not val.strip():
                continue
        system[name] = _header_to_text(val)
    try:
        user = v.normalise_metadata(user)
    except AnvilError as e:
        raise from_anvil(e)
    return user, system


def content_type(r: S3Request) -> str:
    return v.check_content_type(r.h.get("content-type") or S3_DEFAULT_CONTENT_TYPE)


_NO_CONDITIONS = Conditions()


def write_conditions(r: S3Request) -> Conditions:
    if_match, if_none_match = r.h.get("if-match"), r.h.get("if-none-match")
    if if_match is None and if_none_match is None:
        return _NO_CONDITIONS  # the usual write: no dataclass to build
    return Conditions(if_match=parse_etag_list(if_match), if_none_match=parse_etag_list(if_none_match))


async def put_object(r: S3Request) -> Response:
    r.authorize("object:write", r.bucket, r.key)
    # A small body's declared size is admitted with the other checks, once (its store does not ask again).
    declared = v.decimal_length(r.h.get("content-length"))
    admit = declared if declared is not None and declared <= HASH_ON_LOOP_LIMIT else 0
    r.objects.prepare_write(r.bucket, r.key, incoming=admit)
    user, system = metadata(r)
    ctype = content_type(r)
    cond = write_conditions(r)
    tags = header_tags(r.h.get("x-amz-tagging"))
    public = canned(r.h.get("x-amz-acl"), bucket=False)
    body = await receive_uncommitted(r, max_size=MAX_PUT_SIZE)
    body.admitted = admit > 0 and body.data is not None and len(body.data) <= admit
    computed = body.computed
    extra: dict[str, Any] = {}
    if system:
        extra["system"] = system
    if computed:
        extra["checksums"] = computed
    if tags:
        extra["tags"] = tags
    if public:
        extra["public"] = True
    objects, ctx, bucket, key = r.objects, r.ctx, r.bucket, r.key

    def store_and_submit() -> Any:
        # One trip to the file-I/O pool: make the blob durable, then queue the version from that
        # thread; the event loop awaits the commit without parking a thread on it (as native PUT).
        info = body.commit(objects)
        return objects.submit_put_object(ctx, bucket, key, info, content_type=ctype, metadata=user,
                                         cond=cond, extra=extra or None)

    with if_match_needs_object():
        if body.data is not None and len(body.data) <= min(HASH_ON_LOOP_LIMIT, objects.blobs.inline_max):
            # Stored inline in the record store (no file to write): on the loop, as the native small PUT
            # does; the hop to a thread and back cost more than hashing a few KiB.
            pending = store_and_submit()
        else:
            pending = await file_io(store_and_submit)
        result = await committed(pending)
    # A write's version header does not depend on the bucket's versioning (`version_headers`): no re-read.
    headers = {"etag": f'"{result["etag"]}"', **version_headers(result["version_id"], None, write=True)}
    if result.get("cursor") is not None:  # the journal cursor of the write (indexes' min_cursor)
        headers["x-anvil-cursor"] = str(result["cursor"])
    headers.update({f"x-amz-checksum-{a}": val for a, val in computed.items()})
    if computed:
        headers["x-amz-checksum-type"] = "FULL_OBJECT"
    headers.update(expiration_headers(r, key, result["size"], tags))
    raw = raw_headers(headers)  # Starlette's header encoding skipped
    raw.append((b"content-length", b"0"))  # no body (RawResponse adds no length of its own)
    return RawResponse(200, raw)


# ------------------------------------------------------------------ object bodies out


def _object_headers(obj: ObjectVersion, versioning: str) -> dict[str, str]:
    headers = {
        "etag": f'"{obj.etag}"',
        "last-modified": _http_date(obj.created),
        "accept-ranges": "bytes",
        "content-type": obj.content_type,
        **version_headers(obj.version_id, versioning),
    }
    for k, val in obj.system_metadata.items():
        headers[k] = _text_to_header(val)
    for k, val in obj.metadata.items():
        headers[f"x-amz-meta-{k}"] = _meta_to_header(val)
    tags = obj.extra.get("tags")
    if tags:
        headers["x-amz-tagging-count"] = str(len(tags))
    return headers


def _etag_headers(obj: ObjectVersion) -> dict[str, str]:
    return {"etag": f'"{obj.etag}"', "last-modified": _http_date(obj.created)}


def _read_conditions(r: S3Request, obj: ObjectVersion) -> None:
    h = r.h
    modified = int(obj.created)
    if_match = parse_etag_list(h.get("if-match"))
    if if_match is not None:
        if "*" not in if_match and obj.etag not in if_match:
            raise S3Error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold",
                          412, fields={"Condition": "If-Match"})
    else:
        since = _parse_http_date(h.get("if-unmodified-since"))
        if since is not None and modified > since:
            raise S3Error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold",
                          412, fields={"Condition": "If-Unmodified-Since"})
    if_none = parse_etag_list(h.get("if-none-match"))
    if if_none is not None:
        if "*" in if_none or obj.etag in if_none:
            raise S3Error("NotModified", "Not Modified", 304, headers=_etag_headers(obj))
    else:
        since = _parse_http_date(h.get("if-modified-since"))
        if since is not None and modified <= since:
            raise S3Error("NotModified", "Not Modified", 304, headers=_etag_headers(obj))


async def get_object(r: S3Request) -> Response:
    return _get_object(r, head=False)


async def head_object(r: S3Request) -> Response:
    return _get_object(r, head=True)


def _get_object(r: S3Request, *, head: bool) -> Response:
    r.authorize("object:read", r.bucket, r.key)
    q, h, objects = r.q, r.h, r.objects
    version_id = q.get("versionId")
    if version_id == "":
        raise S3Error("InvalidArgument", "Version id cannot be the empty string")
    try:  # the bucket (for its versioning) and the object: one catalog query when no version is named
        b, obj = objects.head_object_in(r.bucket, r.key, version_id=version_id)
    except AnvilError as e:
        err = from_anvil(e)
        if version_id and err.code == "NoSuchVersion":
            raise S3Error("NoSuchVersion", "The specified version does not exist.", 404)
        raise err
    _read_conditions(r, obj)
    headers = _object_headers(obj, b.versioning)
    if obj.is_latest:
        headers.update(expiration_headers(r, obj.key, obj.size, obj.extra.get("tags"), obj.created))
    for param, header in RESPONSE_OVERRIDES.items():
        if param in q:
            headers[header] = _override_value(param, q[param])
    rng = None
    part_number = q.get("partNumber")
    range_header = h.get("range")
    if part_number is not None:
        if range_header:
            raise S3Error("InvalidRequest", "Cannot specify both Range header and partNumber query parameter")
        try:
            n = int(part_number)
        except ValueError:
            n = 0
        # AWS GetObject API reference: partNumber "is a positive integer between 1 and 10,000"; outside
        # that it is a bad argument (400), inside it but past the object's parts InvalidPartNumber (416,
        # "Error responses": "The requested partnumber is not satisfiable").
        if not 1 <= n <= v.MAX_PART_NUMBER:
            raise S3Error("InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive",
                          fields={"ArgumentName": "partNumber", "ArgumentValue": part_number})
        count = obj.parts_count or 1
        if not 1 <= n <= count:
            raise S3Error("InvalidPartNumber", "The requested partnumber is not satisfiable", 416)
        if obj.parts_count:
            start = sum(size for _, size in obj.chunks[: n - 1])
            rng = v.ByteRange(start, start + obj.chunks[n - 1][1] - 1)
            headers["x-amz-mp-parts-count"] = str(count)
        elif obj.size:
            # An object stored in one piece is its own part 1: S3 answers as for a range over all of it
            # (206 with Content-Range) and sends no parts count.
            rng = v.ByteRange(0, obj.size - 1)
    elif range_header:
        try:
            rng = v.parse_range(range_header, obj.size)
        except AnvilError as e:
            if e.code == "InvalidArgument":
                rng = None  # S3 ignores a malformed Range header and returns the whole object
            elif obj.size == 0 and range_header.strip().startswith("bytes=-"):
                rng = None  # S3 answers a suffix range on an empty object with the (empty) object, 200
            else:
                raise S3Error("InvalidRange", "The requested range is not satisfiable", 416,
                              headers={"content-range": f"bytes */{obj.size}"},
                              fields={"RangeRequested": range_header, "ActualObjectSize": str(obj.size)})
    whole = rng is None or (part_number is not None and not obj.parts_count)
    if whole and (h.get("x-amz-checksum-mode") or "").upper() == "ENABLED":
        for alg, val in obj.checksums.items():
            headers[f"x-amz-checksum-{alg}"] = val
        if obj.checksums:
            headers["x-amz-checksum-type"] = checksum_type(obj.checksums)
    status, length = 200, obj.size
    if rng is not None and (rng.length != obj.size or range_header or part_number is not None):
        status, length = 206, rng.length
        headers["content-range"] = f"bytes {rng.start}-{rng.end}/{obj.size}"
    return body_response(objects, obj, rng, status, length, headers, head=head)


# ------------------------------------------------------------------ deletes


async def delete_object(r: S3Request) -> Response:
    r.authorize("object:delete", r.bucket, r.key)
    version_id = r.q.get("versionId")
    if version_id == "":
        raise S3Error("InvalidArgument", "Version id cannot be the empty string")
    if version_id is not None and not (version_id.isascii() and version_id.isprintable()):
        # No version id has such characters, and an absent version's id is echoed in a header below.
        raise S3Error("InvalidArgument", "Invalid version id specified")
    cond = Conditions(if_match=parse_etag_list(r.h.get("if-match")))
    b = r.objects.get_bucket(r.bucket)
    try:
        result = await blocking(r.objects.delete_object, r.ctx, r.bucket, r.key, version_id=version_id, cond=cond)
    except AnvilError as e:
        if version_id and e.code == "NotFound" and e.message.startswith("version"):
            return Response(status_code=204, headers={"x-amz-version-id": version_id})
        raise
    headers = version_headers(result.get("version_id"), b.versioning)
    if result.get("cursor") is not None:
        headers["x-anvil-cursor"] = str(result["cursor"])
    if result.get("delete_marker"):
        headers["x-amz-delete-marker"] = "true"
    return Response(status_code=204, headers=headers)


async def delete_objects(r: S3Request) -> Response:
    r.authorize("object:delete", r.bucket)
    root = await r.body_xml()
    if root.tag != "Delete":
        raise S3Error("MalformedXML", "expected a Delete document")
    quiet = (X.child_text(root, "Quiet") or "").strip().lower() == "true"
    entries = root.findall("Object")
    if len(entries) > MAX_DELETE_KEYS:
        raise S3Error("MalformedXML", f"a DeleteObjects request may name at most {MAX_DELETE_KEYS} keys")
    if not entries:
        raise S3Error("MalformedXML", "a DeleteObjects request must name at least one key")
    targets: list[tuple[str, str | None]] = []
    for e in entries:
        key = X.child_text(e, "Key")
        if not key:
            raise S3Error("MalformedXML", "every Object needs a Key")
        targets.append((key, X.child_text(e, "VersionId") or None))
    r.objects.get_bucket(r.bucket)  # NoSuchBucket for the whole request, not per key
    objects, principal, ctx, bucket = r.objects, r.principal, r.ctx, r.bucket

    def run() -> list[str]:
        out: list[str] = []
        for key, version_id in targets:
            base = X.element("Key", key) + (X.element("VersionId", version_id) if version_id else "")
            try:
                if v.is_reserved_key(key):
                    raise reserved_namespace()
                authorize(principal, "object:delete", f"bucket:{bucket}/{key}")
                result = objects.delete_object(ctx, bucket, key, version_id=version_id)
            except (AnvilError, S3Error) as err:
                s3 = from_anvil(err) if isinstance(err, AnvilError) else err
                if s3.code == "NoSuchVersion" and version_id:
                    s3 = None  # deleting an absent version succeeds, as in S3
                if s3 is not None:
                    out.append("<Error>" + base + X.element("Code", s3.code) + X.element("Message", s3.message)
                               + "</Error>")
                    continue
                result = {"version_id": version_id, "delete_marker": False}
            if quiet:
                continue
            extra = ""
            if result.get("delete_marker"):
                extra = X.element("DeleteMarker", True)
                if result.get("version_id") and not version_id:
                    extra += X.element("DeleteMarkerVersionId", result["version_id"])
            out.append("<Deleted>" + base + extra + "</Deleted>")
        return out

    return xml("DeleteResult", "".join(await blocking(run)))


# ------------------------------------------------------------------ copy


def parse_copy_source(value: str) -> tuple[str, str, str | None]:
    raw, _, query = value.partition("?")
    text = urllib.parse.unquote(raw)
    if text.startswith("/"):
        text = text[1:]
    bucket, _, key = text.partition("/")
    version = None
    if query:
        params = urllib.parse.parse_qs(query)
        version = params.get("versionId", [None])[0]
    return bucket, key, version


def copy_source(r: S3Request) -> tuple[str, str, str | None]:
    src_bucket, src_key, src_version = parse_copy_source(r.h["x-amz-copy-source"])
    if not src_bucket or not src_key:
        raise S3Error("InvalidArgument", "Copy Source must name the source bucket and key: bucket/key")
    if v.is_reserved_key(src_key):
        raise reserved_namespace()
    return src_bucket, src_key, src_version


def source_object(r: S3Request, src_bucket: str, src_key: str, src_version: str | None) -> ObjectVersion:
    """The copy source, once the caller may read it and the `x-amz-copy-source-if-*` conditions hold."""
    r.authorize("object:read", src_bucket, src_key)
    try:
        src = r.objects.head_object(src_bucket, src_key, version_id=src_version)
    except AnvilError as e:
        err = from_anvil(e)
        if err.code == "MethodNotAllowed":
            raise S3Error("InvalidRequest", "The source of a copy request may not specifically refer to a "
                          "delete marker by version id.")
        raise S3Error(err.code, err.message, err.status)
    _copy_conditions(r, src)
    return src


def _copy_conditions(r: S3Request, src: ObjectVersion) -> None:
    h = r.h
    modified = int(src.created)
    failed = S3Error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold", 412)
    if_match = parse_etag_list(h.get("x-amz-copy-source-if-match"))
    if_none = parse_etag_list(h.get("x-amz-copy-source-if-none-match"))
    unmod = _parse_http_date(h.get("x-amz-copy-source-if-unmodified-since"))
    mod = _parse_http_date(h.get("x-amz-copy-source-if-modified-since"))
    if if_match is not None:
        if "*" not in if_match and src.etag not in if_match:
            raise failed
    elif unmod is not None and modified > unmod:
        raise failed
    if if_none is not None:
        if "*" in if_none or src.etag in if_none:
            raise failed
    elif mod is not None and modified <= mod:
        raise failed


async def copy_object(r: S3Request) -> Response:
    src_bucket, src_key, src_version = copy_source(r)
    r.authorize("object:write", r.bucket, r.key)
    src = source_object(r, src_bucket, src_key, src_version)
    directive = (r.h.get("x-amz-metadata-directive") or "COPY").upper()
    if directive not in ("COPY", "REPLACE"):
        raise S3Error("InvalidArgument", "Unknown metadata directive.")
    user, system = metadata(r) if directive == "REPLACE" else ({}, {})
    tagging_directive = (r.h.get("x-amz-tagging-directive") or "COPY").upper()
    if tagging_directive not in ("COPY", "REPLACE"):
        raise S3Error("InvalidArgument", "Unknown tagging directive.")
    new_tags = header_tags(r.h.get("x-amz-tagging") or "") if tagging_directive == "REPLACE" else None
    public = canned(r.h.get("x-amz-acl"), bucket=False)
    if directive == "COPY" and src_bucket == r.bucket and src_key == r.key and src_version is None:
        raise S3Error("InvalidRequest", "This copy request is illegal because it is trying to copy an object to "
                      "itself without changing the object's metadata, storage class, website redirect location "
                      "or encryption attributes.")
    with if_match_needs_object():
        result = await blocking(
            r.objects.copy_object, r.ctx, src_bucket=src_bucket, src_key=src_key,
            src_version=src.version_id, bucket=r.bucket, key=r.key, metadata_directive=directive,
            content_type=content_type(r) if directive == "REPLACE" else None, metadata=user,
            cond=write_conditions(r), src_cond=Conditions(if_match=[src.etag]), system_metadata=system,
            # COPY (the default) carries the source's tags; REPLACE gives the copy the new set, in the
            # same mutation as the copy itself, as PutObject's x-amz-tagging. Likewise public-read.
            tags=new_tags, replace_tags=tagging_directive == "REPLACE", public=public,
        )
    b = r.objects.get_bucket(r.bucket)
    headers = version_headers(result["version_id"], b.versioning, write=True)
    if result.get("cursor") is not None:
        headers["x-anvil-cursor"] = str(result["cursor"])
    src_b = r.objects.get_bucket(src_bucket)
    if src_b.versioning:
        headers["x-amz-copy-source-version-id"] = src.version_id
    copied_tags = new_tags if tagging_directive == "REPLACE" else src.extra.get("tags")
    headers.update(expiration_headers(r, r.key or "", src.size, copied_tags))
    inner = X.element("ETag", f'"{result["etag"]}"') + X.element("LastModified", X.iso_time(time.time()))
    return xml("CopyObjectResult", inner, headers=headers)
