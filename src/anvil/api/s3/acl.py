"""S3 ACLs expressed through Anvil's access model.

Anvil has owners (the bucket's tenant owns the bucket and every object in it) and public read access
(per bucket, `buckets.public`; per object version, `public` in the version's `extra`). An ACL is
accepted only when it says exactly that:

- canned `private` (owner FULL_CONTROL), `public-read` (plus AllUsers READ); on objects also
  `bucket-owner-full-control` and `bucket-owner-read`, which hold trivially since the bucket owner
  owns every object in the bucket;
- an AccessControlPolicy whose grants are the owner's FULL_CONTROL and, optionally, AllUsers READ.

Anything else -- `public-read-write`, `authenticated-read`, `aws-exec-read`, `log-delivery-write`,
`x-amz-grant-*` headers, grants to other accounts or groups -- cannot be honoured and is refused with
`501 NotImplemented`, never stored. Get{Bucket,Object}Acl answer the grants that actually hold: an
object in a public bucket shows AllUsers READ, because anyone can read it.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from anvil.api.common import blocking
from anvil.api.s3 import xmlutil as X
from anvil.api.s3.errors import S3Error, from_anvil, not_implemented
from anvil.api.s3.request import S3Request, version_headers, xml
from anvil.errors import AnvilError

ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
BUCKET_CANNED = {"private": False, "public-read": True}
OBJECT_CANNED = {"private": False, "public-read": True, "bucket-owner-full-control": False,
                 "bucket-owner-read": False}
GRANT_HEADERS = ("x-amz-grant-read", "x-amz-grant-write", "x-amz-grant-read-acp", "x-amz-grant-write-acp",
                 "x-amz-grant-full-control")


def canned(value: str | None, *, bucket: bool) -> bool | None:
    """The public flag a canned ACL header asks for (None: no header); NotImplemented if it cannot hold."""
    if value is None:
        return None
    table = BUCKET_CANNED if bucket else OBJECT_CANNED
    if value not in table:
        raise not_implemented(f"the canned ACL {value!r} (Anvil offers private and public-read)")
    return table[value]


def refuse_grant_headers(headers: Any) -> None:
    for name in GRANT_HEADERS:
        if name in headers:
            raise not_implemented(f"{name} (grants to other accounts)")


def _policy(owner: str, public: bool) -> str:
    who = f"{X.element('ID', owner)}{X.element('DisplayName', owner)}"
    grants = (f'<Grant><Grantee xmlns:xsi="{XSI}" xsi:type="CanonicalUser">{who}</Grantee>'
              f"{X.element('Permission', 'FULL_CONTROL')}</Grant>")
    if public:
        grants += (f'<Grant><Grantee xmlns:xsi="{XSI}" xsi:type="Group">{X.element("URI", ALL_USERS)}</Grantee>'
                   f"{X.element('Permission', 'READ')}</Grant>")
    return f"<Owner>{who}</Owner><AccessControlList>{grants}</AccessControlList>"


async def _requested_public(r: S3Request, owner: str, *, bucket: bool) -> bool:
    """What a Put{Bucket,Object}Acl asks for: the canned header, or the policy document's grants."""
    refuse_grant_headers(r.h)
    header = canned(r.h.get("x-amz-acl"), bucket=bucket)
    if header is not None:
        return header
    root = await r.body_xml()
    if root.tag != "AccessControlPolicy":
        raise S3Error("MalformedACLError", "The XML you provided was not well-formed or did not validate against "
                      "our published schema")
    acl = root.find("AccessControlList")
    public = False
    owner_full = False
    for grant in acl if acl is not None else []:
        grantee = grant.find("Grantee")
        permission = X.child_text(grant, "Permission")
        if grantee is None or permission is None:
            raise S3Error("MalformedACLError", "every Grant needs a Grantee and a Permission")
        uri = X.child_text(grantee, "URI")
        gid = X.child_text(grantee, "ID")
        if uri == ALL_USERS and permission == "READ":
            public = True
        elif gid is not None and gid == owner and permission == "FULL_CONTROL":
            owner_full = True
        else:
            raise not_implemented("grants other than the owner's FULL_CONTROL and AllUsers READ")
    if not owner_full:
        raise not_implemented("an ACL without the owner's FULL_CONTROL")
    return public


async def get_bucket_acl(r: S3Request) -> Response:
    r.authorize("bucket:read", r.bucket)
    b = r.objects.get_bucket(r.bucket)
    return xml("AccessControlPolicy", _policy(b.tenant, b.public))


async def put_bucket_acl(r: S3Request) -> Response:
    r.authorize("bucket:configure", r.bucket)
    b = r.objects.get_bucket(r.bucket)
    public = await _requested_public(r, b.tenant, bucket=True)
    await blocking(r.objects.set_public, r.ctx, r.bucket, public)
    return Response(status_code=200)


async def get_object_acl(r: S3Request) -> Response:
    r.authorize("object:read", r.bucket, r.key)
    b = r.objects.get_bucket(r.bucket)
    version_id = r.q.get("versionId")
    try:
        obj = r.objects.head_object(r.bucket, r.key, version_id=version_id)
    except AnvilError as e:
        raise from_anvil(e)
    public = b.public or bool(obj.extra.get("public"))
    return xml("AccessControlPolicy", _policy(b.tenant, public), headers=version_headers(obj.version_id, b.versioning))


async def put_object_acl(r: S3Request) -> Response:
    r.authorize("object:write", r.bucket, r.key)
    b = r.objects.get_bucket(r.bucket)
    public = await _requested_public(r, b.tenant, bucket=False)
    try:
        result = await blocking(r.objects.set_object_public, r.ctx, r.bucket, r.key, r.q.get("versionId"), public)
    except AnvilError as e:
        raise from_anvil(e)
    return Response(status_code=200, headers=version_headers(result["version_id"], b.versioning))
