"""Shared HTTP plumbing for the native API: request context, errors, JSON, thread hops."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import functools
import gc
import logging
import os
import threading
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio.to_thread
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from anvil import jsontext
from anvil.api.limits import MAX_JSON_BODY, SCOPE_KEY, CountingReceive, log_client_disconnect, read_capped
from anvil.api.record import RECORD_KEY, note
from anvil.api.record import request_id as request_id_of
from anvil.api_models import BodyError, M, parse_body
from anvil.context import DEV_PRINCIPAL, Principal, RequestContext
from anvil.errors import AnvilError
from anvil.storage.space import is_full_error, storage_full

log = logging.getLogger("anvil.api")

META_PREFIX = "x-anvil-meta-"


ANONYMOUS = Principal(tenant="", subject="anonymous", anonymous=True)


def authenticate(request: Request) -> Principal:
    """`Authorization: Bearer TOKEN` -> its principal; no header -> anonymous (the gate decides).

    With `--dev-auth` (development mode only) a request without a header is the development
    principal instead: that exists for comparing authenticated throughput, nothing else.
    """
    header = request.headers.get("authorization")
    if header is None:
        return DEV_PRINCIPAL if getattr(request.app.state, "dev_auth", False) else ANONYMOUS
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AnvilError("Unauthenticated", "expected 'Authorization: Bearer TOKEN'",
                         headers={"www-authenticate": "Bearer"})
    return request.app.state.anvil.identity.authenticate_token(token.strip())


def require_identity(ctx: RequestContext) -> None:
    """For routes that never serve anonymous callers: 401 before the body or any lookup is looked at."""
    if ctx.principal.anonymous:
        raise AnvilError("Unauthenticated", "authentication required", headers={"www-authenticate": "Bearer"})


def record_denial(request: Request, err: AnvilError, request_id: str, principal: Principal | None) -> None:
    if not (getattr(err, "denied", False) or err.code in ("Unauthenticated", "PermissionDenied")):
        return
    anvil = getattr(request.app.state, "anvil", None)
    if anvil is None:
        return
    anvil.identity.audit.record(
        request_id=request_id, method=request.method, path=request.url.path, code=err.code,
        actor=principal.actor if principal is not None and not principal.anonymous else None,
        client=request.client.host if request.client else None,
    )


def error_response(err: AnvilError, request_id: str, *, head: bool = False) -> Response:
    headers = {"x-request-id": request_id, **err.headers}
    if err.code == "NotModified":
        return Response(status_code=304, headers=headers)
    if head:
        return Response(status_code=err.status, headers={**headers, "x-anvil-error-code": err.code})
    return JSONResponse(err.to_dict(request_id), status_code=err.status, headers=headers)


def unexpected_error_response(exc: Exception, request_id: str, method: str, path: str) -> Response:
    """The answer to a handler's exception that is no AnvilError (called in its `except` block: the
    log line carries the traceback); also api/fastput.py's for a native PUT whose commit failed."""
    if is_full_error(exc):  # ENOSPC from any file write: the full-disk answer, not a 500
        return error_response(storage_full(), request_id, head=method == "HEAD")
    log.exception("unhandled error in %s %s", method, path)
    return error_response(AnvilError("Internal", "internal error"), request_id, head=method == "HEAD")


Handler = Callable[[Request, RequestContext], Awaitable[Response]]


def endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a handler: build its context, map errors to JSON, stamp the request id."""

    @functools.wraps(handler)
    async def run(request: Request) -> Response:
        request_id = request_id_of(request.scope)
        principal: Principal | None = None
        try:
            principal = authenticate(request)
            note(request.scope, principal=principal)  # who, for the access log
            idem = request.headers.get("idempotency-key")
            ctx = RequestContext(principal=principal, request_id=request_id, idempotency_key=idem)
            response = await handler(request, ctx)
        except AnvilError as err:
            record_denial(request, err, request_id, principal)
            return error_response(err, request_id, head=request.method == "HEAD")
        except ClientDisconnect:
            log_client_disconnect(request)  # nobody is left to answer; not a server error
            return Response(status_code=400)
        except Exception as exc:  # noqa: BLE001 - never leak a traceback to the client
            return unexpected_error_response(exc, request_id, request.method, request.url.path)
        if type(response) is RawResponse:  # a GET's answer: none of its headers is an x-request-id
            response.raw_headers.append((b"x-request-id", request_id.encode("latin-1")))
        else:
            response.headers["x-request-id"] = request_id
        return response

    return run


async def blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking call (a mutation waiting for its commit, an fsync) off the event loop."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


# A PUT body this small that will be stored inline (no file to write) is hashed and stored from the
# event loop (~15 us for 4 KiB): the hop to a thread and back would cost more than the work.
HASH_ON_LOOP_LIMIT = 16 * 1024

# Blob file work (write + fsync + rename + directory fsync) gets its own pool: fsyncs overlap on the
# disk, and a small dedicated pool hands off more cheaply than anyio's limiter-guarded one.
_FILE_IO = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="anvil-io")


async def file_io(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run blocking file work (blob write and fsync) off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_FILE_IO, functools.partial(fn, *args, **kwargs))


def submit_file_io(fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
    """Start blocking file work in the file-I/O pool; the caller awaits it when it needs to."""
    return _FILE_IO.submit(fn, *args)


# Catalog reads that can take more than a millisecond (listings, journal pages, admin reads) run in a
# pool of their own, off the event loop, so a slow listing never makes a GET wait behind it. Small and
# fixed: each thread keeps one reader connection (with its page cache), so the number of connections
# and the memory they hold stay bounded, and a burst of listings queues here instead of taking the
# threads that mutations wait in.
#
# The pool's threads run at a lower CPU priority (nice +READ_NICENESS, a per-thread attribute on Linux):
# on a machine with fewer free cores than busy threads, the scheduler then runs the event loop (every
# GET, HEAD, PUT) first and a listing in the time left, instead of giving each an equal share; a
# listing rendered in SQL (storage.listing) holds no GIL the loop could wait on meanwhile.
READ_NICENESS = 10


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), READ_NICENESS)
    except (AttributeError, OSError):  # not Linux, or refused: equal priority, still correct
        pass


_READS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="anvil-read",
                                               initializer=_lower_priority)


async def catalog_read(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a catalog read (and the building of its response) in the read pool."""
    return await asyncio.get_running_loop().run_in_executor(_READS, functools.partial(fn, *args, **kwargs))


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; elsewhere there is nothing to call
    except (AttributeError, OSError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def release_memory() -> None:
    """Hand back to the system the memory a whole-store operation (backup, fsck, gc) freed.

    Such an operation builds structures proportional to the store (every blob reference, the parent
    snapshot's tree) on several threads; freed, they stay in the allocator's per-thread heaps, and
    the server's RSS stayed near its peak afterwards (measured: +121 MiB after a backup of 30k blobs,
    +7 MiB with this). glibc's malloc_trim returns the free pages of every heap."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def releasing(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(...)`, then `release_memory()` whatever the outcome (for `blocking`)."""
    try:
        return fn(*args, **kwargs)
    finally:
        release_memory()


def check_recovery(request: Request) -> None:
    """A restored server in recovery mode refuses public writes until `anvil recovery resume`."""
    if getattr(request.app.state, "recovery_mode", False):
        raise AnvilError("RecoveryMode", "the server is in recovery mode: public writes are refused")


# Request bodies are handed to the writer in blocks of this size.
STREAM_BLOCK = 1024 * 1024
# Received pieces smaller than this are copied together before they join a block (BlockGatherer).
SMALL_PIECE = 64 * 1024


class BlockGatherer:
    """Gathers received pieces into blocks of about STREAM_BLOCK bytes without copying them.

    The ASGI server hands a body over in pieces of whatever size the socket gave (uvicorn: up to
    ~256 KiB). Pieces of at least SMALL_PIECE go into the block by reference (they are immutable
    `bytes`); smaller ones are copied together into one piece, so a block is never thousands of
    tiny buffers to hash and write one by one. A full block is a list the writer takes whole
    (`BlobWriter.write_pieces`: one `writev`, each piece hashed as it is)."""

    def __init__(self, block: int = STREAM_BLOCK):
        self.block = block
        self._pieces: list[bytes] = []
        self._small = bytearray()
        self._size = 0

    def add(self, piece: bytes) -> list[bytes] | None:
        """Take a piece; returns a full block when one is complete, else None."""
        if len(piece) < SMALL_PIECE:
            self._small += piece
            if len(self._small) >= SMALL_PIECE:
                self._pieces.append(bytes(self._small))
                self._small.clear()
        else:
            if self._small:
                self._pieces.append(bytes(self._small))
                self._small.clear()
            self._pieces.append(piece)
        self._size += len(piece)
        return self.take() if self._size >= self.block else None

    def take(self) -> list[bytes]:
        """Whatever is gathered (possibly nothing), as one block."""
        if self._small:
            self._pieces.append(bytes(self._small))
            self._small.clear()
        pieces, self._pieces, self._size = self._pieces, [], 0
        return pieces


# A request body's blocks straight from the server's protocol (api/server.py `_BodyFeed`): a callable
# `(block size) -> feed` in the scope of a request on Anvil's own server. Whoever wraps `receive` for a
# request must remove it (the feed bypasses `receive`; `BodyBlocks` keeps the observer's count itself).
BODY_FEED = "anvil.body_feed"


class BodyBlocks:
    """A request body as blocks of about `block` bytes (lists of received pieces, by reference).

    On Anvil's server the pieces come straight from the protocol's `on_body` (`BODY_FEED`): no ASGI
    `receive` per received piece (uvicorn's copies each into a growing bytearray, then copies that
    again into a fresh `bytes`, and wakes the app for it), only one wake-up of the app per block.
    Elsewhere (granian, a test client) the pieces come from `request.stream()` and are gathered
    here. Iterating yields the full blocks; what is left at the end (less than a block) is `tail`.
    A client that leaves mid-body raises `ClientDisconnect`, as `request.stream()` does."""

    def __init__(self, request: Request, block: int = STREAM_BLOCK):
        self.request = request
        self.block = block
        self.tail: list[bytes] = []
        self.size = 0
        self._feed: Any = None

    def close(self) -> None:
        """Stop taking the body (a failed upload): at once, not when the iterator is collected."""
        if self._feed is not None:
            self._feed.close()

    def __aiter__(self) -> AsyncIterator[list[bytes]]:
        request = self.request
        factory = request.scope.get(BODY_FEED)
        if factory is None or "_body" in request.__dict__ or request._stream_consumed:
            return self._gathered()
        return self._fed(factory)

    def _gathered(self) -> AsyncIterator[list[bytes]]:
        return self.gathered(self.request.stream())

    async def gathered(self, pieces: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
        """`pieces` (any source: the request's stream, a decoded aws-chunked body) gathered into blocks."""
        gather = BlockGatherer(self.block)
        async for piece in pieces:
            if piece:
                self.size += len(piece)
                block = gather.add(piece)
                if block is not None:
                    yield block
        self.tail = gather.take()

    async def _fed(self, factory: Callable[[int], Any]) -> AsyncIterator[list[bytes]]:
        request = self.request
        counter = request.scope.get(SCOPE_KEY)
        counting = isinstance(counter, CountingReceive)
        feed = self._feed = factory(self.block)
        try:
            while True:
                block, last = await feed.next()
                n = 0
                for piece in block:
                    n += len(piece)
                self.size += n
                if counting:
                    counter.received += n
                if last:
                    self.tail = block
                    break
                yield block
            request._stream_consumed = True
            if counting:
                counter.complete = True
        finally:
            feed.close()


async def stream_into(request: Request, writer: Any) -> None:
    """Stream the request body into a blob writer; nothing is held whole in memory.

    Hashing and writing run in a file-I/O thread, a block at a time, while the event loop receives
    the next block: the two cores work in parallel and the loop stays free. At most one block is
    being written and one filling (plus the few blocks the writer's MD5 may trail by), so memory
    stays flat in body size. The loop only collects references to the received pieces: no copy.
    On any failure the writer is aborted (once its last write is done with the descriptor) and
    the error re-raised.
    """
    blocks = BodyBlocks(request)
    pending: concurrent.futures.Future | None = None
    try:
        async for block in blocks:
            if pending is not None:
                await asyncio.wrap_future(pending)
            pending = submit_file_io(writer.write_pieces, block)
        block = blocks.tail
        if block:
            if pending is not None:
                await asyncio.wrap_future(pending)
            pending = submit_file_io(writer.write_pieces, block)
        if pending is not None:
            await asyncio.wrap_future(pending)
    except BaseException:
        blocks.close()
        # A write may still be running in its thread (cancelling our await does not stop it):
        # close and remove the file only once it is done with the descriptor.
        if pending is not None:
            pending.add_done_callback(lambda _f: writer.abort())
        else:
            writer.abort()
        raise


async def committed(future: concurrent.futures.Future) -> Any:
    """Await a `Catalog.submit` future without parking a thread on it.

    One way only: the outcome is copied onto a future of the loop when the writer settles it, and a
    client that goes away cancels only that copy, never the mutation the writer may already apply
    (what `asyncio.shield(asyncio.wrap_future(...))` did, with two chained futures and a shield task
    more per PUT).
    """
    if future.done():
        return future.result()
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def deliver(f: concurrent.futures.Future) -> None:  # in the writer thread
        try:
            loop.call_soon_threadsafe(_settle, waiter, f)
        except RuntimeError:
            pass  # the loop has closed: nobody waits for this answer any more

    future.add_done_callback(deliver)
    return await waiter


def _settle(waiter: asyncio.Future, future: concurrent.futures.Future) -> None:
    if waiter.cancelled():
        return
    if future.cancelled():
        waiter.cancel()
        return
    exc = future.exception()
    if exc is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(future.result())


def _json_too_large() -> AnvilError:
    # Close the connection: the rest of the body is not worth reading to find the next request.
    return AnvilError("RequestTooLarge", f"the JSON body is larger than {MAX_JSON_BODY} bytes",
                      headers={"connection": "close"})


def decode_json(raw: bytes | str, what: str = "JSON body") -> Any:
    """JSON text -> value, or InvalidArgument: malformed, nested too deeply, a non-finite number
    (NaN, Infinity, 1e400) or a string that is not Unicode (an unpaired surrogate escape such as
    `\\ud800`, which failed later in a service as a UnicodeEncodeError: 500). See anvil.jsontext."""
    try:
        return jsontext.loads(raw)
    except jsontext.JsonTextError as e:
        if e.reason == jsontext.TOO_DEEP:
            raise AnvilError("InvalidArgument", f"the {what} is nested too deeply") from None
        if e.reason == jsontext.NOT_UNICODE:
            raise AnvilError("InvalidArgument", f"the {what} is refused: {e}") from None
        raise AnvilError("InvalidArgument", f"malformed {what}") from None


async def json_body(request: Request, *, required: bool = True) -> dict[str, Any]:
    raw = await read_capped(request, MAX_JSON_BODY, _json_too_large)
    if not raw:
        if required:
            raise AnvilError("InvalidArgument", "a JSON body is required")
        return {}
    body = decode_json(raw)
    if not isinstance(body, dict):
        raise AnvilError("InvalidArgument", "the JSON body must be an object")
    return body


async def model_body(request: Request, model: type[M], *, required: bool = True) -> M:
    """The JSON body validated by its model (anvil.api_models): InvalidArgument naming the bad field."""
    return validated(model, await json_body(request, required=required))


def validated(model: type[M], body: dict[str, Any]) -> M:
    """A decoded JSON object validated by its model: InvalidArgument naming the bad field."""
    try:
        return parse_body(model, body)
    except BodyError as e:
        raise AnvilError("InvalidArgument", e.message) from None


def query_int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise AnvilError("InvalidArgument", f"{name} must be an integer") from None


def metadata_from_headers(request: Request) -> dict[str, str]:
    """`x-anvil-meta-NAME: percent-encoded UTF-8 value` -> {name: value}.

    Raw bytes are decoded as UTF-8 (Starlette's latin-1 view would turn a raw "é" into "Ã©"),
    so a client that sends unencoded UTF-8 gets its text back, and invalid UTF-8 is refused
    (UnicodeDecodeError, mapped to InvalidArgument by the caller).
    """
    meta: dict[str, str] = {}
    prefix = META_PREFIX.encode()
    for raw_name, raw_value in request.headers.raw:
        name = raw_name.lower()
        if name.startswith(prefix):
            value = raw_value.decode("utf-8")
            meta[name[len(prefix):].decode("latin-1")] = urllib.parse.unquote(value, errors="strict")
    return meta


def metadata_to_headers(meta: dict[str, str]) -> dict[str, str]:
    return {META_PREFIX + k: urllib.parse.quote(v, safe="") for k, v in meta.items()}


# Bodies up to this size are read inline: a page-cache read of a small blob costs less than the
# hand-off to a worker thread and back.
INLINE_BODY_LIMIT = 1024 * 1024


# The server puts its connection's abort (a TCP reset) in each request's scope under this key.
ABORT_CONNECTION = "anvil.abort_connection"
# ... and under this one a callable `(status, raw headers, body) -> bool` that sends a whole response
# in one write, bypassing the ASGI `send` (api/server.py `_send_raw`); False if it declined. Whoever
# wraps `send` for a request must remove it from the scope, or the wrapper is bypassed (the observer
# is the exception: `RawResponse` fills in its record itself).
SEND_RAW = "anvil.send_raw"


class RawResponse(Response):
    """A whole response given as raw header pairs (lower-case names, latin-1 values, content-length
    included: nothing adds it) and a body: the small GET/HEAD answers, S3 PUT's.

    Starlette's Response re-encodes and lower-cases every header, then sends two ASGI messages that
    each pass through the observer's and uvicorn's `send`; this one is built from bytes, and on our
    server goes out through `SEND_RAW` in one write. Elsewhere (granian, a test client, a request whose
    `send` is wrapped) it is sent as the usual two messages. `headers` works as on any Response (it
    edits `raw_headers`), so the common wrappers can add theirs.
    """

    def __init__(self, status: int, raw_headers: list[tuple[bytes, bytes]], body: bytes = b""):
        self.status_code = status
        self.raw_headers = raw_headers
        self.body = body
        self.background = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        raw = scope.get(SEND_RAW)
        if raw is not None and raw(self.status_code, self.raw_headers, self.body):
            rec = scope.get(RECORD_KEY)
            if rec is not None:  # what the observer's wrapper of `send` would have noted
                rec.status = self.status_code
                rec.bytes_out += len(self.body)
            return
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})


