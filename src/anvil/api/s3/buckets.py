"""Bucket-level S3 operations: ListBuckets, Create/Head/DeleteBucket, GetBucketLocation, Get/PutBucketVersioning."""

from __future__ import annotations

import base64
from xml.sax.saxutils import escape

from starlette.responses import Response

from anvil.api.common import blocking
from anvil.api.s3 import xmlutil as X
from anvil.api.s3.acl import canned
from anvil.api.s3.body import BodyReader
from anvil.api.s3.errors import S3Error, not_implemented
from anvil.api.s3.request import S3Request, owner, xml
from anvil.errors import AnvilError
from anvil.objects import validation as v

MAX_BUCKETS_PAGE = 10000


async def list_buckets(r: S3Request) -> Response:
    """ListBuckets, paged as the API reference describes: `max-buckets` (1 to 10,000), `prefix`,
    `continuation-token` (opaque: the last name of the previous page), `bucket-region`."""
    r.authorize("bucket:list")
    q = r.q
    raw_max = q.get("max-buckets")
    limit = None
    if raw_max is not None:
        try:
            limit = int(raw_max)
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_BUCKETS_PAGE:
            raise S3Error("InvalidArgument", f"max-buckets must be an integer between 1 and {MAX_BUCKETS_PAGE}",
                          fields={"ArgumentName": "max-buckets", "ArgumentValue": raw_max})
    prefix = q.get("prefix") or ""
    after = ""
    token = q.get("continuation-token")
    if token is not None:
        try:
            after = base64.urlsafe_b64decode(token.encode("ascii") + b"=" * (-len(token) % 4)).decode("utf-8")
        except (ValueError, UnicodeError):
            after = ""
        if not token or not after:
            raise S3Error("InvalidArgument", "The continuation token provided is incorrect",
                          fields={"ArgumentName": "continuation-token"})
    region = q.get("bucket-region")
    tenant = None if r.principal.admin else r.principal.tenant
    buckets = [b for b in r.objects.list_buckets(tenant)
               if b.name.startswith(prefix) and b.name > after and region in (None, r.gw.region)]
    next_token = None
    if limit is not None and len(buckets) > limit:
        buckets = buckets[:limit]
        next_token = base64.urlsafe_b64encode(buckets[-1].name.encode()).decode().rstrip("=")
    items = "".join(
        "<Bucket>" + X.element("Name", b.name) + X.element("CreationDate", X.iso_time(b.created))
        + X.element("BucketRegion", r.gw.region) + "</Bucket>"
        for b in buckets
    )
    tail = (X.element("ContinuationToken", next_token) if next_token else "") + (
        X.element("Prefix", prefix) if "prefix" in q else "")
    return xml("ListAllMyBucketsResult", f"{owner(r.principal.tenant)}<Buckets>{items}</Buckets>{tail}")


async def create_bucket(r: S3Request) -> Response:
    name = r.bucket
    assert name is not None
    try:
        v.check_bucket_name(name)
    except AnvilError as e:
        raise S3Error("InvalidBucketName", f"The specified bucket is not valid: {e.message}")
    r.authorize("bucket:create")
    region = r.gw.region
    reader = BodyReader(r.request, r.auth)
    data = await reader.read_all(64 * 1024)
    if data.strip():
        try:
            root = X.parse(data)
        except X.XMLRejected as e:
            raise S3Error("MalformedXML", f"The XML you provided was not well-formed: {e}")
        if root.tag != "CreateBucketConfiguration":
            raise S3Error("MalformedXML", "expected a CreateBucketConfiguration document")
        location = X.child_text(root, "LocationConstraint")
        if location and location != region:
            raise S3Error("IllegalLocationConstraintException",
                          f"the {location} location constraint is incompatible with the region "
                          f"'{region}' this endpoint serves")
    existing = r.objects.find_bucket(name)
    if existing is not None:
        if existing.tenant == r.principal.tenant:
            if region == "us-east-1":
                # S3's legacy behaviour in us-east-1 (only there): re-creating a bucket you own is a
                # no-op that answers 200 OK; every other region answers BucketAlreadyOwnedByYou.
                return Response(status_code=200, headers={"location": f"/{name}"})
            raise S3Error("BucketAlreadyOwnedByYou", "Your previous request to create the named bucket "
                          "succeeded and you already own it.", 409)
        raise S3Error("BucketAlreadyExists", "The requested bucket name is not available.", 409)
    public = canned(r.h.get("x-amz-acl"), bucket=True)
    try:
        await blocking(r.objects.create_bucket, r.ctx, name)
    except AnvilError as e:
        if e.code == "AlreadyExists":
            raise S3Error("BucketAlreadyOwnedByYou", "Your previous request to create the named bucket "
                          "succeeded and you already own it.", 409)
        raise
    if public:  # canned public-read: the bucket's public access (docs/s3.md, "ACLs")
        await blocking(r.objects.set_public, r.ctx, name, True)
    return Response(status_code=200, headers={"location": f"/{name}"})


async def head_bucket(r: S3Request) -> Response:
    r.authorize("bucket:read", r.bucket)
    r.objects.get_bucket(r.bucket)
    return Response(status_code=200, headers={"x-amz-bucket-region": r.gw.region})


async def delete_bucket(r: S3Request) -> Response:
    r.authorize("bucket:delete", r.bucket)
    # In-progress multipart uploads do not keep a bucket alive: they are aborted with it (Ceph RGW's
    # behaviour; AWS documents no answer for it), so a bucket left only with stale uploads can be removed.
    await blocking(r.objects.delete_bucket_aborting_uploads, r.ctx, r.bucket)
    return Response(status_code=204)


async def get_location(r: S3Request) -> Response:
    r.authorize("bucket:read", r.bucket)
    r.objects.get_bucket(r.bucket)
    region = "" if r.gw.region == "us-east-1" else r.gw.region
    return Response(X.xml_document("LocationConstraint", escape(region)), media_type="application/xml")


async def get_versioning(r: S3Request) -> Response:
    r.authorize("bucket:read", r.bucket)
    b = r.objects.get_bucket(r.bucket)
    inner = X.element("Status", b.versioning) if b.versioning else ""
    return xml("VersioningConfiguration", inner)


async def put_versioning(r: S3Request) -> Response:
    r.authorize("bucket:configure", r.bucket)
    root = await r.body_xml()
    if root.tag != "VersioningConfiguration":
        raise S3Error("MalformedXML", "expected a VersioningConfiguration document")
    if X.child_text(root, "MfaDelete") not in (None, "Disabled"):
        raise not_implemented("MFA delete")
    status = X.child_text(root, "Status")
    if status not in ("Enabled", "Suspended"):
        raise S3Error("MalformedXML", "Status must be Enabled or Suspended")
    await blocking(r.objects.set_versioning, r.ctx, r.bucket, status)
    return Response(status_code=200)


async def post_bucket(r: S3Request) -> Response:
    raise not_implemented("POST to a bucket (browser form uploads)")
