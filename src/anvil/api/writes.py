"""The answer of a small write, built once from bytes (the PUT paths of the native API and the S3 gateway).

A native PUT answered with Starlette's JSONResponse paid for a JSON encoder built per call, every
header re-encoded and lower-cased, and two ASGI messages through the observer's and uvicorn's `send`;
`RawResponse` takes the encoded headers and, on Anvil's server, goes out in one write. The body is
byte for byte what JSONResponse renders.
"""

from __future__ import annotations

from typing import Any

from anvil.api.common import RawResponse
from anvil.storage import jsonfast

# JSONResponse.render's options, in an encoder built once, C encoder included (`JSONEncoder.encode` builds
# a new C encoder at every call).
_render = jsonfast.encoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def json_put_answer(result: dict[str, Any]) -> RawResponse:
    """200 with the write's result as JSON and its ETag (the native PUT's answer)."""
    body = _render(result).encode("utf-8")
    return RawResponse(200, [
        (b"content-length", b"%d" % len(body)),
        (b"content-type", b"application/json"),
        (b"etag", b'"%s"' % result["etag"].encode("latin-1")),
    ], body)
