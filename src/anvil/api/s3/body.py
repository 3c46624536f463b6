"""Request bodies: plain, or aws-chunked (signed per chunk, or unsigned with trailing checksums).

Bodies are streamed: each piece is handed on as it arrives and only one header line is ever
buffered. A chunk's signature is checked when the chunk ends; the consumer writes into a
temporary blob that is discarded on any error, so a bad chunk never becomes visible state.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import AsyncIterator

from starlette.requests import ClientDisconnect, Request

from anvil.api.common import BodyBlocks
from anvil.api.s3 import auth as sig
from anvil.api.s3.errors import S3Error
from anvil.objects import validation as v

MAX_LINE = 4096
MAX_TRAILER_BYTES = 16 * 1024


def message_too_long() -> S3Error:
    # Connection closed: reading the rest of an oversized body only to discard it is wasted work.
    return S3Error("MaxMessageLengthExceeded", "your request was too big", 400, headers={"connection": "close"})


def _incomplete() -> S3Error:
    return S3Error("IncompleteBody", "the request body ended before the aws-chunked stream was complete")


def _malformed(why: str) -> S3Error:
    return S3Error("InvalidRequest", f"malformed aws-chunked body: {why}")


def _bad_chunk_signature() -> S3Error:
    return S3Error("SignatureDoesNotMatch", "a chunk signature does not match the signature we calculated", 403)


class BodyReader:
    def __init__(self, request: Request, auth: sig.AuthResult):
        self.request = request
        self.auth = auth
        self.mode = auth.payload_hash
        self.trailers: dict[str, str] = {}
        self.size = 0
        self._buf = bytearray()
        self._it: AsyncIterator[bytes] | None = None
        encodings = [e.strip().lower() for e in request.headers.get("content-encoding", "").split(",") if e.strip()]
        self.chunked = self.mode in sig.STREAMING_MODES
        if self.chunked and self.mode != sig.STREAMING_UNSIGNED_TRAILER and auth.signing_key is None:
            raise S3Error("AccessDenied", "signed streaming bodies need a signed request", 403)
        if "aws-chunked" in encodings and not self.chunked:
            raise S3Error("InvalidRequest", "Content-Encoding aws-chunked needs a STREAMING-* x-amz-content-sha256")
        decoded = request.headers.get("x-amz-decoded-content-length")
        self.decoded_length: int | None = None
        if self.chunked:
            self.decoded_length = v.decimal_length(decoded)
            if self.decoded_length is None:
                raise S3Error("MissingContentLength", "aws-chunked bodies need x-amz-decoded-content-length", 411)
        elif self.mode != sig.UNSIGNED and not _is_sha256(self.mode):
            raise S3Error("InvalidArgument", "x-amz-content-sha256 must be a SHA-256 hex digest, UNSIGNED-PAYLOAD "
                          "or a STREAMING-* mode")

    @property
    def declared_sha256(self) -> str | None:
        return self.mode.lower() if _is_sha256(self.mode) else None

    def check_sha256(self, actual: str) -> None:
        expected = self.declared_sha256
        if expected is not None and expected != actual:
            raise S3Error("XAmzContentSHA256Mismatch",
                          "the provided x-amz-content-sha256 header does not match what was computed")

    async def pieces(self) -> AsyncIterator[bytes]:
        if not self.chunked:
            async for piece in _stream(self.request):
                self.size += len(piece)
                yield piece
            return
        async for piece in self._chunks():
            yield piece

    def blocks(self, block: int) -> BodyBlocks:
        """The body as blocks of about `block` bytes, by reference (`api.common.BodyBlocks`): a plain
        body straight from the server's protocol, an aws-chunked one decoded by `pieces`."""
        if not self.chunked:
            return _CountedBlocks(self, block)
        return _DecodedBlocks(self, block)

    async def read_all(self, limit: int) -> bytes:
        """A small body (an XML document) read whole, with its payload hash checked."""
        out = bytearray()
        async for piece in self.pieces():
            out += piece
            if len(out) > limit:
                raise message_too_long()
        data = bytes(out)
        self.check_sha256(hashlib.sha256(data).hexdigest())
        return data

    # ------------------------------------------------------------------ aws-chunked

    async def _next(self) -> bytes:
        """The next non-empty piece received; IncompleteBody if the body ends first."""
        assert self._it is not None
        while True:
            try:
                piece = await self._it.__anext__()
            except StopAsyncIteration:
                raise _incomplete() from None
            if piece:
                return piece

    async def _fill(self) -> None:
        self._buf += await self._next()

    async def _line(self) -> bytes:
        while True:
            i = self._buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 2]
                return line
            if len(self._buf) > MAX_LINE:
                raise _malformed("a chunk header line is too long")
            await self._fill()

    async def _chunks(self) -> AsyncIterator[bytes]:
        self._it = self.request.stream().__aiter__()
        signed = self.mode != sig.STREAMING_UNSIGNED_TRAILER
        previous = self.auth.seed_signature or ""
        while True:
            line = await self._line()
            size_text, _, ext = line.partition(b";")
            size_text = size_text.strip()
            # Hex digits only: int(..., 16) would also take '0x10', '-1', '1_0' and surrounding spaces.
            if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
                raise _malformed("a chunk size is not hexadecimal")
            if len(size_text) > 16:
                raise _malformed("a chunk size is out of range")
            size = int(size_text, 16)
            claimed = None
            if signed:
                name, _, value = ext.partition(b"=")
                if name.strip() != b"chunk-signature" or not value:
                    raise _malformed("a chunk has no chunk-signature")
                claimed = value.strip()
            h = hashlib.sha256() if signed else None
            remaining = size
            while remaining:
                if self._buf:
                    take = min(remaining, len(self._buf))
                    piece = bytes(self._buf[:take])
                    del self._buf[:take]
                else:
                    # Straight from the socket: a received piece inside the chunk is handed on as
                    # it is (no copy); only one that runs past the chunk's end is split.
                    piece = await self._next()
                    if len(piece) > remaining:
                        self._buf += memoryview(piece)[remaining:]
                        piece = piece[:remaining]
                    take = len(piece)
                remaining -= take
                if h is not None:
                    h.update(piece)
                self.size += take
                if self.decoded_length is not None and self.size > self.decoded_length:
                    raise _malformed("the body is longer than x-amz-decoded-content-length")
                yield piece
            if signed:
                expected = sig.chunk_signature(self.auth, previous, h.hexdigest())  # type: ignore[union-attr]
                # Bytes, not text: compare_digest refuses non-ASCII strings (a TypeError, a 500).
                if not hmac.compare_digest(expected.encode(), claimed or b""):
                    raise _bad_chunk_signature()
                previous = expected
            if size == 0:
                break
            if await self._line() != b"":
                raise _malformed("a chunk is longer than its declared size")
        await self._read_trailers(previous)
        await self._expect_end()
        if self.decoded_length is not None and self.size != self.decoded_length:
            raise _incomplete()

    async def _expect_end(self) -> None:
        """Nothing may follow the final chunk and its trailers: extra bytes mean broken framing."""
        assert self._it is not None
        if self._buf:
            raise _malformed("data follows the final chunk")
        async for piece in self._it:
            if piece:
                raise _malformed("data follows the final chunk")

    async def _read_trailers(self, previous: str) -> None:
        raw = bytearray()
        trailer_sig = None
        while True:
            line = await self._line()
            if line == b"":
                break
            name, sep, value = line.partition(b":")
            if not sep:
                raise _malformed("a trailer line has no ':'")
            key = name.strip().lower().decode("ascii", "replace")
            val = value.strip().decode("ascii", "replace")
            if key == "x-amz-trailer-signature":
                trailer_sig = val
                continue
            raw += name.strip().lower() + b":" + value.strip() + b"\n"
            if len(raw) > MAX_TRAILER_BYTES:
                raise _malformed("trailers are too large")
            self.trailers[key] = val
        if self.mode == sig.STREAMING_SIGNED_TRAILER:
            expected = sig.trailer_signature(self.auth, previous, bytes(raw))
            if trailer_sig is None or not hmac.compare_digest(expected.encode(), trailer_sig.encode()):
                raise _bad_chunk_signature()
        declared = self.request.headers.get("x-amz-trailer")
        if declared:
            for name in (n.strip().lower() for n in declared.split(",")):
                if name and name not in self.trailers:
                    raise S3Error("InvalidRequest", f"the trailer {name} was declared but not sent")


