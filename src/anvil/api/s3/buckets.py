"""Bucket-level S3 operations: ListBuckets, Create/Head/DeleteBucket, GetBucketLocation, Get/PutBucketVersioning."""

from __future__ import annotations

from xml.sax.saxutils import escape

from starlette.responses import Response

from anvil.api.common import blocking
from anvil.api.s3 import xmlutil as X
from anvil.api.s3.body import BodyReader
from anvil.api.s3.errors import S3Error, not_implemented
from anvil.api.s3.request import S3Request, owner, xml
from anvil.errors import AnvilError
from anvil.objects import validation as v


async def list_buckets(r: S3Request) -> Response:
    r.authorize("bucket:list")
    tenant = None if r.principal.admin else r.principal.tenant
    buckets = r.objects.list_buckets(tenant)
    items = "".join(
        "<Bucket>" + X.element("Name", b.name) + X.element("CreationDate", X.iso_time(b.created))
        + X.element("BucketRegion", r.gw.region) + "</Bucket>"
        for b in buckets
    )
    return xml("ListAllMyBucketsResult", f"{owner(r.principal.tenant)}<Buckets>{items}</Buckets>")


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
    try:
        await blocking(r.objects.create_bucket, r.ctx, name)
    except AnvilError as e:
        if e.code == "AlreadyExists":
            raise S3Error("BucketAlreadyOwnedByYou", "Your previous request to create the named bucket "
                          "succeeded and you already own it.", 409)
        raise
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
