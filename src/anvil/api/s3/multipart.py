"""Multipart uploads: Create, UploadPart, UploadPartCopy, ListParts, ListMultipartUploads, Complete, Abort."""

from __future__ import annotations

import time
import urllib.parse
from typing import Any

from starlette.responses import Response

from anvil.api.common import blocking, catalog_read
from anvil.api.s3 import xmlutil as X
from anvil.api.s3.acl import canned
from anvil.api.s3.config import header_tags
from anvil.api.s3.errors import S3Error, not_implemented
from anvil.api.s3.lifecycle import abort_headers, expiration_headers
from anvil.api.s3.listings import encoder, max_keys
from anvil.api.s3.objects import (
    MAX_PUT_SIZE,
    content_type,
    copy_source,
    if_match_needs_object,
    metadata,
    receive,
    source_object,
    write_conditions,
)
from anvil.api.s3.request import (
    S3Request,
    body_algorithms,
    checksum_type,
    declared_checksums,
    owner,
    version_headers,
    xml,
)
from anvil.errors import AnvilError
from anvil.identity.gate import object_filter
from anvil.objects import validation as v
from anvil.objects.checksums import ALGORITHMS, COMPOSITE_ALGORITHMS, FULL_OBJECT_ALGORITHMS, new_checksum
from anvil.objects.service import UploadListResult


def _upload(r: S3Request) -> dict[str, Any]:
    upload_id = r.q.get("uploadId") or ""
    try:
        up = r.objects.get_upload(r.bucket, upload_id)
    except AnvilError as e:
        if e.code == "NotFound":
            r.objects.get_bucket(r.bucket)
            raise S3Error("NoSuchUpload", "The specified upload does not exist. The upload ID may be invalid, "
                          "or the upload may have been aborted or completed.", 404)
        raise
    if up["key"] != r.key:
        raise S3Error("NoSuchUpload", "The specified upload does not exist for this key.", 404)
    return up


def _part_number(r: S3Request) -> int:
    try:
        n = int(r.q.get("partNumber", ""))
    except ValueError:
        n = 0
    if not 1 <= n <= v.MAX_PART_NUMBER:
        raise S3Error("InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive")
    return n


def _upload_checksum_type(up: dict[str, Any]) -> str:
    # Uploads created before full-object checksums have no type: they were all composite.
    return up["extra"].get("checksum_type", "COMPOSITE")


def _initiator_and_owner(tenant: str) -> str:
    who = owner(tenant)
    return who.replace("Owner>", "Initiator>") + who


async def create_upload(r: S3Request) -> Response:
    r.authorize("object:write", r.bucket, r.key)
    v.check_key(r.key)
    user, system = metadata(r)
    ctype_header = content_type(r)
    extra: dict[str, Any] = {}
    if system:
        extra["system"] = system
    tags = header_tags(r.h.get("x-amz-tagging"))
    if tags:
        extra["tags"] = tags  # given to the object at completion
    if canned(r.h.get("x-amz-acl"), bucket=False):
        extra["public"] = True  # likewise
    alg = (r.h.get("x-amz-checksum-algorithm") or "").lower()
    ctype = (r.h.get("x-amz-checksum-type") or "").upper()
    if ctype and ctype not in ("COMPOSITE", "FULL_OBJECT"):
        raise S3Error("InvalidRequest", "x-amz-checksum-type must be COMPOSITE or FULL_OBJECT")
    if ctype and not alg:
        raise S3Error("InvalidRequest", "x-amz-checksum-type needs an x-amz-checksum-algorithm")
    if alg:
        if alg not in ALGORITHMS:
            raise not_implemented(f"the {alg.upper()} checksum algorithm")
        # As S3: CRC64NVME is only ever a full-object checksum, the others default to composite.
        ctype = ctype or ("COMPOSITE" if alg in COMPOSITE_ALGORITHMS else "FULL_OBJECT")
        if alg not in (FULL_OBJECT_ALGORITHMS if ctype == "FULL_OBJECT" else COMPOSITE_ALGORITHMS):
            raise S3Error("InvalidRequest", f"The {ctype} checksum type cannot be used with the {alg.upper()} "
                          "checksum algorithm.")
        extra["checksum_algorithm"] = alg
        extra["checksum_type"] = ctype
    result = await blocking(r.objects.create_multipart, r.ctx, r.bucket, r.key,
                            content_type=ctype_header, metadata=user, extra=extra or None)
    inner = X.element("Bucket", r.bucket) + X.element("Key", r.key) + X.element("UploadId", result["upload_id"])
    headers = {"x-amz-checksum-algorithm": alg.upper(), "x-amz-checksum-type": ctype} if alg else {}
    headers.update(abort_headers(r, r.key or "", time.time()))
    return xml("InitiateMultipartUploadResult", inner, headers=headers or None)