class _CountedBlocks(BodyBlocks):
    """A plain body's blocks, counted into the reader's size as they go."""

    def __init__(self, reader: BodyReader, block: int):
        super().__init__(reader.request, block)
        self._reader = reader

    def __aiter__(self) -> AsyncIterator[list[bytes]]:
        return self._counted(super().__aiter__())

    async def _counted(self, it: AsyncIterator[list[bytes]]) -> AsyncIterator[list[bytes]]:
        reader = self._reader
        async for block in it:
            for piece in block:
                reader.size += len(piece)
            yield block
        for piece in self.tail:
            reader.size += len(piece)


class _DecodedBlocks(BodyBlocks):
    """An aws-chunked body's decoded pieces, gathered into blocks."""

    def __init__(self, reader: BodyReader, block: int):
        super().__init__(reader.request, block)
        self._reader = reader

    def __aiter__(self) -> AsyncIterator[list[bytes]]:
        return self.gathered(self._reader.pieces())


async def _stream(request: Request) -> AsyncIterator[bytes]:
    """The body's non-empty pieces as received: Starlette's `Request.stream` (same state kept: the stream
    marked consumed, a disconnect noted and raised as ClientDisconnect) without its generator wrapped
    in another, and without its final empty piece."""
    if "_body" in request.__dict__ or request._stream_consumed:  # (hasattr would raise and catch when absent)
        async for piece in request.stream():  # read already (or an error): Starlette's own answer
            if piece:
                yield piece
        return
    receive = request.receive
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if not more:
                request._stream_consumed = True
            if body:
                yield body
            if not more:
                return
        elif kind == "http.disconnect":
            request._is_disconnected = True
            raise ClientDisconnect()


_SHA256_HEX = re.compile("[0-9a-fA-F]{64}")


def _is_sha256(value: str) -> bool:
    return _SHA256_HEX.fullmatch(value) is not None  # one C call, not 64 Python steps (3 per PUT)
