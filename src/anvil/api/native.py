"""The native JSON API under `/anvil/v1/`: translation and authorisation, nothing else."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import urllib.parse
from email.utils import formatdate
from json.encoder import encode_basestring as _js  # type: ignore[attr-defined]
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from anvil.api.access import list_objects_filtered, list_versions_filtered
from anvil.api.common import (
    HASH_ON_LOOP_LIMIT,
    RawHeaders,
    blocking,
    body_response,
    catalog_read,
    check_recovery,
    committed,
    endpoint,
    file_io,
    metadata_from_headers,
    metadata_to_headers,
    model_body,
    query_int,
    raw_headers,
    require_identity,
    stream_into,
)
from anvil.api.fastreq import QUERY_KEY
from anvil.api.writes import json_put_answer
from anvil.api_models import (
    CompleteUploadRequest,
    CopyObjectRequest,
    CreateBucketRequest,
    CreateUploadRequest,
    VersioningRequest,
)
from anvil.context import RequestContext
from anvil.errors import AnvilError
from anvil.identity import authorize
from anvil.identity.gate import object_filter
from anvil.objects import Conditions, ObjectVersion
from anvil.objects import validation as v
from anvil.objects.checksums import content_md5_hex
from anvil.objects.service import ListResult, parse_etag_list, row_parts_count
from anvil.runtime import Anvil

# A PUT body up to this size (by Content-Length) is read into memory, then written, hashed and
# fsynced in one hop to a file-I/O thread; larger or unsized bodies are streamed to disk.
BUFFERED_BODY_LIMIT = 1024 * 1024
_unquote = urllib.parse.unquote


def _anvil(request: Request) -> Anvil:
    return request.app.state.anvil


def _strict_query(request: Request) -> dict[str, str]:
    """Query parameters decoded as strict UTF-8.

    Starlette replaces invalid percent-encoded UTF-8 with U+FFFD, which would silently store
    or look up a different key than the one sent; we refuse such input instead.
    """
    scope = request.scope
    found = scope.get(QUERY_KEY)
    if found is not None:  # parsed once per request: the key, then the version id, read it
        return found
    raw = scope.get("query_string", b"").decode("latin-1")
    if "%" not in raw and "+" not in raw:
        # Nothing to decode (the common `key=name`): what parse_qsl would return, without its machinery.
        query = {}
        for field in raw.split("&"):
            if field:
                name, _, value = field.partition("=")
                query[name] = value
    else:
        try:
            if "&" not in raw:
                # One field (`key=a%2Fb`): parse_qsl's own steps for it, without its machinery (~1/3 of
                # a small PUT's key handling, keys with a '/' being the usual ones).
                name, _, value = raw.partition("=")
                query = {_unquote(name.replace("+", " "), errors="strict"): _unquote(value.replace("+", " "),
                                                                                     errors="strict")}
            else:
                query = dict(urllib.parse.parse_qsl(raw, keep_blank_values=True, encoding="utf-8", errors="strict"))
        except UnicodeDecodeError:
            raise AnvilError("InvalidArgument", "query parameters must be percent-encoded UTF-8") from None
    scope[QUERY_KEY] = query
    return query


def _key(request: Request) -> str:
    key = _strict_query(request).get("key")
    if key is None:
        raise AnvilError("InvalidArgument", "the 'key' query parameter is required")
    v.check_not_reserved(key)  # before any other logic, including authorisation
    v.check_key(key)
    return key


_NO_CONDITIONS = Conditions()


def _conditions(request: Request) -> Conditions:
    h = request.headers
    if_match, if_none_match = h.get("if-match"), h.get("if-none-match")
    version_match, version_none_match = h.get("x-anvil-if-version-match"), h.get("x-anvil-if-version-none-match")
    if if_match is None and if_none_match is None and version_match is None and version_none_match is None:
        return _NO_CONDITIONS  # most requests: no frozen dataclass to build
    return Conditions(
        if_match=parse_etag_list(if_match),
        if_none_match=parse_etag_list(if_none_match),
        if_version_match=version_match,
        if_version_none_match=version_none_match,
    )


def _bucket_resource(bucket: str, key: str | None = None) -> str:
    return f"bucket:{bucket}" if key is None else f"bucket:{bucket}/{key}"


def _object_headers(obj: ObjectVersion) -> RawHeaders:
    """The headers of a GET or HEAD answer, encoded (names are constants; every value is ASCII: hex
    digests, ids, a date, a checked content type, percent-encoded metadata)."""
    headers = [
        (b"etag", f'"{obj.etag}"'.encode("latin-1")),
        (b"x-anvil-version-id", obj.version_id.encode("latin-1")),
        (b"last-modified", _http_date(obj.created)),
        (b"accept-ranges", b"bytes"),
        (b"content-type", obj.content_type.encode("latin-1")),
    ]
    if obj.metadata:
        headers += raw_headers(metadata_to_headers(obj.metadata))
    if obj.sha256:
        headers.append((b"x-anvil-sha256", obj.sha256.encode("latin-1")))
    if obj.parts_count:
        headers.append((b"x-anvil-parts-count", b"%d" % obj.parts_count))
    return headers


@functools.lru_cache(maxsize=4096)
def _http_second(second: int) -> bytes:
    return formatdate(second, usegmt=True).encode("latin-1")


def _http_date(ts: float) -> bytes:
    # HTTP dates have one-second resolution; formatting one is a visible share of a small GET.
    return _http_second(int(ts))


# ------------------------------------------------------------------ health and meta


async def live(request: Request) -> Response:
    return JSONResponse({"status": "live"})


async def ready(request: Request) -> Response:
    anvil = _anvil(request)
    seq, h = anvil.storage.catalog.head()
    body: dict[str, Any] = {
        "status": "ready",
        "recovery_mode": bool(getattr(request.app.state, "recovery_mode", False)),
        "journal": {"seq": seq, "hash": h},
        "deployment_id": anvil.storage.format.deployment_id,
        "backup": {"last": getattr(request.app.state, "last_backup", None),
                   "schedule": getattr(request.app.state, "backup_schedule", None),
                   "running": getattr(request.app.state, "backup_running", None)},
    }
    archiver = getattr(request.app.state, "archiver", None)
    # Continuous archiving: cursor, lag (events, seconds) and the last error (docs/backup.md).
    body["backup"]["archive"] = archiver.status() if archiver is not None else {"enabled": False}
    return JSONResponse(body)


async def openapi(request: Request) -> Response:
    from anvil.api.openapi import document_bytes

    return Response(document_bytes(str(request.base_url)), media_type="application/json")


# ------------------------------------------------------------------ buckets


@endpoint
async def list_buckets(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "bucket:list", f"tenant:{ctx.tenant}")
    tenant = None if ctx.principal.admin else ctx.tenant
    buckets = _anvil(request).objects.list_buckets(tenant)
    return JSONResponse({"buckets": [b.to_dict() for b in buckets]})


@endpoint
async def create_bucket(request: Request, ctx: RequestContext) -> Response:
    check_recovery(request)
    name = request.path_params["bucket"]
    authorize(ctx.principal, "bucket:create", f"tenant:{ctx.tenant}")
    body = await model_body(request, CreateBucketRequest, required=False)
    versioning = body.versioning or ""
    if versioning == "Unversioned":
        versioning = ""
    result = await blocking(_anvil(request).objects.create_bucket, ctx, name, versioning=versioning)
    return JSONResponse(result, status_code=201)


@endpoint
async def get_bucket(request: Request, ctx: RequestContext) -> Response:
    name = request.path_params["bucket"]
    authorize(ctx.principal, "bucket:read", _bucket_resource(name))
    return JSONResponse(_anvil(request).objects.get_bucket(name).to_dict())


@endpoint
async def delete_bucket(request: Request, ctx: RequestContext) -> Response:
    check_recovery(request)
    name = request.path_params["bucket"]
    authorize(ctx.principal, "bucket:delete", _bucket_resource(name))
    return JSONResponse(await blocking(_anvil(request).objects.delete_bucket, ctx, name))


@endpoint
async def put_versioning(request: Request, ctx: RequestContext) -> Response:
    check_recovery(request)
    name = request.path_params["bucket"]
    authorize(ctx.principal, "bucket:configure", _bucket_resource(name))
    status = (await model_body(request, VersioningRequest)).status
    return JSONResponse(await blocking(_anvil(request).objects.set_versioning, ctx, name, status))


# ------------------------------------------------------------------ listing


@endpoint
async def list_objects(request: Request, ctx: RequestContext) -> Response:
    bucket = request.path_params["bucket"]
    q = request.query_params
    prefix = q.get("prefix", "")
    v.check_not_reserved(prefix)
    authorize(ctx.principal, "object:list", _bucket_resource(bucket))
    limit = query_int(request, "limit", 1000)
    kf = object_filter(ctx.principal, "object:list", bucket)
    objects = _anvil(request).objects
    args = dict(prefix=prefix, delimiter=q.get("delimiter", ""), start_after=q.get("start_after", ""),
                max_keys=limit, token=q.get("token") or None)

    def page() -> Response:  # in the read pool: the query and the JSON of up to 1,000 objects
        if kf is None:
            rendered = objects.list_objects_rendered(bucket, **args)
            if rendered is not None:  # the page rendered in SQL (storage.listing): no Python per row
                p = rendered.page
                return Response(
                    '{"objects":[' + p.objects + '],"common_prefixes":[' + p.prefixes + '],"truncated":'
                    + ("true" if p.truncated else "false") + ',"next_token":' + json.dumps(rendered.next_token) + "}",
                    media_type="application/json")
            return Response(_listing_json(objects.list_objects(bucket, rows=True, **args)),
                            media_type="application/json")
        else:  # a bound bucket: only the keys the subject may list (docs/authz.md)
            if not 1 <= limit <= 1000:
                raise AnvilError("InvalidArgument", "page size must be between 1 and 1000")
            res = list_objects_filtered(objects, kf, bucket, **args)
        return JSONResponse({
            "objects": [o.to_dict() for o in res.objects],
            "common_prefixes": res.common_prefixes,
            "truncated": res.truncated,
            "next_token": res.next_token,
        })

    return await catalog_read(page)


def _json_number(x: Any) -> str:
    return repr(x) if type(x) is float else json.dumps(x)  # a float's repr is what json.dumps writes


def _listing_json(res: ListResult) -> str:
    """The JSON of a page of `list_objects(rows=True)`: what `ObjectVersion.to_dict` gives for each
    row, written from the row with one f-string (strings through the json module's C escaper, the
    stored metadata as stored: it is JSON already). The per-object dicts and json.dumps' walk over
    them were ~half of a 1,000-key page's server CPU."""
    out = []
    for r in res.rows:
        meta = r[10] if isinstance(r[10], str) else json.dumps(r[10], ensure_ascii=False)
        pc = row_parts_count(r)
        out.append(
            f'{{"bucket":{_js(r[0])},"key":{_js(r[1])},"version_id":{_js(r[2])},'
            f'"is_latest":{"true" if r[4] else "false"},"delete_marker":{"true" if r[5] else "false"},'
            f'"size":{r[6]},"etag":{_js(r[7])},"sha256":{"null" if r[8] is None else _js(r[8])},'
            f'"content_type":{_js(r[9])},"metadata":{meta},"last_modified":{_json_number(r[12])},'
            f'"parts_count":{"null" if pc is None else pc}}}'
        )
    tail = json.dumps({"common_prefixes": res.common_prefixes, "truncated": res.truncated,
                       "next_token": res.next_token}, ensure_ascii=False, separators=(",", ":"))
    return '{"objects":[' + ",".join(out) + "]," + tail[1:]


