"""Get/Put/DeleteBucketLifecycle(Configuration): the document, checked as S3 checks it and stored as the
bucket's `lifecycle` setting; `anvil.objects.lifecycle.LifecycleWorker` executes it.

Supported: Filter with Prefix, Tag, object sizes or And (Prefix + Tags + sizes) and the legacy rule-level Prefix;
Expiration (Days, Date, ExpiredObjectDeleteMarker); NoncurrentVersionExpiration (NoncurrentDays,
NewerNoncurrentVersions); AbortIncompleteMultipartUpload (DaysAfterInitiation); object-size filters
(ObjectSizeGreaterThan, ObjectSizeLessThan, alone or in And). Transitions (Anvil has one storage class)
are NotImplemented."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any

from starlette.responses import Response

from anvil.api.common import blocking
from anvil.api.s3 import xmlutil as X
from anvil.api.s3.errors import S3Error, not_implemented
from anvil.api.s3.request import S3Request, xml
from anvil.objects import lifecycle as worker

MAX_RULES = 1000
MAX_SIZE_FILTER = 50 * 1024**4


def _positive(el: Any, name: str, what: str) -> int | None:
    text = X.child_text(el, name)
    if text is None:
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise S3Error("InvalidArgument", f"'{name}' for {what} action must be a positive integer")
    return n


def _date(text: str) -> float:
    try:
        d = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise S3Error("InvalidArgument", "Invalid date: 'Date' must be in ISO 8601 format")
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    d = d.astimezone(UTC)
    if (d.hour, d.minute, d.second, d.microsecond) != (0, 0, 0, 0):
        raise S3Error("InvalidArgument", "'Date' must be at midnight GMT")
    return d.timestamp()


def _filter(el: Any, rule: dict[str, Any]) -> None:
    legacy = X.child_text(el, "Prefix")
    f = el.find("Filter")
    if f is not None and legacy is not None:
        raise S3Error("MalformedXML", "a rule has either a Filter or a Prefix")
    rule["prefix"] = legacy or ""
    rule["tags"] = []
    if f is None:
        return
    parts = [c for c in f]
    if len(parts) > 1:
        # AWS API reference, LifecycleRuleFilter: "exactly one of Prefix, Tag, ObjectSizeGreaterThan,
        # ObjectSizeLessThan, or And".
        raise S3Error("MalformedXML", "a Filter holds one of Prefix, Tag, ObjectSizeGreaterThan, "
                      "ObjectSizeLessThan or And")
    holder = f.find("And") if f.find("And") is not None else f
    rule["prefix"] = X.child_text(holder, "Prefix") or ""
    for tag in holder.findall("Tag"):
        k, val = X.child_text(tag, "Key"), X.child_text(tag, "Value")
        if k is None or val is None:
            raise S3Error("MalformedXML", "every Tag needs a Key and a Value")
        rule["tags"].append([k, val])
    # Object-size bounds, both exclusive ("the rule applies to objects with a size that is greater
    # than 7"), at most 50 TB ("Adding filters to Lifecycle rules").
    for name, field in (("ObjectSizeGreaterThan", "size_gt"), ("ObjectSizeLessThan", "size_lt")):
        text = X.child_text(holder, name)
        if text is None:
            continue
        try:
            n = int(text)
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_SIZE_FILTER:
            raise S3Error("InvalidArgument", f"'{name}' must be a whole number of bytes from 0 to 50 TB")
        rule[field] = n
    if rule.get("size_lt") is not None and rule.get("size_gt") is not None and rule["size_lt"] <= rule["size_gt"]:
        raise S3Error("InvalidArgument", "ObjectSizeLessThan must be greater than ObjectSizeGreaterThan")
    if rule.get("size_lt") == 0:
        raise S3Error("InvalidArgument", "ObjectSizeLessThan must be greater than 0")


def parse(root: Any) -> dict[str, Any]:
    if root.tag != "LifecycleConfiguration":
        raise S3Error("MalformedXML", "expected a LifecycleConfiguration document")
    rules: list[dict[str, Any]] = []
    ids: set[str] = set()
    for el in root:
        if el.tag != "Rule":
            raise S3Error("MalformedXML", "a LifecycleConfiguration holds Rule elements")
        if el.find("Transition") is not None or el.find("NoncurrentVersionTransition") is not None:
            raise not_implemented("lifecycle transitions (Anvil has one storage class)")
        rule: dict[str, Any] = {"id": X.child_text(el, "ID") or "", "status": X.child_text(el, "Status")}
        if len(rule["id"]) > 255:
            raise S3Error("InvalidArgument", "ID length should not exceed allowed limit of 255")
        if rule["id"]:
            if rule["id"] in ids:
                raise S3Error("InvalidArgument", "Rule ID must be unique. Found same ID for more than one rule")
            ids.add(rule["id"])
        if rule["status"] not in ("Enabled", "Disabled"):
            raise S3Error("MalformedXML", "Status must be Enabled or Disabled")
        _filter(el, rule)
        exp = el.find("Expiration")
        if exp is not None:
            rule["expiration_days"] = _positive(exp, "Days", "Expiration")
            date = X.child_text(exp, "Date")
            rule["expiration_date"] = _date(date) if date is not None else None
            marker = X.child_text(exp, "ExpiredObjectDeleteMarker")
            rule["expired_object_delete_marker"] = marker == "true"
            given = [rule["expiration_days"] is not None, rule["expiration_date"] is not None, marker is not None]
            if sum(given) != 1:
                raise S3Error("MalformedXML", "Expiration holds exactly one of Days, Date and "
                              "ExpiredObjectDeleteMarker")
            if marker is not None and rule["tags"]:
                raise S3Error("InvalidRequest", "ExpiredObjectDeleteMarker cannot be specified with tags.")
        nc = el.find("NoncurrentVersionExpiration")
        if nc is not None:
            rule["noncurrent_days"] = _positive(nc, "NoncurrentDays", "NoncurrentVersionExpiration")
            if rule["noncurrent_days"] is None:
                raise S3Error("MalformedXML", "NoncurrentVersionExpiration needs NoncurrentDays")
            newer = X.child_text(nc, "NewerNoncurrentVersions")
            rule["newer_noncurrent"] = _positive(nc, "NewerNoncurrentVersions", "NoncurrentVersionExpiration") \
                if newer is not None else None
        abort = el.find("AbortIncompleteMultipartUpload")
        if abort is not None:
            rule["abort_days"] = _positive(abort, "DaysAfterInitiation", "AbortIncompleteMultipartUpload")
            if rule["abort_days"] is None:
                raise S3Error("MalformedXML", "AbortIncompleteMultipartUpload needs DaysAfterInitiation")
            if rule["tags"]:
                raise S3Error("InvalidRequest", "Tag-based filter cannot be used with "
                              "AbortIncompleteMultipartUpload action")
            if rule.get("size_gt") is not None or rule.get("size_lt") is not None:
                # An upload in progress has no object size to compare: refused rather than ignored.
                raise S3Error("InvalidRequest", "Object size filter cannot be used with "
                              "AbortIncompleteMultipartUpload action")
        if exp is None and nc is None and abort is None:
            raise S3Error("InvalidRequest", "At least one action needs to be specified in a rule")
        rules.append(rule)
    if not rules:
        raise S3Error("MalformedXML", "a LifecycleConfiguration needs at least one Rule")
    for n, rule in enumerate(rules):
        if not rule["id"]:
            # S3 gives a rule sent without an ID one of its own (GetBucketLifecycleConfiguration and
            # x-amz-expiration name it). Derived from the rule and its place rather than random, so a
            # retried request stores the same document.
            digest = hashlib.sha256(json.dumps([n, rule], sort_keys=True).encode()).digest()
            rule["id"] = base64.b32encode(digest[:20]).decode().rstrip("=")
            while rule["id"] in ids:
                rule["id"] = rule["id"][1:] + rule["id"][0]
            ids.add(rule["id"])
    if len(rules) > MAX_RULES:
        raise S3Error("InvalidRequest", f"a lifecycle configuration holds at most {MAX_RULES} rules")
    return {"rules": rules}


def _rule_xml(rule: dict[str, Any]) -> str:
    out = X.element("ID", rule["id"]) if rule["id"] else ""
    tags = "".join(f"<Tag>{X.element('Key', k)}{X.element('Value', val)}</Tag>" for k, val in rule["tags"])
    sizes = "".join(X.element(name, rule[field]) for name, field in
                    (("ObjectSizeGreaterThan", "size_gt"), ("ObjectSizeLessThan", "size_lt"))
                    if rule.get(field) is not None)
    predicates = bool(rule["prefix"]) + len(rule["tags"]) + (rule.get("size_gt") is not None) \
        + (rule.get("size_lt") is not None)
    if predicates > 1:
        prefix = X.element("Prefix", rule["prefix"]) if rule["prefix"] else ""
        out += f"<Filter><And>{prefix}{tags}{sizes}</And></Filter>"
    elif rule["tags"] or sizes:
        out += f"<Filter>{tags}{sizes}</Filter>"
    else:
        out += f"<Filter>{X.element('Prefix', rule['prefix'])}</Filter>"
    out += X.element("Status", rule["status"])
    if rule.get("expiration_days") is not None:
        out += f"<Expiration>{X.element('Days', rule['expiration_days'])}</Expiration>"
    elif rule.get("expiration_date") is not None:
        date = datetime.fromtimestamp(rule["expiration_date"], UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        out += f"<Expiration>{X.element('Date', date)}</Expiration>"
    elif rule.get("expired_object_delete_marker"):
        out += "<Expiration><ExpiredObjectDeleteMarker>true</ExpiredObjectDeleteMarker></Expiration>"
    if rule.get("noncurrent_days") is not None:
        newer = (X.element("NewerNoncurrentVersions", rule["newer_noncurrent"])
                 if rule.get("newer_noncurrent") is not None else "")
        out += (f"<NoncurrentVersionExpiration>{X.element('NoncurrentDays', rule['noncurrent_days'])}{newer}"
                "</NoncurrentVersionExpiration>")
    if rule.get("abort_days") is not None:
        out += (f"<AbortIncompleteMultipartUpload>{X.element('DaysAfterInitiation', rule['abort_days'])}"
                "</AbortIncompleteMultipartUpload>")
    return f"<Rule>{out}</Rule>"


async def get_bucket_lifecycle(r: S3Request) -> Response:
    r.authorize("bucket:read", r.bucket)
    r.objects.get_bucket(r.bucket)
    doc = r.objects.bucket_setting(r.bucket, "lifecycle")
    if not doc:
        raise S3Error("NoSuchLifecycleConfiguration", "The lifecycle configuration does not exist", 404,
                      fields={"BucketName": r.bucket or ""})
    return xml("LifecycleConfiguration", "".join(_rule_xml(rule) for rule in doc["rules"]))


async def put_bucket_lifecycle(r: S3Request) -> Response:
    r.authorize("bucket:configure", r.bucket)
    r.objects.get_bucket(r.bucket)
    doc = parse(await r.body_xml())
    await blocking(r.objects.put_bucket_setting, r.ctx, r.bucket, "lifecycle", doc)
    return Response(status_code=200)


async def delete_bucket_lifecycle(r: S3Request) -> Response:
    r.authorize("bucket:configure", r.bucket)
    r.objects.get_bucket(r.bucket)
    await blocking(r.objects.put_bucket_setting, r.ctx, r.bucket, "lifecycle", None)
    return Response(status_code=204)


def expiration_headers(r: S3Request, key: str, size: int, tags: list[list[str]] | None,
                       created: float | None = None) -> dict[str, str]:
    """`x-amz-expiration: expiry-date="<HTTP date>", rule-id="<id>"` when an enabled Expiration rule of
    the bucket will expire this object (AWS PutObject / GetObject / HeadObject API reference), else
    nothing. The date is the one the lifecycle worker acts on (`anvil.objects.lifecycle.due_time`)."""
    doc = r.objects.bucket_setting(r.bucket, "lifecycle")
    if not doc:
        return {}
    found = worker.expiration(doc, key, size, tags or [], time.time() if created is None else created,
                              worker.day_seconds_from_env())
    if found is None:
        return {}
    when, rule_id = found
    return {"x-amz-expiration": f'expiry-date="{formatdate(when, usegmt=True)}", rule-id="{rule_id}"'}


def abort_headers(r: S3Request, key: str, initiated: float) -> dict[str, str]:
    """`x-amz-abort-date` and `x-amz-abort-rule-id` when an enabled AbortIncompleteMultipartUpload rule
    covers this upload (AWS CreateMultipartUpload / ListParts API reference), else nothing."""
    doc = r.objects.bucket_setting(r.bucket, "lifecycle")
    found = worker.abort_date(doc, key, initiated, worker.day_seconds_from_env()) if doc else None
    if found is None:
        return {}
    return {"x-amz-abort-date": formatdate(found[0], usegmt=True), "x-amz-abort-rule-id": found[1]}
