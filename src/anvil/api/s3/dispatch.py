"""Which handler serves a request: method + target shape + query sub-resource, one table.

The table is compiled once at import into `{(method, shape): (probes, fallback)}`, so routing a request
costs one dict lookup and a scan of at most a handful of query names.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.datastructures import QueryParams
from starlette.responses import Response

from anvil.api.s3 import acl, buckets, config, cors, lifecycle, listings, multipart, objects
from anvil.api.s3.errors import S3Error, not_implemented
from anvil.api.s3.request import S3Request

Handler = Callable[[S3Request], Awaitable[Response]]

# Target shapes. COPY is a PUT to a key with an `x-amz-copy-source` header: the header names a second
# object, which changes the operation as a sub-resource would.
SERVICE = "service"
BUCKET = "bucket"
OBJECT = "object"
COPY = "copy"


async def _post_object(r: S3Request) -> Response:
    raise not_implemented("this POST operation")


# (method, shape, sub-resource, handler). Within one (method, shape) the rows are tried in order and the
# first sub-resource present in the query wins; `name=value` needs that value too; None is the fallback.
Route = tuple[str, str, "str | None", Handler]
ROUTES: tuple[Route, ...] = (
    ("GET", SERVICE, None, buckets.list_buckets),

    ("PUT", BUCKET, "versioning", buckets.put_versioning),
    ("PUT", BUCKET, "tagging", config.put_bucket_tagging),
    ("PUT", BUCKET, "acl", acl.put_bucket_acl),
    ("PUT", BUCKET, "cors", cors.put_bucket_cors),
    ("PUT", BUCKET, "lifecycle", lifecycle.put_bucket_lifecycle),
    ("PUT", BUCKET, None, buckets.create_bucket),
    ("HEAD", BUCKET, None, buckets.head_bucket),
    ("GET", BUCKET, "location", buckets.get_location),
    ("GET", BUCKET, "versioning", buckets.get_versioning),
    ("GET", BUCKET, "tagging", config.get_bucket_tagging),
    ("GET", BUCKET, "acl", acl.get_bucket_acl),
    ("GET", BUCKET, "cors", cors.get_bucket_cors),
    ("GET", BUCKET, "lifecycle", lifecycle.get_bucket_lifecycle),
    ("GET", BUCKET, "versions", listings.list_versions),
    ("GET", BUCKET, "uploads", multipart.list_uploads),
    ("GET", BUCKET, "list-type=2", listings.list_objects_v2),
    ("GET", BUCKET, None, listings.list_objects_v1),
    ("DELETE", BUCKET, "tagging", config.delete_bucket_tagging),
    ("DELETE", BUCKET, "cors", cors.delete_bucket_cors),
    ("DELETE", BUCKET, "lifecycle", lifecycle.delete_bucket_lifecycle),
    ("DELETE", BUCKET, None, buckets.delete_bucket),
    ("POST", BUCKET, "delete", objects.delete_objects),
    ("POST", BUCKET, None, buckets.post_bucket),

    ("PUT", OBJECT, "tagging", config.put_object_tagging),
    ("PUT", OBJECT, "acl", acl.put_object_acl),
    ("PUT", OBJECT, "uploadId", multipart.upload_part),
    ("PUT", OBJECT, "partNumber", multipart.upload_part),
    ("PUT", OBJECT, None, objects.put_object),
    ("PUT", COPY, "uploadId", multipart.upload_part_copy),
    ("PUT", COPY, "partNumber", multipart.upload_part_copy),
    ("PUT", COPY, None, objects.copy_object),
    ("GET", OBJECT, "tagging", config.get_object_tagging),
    ("GET", OBJECT, "acl", acl.get_object_acl),
    ("GET", OBJECT, "attributes", config.get_object_attributes),
    ("GET", OBJECT, "uploadId", multipart.list_parts),
    ("GET", OBJECT, None, objects.get_object),
    ("HEAD", OBJECT, None, objects.head_object),
    ("DELETE", OBJECT, "tagging", config.delete_object_tagging),
    ("DELETE", OBJECT, "uploadId", multipart.abort_upload),
    ("DELETE", OBJECT, None, objects.delete_object),
    ("POST", OBJECT, "uploads", multipart.create_upload),
    ("POST", OBJECT, "uploadId", multipart.complete_upload),
    ("POST", OBJECT, None, _post_object),
)

Probe = tuple[str, "str | None", Handler]


def _compile(routes: tuple[Route, ...]) -> dict[tuple[str, str], tuple[tuple[Probe, ...], Handler]]:
    probes: dict[tuple[str, str], list[Probe]] = {}
    fallbacks: dict[tuple[str, str], Handler] = {}
    for method, shape, sub, handler in routes:
        if sub is None:
            fallbacks[(method, shape)] = handler
            continue
        name, eq, value = sub.partition("=")
        probes.setdefault((method, shape), []).append((name, value if eq else None, handler))
    missing = set(probes) - set(fallbacks)
    if missing:
        raise AssertionError(f"S3 routes without a fallback: {sorted(missing)}")
    return {k: (tuple(probes.get(k, ())), fallbacks[k]) for k in fallbacks}


_TABLE = _compile(ROUTES)


def method_not_allowed() -> S3Error:
    return S3Error("MethodNotAllowed", "the specified method is not allowed against this resource", 405)


def route(method: str, shape: str, q: QueryParams) -> Handler:
    entry = _TABLE.get((method, shape))
    if entry is None:
        raise method_not_allowed()
    probes, fallback = entry
    if probes and q:
        for name, value, handler in probes:
            found = q.get(name)
            if found is not None and (value is None or found == value):
                return handler
    return fallback