@endpoint
async def list_versions(request: Request, ctx: RequestContext) -> Response:
    bucket = request.path_params["bucket"]
    q = request.query_params
    prefix = q.get("prefix", "")
    v.check_not_reserved(prefix)
    authorize(ctx.principal, "object:list", _bucket_resource(bucket))
    limit = query_int(request, "limit", 1000)
    kf = object_filter(ctx.principal, "object:list", bucket)
    objects = _anvil(request).objects
    args = dict(prefix=prefix, delimiter=q.get("delimiter", ""), key_marker=q.get("key_marker", ""),
                version_marker=q.get("version_marker", ""), max_keys=limit)

    def page() -> Response:  # in the read pool, as list_objects
        if kf is None:
            res = objects.list_versions(bucket, **args)
        else:  # a bound bucket: only the keys the subject may list (docs/authz.md)
            if not 1 <= limit <= 1000:
                raise AnvilError("InvalidArgument", "page size must be between 1 and 1000")
            res = list_versions_filtered(objects, kf, bucket, **args)
        return JSONResponse({
            "versions": [o.to_dict() for o in res.versions],
            "common_prefixes": res.common_prefixes,
            "truncated": res.truncated,
            "next_key_marker": res.next_key_marker,
            "next_version_marker": res.next_version_marker,
        })

    return await catalog_read(page)


