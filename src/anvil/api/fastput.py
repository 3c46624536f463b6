"""The small PUT (S3 PutObject, and the native API's object PUT), answered from the HTTP parser's
callbacks (api/server.py), before the general path.

Most writes an S3 client makes are a path-style `PUT /bucket/key` signed with SigV4 in the Authorization
header, with a small body of known length, its SHA-256 (or UNSIGNED-PAYLOAD) declared, maybe a
Content-MD5, a Content-Type and some `x-amz-meta-*` (boto3 adds `Expect: 100-continue`). The general
path serves it through an ASGI task, the app, Starlette's request, the gateway's dispatch and the body
reader (~0.9 M instructions on the event loop per PUT, docs/performance.md); this one serves exactly
those requests with the same functions and no layers:

- `plan`, when the request head is parsed: the gateway's checks (header section size, target, reserved
  names, no query, no header it does not handle), the signature (`auth.authenticate`: same canonical
  request, same cached signing keys and credentials, so the same lifecycle of the application),
  `authorize` (tenant, scopes), `prepare_write` (bucket, key, free space), the metadata and content type;
- `commit`, when the body has arrived: its SHA-256 and MD5 (checked against what was declared), then the
  version is submitted to the catalog writer (group commit), as `objects.put_object` does for a small body;
- `answer`, when the writer has committed it: the 200 answer, headers in the general path's order.

Everything it does not handle it declines before answering, and the request takes the general path,
which sees it untouched (the protocol makes the request's cycle only on a decline, as it would have been
made at the end of the head, and starts its ASGI task with the body received so far): a head it does not
fully reproduce (virtual-host style, presigned, aws-chunked, a condition, checksums, ACL, tagging, SSE,
object lock, storage class, a copy source, a query, a session token, CORS), a refused signature or
authorisation, a bucket with a binding or a lifecycle configuration (its answers carry x-amz-expiration),
an access log to write, a body whose digest does not match (the general path gives
XAmzContentSHA256Mismatch or BadDigest), a client that goes away mid-body. Only a failure of the commit
itself is answered here, with the gateway's error.

The native `PUT /anvil/v1/buckets/{bucket}/object?key=K` with a Bearer token is served the same way
(`_plan_native`), with the native route's functions: the key from the query (`native._key`), the token
(`identity.authenticate_token_full`: the verified-token cache and the application lifecycle, as
`common.authenticate`), `authorize`, `prepare_write`, `x-anvil-meta-*`, Content-Type, Content-MD5 and
`x-anvil-checksum-sha256`; its answer is `json_put_answer`'s with the request id, or `endpoint`'s error.
It declines a query other than `key=`, a condition, an Idempotency-Key, any header it does not know,
no token (`--dev-auth`), a refused token, key or authorisation, a bucket with a binding or a lifecycle
rule, an access log, recovery mode, a body whose declared digests do not match.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from anvil.api import native
from anvil.api.common import HASH_ON_LOOP_LIMIT, metadata_from_headers, unexpected_error_response
from anvil.api.common import error_response as native_error_response
from anvil.api.fastreq import FastHeaders
from anvil.api.record import next_request_id
from anvil.api.s3 import auth as sig
from anvil.api.s3.body import _is_sha256
from anvil.api.s3.errors import error_response
from anvil.api.s3.gateway import MAX_HEADER_BYTES, error_of
from anvil.api.s3.objects import _meta_from_header, content_type
from anvil.api.s3.request import content_md5
from anvil.api.writes import json_put_answer
from anvil.context import RequestContext
from anvil.errors import AnvilError
from anvil.identity import authorize
from anvil.objects import Conditions
from anvil.objects import validation as v
from anvil.runtime import Anvil
from anvil.storage.blobs import digest_bytes
from anvil.storage.catalog import Settled

# The request headers this path knows the whole meaning of (and `x-amz-meta-*`). Any other header may
# change what the general path does (a condition, a checksum, an ACL, an encoding...): declined.
_KNOWN = frozenset({
    b"host", b"authorization", b"x-amz-date", b"x-amz-content-sha256", b"content-length", b"content-type",
    b"content-md5", b"user-agent", b"accept-encoding", b"accept", b"amz-sdk-invocation-id", b"amz-sdk-request",
    b"connection", b"expect",  # (100-continue: answered by the protocol as the general path's first receive)
})
_AUTH_PREFIX = (sig.ALGORITHM + " ").encode("ascii")
# ... and those of the native object PUT (and `x-anvil-meta-*`): a condition, an Idempotency-Key, a
# Transfer-Encoding or anything else is the general path's.
_NATIVE_KNOWN = frozenset({
    b"host", b"authorization", b"content-length", b"content-type", b"content-md5", b"x-anvil-checksum-sha256",
    b"user-agent", b"accept-encoding", b"accept", b"connection", b"expect",
})
# Those of them that ask for no more than the key, token, length and content type: a PUT with only these
# (the benchmark's, an SDK's without metadata or checksums) skips the metadata and checksum readers.
_NATIVE_PLAIN = frozenset({
    b"host", b"authorization", b"content-length", b"content-type", b"user-agent", b"accept-encoding", b"accept",
    b"connection", b"expect",
})
_NATIVE_PREFIX = b"/anvil/v1/buckets/"
_NATIVE_SUFFIX = b"/object"
_BUCKET = slice(len(_NATIVE_PREFIX), -len(_NATIVE_SUFFIX))
_NO_CONDITIONS = Conditions()


class _Head:
    """What the gateway's and the native route's functions read of a request (`headers`, `method`,
    `scope`, `h`), for the signature check, the key, the metadata, the content type and checksums."""

    __slots__ = ("headers", "h", "scope")
    method = "PUT"

    def __init__(self, headers: FastHeaders | None, raw_path: bytes, query: bytes = b""):
        self.headers = self.h = headers
        self.scope = {"raw_path": raw_path, "query_string": query}


def _known_headers(headers: list[tuple[bytes, bytes]], known: frozenset[bytes], meta: bytes
                   ) -> dict[bytes, bytes] | None:
    """The headers by name, or None when a name repeats (the general path's rules for it) or one is
    neither `known` nor user metadata (`meta` prefix). C loops over the list: a Python loop over a dozen
    headers cost more."""
    found = dict(headers)
    if len(found) != len(headers):
        return None
    # (`issuperset` walks the dict's keys: no set made for the usual request, which has no other header)
    if not known.issuperset(found) and not all(name.startswith(meta) for name in found.keys() - known):
        return None
    return found


class PutPlan:
    """One accepted request between its head and its answer."""

    __slots__ = ("bucket", "key", "path", "length", "sha256", "md5", "ctx", "ctype", "user", "start", "native")

    def __init__(self, bucket: str, key: str, path: str, length: int, sha256: str | None, md5: str | None,
                 ctx: RequestContext, ctype: str, user: dict[str, str], start: float, native: bool = False):
        self.bucket, self.key, self.path, self.length = bucket, key, path, length
        self.sha256, self.md5, self.ctx, self.ctype, self.user, self.start = sha256, md5, ctx, ctype, user, start
        self.native = native  # a native API PUT (its answer is JSON), else an S3 one


class FastPuts:
    def __init__(self, anvil: Anvil, app: Any):
        self.objects = anvil.objects
        self.authz = anvil.authz
        self.state = app.state
        self.observer = app.state.observer
        gateway = app.state.s3_gateway
        self.region = gateway.region
        self.base_domain = gateway.base_domain
        # Inline bodies hashed and stored on the loop, as the general path does for them (`put_object`).
        self.limit = min(HASH_ON_LOOP_LIMIT, anvil.objects.blobs.inline_max)
        self.identity = anvil.identity
        self.answered = 0  # S3 PUTs answered here (the `anvil_fast_answers_total` metric)
        self.native_answered = 0  # ... and native ones

    def plan(self, url: bytes, headers: list[tuple[bytes, bytes]], header_bytes: int) -> PutPlan | None:
        """At the end of a PUT's head: a plan if this path answers it, None if the general path must.
        `header_bytes`: the header section's size as the gateway counts it ("name: value\r\n" per header),
        which the protocol adds up as the headers arrive (a second pass here cost ~8 k instructions)."""
        state = self.state
        if self.observer.log is not None or state.recovery_mode:
            return None  # an access log line to write, writes refused: the general path
        if url.startswith(_NATIVE_PREFIX):
            return self._plan_native(url, headers)
        if url[:1] != b"/" or url.find(b"?") >= 0 or url.find(b"#") >= 0:
            return None  # a query (a sub-resource, presigned) or an absolute URL
        start = time.perf_counter()
        found = _known_headers(headers, _KNOWN, b"x-amz-meta-")
        if found is None:
            return None
        authorization = found.get(b"authorization")
        sha_text = found.get(b"x-amz-content-sha256")
        length_text = found.get(b"content-length")
        host = found.get(b"host")
        if authorization is None or not authorization.startswith(_AUTH_PREFIX) or sha_text is None \
                or length_text is None \
                or header_bytes > MAX_HEADER_BYTES:
            return None
        length = v.decimal_length(length_text.decode("latin-1"))
        if length is None or length > self.limit:
            return None
        payload = sha_text.decode("latin-1")
        if payload != sig.UNSIGNED and not _is_sha256(payload):
            return None
        if self.base_domain and host is not None and \
                host.decode("latin-1").rsplit(":", 1)[0].lower().endswith("." + self.base_domain):
            return None  # virtual-host style
        try:
            path = urllib.parse.unquote(url.decode("latin-1"), errors="strict")
        except UnicodeDecodeError:
            return None
        bucket, _, key = path[1:].partition("/")
        if not bucket or not key or bucket in v.RESERVED_BUCKETS or v.is_reserved_key(key):
            return None
        if self.authz.has_binding(bucket) or self.objects.bucket_setting(bucket, "lifecycle") is not None:
            return None  # decided by relationships; answered with x-amz-expiration
        h = FastHeaders({"headers": headers})
        head = _Head(h, url)
        try:
            principal = sig.authenticate(head, state.s3_credentials, self.region, query=sig._NO_QUERY).principal  # type: ignore[arg-type]
            if principal.anonymous:
                return None
            authorize(principal, "object:write", f"bucket:{bucket}/{key}")
            self.objects.prepare_write(bucket, key, incoming=length)
            # `objects.metadata` without its system headers (none of them is known here).
            user = {k[11:]: _meta_from_header(val) for k, val in h.amz_items() if k.startswith("x-amz-meta-")}
            if user:
                user = v.normalise_metadata(user)
            ctype = content_type(head)  # type: ignore[arg-type]
            md5 = content_md5(h.get("content-md5"))
        except Exception:  # noqa: BLE001 - every refusal is the general path's to answer
            return None
        ctx = RequestContext(principal=principal, request_id=next_request_id())
        return PutPlan(bucket, key, path, length, payload.lower() if payload != sig.UNSIGNED else None, md5, ctx,
                       ctype, user, start)

    def _plan_native(self, url: bytes, headers: list[tuple[bytes, bytes]]) -> PutPlan | None:
        """`plan` for `PUT /anvil/v1/buckets/{bucket}/object?key=K` (api/native.py `put_object`)."""
        path, _, query = url.partition(b"?")
        bucket_raw = path[_BUCKET]
        if not path.endswith(_NATIVE_SUFFIX) or query[:4] != b"key=" or query.find(b"&") >= 0 \
                or url.find(b"#") >= 0 or not url.isascii() or not bucket_raw or bucket_raw.find(b"/") >= 0 \
                or bucket_raw.find(b"%") >= 0:
            return None  # another route, another query parameter (a version id...), an encoded bucket name
        start = time.perf_counter()
        found = _known_headers(headers, _NATIVE_KNOWN, b"x-anvil-meta-")
        if found is None:
            return None
        authorization = found.get(b"authorization")
        length_text = found.get(b"content-length")
        if authorization is None or authorization[:7] != b"Bearer " or length_text is None:
            return None  # no token (anonymous, or --dev-auth's principal), another scheme: the general path
        length = v.decimal_length(length_text.decode("latin-1"))
        token = authorization[7:].strip().decode("latin-1")  # as `common.authenticate` reads it
        if length is None or length > self.limit or not token:
            return None
        bucket = bucket_raw.decode("ascii")
        if self.authz.has_binding(bucket) or self.objects.bucket_setting(bucket, "lifecycle") is not None:
            return None  # decided by relationships (and their caveats); a lifecycle rule
        ctype_raw = found.get(b"content-type")
        head = _Head(None if _NATIVE_PLAIN.issuperset(found) else FastHeaders({"headers": headers}), path, query)
        try:
            key = native._key(head)  # type: ignore[arg-type]
            principal = self.identity.authenticate_token_full(token)[0]
            authorize(principal, "object:write", f"bucket:{bucket}/{key}")
            self.objects.prepare_write(bucket, key, incoming=length)
            ctype = v.check_content_type(ctype_raw.decode("latin-1") if ctype_raw is not None else None)
            if head.headers is None:
                user, sha, md5 = {}, None, None
            else:
                user = v.normalise_metadata(metadata_from_headers(head))  # type: ignore[arg-type]
                sha, md5 = native._expected_checksums(head)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - every refusal is the general path's to answer
            return None
        ctx = RequestContext(principal=principal, request_id=next_request_id())
        return PutPlan(bucket, key, url.decode("ascii"), length, sha.lower() if sha is not None else None, md5, ctx,
                       ctype, user, start, native=True)

    def commit(self, plan: PutPlan, body: bytes, then: Callable[[Settled], None]) -> Settled | None:
        """The whole body has arrived: the version submitted to the catalog writer, its outcome handed to
        `then` from the writer thread once committed (or failed); None (nothing submitted) when the general
        path must answer."""
        if len(body) != plan.length:
            return None
        digests = digest_bytes(body)
        if (plan.sha256 is not None and digests.sha256 != plan.sha256) or \
                (plan.md5 is not None and digests.md5 != plan.md5):
            return None  # XAmzContentSHA256Mismatch or BadDigest, from the general path
        objects = self.objects
        try:
            # (admitted: by `prepare_write`, which the native route counts done even for an empty body)
            info = objects.store_bytes(body, expected_md5=plan.md5, digests=digests,
                                       admitted=plan.length > 0 or plan.native)
            return objects.submit_put_object(plan.ctx, plan.bucket, plan.key, info, content_type=plan.ctype,  # type: ignore[return-value]
                                             metadata=plan.user, cond=_NO_CONDITIONS, extra=None, then=then,
                                             checked=True)
        except Exception:  # noqa: BLE001 - refused before anything was queued: the general path answers
            return None

    def answer(self, plan: PutPlan, future: Settled) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """The answer (status, headers with content-length, body) once the commit settled, counted in
        the metrics as the general path counts it."""
        if plan.native:
            return self._answer_native(plan, future)
        rid = plan.ctx.request_id.encode("latin-1")
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - the gateway's answer for it
            response = error_response(error_of(exc, "PUT", plan.path), plan.ctx.request_id, resource=plan.path)
            status, headers, body = response.status_code, response.raw_headers, response.body
        else:
            status, body = 200, b""
            headers = [(b"etag", b'"%s"' % result["etag"].encode("latin-1"))]
            version_id = result["version_id"]
            if version_id is not None and version_id != "null":  # `version_headers(..., write=True)`
                headers.append((b"x-amz-version-id", version_id.encode("latin-1")))
            if result.get("cursor") is not None:
                headers.append((b"x-anvil-cursor", b"%d" % result["cursor"]))
            headers += [(b"content-length", b"0"), (b"x-amz-request-id", rid), (b"x-amz-id-2", rid)]
        self.answered += 1
        requests = self.observer.requests
        if requests is not None:
            requests.record("s3", "put_object", status, plan.length, len(body), time.perf_counter() - plan.start)
        return status, headers, body

    def _answer_native(self, plan: PutPlan, future: Settled) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """`answer` for a native PUT: `put_object`'s JSON and `endpoint`'s request id, or its error."""
        rid = plan.ctx.request_id
        try:
            response = json_put_answer(future.result())
        except AnvilError as err:
            response = native_error_response(err, rid)
        except Exception as exc:  # noqa: BLE001 - the full-disk answer, or a logged 500
            response = unexpected_error_response(exc, rid, "PUT", plan.path.partition("?")[0])
        else:
            response.raw_headers.append((b"x-request-id", rid.encode("latin-1")))
        status, headers, body = response.status_code, response.raw_headers, response.body
        self.native_answered += 1
        requests = self.observer.requests
        if requests is not None:
            requests.record("native", "put_object", status, plan.length, len(body), time.perf_counter() - plan.start)
        return status, headers, body
