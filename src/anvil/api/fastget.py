"""The small object GET/HEAD of the native API, answered before the application's general path.

Most requests a store serves are `GET /anvil/v1/buckets/{bucket}/object?key=K` with a bearer token
and nothing else: no conditions, no range, no version id, the current version of a small object.
`FastReads.native` answers exactly those in one synchronous function: one pass over the headers,
the token from the verified-token cache, the scope decision from a cache of pure answers, one SQL
statement (bucket tenant + latest version + inline body, `ObjectService.latest_small`), the body
verified against its SHA-256, and the response written in one piece (`anvil.send_raw`).

Everything it does not handle it declines (returns None) before answering, and the request takes the
general path (api/native.py), which gives every error and every other feature its usual answer: a
token not yet verified, a lifecycle refusal, a scope that depends on the key, a bucket of another
tenant or with a binding, a missing key or delete marker, a multipart or large object, a body that
fails verification (the general path records the finding), an access log. So a decline costs one
wasted lookup at most, and what this path answers is what the general path would have answered.

What stays fresh: the token cache only holds well-signed tokens with their expiry, checked here; the
application lifecycle (disabled, deleted, revoked, rotated) is read from the identity service's
in-memory state on every request, as the general path does; the bucket's tenant comes from the
same statement as the version; bindings are asked of authz (in memory, dropped on every binding
change). The only cache of this module holds `scopes x bucket -> covered`, a pure function of
its key.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any
from urllib.parse import unquote_to_bytes

from uvicorn.protocols.http.httptools_impl import HEADER_RE

from anvil.api.common import INLINE_BODY_LIMIT, SEND_RAW, RawResponse, metadata_to_headers
from anvil.api.native import _http_date
from anvil.api.record import next_request_id
from anvil.errors import AnvilError
from anvil.identity import scopes as sc
from anvil.objects import validation as v
from anvil.runtime import Anvil
from anvil.storage.blobs import CHUNK_SIZE

_PREFIX = "/anvil/v1/buckets/"
_SUFFIX = "/object"
_SLICE = slice(len(_PREFIX), -len(_SUFFIX))
# Request headers that change what a GET answers: their requests take the general path.
_GENERAL = frozenset({b"if-match", b"if-none-match", b"x-anvil-if-version-match", b"x-anvil-if-version-none-match",
                      b"range"})
# Bodies stored in a file are read whole here up to this size, as the general path reads them (larger
# ones are streamed by it); one blob of at most a verification chunk has no sidecar to consult.
FILE_LIMIT = min(INLINE_BODY_LIMIT, CHUNK_SIZE)
_SCOPE_CACHE_SIZE = 4096


class FastReads:
    def __init__(self, anvil: Anvil, observer: Any):
        self.objects = anvil.objects
        self.identity = anvil.identity
        self.tokens = anvil.identity.tokens
        self.authz = anvil.authz
        self.blobs = anvil.objects.blobs
        self.observer = observer
        self._covered: dict[tuple[tuple[str, ...], str], bool] = {}
        self.answered = 0  # GET/HEADs answered here (the `anvil_fast_answers_total` metric)

    def _scopes_cover(self, scopes: tuple[str, ...], bucket: str) -> bool:
        """Whether one of `scopes` allows object:read on every key of `bucket` (False also when it
        depends on the key: the general path then decides per key)."""
        hit = self._covered.get((scopes, bucket))
        if hit is None:
            wanted = f"object:read|bucket:{bucket}/*"
            try:
                hit = any(sc.covers(s, wanted) for s in scopes)
            except AnvilError:  # a scope the parser refuses covers nothing here
                hit = False
            if len(self._covered) >= _SCOPE_CACHE_SIZE:
                self._covered.clear()
            self._covered[(scopes, bucket)] = hit
        return hit

    def native(self, scope: Any) -> bool | RawResponse | None:
        """From the application (when the protocol did not answer first, see `answer`): True (sent), a
        response to send the ASGI way (the server's one-write path declined), or None (not handled:
        nothing was sent)."""
        send_raw = scope.get(SEND_RAW)
        if send_raw is None:
            return None  # not our server (a test client, granian)
        found = self.answer(scope["method"] == "HEAD", scope["path"], scope["query_string"], scope["headers"])
        if found is None:
            return None
        block, data = found
        headers = [tuple(line.split(b": ", 1)) for line in block.split(b"\r\n")[:-1]]
        return True if send_raw(200, headers, data) else RawResponse(200, headers, data)

    def answer(self, head: bool, path: str, qs: bytes, request_headers: list[tuple[bytes, bytes]]
               ) -> tuple[bytes, bytes] | None:
        """The 200 answer to a small native object GET/HEAD of `path`?`qs`, counted in the metrics: its
        header lines ("name: value\r\n" each, with content-length and x-request-id; they pass uvicorn's
        checks of names and values, `_send_raw`'s, so the protocol writes them as they are) and body
        (empty for HEAD); None when the general path must answer. Called by the server's protocol as soon
        as the request head is parsed
        (`AnvilHttpProtocol.on_headers_complete`: no ASGI task, no app call), else by the app."""
        if not path.startswith(_PREFIX) or not path.endswith(_SUFFIX):
            return None
        observer = self.observer
        if observer.log is not None:
            return None  # an access log line to write: the general path writes it
        start = time.perf_counter()
        bucket = path[_SLICE]
        # `find`, not `in`: bytes.__contains__ first tries its operand as an integer, raising and
        # discarding a TypeError for each test (~2 k instructions).
        if qs[:4] != b"key=" or qs.find(b"&") >= 0 or not qs.isascii() or "/" in bucket or not bucket:
            return None
        authorization = None
        for name, value in request_headers:
            if name == b"authorization":
                if authorization is None:  # the first of repeated headers, as the general path reads it
                    authorization = value
            elif name in _GENERAL:
                return None
        if authorization is None or authorization[:7] != b"Bearer ":
            return None
        raw_key = qs[4:]
        try:
            if raw_key.find(b"%") >= 0 or raw_key.find(b"+") >= 0:
                key = unquote_to_bytes(raw_key.replace(b"+", b" ")).decode("utf-8")
            else:
                key = raw_key.decode("ascii")
            v.check_object_key(key)
        except (UnicodeDecodeError, AnvilError):
            return None
        verified = self.tokens.peek(authorization[7:].strip().decode("latin-1"))
        if verified is None:
            return None
        principal, info = verified
        identity = self.identity
        identity.catalog.sync()  # many nodes: changes committed on another node are in force here too
        life = identity._lifecycle
        if life.active and life.refusal(principal.subject, info) is not None:
            return None
        if not self._scopes_cover(principal.scopes, bucket) or self.authz.has_binding(bucket):
            return None
        row = self.objects.latest_small(bucket, key, body=not head)
        if row is None:
            return None
        tenant, version_id, delete_marker, size, etag, sha, content_type, meta, chunks, created, _, body = row
        if (delete_marker or sha is None or tenant is None or (tenant != principal.tenant and not principal.admin)
                or chunks != f'[["{sha}", {size}]]'):
            return None  # another tenant's bucket (or a public one), a multipart object: the general path
        stored = etag + version_id + content_type + sha
        if not (stored.isascii() and stored.isprintable()):
            # The stored values this answer sends are printable ASCII, so it passes the header checks
            # uvicorn makes (`_send_raw`) without their regular expressions; anything else (stricter
            # than uvicorn: a tab too) is the general path's to answer.
            return None
        if head:
            data = b""
        elif body is not None:
            data = bytes(body)
            if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
                return None  # the general path verifies again, and records the finding
        elif size <= FILE_LIMIT:
            try:
                data = self.blobs.read_small(sha, size)
            except Exception:  # noqa: BLE001 - missing or corrupt: the general path reports it
                return None
        else:
            return None
        extra = ""
        if meta != "{}":
            pairs = metadata_to_headers(json.loads(meta))  # values percent-encoded: printable ASCII
            if HEADER_RE.search("".join(pairs).encode("latin-1")):
                return None
            extra = "".join([f"{name}: {value}\r\n" for name, value in pairs.items()])
        # The header lines in the general path's order, as one string (every value is printable ASCII):
        # one encode instead of a pair of bytes per header and a loop to write them.
        date = _http_date(created).decode()
        block = (f'etag: "{etag}"\r\nx-anvil-version-id: {version_id}\r\nlast-modified: {date}\r\n'
                 f"accept-ranges: bytes\r\ncontent-type: {content_type}\r\n{extra}x-anvil-sha256: {sha}\r\n"
                 f"content-length: {size}\r\nx-request-id: {next_request_id()}\r\n").encode("ascii")
        if observer.requests is not None:
            observer.requests.record("native", "get_object", 200, 0, len(data), time.perf_counter() - start)
        self.answered += 1
        return block, data
