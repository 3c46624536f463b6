"""Bucket CORS: the configuration (Get/Put/DeleteBucketCors, stored as the bucket's `cors` setting),
preflight `OPTIONS` (unauthenticated, as browsers send it), and the CORS headers of actual requests
that carry an `Origin`. Rules are matched as the AWS page "Using cross-origin resource sharing (CORS)"
describes: the first rule whose AllowedOrigin matches the Origin, whose AllowedMethod holds the method,
and whose AllowedHeader patterns cover every requested header."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from anvil.api.common import blocking
from anvil.api.s3 import xmlutil as X
from anvil.api.s3.errors import S3Error
from anvil.api.s3.request import S3Request, xml

METHODS = ("GET", "PUT", "POST", "DELETE", "HEAD")
MAX_RULES = 100
VARY = "Origin, Access-Control-Request-Headers, Access-Control-Request-Method"


def _one_wildcard(values: list[str], what: str) -> None:
    for val in values:
        if val.count("*") > 1:
            raise S3Error("InvalidRequest", f'{what} "{val}" can not have more than one wildcard.')


def parse(root: Any) -> list[dict[str, Any]]:
    if root.tag != "CORSConfiguration":
        raise S3Error("MalformedXML", "expected a CORSConfiguration document")
    rules = []
    for el in root:
        if el.tag != "CORSRule":
            raise S3Error("MalformedXML", "a CORSConfiguration holds CORSRule elements")
        rule = {
            "id": X.child_text(el, "ID"),
            "origins": [c.text or "" for c in el.findall("AllowedOrigin")],
            "methods": [c.text or "" for c in el.findall("AllowedMethod")],
            "headers": [c.text or "" for c in el.findall("AllowedHeader")],
            "expose": [c.text or "" for c in el.findall("ExposeHeader")],
            "max_age": None,
        }
        if not rule["origins"] or not rule["methods"]:
            raise S3Error("MalformedXML", "every CORSRule needs an AllowedOrigin and an AllowedMethod")
        for m in rule["methods"]:
            if m not in METHODS:
                raise S3Error("InvalidRequest", f"Found unsupported HTTP method in CORS config. Unsupported method "
                              f"is {m}")
        _one_wildcard(rule["origins"], "AllowedOrigin")
        _one_wildcard(rule["headers"], "AllowedHeader")
        age = X.child_text(el, "MaxAgeSeconds")
        if age is not None:
            try:
                rule["max_age"] = int(age)
            except ValueError:
                raise S3Error("MalformedXML", "MaxAgeSeconds must be an integer")
        rules.append(rule)
    if not rules:
        raise S3Error("MalformedXML", "a CORSConfiguration needs at least one CORSRule")
    if len(rules) > MAX_RULES:
        raise S3Error("InvalidRequest", f"a CORS configuration holds at most {MAX_RULES} rules")
    return rules


def _matches(pattern: str, value: str) -> bool:
    head, star, tail = pattern.partition("*")
    if not star:
        return pattern == value
    return len(value) >= len(head) + len(tail) and value.startswith(head) and value.endswith(tail)


def match(rules: list[dict[str, Any]], origin: str, method: str, headers: list[str]) -> dict[str, Any] | None:
    for rule in rules:
        if not any(_matches(o, origin) for o in rule["origins"]):
            continue
        if method not in rule["methods"]:
            continue
        allowed = [h.lower() for h in rule["headers"]]
        if all(any(_matches(a, h.lower()) for a in allowed) for h in headers):
            return rule
    return None


def _allow_headers(rule: dict[str, Any], origin: str) -> dict[str, str]:
    wildcard = "*" in rule["origins"]
    out = {"access-control-allow-origin": "*" if wildcard else origin,
           "access-control-allow-methods": ", ".join(rule["methods"]), "vary": VARY}
    if not wildcard:
        out["access-control-allow-credentials"] = "true"
    if rule["expose"]:
        out["access-control-expose-headers"] = ", ".join(rule["expose"])
    if rule["max_age"] is not None:
        out["access-control-max-age"] = str(rule["max_age"])
    return out


def preflight(request: Request, bucket: str | None, objects: Any) -> Response:
    """OPTIONS: no signature (browsers send none); the answer depends only on the bucket's rules."""
    origin = request.headers.get("origin")
    method = request.headers.get("access-control-request-method")
    if not origin:
        raise S3Error("BadRequest", "Insufficient information. Origin request header needed.")
    if not method:
        raise S3Error("BadRequest", "Invalid Access-Control-Request-Method: null")
    if bucket is None or objects.find_bucket(bucket) is None:
        raise S3Error("NoSuchBucket", "The specified bucket does not exist", 404)
    rules = objects.bucket_setting(bucket, "cors")
    if not rules:
        raise S3Error("AccessDenied", "CORSResponse: CORS is not enabled for this bucket.", 403)
    requested = [h.strip() for h in (request.headers.get("access-control-request-headers") or "").split(",")
                 if h.strip()]
    rule = match(rules, origin, method, requested)
    if rule is None:
        raise S3Error("AccessDenied", "CORSResponse: This CORS request is not allowed. This is usually because the "
                      "evalution of Origin, request method / Access-Control-Request-Method or "
                      "Access-Control-Request-Headers are not whitelisted by the resource's CORS spec.", 403)
    headers = _allow_headers(rule, origin)
    if requested:
        headers["access-control-allow-headers"] = ", ".join(h.lower() for h in requested)
    return Response(status_code=200, headers=headers)