# ------------------------------------------------------------------ objects


async def _receive_body(request: Request, *, expected_sha256: str | None, expected_md5: str | None):
    """Stream the request body into a blob; nothing is held whole in memory."""
    objects = _anvil(request).objects
    writer = objects.body_writer(max_size=v.MAX_OBJECT_SIZE,
                                 expected_size=v.decimal_length(request.headers.get("content-length")))
    try:
        await stream_into(request, writer)
    except OverflowError:
        raise AnvilError("EntityTooLarge", "the body is larger than the maximum object size") from None
    return await file_io(objects.store_body, writer, expected_sha256=expected_sha256, expected_md5=expected_md5)


def _content_length(request: Request) -> int:
    """The declared body length, or a huge number when unknown (chunked) or malformed."""
    raw = request.headers.get("content-length")
    return int(raw) if raw is not None and raw.isdigit() else 1 << 62


def _expected_checksums(request: Request) -> tuple[str | None, str | None]:
    sha = request.headers.get("x-anvil-checksum-sha256")
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha)):
        raise AnvilError("InvalidArgument", "x-anvil-checksum-sha256 must be 64 hex digits")
    md5 = None
    content_md5 = request.headers.get("content-md5")
    if content_md5 is not None:
        md5 = content_md5_hex(content_md5)
        if md5 is None:
            raise AnvilError("InvalidArgument", "Content-MD5 must be a base64 MD5 digest")
    return sha, md5