def _close(it: Any) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001 - the response has failed already; nothing more to report
            pass


class _BodyBroken(Exception):
    """A streamed body failed after its headers were sent (already logged)."""


def _logged(it: Iterator[bytes]) -> Iterator[bytes]:
    """Log a body that fails after its headers went out; a chunk that failed verification was
    never yielded, so no bad byte was sent."""
    try:
        yield from it
    except AnvilError as err:
        log.error("object body stream aborted after headers: %s: %s", err.code, err.message)
        raise _BodyBroken from err
    except Exception as exc:  # noqa: BLE001
        log.exception("error while streaming an object body")
        raise _BodyBroken from exc


class _AbortableStream(StreamingResponse):
    """A streamed body that resets the connection when it fails part-way, and reads ahead.

    Once the status and Content-Length are sent, the only honest signal left is to break the
    transfer. Closing normally would send a FIN after a short body, which a careless client or
    proxy may take for the end; a reset cannot be mistaken for a complete response.

    The next piece is read (in a thread: a pread and its chunk digests) while the current one is
    written: Starlette's StreamingResponse reads only once the write is done, so the socket stood
    idle through every read. At most two pieces (READ_SPAN each) are held per response.
    """

    def __init__(self, chunks: Iterator[bytes], status_code: int):
        super().__init__(chunks, status_code=status_code)
        self._chunks = chunks

    async def stream_response(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        it = self._chunks
        ahead = _FILE_IO.submit(next, it, None)
        try:
            while True:
                chunk = await asyncio.wrap_future(ahead)
                if chunk is None:
                    break
                ahead = _FILE_IO.submit(next, it, None)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except BaseException:
            # A client gone, or a failed piece: the iterator (its open file) is closed once the read
            # running in its thread is done with it (a generator cannot be closed while it runs).
            ahead.add_done_callback(lambda _f: _close(it))
            raise
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except _BodyBroken:
            abort = scope.get(ABORT_CONNECTION)
            if abort is None:  # not our server (a test client): uvicorn-style close instead
                raise
            abort()
            await asyncio.sleep(0)  # let the connection see its loss before the app returns


RawHeaders = list[tuple[bytes, bytes]]


def raw_headers(headers: dict[str, str] | RawHeaders) -> RawHeaders:
    """Response headers as `RawResponse` takes them: lower-case latin-1 names and latin-1 values, as
    Starlette would encode them (a list of pairs is taken as already encoded)."""
    if isinstance(headers, list):
        return headers
    return [(k.lower().encode("latin-1"), val.encode("latin-1")) for k, val in headers.items()]


def body_response(objects: Any, obj: Any, rng: Any, status: int, length: int, headers: dict[str, str] | RawHeaders,
                  *, head: bool) -> Response:
    """A GET or HEAD answer once its status and headers are decided (native API and S3 alike).

    `read_body` checks, before any header is sent, that each blob is present and of its recorded
    size; a body up to INLINE_BODY_LIMIT is then read and verified whole, so a mismatch is a clean
    500 DataCorrupted; a larger one is verified chunk by chunk as it streams, and a mismatch
    resets the connection (`_AbortableStream`).
    """
    raw = raw_headers(headers)
    raw.append((b"content-length", b"%d" % length))
    if head:
        return RawResponse(status, raw)
    return verified_body(objects.read_body(obj, rng), length, status, raw)


def verified_body(chunks: Iterator[bytes], length: int, status: int, headers: dict[str, str] | RawHeaders) -> Response:
    """A body read through a verifying iterator: up to INLINE_BODY_LIMIT read whole first (a bad
    byte is a clean error), larger ones streamed, with the connection reset if a chunk fails.
    `headers` include the content-length."""
    raw = raw_headers(headers)
    if length <= INLINE_BODY_LIMIT:
        return RawResponse(status, raw, b"".join(chunks))
    response = _AbortableStream(_logged(chunks), status)
    response.raw_headers = raw  # as given: no content-type of its own, the length is in them
    return response