def response_headers(request: Request, bucket: str | None, objects: Any) -> dict[str, str]:
    """The CORS headers of an actual (non-preflight) request from `Origin`, when a rule allows it."""
    origin = request.headers.get("origin")
    if not origin or bucket is None:
        return {}
    try:
        rules = objects.bucket_setting(bucket, "cors")
    except Exception:  # noqa: BLE001 - a missing bucket or a closed store: no CORS headers, the answer stands
        return {}
    if not rules:
        return {}
    rule = match(rules, origin, request.method, [])
    return _allow_headers(rule, origin) if rule is not None else {}


# ------------------------------------------------------------------ configuration


async def get_bucket_cors(r: S3Request) -> Response:
    r.authorize("bucket:read", r.bucket)
    r.objects.get_bucket(r.bucket)
    rules = r.objects.bucket_setting(r.bucket, "cors")
    if not rules:
        raise S3Error("NoSuchCORSConfiguration", "The CORS configuration does not exist", 404,
                      fields={"BucketName": r.bucket or ""})
    out = []
    for rule in rules:
        inner = X.element("ID", rule["id"]) if rule["id"] is not None else ""
        inner += "".join(X.element("AllowedHeader", h) for h in rule["headers"])
        inner += "".join(X.element("AllowedMethod", m) for m in rule["methods"])
        inner += "".join(X.element("AllowedOrigin", o) for o in rule["origins"])
        inner += "".join(X.element("ExposeHeader", e) for e in rule["expose"])
        if rule["max_age"] is not None:
            inner += X.element("MaxAgeSeconds", rule["max_age"])
        out.append(f"<CORSRule>{inner}</CORSRule>")
    return xml("CORSConfiguration", "".join(out))


async def put_bucket_cors(r: S3Request) -> Response:
    r.authorize("bucket:configure", r.bucket)
    r.objects.get_bucket(r.bucket)
    rules = parse(await r.body_xml())
    await blocking(r.objects.put_bucket_setting, r.ctx, r.bucket, "cors", rules)
    return Response(status_code=200)


async def delete_bucket_cors(r: S3Request) -> Response:
    r.authorize("bucket:configure", r.bucket)
    r.objects.get_bucket(r.bucket)
    await blocking(r.objects.put_bucket_setting, r.ctx, r.bucket, "cors", None)
    return Response(status_code=204)