async def upload_part(r: S3Request) -> Response:
    n = _part_number(r)
    up = _upload(r)
    r.authorize("object:write", r.bucket, r.key)
    alg = up["extra"].get("checksum_algorithm")
    # A composite checksum is made of the client's part checksums, so each part must bring one.
    # A full-object CRC only needs every part's CRC and size, which Anvil computes as the part
    # streams in when the client sends none.
    if alg and _upload_checksum_type(up) == "COMPOSITE" and alg not in body_algorithms(r.h):
        raise S3Error("InvalidRequest", f"this upload expects an x-amz-checksum-{alg} on every part")
    info, computed = await receive(r, max_size=MAX_PUT_SIZE, also=alg)
    result = await blocking(r.objects.upload_part, r.ctx, r.bucket, up["upload_id"], n, info,
                            checksums=computed or None)
    headers = {"etag": f'"{result["etag"]}"'}
    headers.update({f"x-amz-checksum-{a}": val for a, val in computed.items()})
    return Response(status_code=200, headers=headers)


async def upload_part_copy(r: S3Request) -> Response:
    n = _part_number(r)
    src_bucket, src_key, src_version = copy_source(r)
    up = _upload(r)
    r.authorize("object:write", r.bucket, r.key)
    src = source_object(r, src_bucket, src_key, src_version)
    rng = None
    raw_range = r.h.get("x-amz-copy-source-range")
    if raw_range:
        try:
            rng = v.parse_range(raw_range, src.size)
        except AnvilError:
            rng = None
        if rng is None or raw_range.startswith("bytes=-") or raw_range.endswith("-"):
            raise S3Error("InvalidArgument", "The x-amz-copy-source-range value must be of the form "
                          "bytes=first-last where first and last are the zero-based offsets of the first and last "
                          "bytes to copy")
    objects = r.objects
    alg = up["extra"].get("checksum_algorithm")

    def copy_bytes():
        writer = objects.body_writer()
        checksum = new_checksum(alg) if alg else None
        try:
            for piece in objects.read_body(src, rng):
                writer.write(piece)
                if checksum is not None:
                    checksum.update(piece)
        except BaseException:
            writer.abort()
            raise
        return objects.store_body(writer), ({alg: checksum.b64()} if checksum is not None else {})

    info, computed = await blocking(copy_bytes)
    result = await blocking(objects.upload_part, r.ctx, r.bucket, up["upload_id"], n, info,
                            checksums=computed or None)
    inner = (X.element("ETag", f'"{result["etag"]}"') + X.element("LastModified", X.iso_time(time.time()))
             + "".join(X.element(f"Checksum{a.upper()}", val) for a, val in computed.items()))
    headers = {"x-amz-copy-source-version-id": src.version_id} if src.version_id != "null" else None
    return xml("CopyPartResult", inner, headers=headers)


async def list_parts(r: S3Request) -> Response:
    return await catalog_read(_list_parts, r)  # off the event loop, as every listing


