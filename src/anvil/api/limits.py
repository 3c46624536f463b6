"""Request size limits: the request head (checked in the HTTP protocol as bytes arrive) and the small
bodies read whole (JSON for the native API, XML for the S3 gateway). Documented in docs/limits.md.

Object bodies are never read whole (they stream into a blob), so they need no cap here beyond the
maximum object size the handlers already check.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import Message, Receive

from anvil.objects import validation as v

log = logging.getLogger("anvil.api")

KIB = 1024

# A JSON body of the native API: the largest real one (a policy grant) is a few KiB.
MAX_JSON_BODY = 1024 * KIB


def _env_bytes(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of bytes, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum} bytes")
    return value


@dataclass(frozen=True)
class HeaderLimits:
    """Bytes of one request head, enforced before the head is buffered further.

    - `total`: request line and every header together (S3 itself refuses more than 8 KiB of
      headers, and the S3 gateway still does; the native API gets more room).
    - `field`: one header line, name and value (S3 allows 8 KiB; bearer tokens fit easily).
    - `target`: the request target (path and query): presigned URLs carry their signature in the
      query string, and a 1,024-byte key percent-encodes to up to 3 KiB.
    """

    total: int = 64 * KIB
    field: int = 16 * KIB
    target: int = 16 * KIB

    @classmethod
    def from_env(cls) -> HeaderLimits:
        limits = cls(
            total=_env_bytes("ANVIL_MAX_HEADER_BYTES", cls.total, 8 * KIB),
            field=_env_bytes("ANVIL_MAX_HEADER_FIELD_BYTES", cls.field, 1 * KIB),
            target=_env_bytes("ANVIL_MAX_REQUEST_TARGET_BYTES", cls.target, 1 * KIB),
        )
        if limits.field > limits.total or limits.target > limits.total:
            raise ValueError("ANVIL_MAX_HEADER_FIELD_BYTES and ANVIL_MAX_REQUEST_TARGET_BYTES may not exceed "
                             "ANVIL_MAX_HEADER_BYTES")
        return limits


def declared_length(raw: str | None) -> int | None:
    """A `Content-Length`-style header value -> its integer, or None when absent or not plain ASCII
    digits (the objects layer's one parser, which also caps absurdly long numbers)."""
    return v.decimal_length(raw.strip()) if raw is not None else None


async def read_capped(request: Request, limit: int, too_large: Callable[[], Exception]) -> bytes:
    """The request body, at most `limit` bytes, else `too_large()` is raised.

    A body declared longer (`Content-Length`) is refused before any of it is read; a body of
    unknown length (chunked) is read with a running count and refused as soon as it passes the cap,
    so memory never holds more than `limit` plus one received piece.
    """
    declared = declared_length(request.headers.get("content-length"))
    if declared is not None and declared > limit:
        raise too_large()
    out = bytearray()
    async for piece in request.stream():
        out += piece
        if len(out) > limit:
            raise too_large()
    return bytes(out)


# ------------------------------------------------------------------ disconnects


class CountingReceive:
    """An ASGI `receive` that counts the body bytes handed to the application, so a client that
    goes away mid-upload can be reported with how far it got."""

    __slots__ = ("receive", "received", "complete")

    def __init__(self, receive: Receive):
        self.receive = receive
        self.received = 0
        self.complete = False

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.complete = True
        return message


SCOPE_KEY = "anvil.receive"


def log_client_disconnect(request: Request) -> None:
    """One INFO line for a client that hung up while sending its body: the client's doing, not a
    server error, and the handler has already discarded whatever was received."""
    counter = request.scope.get(SCOPE_KEY)
    received = f" after {counter.received} bytes" if isinstance(counter, CountingReceive) else ""
    log.info("client disconnected during upload of %s %s%s; nothing was stored",
             request.method, request.url.path, received)