@endpoint
async def put_object(request: Request, ctx: RequestContext) -> Response:
    key = _key(request)
    check_recovery(request)
    bucket = request.path_params["bucket"]
    authorize(ctx.principal, "object:write", _bucket_resource(bucket, key))
    objects = _anvil(request).objects
    declared = _content_length(request)
    small = declared <= BUFFERED_BODY_LIMIT
    # Everything checkable before the body: names, metadata, content type, bucket existence, and
    # room for a body of the declared size (admitted once: store_bytes does not ask again).
    objects.prepare_write(bucket, key, incoming=declared if small else 0)
    try:
        meta = v.normalise_metadata(metadata_from_headers(request))
    except UnicodeDecodeError:
        raise AnvilError("InvalidArgument", "metadata values must be percent-encoded UTF-8") from None
    content_type = v.check_content_type(request.headers.get("content-type"))
    cond = _conditions(request)
    sha, md5 = _expected_checksums(request)
    if small:
        body = await request.body()

        def store_and_submit() -> concurrent.futures.Future:
            # Queue the mutation straight from the file-I/O thread once the blob is durable,
            # rather than after a trip back through the event loop.
            info = objects.store_bytes(body, expected_sha256=sha, expected_md5=md5, admitted=len(body) <= declared)
            return objects.submit_put_object(
                ctx, bucket, key, info, content_type=content_type, metadata=meta, cond=cond
            )

        if len(body) <= min(HASH_ON_LOOP_LIMIT, objects.blobs.inline_max):
            pending = store_and_submit()
        else:
            pending = await file_io(store_and_submit)
    else:
        info = await _receive_body(request, expected_sha256=sha, expected_md5=md5)
        pending = objects.submit_put_object(
            ctx, bucket, key, info, content_type=content_type, metadata=meta, cond=cond
        )
    return json_put_answer(await committed(pending))


async def _get_or_head(request: Request, ctx: RequestContext, *, head: bool) -> Response:
    key = _key(request)
    bucket = request.path_params["bucket"]
    authorize(ctx.principal, "object:read", f"bucket:{bucket}/{key}")
    objects = _anvil(request).objects
    version_id = _strict_query(request).get("version_id") or None
    obj = objects.head_object(bucket, key, version_id=version_id, cond=_conditions(request))
    headers = _object_headers(obj)
    range_header = request.headers.get("range")
    rng = v.parse_range(range_header, obj.size) if range_header else None
    status = 200
    length = obj.size
    if rng is not None:
        status = 206
        length = rng.length
        headers.append((b"content-range", f"bytes {rng.start}-{rng.end}/{obj.size}".encode("latin-1")))
    return body_response(objects, obj, rng, status, length, headers, head=head)


@endpoint
async def get_object(request: Request, ctx: RequestContext) -> Response:
    # Starlette routes HEAD to GET handlers.
    return await _get_or_head(request, ctx, head=request.method == "HEAD")