def _list_parts(r: S3Request) -> Response:
    up = _upload(r)
    r.authorize("object:read", r.bucket, r.key)
    parts = r.objects.list_parts(r.bucket, up["upload_id"])
    try:
        marker = int(r.q.get("part-number-marker") or 0)
    except ValueError:
        raise S3Error("InvalidArgument", "part-number-marker must be an integer")
    max_parts = max_keys(r.q, "max-parts")
    selected = [p for p in parts if p["part_number"] > marker]
    truncated = len(selected) > max_parts
    selected = selected[:max_parts]
    out = [X.element("Bucket", r.bucket), X.element("Key", r.key), X.element("UploadId", up["upload_id"]),
           X.element("PartNumberMarker", marker)]
    if selected:
        out.append(X.element("NextPartNumberMarker", selected[-1]["part_number"]))
    out += [X.element("MaxParts", max_parts), X.element("IsTruncated", truncated)]
    if up["extra"].get("checksum_algorithm"):
        out += [X.element("ChecksumAlgorithm", up["extra"]["checksum_algorithm"].upper()),
                X.element("ChecksumType", _upload_checksum_type(up))]
    out.append(_initiator_and_owner(up["tenant"]) + X.element("StorageClass", "STANDARD"))
    for p in selected:
        sums = "".join(X.element(f"Checksum{a.upper()}", val) for a, val in p["checksums"].items())
        out.append("<Part>" + X.element("PartNumber", p["part_number"])
                   + X.element("LastModified", X.iso_time(p["last_modified"]))
                   + X.element("ETag", f'"{p["etag"]}"') + X.element("Size", p["size"]) + sums + "</Part>")
    return xml("ListPartsResult", "".join(out), headers=abort_headers(r, r.key or "", up["created"]) or None)


async def list_uploads(r: S3Request) -> Response:
    return await catalog_read(_list_uploads, r)  # off the event loop, as every listing


def _list_uploads(r: S3Request) -> Response:
    r.authorize("object:list", r.bucket)
    q = r.q
    prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
    key_marker, id_marker = q.get("key-marker", ""), q.get("upload-id-marker", "")
    max_uploads = max_keys(q, "max-uploads")
    enc = encoder(q)
    b = r.objects.get_bucket(r.bucket)
    res = UploadListResult()
    if max_uploads:
        res = r.objects.list_uploads(r.bucket, prefix=prefix, delimiter=delimiter, key_marker=key_marker,
                                     upload_id_marker=id_marker, max_uploads=max_uploads)
        kf = object_filter(r.principal, "object:list", r.bucket)
        if kf is not None:  # a bound bucket: only the keys the subject may list (docs/authz.md)
            res.uploads = [u for u in res.uploads if kf.allows(u["key"])]
            res.common_prefixes = [p for p in res.common_prefixes if kf.any_under(p)]
    out = [X.element("Bucket", r.bucket), X.element("KeyMarker", enc(key_marker)),
           X.element("UploadIdMarker", id_marker)]
    if res.truncated:
        # After a common prefix there is no upload id: the next page starts past the whole prefix.
        if res.next_key_marker is not None:
            out.append(X.element("NextKeyMarker", enc(res.next_key_marker)))
        if res.next_upload_id_marker is not None:
            out.append(X.element("NextUploadIdMarker", res.next_upload_id_marker))
    out.append(X.element("Prefix", enc(prefix)))
    if delimiter:
        out.append(X.element("Delimiter", enc(delimiter)))
    out += [X.element("MaxUploads", max_uploads), X.element("IsTruncated", res.truncated)]
    if q.get("encoding-type"):
        out.append(X.element("EncodingType", "url"))
    people = _initiator_and_owner(b.tenant)
    for u in res.uploads:
        sums = ""
        if u.get("checksum_algorithm"):
            sums = (X.element("ChecksumAlgorithm", u["checksum_algorithm"].upper())
                    + X.element("ChecksumType", u["checksum_type"]))
        out.append("<Upload>" + X.element("Key", enc(u["key"])) + X.element("UploadId", u["upload_id"])
                   + people + X.element("StorageClass", "STANDARD")
                   + X.element("Initiated", X.iso_time(u["created"])) + sums + "</Upload>")
    for p in res.common_prefixes:
        out.append("<CommonPrefixes>" + X.element("Prefix", enc(p)) + "</CommonPrefixes>")
    return xml("ListMultipartUploadsResult", "".join(out))


async def complete_upload(r: S3Request) -> Response:
    up = _upload(r)
    r.authorize("object:write", r.bucket, r.key)
    # Checksum headers here describe the assembled object (below), not the XML document.
    root = await r.body_xml(checksums_describe_body=False)
    if root.tag != "CompleteMultipartUpload":
        raise S3Error("MalformedXML", "expected a CompleteMultipartUpload document")
    parts: list[tuple[int, str]] = []
    claimed_sums: dict[int, dict[str, str]] = {}
    for p in root.findall("Part"):
        number, etag = X.child_text(p, "PartNumber"), X.child_text(p, "ETag")
        if number is None or etag is None:
            raise S3Error("MalformedXML", "every Part needs a PartNumber and an ETag")
        try:
            n = int(number)
        except ValueError:
            raise S3Error("MalformedXML", "PartNumber must be an integer")
        parts.append((n, etag.strip().strip('"')))
        claimed_sums[n] = {a: X.child_text(p, f"Checksum{a.upper()}") for a in ALGORITHMS
                           if X.child_text(p, f"Checksum{a.upper()}")}
    if not parts:
        raise S3Error("MalformedXML", "The XML you provided was not well-formed or did not validate against our "
                      "published schema: no parts")
    stored = {p["part_number"]: p for p in r.objects.list_parts(r.bucket, up["upload_id"])}
    for n, sums in claimed_sums.items():
        have = stored.get(n, {}).get("checksums", {})
        for alg, val in sums.items():
            if alg in have and have[alg] != val:
                raise S3Error("InvalidPart", f"the {alg.upper()} of part {n} does not match the uploaded part")
    expected = _claimed_object_checksum(r, up)
    with if_match_needs_object():
        result = await blocking(r.objects.complete_multipart, r.ctx, r.bucket, up["upload_id"], parts,
                                cond=write_conditions(r), expected_checksum=expected)
    b = r.objects.get_bucket(r.bucket)
    headers = version_headers(result["version_id"], b.versioning, write=True)
    sums = result.get("checksums") or {}
    inner = (X.element("Location", _object_url(r))
             + X.element("Bucket", r.bucket) + X.element("Key", r.key)
             + X.element("ETag", f'"{result["etag"]}"')
             + "".join(X.element(f"Checksum{a.upper()}", val) for a, val in sums.items()))
    if sums:
        inner += X.element("ChecksumType", checksum_type(sums))
    headers.update(expiration_headers(r, r.key or "", result["size"], up["extra"].get("tags")))
    return xml("CompleteMultipartUploadResult", inner, headers=headers)


def _claimed_object_checksum(r: S3Request, up: dict[str, Any]) -> str | None:
    """The whole object's checksum a CompleteMultipartUpload carries, if any, once it is known to
    fit the upload: same algorithm and checksum type as CreateMultipartUpload chose."""
    alg = up["extra"].get("checksum_algorithm")
    have = _upload_checksum_type(up) if alg else "null"
    ctype = r.h.get("x-amz-checksum-type")
    if ctype is not None and ctype.upper() != have:
        raise S3Error("InvalidRequest", f"The upload was created using the {have} checksum type. The complete "
                      "request must use the same checksum type.")
    claims = declared_checksums(r.h, part_count_ok=True)
    if not claims:
        return None
    if list(claims) != [alg]:
        raise S3Error("InvalidRequest", f"The upload was created using {alg.upper() if alg else 'no'} checksum "
                      "algorithm. The complete request must use the same checksum algorithm.")
    return claims[alg]


def _object_url(r: S3Request) -> str:
    """The object's absolute URL in the addressing style of this request (S3's `Location`)."""
    request = r.request
    host = r.h.get("host") or request.url.netloc
    bare = host.rsplit(":", 1)[0].lower()
    path = "/" + urllib.parse.quote(r.key or "")
    base_domain = r.gw.base_domain
    if not (base_domain and bare.endswith("." + base_domain)):
        path = f"/{r.bucket}{path}"
    return f"{request.url.scheme}://{host}{path}"


async def abort_upload(r: S3Request) -> Response:
    up = _upload(r)
    r.authorize("object:delete", r.bucket, r.key)
    await blocking(r.objects.abort_multipart, r.ctx, r.bucket, up["upload_id"])
    return Response(status_code=204)