@endpoint
async def delete_object(request: Request, ctx: RequestContext) -> Response:
    key = _key(request)
    check_recovery(request)
    bucket = request.path_params["bucket"]
    authorize(ctx.principal, "object:delete", _bucket_resource(bucket, key))
    version_id = request.query_params.get("version_id") or None
    result = await blocking(
        _anvil(request).objects.delete_object, ctx, bucket, key, version_id=version_id, cond=_conditions(request)
    )
    return JSONResponse(result)


@endpoint
async def copy_object(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    bucket = request.path_params["bucket"]
    body = await model_body(request, CopyObjectRequest)
    src_key, key = body.source_key, body.key
    v.check_not_reserved(src_key)
    v.check_not_reserved(key)
    check_recovery(request)
    src_bucket = body.source_bucket or bucket
    authorize(ctx.principal, "object:read", _bucket_resource(src_bucket, src_key))
    authorize(ctx.principal, "object:write", _bucket_resource(bucket, key))
    # Source conditions take the same forms as the headers: quoted, weak, lists or "*".
    src_cond = Conditions(
        if_match=parse_etag_list(body.source_if_match),
        if_none_match=parse_etag_list(body.source_if_none_match),
        if_version_match=body.source_if_version_match,
    )
    result = await blocking(
        _anvil(request).objects.copy_object, ctx, src_bucket=src_bucket, src_key=src_key,
        src_version=body.source_version_id, bucket=bucket, key=key,
        metadata_directive=(body.metadata_directive or "COPY").upper(),
        content_type=body.content_type, metadata=body.metadata, cond=_conditions(request),
        src_cond=src_cond,
    )
    return JSONResponse(result, headers={"etag": f'"{result["etag"]}"'})


# ------------------------------------------------------------------ multipart


def _upload(request: Request, *, include_completed: bool = False) -> dict[str, Any]:
    bucket = request.path_params["bucket"]
    return _anvil(request).objects.get_upload(bucket, request.path_params["upload_id"],
                                              include_completed=include_completed)


@endpoint
async def create_upload(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    bucket = request.path_params["bucket"]
    body = await model_body(request, CreateUploadRequest)
    key = body.key
    v.check_not_reserved(key)
    check_recovery(request)
    authorize(ctx.principal, "object:write", _bucket_resource(bucket, key))
    result = await blocking(
        _anvil(request).objects.create_multipart, ctx, bucket, key,
        content_type=body.content_type, metadata=body.metadata,
    )
    return JSONResponse(result, status_code=201)


@endpoint
async def list_uploads(request: Request, ctx: RequestContext) -> Response:
    bucket = request.path_params["bucket"]
    prefix = request.query_params.get("prefix", "")
    v.check_not_reserved(prefix)
    authorize(ctx.principal, "object:list", _bucket_resource(bucket))
    # The native API answers every upload at once; the service pages, so gather its pages.
    objects = _anvil(request).objects
    kf = object_filter(ctx.principal, "object:list", bucket)

    def gather() -> Response:  # in the read pool: every page of uploads
        uploads: list[dict[str, Any]] = []
        key_marker = id_marker = ""
        while True:
            page = objects.list_uploads(bucket, prefix=prefix, key_marker=key_marker, upload_id_marker=id_marker)
            uploads += page.uploads if kf is None else [u for u in page.uploads if kf.allows(u["key"])]
            if not page.truncated:
                return JSONResponse({"uploads": uploads})
            key_marker, id_marker = page.next_key_marker or "", page.next_upload_id_marker or ""

    return await catalog_read(gather)


@endpoint
async def upload_part(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    up = _upload(request)
    check_recovery(request)
    authorize(ctx.principal, "object:write", _bucket_resource(up["bucket"], up["key"]))
    try:
        number = int(request.path_params["part_number"])
    except ValueError:
        raise AnvilError("InvalidArgument", "part number must be an integer") from None
    v.check_part_number(number)
    sha, md5 = _expected_checksums(request)
    info = await _receive_body(request, expected_sha256=sha, expected_md5=md5)
    result = await blocking(
        _anvil(request).objects.upload_part, ctx, up["bucket"], up["upload_id"], number, info
    )
    return JSONResponse(result, headers={"etag": f'"{result["etag"]}"'})


@endpoint
async def list_parts(request: Request, ctx: RequestContext) -> Response:
    up = _upload(request)
    authorize(ctx.principal, "object:read", _bucket_resource(up["bucket"], up["key"]))
    parts = await catalog_read(_anvil(request).objects.list_parts, up["bucket"], up["upload_id"])
    return JSONResponse({"upload_id": up["upload_id"], "key": up["key"], "parts": parts})


@endpoint
async def complete_upload(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    # A retry carrying an Idempotency-Key may arrive after the upload completed: find it anyway
    # so the service can replay the first result (without a key it is NotFound, as before).
    up = _upload(request, include_completed=ctx.idempotency_key is not None)
    check_recovery(request)
    authorize(ctx.principal, "object:write", _bucket_resource(up["bucket"], up["key"]))
    body = await model_body(request, CompleteUploadRequest)
    parts = [(p.part_number, p.etag) for p in body.parts]
    result = await blocking(
        _anvil(request).objects.complete_multipart, ctx, up["bucket"], up["upload_id"], parts,
        cond=_conditions(request),
    )
    return JSONResponse(result, headers={"etag": f'"{result["etag"]}"'})


@endpoint
async def abort_upload(request: Request, ctx: RequestContext) -> Response:
    require_identity(ctx)
    up = _upload(request)
    check_recovery(request)
    authorize(ctx.principal, "object:delete", _bucket_resource(up["bucket"], up["key"]))
    return JSONResponse(await blocking(_anvil(request).objects.abort_multipart, ctx, up["bucket"], up["upload_id"]))


# ------------------------------------------------------------------ admin


@endpoint
async def journal_events(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:read", "system")
    after = query_int(request, "after", 0)
    if not 0 <= after < 1 << 63:  # a journal seq is a non-negative SQLite integer
        raise AnvilError("InvalidArgument", "after must be a non-negative integer")
    limit = min(max(query_int(request, "limit", 100), 1), 1000)

    def page() -> Response:  # in the read pool: up to 1,000 events and their JSON
        return JSONResponse({"events": [e.to_dict() for e in _anvil(request).storage.read_journal(after, limit)]})

    return await catalog_read(page)


@endpoint
async def journal_verify(request: Request, ctx: RequestContext) -> Response:
    authorize(ctx.principal, "admin:read", "system")
    checked, problems = await blocking(_anvil(request).storage.verify_journal)
    return JSONResponse({
        "checked": checked, "ok": not problems,
        "problems": [{"seq": p.seq, "problem": p.problem} for p in problems],
    })


B = "/anvil/v1/buckets/{bucket}"
OBJECT_PATH = B + "/object"  # the hot route: api/app.py dispatches it without the router

ROUTES = [
    Route("/anvil/health/live", live, methods=["GET"]),
    Route("/anvil/health/ready", ready, methods=["GET"]),
    Route("/anvil/v1/openapi.json", openapi, methods=["GET"]),
    Route("/anvil/v1/buckets", list_buckets, methods=["GET"]),
    Route(B, create_bucket, methods=["PUT"]),
    Route(B, get_bucket, methods=["GET"]),
    Route(B, delete_bucket, methods=["DELETE"]),
    Route(B + "/versioning", put_versioning, methods=["PUT"]),
    Route(B + "/objects", list_objects, methods=["GET"]),
    Route(B + "/versions", list_versions, methods=["GET"]),
    Route(OBJECT_PATH, put_object, methods=["PUT"]),
    Route(OBJECT_PATH, get_object, methods=["GET"]),
    Route(OBJECT_PATH, delete_object, methods=["DELETE"]),
    Route(B + "/copy", copy_object, methods=["POST"]),
    Route(B + "/uploads", create_upload, methods=["POST"]),
    Route(B + "/uploads", list_uploads, methods=["GET"]),
    Route(B + "/uploads/{upload_id}/parts/{part_number}", upload_part, methods=["PUT"]),
    Route(B + "/uploads/{upload_id}/parts", list_parts, methods=["GET"]),
    Route(B + "/uploads/{upload_id}/complete", complete_upload, methods=["POST"]),
    Route(B + "/uploads/{upload_id}", abort_upload, methods=["DELETE"]),
    Route("/anvil/v1/admin/journal", journal_events, methods=["GET"]),
    Route("/anvil/v1/admin/journal/verify", journal_verify, methods=["GET"]),
]
