"""Run the HTTP server for one `STORAGE_PATH`."""

from __future__ import annotations

import asyncio
import collections
import functools
import gc
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import urllib.parse
from typing import Any

import httptools
import uvicorn
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE, HttpToolsProtocol

from anvil.api.app import create_app
from anvil.api.common import ABORT_CONNECTION, BODY_FEED, SEND_RAW, BlockGatherer
from anvil.api.limits import HeaderLimits
from anvil.api.s3.errors import S3Error
from anvil.api.s3.errors import error_response as s3_error_response
from anvil.errors import AnvilError
from anvil.identity.settings import dev_auth_enabled, is_development
from anvil.runtime import Anvil
from anvil.storage import leases


class _CoalescingTransport:
    """Collects a connection's writes made in one event-loop step and sends them together.

    uvicorn writes a response's head and body separately: two send() calls, two loopback
    segments, two wake-ups of the client. For small responses that doubled the kernel cost of
    each request (measured: send() was half the server's GIL time in the small-GET benchmark).
    Writes are deferred to the end of the current loop step, then handed over as one writev.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        # What uvicorn calls on every request, bound here: through `__getattr__` each call first failed
        # an ordinary lookup (an AttributeError made and discarded).
        self.is_closing = transport.is_closing
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading
        self.get_extra_info = transport.get_extra_info

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def writelines(self, lines: list[bytes]) -> None:
        for data in lines:
            self.write(data)

    def write_whole(self, data: bytes) -> None:
        """A whole response in one piece: nothing to coalesce it with, so it goes out now (after
        anything still pending, which keeps the order) without a deferred flush."""
        if self._pending:
            self._pending.append(data)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending or self._transport.is_closing():
            return
        if len(pending) == 1:
            self._transport.write(pending[0])
        else:
            self._transport.writelines(pending)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(d) for d in self._pending)

    def close(self) -> None:
        self._flush()  # a response written just before close must still go out
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()  # the EOF must follow what was written before it
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head and body of a response sent in one write."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]


def _send_raw(cycle: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
    """Answer `cycle`'s request with one write: status line, headers (lower-case names, with the
    content-length of the whole body) and body, and complete the response as uvicorn's `send` would
    after an `http.response.start` and a last `http.response.body` message.

    What it saves over the two ASGI messages: two trips through `send` (and through every wrapper of
    it), the header loop with two regular-expression searches per header (here one search over all
    names and one over all values: a forbidden byte is in the joined bytes exactly when it is in one
    of them, names need no separator and values are joined by a tab, which values may hold), and the
    deferred flush that coalesced the two writes. It declines (returns False, nothing sent) whenever
    the ASGI path has something to do that it does not: writing paused, the response already started,
    a disconnected client, an access logger, a `connection` header, no `content-length`, a header uvicorn
    would refuse.
    """
    if cycle.response_started or cycle.disconnected or cycle.flow.write_paused or cycle.access_log:
        return False
    names = b"".join([n for n, _ in headers])
    if HEADER_RE.search(names) or HEADER_VALUE_RE.search(b"\t".join([v for _, v in headers])) \
            or names.find(b"connection") >= 0 or names.find(b"content-length") < 0:
        # (without a length uvicorn would send the body chunked). `find`, not `in`: bytes.__contains__
        # first tries its operand as an integer, raising and discarding a TypeError for each test.
        return False
    _write_raw(cycle, status, headers, body)
    return True


_rendered_defaults: tuple[list[tuple[bytes, bytes]], bytes] = ([], b"")


def _default_lines(default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """uvicorn's default headers (the date) as header lines, rendered once per list: uvicorn makes a new
    list when the date changes (every tick of its main loop), and the cache holds the list it was made
    from, so the identity test cannot be fooled by a new list at a reused address."""
    global _rendered_defaults
    if _rendered_defaults[0] is not default_headers:
        _rendered_defaults = (default_headers, b"".join([b"%s: %s\r\n" % pair for pair in default_headers]))
    return _rendered_defaults[1]


def _answer_bytes(status: int, default_headers: list[tuple[bytes, bytes]], headers: list[tuple[bytes, bytes]],
                  body: bytes, *, close: bool = False) -> bytes:
    """A whole answer in one piece: the status line, uvicorn's default headers (the date, as it sends
    them), `headers`, `connection: close` when the connection ends after it, and the body (b"" for HEAD)."""
    content = [STATUS_LINE[status], _default_lines(default_headers)]
    for name, value in headers:
        content += (name, b": ", value, b"\r\n")
    if close:
        content.append(b"connection: close\r\n")
    content += (b"\r\n", body)
    return b"".join(content)


def _write_raw(cycle: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """The write and bookkeeping of `_send_raw`, once it has accepted the response."""
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.transport.write_whole(_answer_bytes(status, cycle.default_headers, headers,
                                              body if cycle.scope["method"] != "HEAD" else b"",
                                              close=not cycle.keep_alive))
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()


class _BodyFeed:
    """One request's body handed from `on_body` to the app in blocks (`api.common.BodyBlocks`).

    Each received piece (immutable `bytes` from the parser) joins a block by reference
    (`BlockGatherer`); a full block is queued for the app, which is woken once per block. While
    READY_MAX blocks wait (the app's writer is behind the socket), reading is paused, so memory per
    upload stays bounded whatever the body's size."""

    READY_MAX = 2

    def __init__(self, protocol: AnvilHttpProtocol, cycle: Any, block: int):
        self.protocol = protocol
        self.cycle = cycle
        self.gather = BlockGatherer(block)
        self.ready: collections.deque[list[bytes]] = collections.deque()
        self.paused = False

    def piece(self, body: bytes) -> None:
        block = self.gather.add(body)
        if block is not None:
            self.ready.append(block)
            if len(self.ready) >= self.READY_MAX and not self.paused:
                self.paused = True
                self.protocol.flow.pause_reading()
            self.cycle.message_event.set()

    async def next(self) -> tuple[list[bytes], bool]:
        """(the next full block, False), or (what is left, True) once the body is complete; raises
        ClientDisconnect if the client leaves first."""
        cycle = self.cycle
        while True:
            if self.ready:
                block = self.ready.popleft()
                if self.paused and len(self.ready) < self.READY_MAX:
                    self.paused = False
                    self.protocol.flow.resume_reading()
                return block, False
            if cycle.disconnected:
                raise ClientDisconnect()
            if not cycle.more_body:
                return self.gather.take(), True
            cycle.message_event.clear()
            await cycle.message_event.wait()

    def close(self) -> None:
        """The app is done with the body (read whole, or given up on): `on_body` goes back to uvicorn's
        way (which drops what arrives after an answer) and reading resumes if this paused it."""
        protocol = self.protocol
        if protocol._feed is self:
            protocol._feed = None
        self.ready.clear()
        if self.paused:
            self.paused = False
            protocol.flow.resume_reading()


class _HeldPut:
    """A small PUT taken by `fast_puts` (api/fastput.py), in the place of its request's cycle until it is
    answered: uvicorn's RequestResponseCycle (its scope completed, an asyncio.Event, the cycle itself,
    ~34 k instructions a request) is made only if the general path must answer after all (`_cycle_of`).

    To uvicorn it is a cycle whose response is not complete yet: a request pipelined behind it waits in
    the pipeline, a lost connection marks it `disconnected`, a shutdown clears `keep_alive`, as they would
    a real cycle's."""

    __slots__ = ("plan", "body", "response_complete", "disconnected", "keep_alive")
    response_started = False
    # Nobody waits on it: uvicorn sets its cycle's event when the connection is lost.
    message_event = asyncio.Event()

    def __init__(self, plan: Any):
        self.plan = plan
        self.body = bytearray()  # at most the declared length, which `FastPuts.plan` bounded
        self.response_complete = False
        self.disconnected = False
        self.keep_alive = True  # (the plan is only made for a keep-alive request)


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a request head over its limits."""


# After a 431 the connection lingers this long (or until this much more arrives) before it is closed:
# closing with unread data makes the kernel send a reset, which can destroy the answer before the
# client reads it. Incoming bytes are discarded meanwhile, so memory does not grow.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024
# The SSE change feed never ends by itself: on shutdown it is ended cleanly (see shutdown()).
WATCH_PATH = "/anvil/v1/watch"
_STATUS_200 = STATUS_LINE[200]
FAST_PREFIX = b"/anvil/v1/buckets/"  # the raw request target of every request FastReads may answer


class AnvilHttpProtocol(CoalescingHttpToolsProtocol):
    """The server's protocol: coalesced writes, request heads held to `HeaderLimits` as they arrive,
    and SSE streams ended on shutdown.

    httptools parses the head in C, but the partial header value, the URL and the header list are
    accumulated in Python without a bound; uvicorn has no head limit for httptools. The limits are
    checked on every callback and, for a head still incomplete, after every piece of data received,
    so at most the limit plus one read (256 KiB) is ever held.
    """

    limits = HeaderLimits()
    # The app's small-GET answerer (api/fastget.py), set by `serve`: asked from the parser's callback.
    fast_reads: Any = None
    # ... and its small S3 PUT answerer (api/fastput.py).
    fast_puts: Any = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._head_open = False      # a request head is being received
        self._head_fresh = False     # ... and it began inside the data just fed
        self._head_bytes = 0         # bytes received for it in later reads (a lower bound on its size)
        self._head_sum = 0           # bytes of its complete header lines
        self._refused = False
        self._lingered = 0
        self._answered = False  # the current request was answered by `_answer_fast`
        # A small PUT taken by `fast_puts` while its body arrives (also `self.cycle` until it is answered).
        # No cycle or ASGI task is made for it unless it is declined (`_cycle_of`).
        self._put: _HeldPut | None = None
        self._holding = False
        self._held_app: Any = None
        self._feed: _BodyFeed | None = None  # the current request's body, fed to the app in blocks
        # When the connection's last response completed with nothing else received since (None: busy).
        self._idle_since: float | None = None

    # The keep-alive timeout, with one timer per idle period rather than per request: uvicorn arms a timer
    # when a response completes and cancels it when data comes (~5 k instructions a request on the loop).
    # Here data only marks the connection busy; the timer, when due, closes the connection if it has been
    # idle for the whole timeout, waits the rest if it became idle again since, and lapses while busy
    # (the next completed response arms a new one). The connection closes at the same moment as uvicorn's.

    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._idle_since = None
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        loop = self.loop
        self._idle_since = loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = loop.call_later(self.timeout_keep_alive, self._keep_alive_due)

    def _keep_alive_due(self) -> None:
        self.timeout_keep_alive_task = None
        idle_since = self._idle_since
        if idle_since is None:
            return  # a request is being received or served
        remaining = idle_since + self.timeout_keep_alive - self.loop.time()
        if remaining > 0:
            self.timeout_keep_alive_task = self.loop.call_later(remaining, self._keep_alive_due)
            return
        self.timeout_keep_alive_handler()

    # Parser callbacks

    def on_message_begin(self) -> None:
        # uvicorn's, less the ASGI scope: that is made by `_new_scope` only for a request the general path
        # answers (a request answered from `_answer_fast` never needs it: ~3 k instructions).
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.scope = None  # type: ignore[assignment]
        self._head_open, self._head_fresh, self._head_bytes, self._head_sum = True, True, 0, 0
        self._answered = False
        # A request answered in `_answer_fast` armed the keep-alive timer; one pipelined behind it in the
        # same read must not be cut off by that timer while it is served.
        self._idle_since = None

    def _new_scope(self) -> Any:
        """uvicorn's scope for the request whose head was parsed, as its `on_message_begin` makes it (called
        here for that alone: the URL, headers and `Expect` seen so far are kept)."""
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.headers, self.expect_100_continue = url, headers, expect
        scope = self.scope
        scope["headers"] = headers
        return scope

    # on_url and on_header run for every request: uvicorn's bodies are inlined rather than called.

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.target:
            raise _HeadTooLarge(f"the request target is larger than {self.limits.target} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 4  # "name: value\r\n"
        if size > self.limits.field:
            raise _HeadTooLarge(f"a header line is larger than {self.limits.field} bytes")
        self._head_sum += size
        if self._head_sum + len(self.url) > self.limits.total:
            raise _HeadTooLarge(f"the request head is larger than {self.limits.total} bytes")
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._head_open = False
        if self.fast_reads is not None and self.url.startswith(FAST_PREFIX) and self._answer_fast():
            return
        plan = self._plan_put() if self.fast_puts is not None and self.parser.get_method() == b"PUT" else None
        if plan is not None:
            self.cycle = self._put = _HeldPut(plan)  # type: ignore[assignment]
            if self.expect_100_continue and not self.transport.is_closing():
                # As the cycle's first `receive` would (boto3 asks for it on every PUT): the checks it
                # waits for are passed, so the body may come.
                self.transport.write_whole(b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        self._make_cycle()

    def _make_cycle(self) -> None:
        """uvicorn's cycle for the request whose head was parsed, with the app's extras in its scope."""
        scope = self._new_scope()
        scope[ABORT_CONNECTION] = self._reset  # type: ignore[literal-required]
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is scope:  # not an upgrade, which makes no cycle
            scope[SEND_RAW] = functools.partial(_send_raw, cycle)  # type: ignore[literal-required]
            scope[BODY_FEED] = functools.partial(self._feed_body, cycle)  # type: ignore[literal-required]

    def _cycle_of(self, held: _HeldPut) -> tuple[Any, Any]:
        """A declined PUT's cycle, made now as it would have been at the end of its head (the parser and
        the head are still this request's), with the body received so far; its ASGI task is held back
        (the app it would run is returned) so the caller decides what the cycle knows before it starts."""
        self.cycle = None  # type: ignore[assignment]  # (nothing else was in flight: `_plan_put`)
        self._holding = True
        try:
            self._make_cycle()
        finally:
            self._holding = False
        cycle = self.cycle
        cycle.waiting_for_100_continue = False  # answered at the head, if it was asked for
        cycle.body = held.body
        cycle.keep_alive = cycle.keep_alive and held.keep_alive
        return cycle, self._held_app

    def _feed_body(self, cycle: Any, block: int) -> _BodyFeed:
        """Start handing `cycle`'s body to its app in blocks (`BODY_FEED`), beginning with what was
        received before the app asked for it."""
        feed = _BodyFeed(self, cycle, block)
        if cycle.waiting_for_100_continue and not self.transport.is_closing():
            # As the cycle's first `receive` would.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        cycle.waiting_for_100_continue = False
        if cycle.body:
            feed.piece(bytes(cycle.body))
            cycle.body = bytearray()
        if self.cycle is cycle and not cycle.response_complete:
            self._feed = feed
        self.flow.resume_reading()  # (paused if more than BODY_BUFFER arrived before the app asked)
        return feed

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if self._holding:  # a declined small PUT's: started once its cycle knows what was received
            self._held_app = app
            return
        super()._start_asgi_task(cycle, app)

    def _plan_put(self) -> Any:
        """A small S3 PUT's plan (`FastPuts.plan`) if it is answered here, else None: only when nothing
        else is in flight on the connection, on a keep-alive HTTP/1.1 request, as `_answer_fast` does."""
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self.pipeline or self.flow.write_paused \
                or self.root_path:
            return None
        parser = self.parser
        if parser.get_http_version() != "1.1" or not parser.should_keep_alive() or parser.should_upgrade():
            return None
        return self.fast_puts.plan(self.url, self.headers, self._head_sum)

    def _release(self, cycle: Any, app: Any) -> None:
        """Decline a held PUT: its ASGI task starts now, with what was received, and the general path
        answers it as if it had been running all along."""
        cycle.message_event.set()
        super()._start_asgi_task(cycle, app)

    def _put_done(self, held: _HeldPut, settled: Any) -> None:
        """The writer settled a held PUT's commit: its answer, in one write (from the loop), as `_write_raw`
        writes a cycle's."""
        status, headers, body = self.fast_puts.answer(held.plan, settled)
        if held.disconnected or self.transport.is_closing():
            return  # the client went away, or the connection was closed (a malformed request behind it)
        # Written even while writing is paused, unlike `_send_raw`: there is no ASGI task to wait in,
        # and a few hundred bytes more in the transport's buffer is what the paused path would send next.
        self.transport.write_whole(_answer_bytes(status, self.server_state.default_headers, headers, body,
                                                 close=not held.keep_alive))
        held.response_complete = True
        if not held.keep_alive:  # the server is shutting down
            self.transport.close()
        self.on_response_complete()

    def _answer_fast(self) -> bool:
        """Answer a small object GET/HEAD now, from the parser's callback (`FastReads.answer`, api/fastget.py):
        no request-response cycle, no ASGI task, no app call, one write. Only when nothing else is in
        flight on the connection (no response being written, nothing pipelined, writing not paused),
        on a keep-alive HTTP/1.1 GET or HEAD; every other request, and every one `answer` declines,
        goes on as before (the ASGI path, where the app may still answer it through `FastReads.native`)."""
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self.pipeline or self.flow.write_paused:
            return False
        parser = self.parser
        method = parser.get_method()
        if (method != b"GET" and method != b"HEAD") or parser.get_http_version() != "1.1" \
                or not parser.should_keep_alive() or parser.should_upgrade():
            return False
        # The target is in origin form (it starts with FAST_PREFIX), which llhttp has checked: its path and
        # query are what `httptools.parse_url` would find (without making a URL object), unless it has a
        # fragment, which is left to uvicorn's parse.
        url = self.url
        if url.find(b"#") >= 0:
            return False
        raw_path, _, query = url.partition(b"?")
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)  # as uvicorn makes scope["path"]
        head = method == b"HEAD"
        found = self.fast_reads.answer(head, self.root_path + path, query, self.headers)
        if found is None:
            return False
        block, body = found  # (header lines that pass `_send_raw`'s checks: `answer` made sure of it)
        self.transport.write_whole(b"".join((_STATUS_200, _default_lines(self.server_state.default_headers), block,
                                             b"\r\n", b"" if head else body)))
        self._answered = True  # the rest of this request (a body, its end) is not for any cycle
        self.on_response_complete()  # as a finished cycle calls it: counts, keep-alive timer, reading resumed
        return True

    def on_message_complete(self) -> None:
        if self._answered:
            self._answered = False
            return
        held = self._put
        if held is not None:
            self._put = None
            loop = self.loop

            def deliver(settled: Any) -> None:  # in the writer thread
                try:
                    loop.call_soon_threadsafe(self._put_done, held, settled)
                except RuntimeError:
                    pass  # the loop has closed: nobody waits for this answer any more

            if self.fast_puts.commit(held.plan, bytes(held.body), deliver) is None:
                cycle, app = self._cycle_of(held)
                cycle.more_body = False
                self._release(cycle, app)
            return
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        task = self.timeout_keep_alive_task
        if task is not None:  # (`_unset_keepalive_if_required` only marks the connection busy)
            task.cancel()
            self.timeout_keep_alive_task = None
        held = self._put
        if held is None:
            super().connection_lost(exc)
            return
        # Gone mid-body: the general path reports it (one INFO line, its metrics), with a cycle made while
        # the parser is still there, then marked as uvicorn marks a cycle whose client went away.
        self._put = None
        cycle, app = self._cycle_of(held)
        super().connection_lost(exc)
        self._release(cycle, app)

    def _reset(self) -> None:
        """Reset the connection (RST, not FIN): a body cut short must not look like an ending."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:  # linger 0: close() discards unsent data and sends a reset
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.transport.abort()

    # A request body reaches the app in pieces: whatever arrived since the app last asked. uvicorn
    # stops reading the socket as soon as 64 KiB wait, so a large upload paused and resumed reading
    # (two epoll changes) and woke the app for every socket read (<= 256 KiB): a bare app's
    # receiving CPU per 256 MiB was 0.31 s, 0.245 s with this (bench/largeput.py, docs/performance.md).
    # Up to this much may wait instead, per connection, only while the app is slower than the socket.
    BODY_BUFFER = 1024 * 1024

    def on_body(self, body: bytes) -> None:
        if self._answered:
            return  # a body sent with a GET answered already: read and dropped, as the app would ignore it
        held = self._put
        if held is not None:
            held.body += body  # at most the declared length, which `FastPuts.plan` bounded
            return
        if (self.parser.should_upgrade() and self._should_upgrade()) or self.cycle.response_complete:
            return
        feed = self._feed
        if feed is not None and feed.cycle is self.cycle:
            feed.piece(body)
            return
        self.cycle.body += body
        if len(self.cycle.body) > self.BODY_BUFFER:
            self.flow.pause_reading()
        self.cycle.message_event.set()

    # Transport callbacks

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._linger(len(data))
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():  # as uvicorn does (no WebSocket route is offered)
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._refuse_head(str(exc.__context__))
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        if self._head_open:
            if self._head_fresh:
                # The head began inside this data, after an unknown number of bytes of the previous
                # request: count only what the parser has accumulated so far.
                self._head_fresh = False
            else:
                self._head_bytes += len(data)
            if max(self._head_bytes, self._head_sum + len(self.url)) > self.limits.total:
                self._refuse_head(f"the request head is larger than {self.limits.total} bytes")

    def _refuse_head(self, message: str) -> None:
        """Answer 431 and close: the rest of the head is never read."""
        self._refused = True
        self._head_open = False
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a pipelined request is still being answered: no room for ours
            return
        self.transport.write(_head_refusal(self.url, message))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _linger(self, size: int) -> None:
        self._lingered += size
        if self._lingered > LINGER_BYTES and not self.transport.is_closing():
            self.transport.close()

    def shutdown(self) -> None:
        cycle = self.cycle
        if (cycle is not None and cycle.response_started and not cycle.response_complete
                and cycle.chunked_encoding and cycle.scope.get("path") == WATCH_PATH):
            # An open change feed would hold the shutdown until its grace period ran out and was
            # cancelled with an error. End it as a client disconnect would (the application's
            # next receive() says so) and close the chunked body properly for the client.
            cycle.disconnected = True
            cycle.message_event.set()
            self.transport.write(b"0\r\n\r\n")
            self.transport.close()
            return
        super().shutdown()


# How `anvil serve` runs uvicorn (bench/asgi.py runs its protocol floor with the same options).
UVICORN_OPTIONS: dict[str, Any] = {
    "loop": "uvloop", "http": AnvilHttpProtocol, "access_log": False, "log_level": "warning", "server_header": False,
}


def _head_refusal(url: bytes, message: str) -> bytes:
    """The 431 answer, in the error format of the API the request was for."""
    status = 431
    if url == b"/anvil" or url.startswith((b"/anvil/", b"/anvil?")):
        err = {"error": {"code": "RequestHeaderFieldsTooLarge", "message": message, "request_id": None}}
        body = json.dumps(err).encode()
        content_type = b"application/json"
    else:
        response = s3_error_response(S3Error("RequestHeaderSectionTooLarge", message, status), "-")
        body = response.body
        content_type = b"application/xml"
    return b"".join([
        STATUS_LINE[status],
        b"content-type: ", content_type, b"\r\n",
        b"content-length: ", str(len(body)).encode(), b"\r\n",
        b"connection: close\r\n\r\n",
        body,
    ])


def parse_listen(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address must be HOST:PORT, got {addr!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _print_dev_credentials(anvil: Anvil, endpoint: str) -> None:
    cred = anvil.identity.ensure_dev_app(endpoint)
    admin = anvil.storage.layout.bootstrap / "first-admin.json"
    cid, secret = cred["client_id"], cred["client_secret"]
    print(
        "Development mode: a ready application of tenant 'dev' "
        f"(kept in {anvil.storage.layout.bootstrap / 'dev-app.json'}):\n"
        f"  endpoint:      {endpoint}\n"
        f"  client_id:     {cid}\n"
        f"  client_secret: {secret}\n"
        f"  CLI:   ANVIL_ENDPOINT={endpoint} ANVIL_CLIENT_ID={cid} ANVIL_CLIENT_SECRET={secret} anvil bucket ls\n"
        f"  aws:   AWS_ACCESS_KEY_ID={cid} AWS_SECRET_ACCESS_KEY={secret} AWS_DEFAULT_REGION=us-east-1 "
        f"aws --endpoint-url {endpoint} s3 ls\n"
        f"  admin credential: {admin}",
        flush=True,
    )


def _listen_socket(host: str, port: int) -> socket.socket:
    """Bind and listen now, before anything is printed: a port in use is one clear error, not a
    "listening" banner followed by a traceback. Connections made before serving starts wait in the
    backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _grace_seconds() -> float:
    raw = os.environ.get("ANVIL_SHUTDOWN_GRACE_SECONDS", "10")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"ANVIL_SHUTDOWN_GRACE_SECONDS must be a number of seconds, got {raw!r}") from None
    if not 0 <= value <= 3600:
        raise ValueError("ANVIL_SHUTDOWN_GRACE_SECONDS must be between 0 and 3600")
    return value


ASGI_SERVER_ENV = "ANVIL_ASGI_SERVER"


def asgi_server() -> str:
    """`uvicorn` (the default) or `granian` (measured against it in bench/asgi.py; docs/performance.md)."""
    name = os.environ.get(ASGI_SERVER_ENV, "").strip().lower() or "uvicorn"
    if name not in ("uvicorn", "granian"):
        raise ValueError(f"{ASGI_SERVER_ENV} must be uvicorn or granian, got {name!r}")
    return name


def _run_granian(app: Any, host: str, port: int, sock: socket.socket) -> None:
    """Serve `app` with granian's embedded server on the same loop type (uvloop), for comparison.

    What uvicorn's protocol does here and granian does not: the request-head limits with their 431
    answer, the coalesced response writes, the connection reset of a body that fails part-way, and
    ending open change feeds at shutdown (granian waits for them instead).
    """
    import uvloop
    from granian.constants import Interfaces
    from granian.server.embed import Server as Granian

    sock.close()  # granian binds the address itself
    server = Granian(app, address=host, port=port, interface=Interfaces.ASGINL, log_enabled=False,
                     backlog=2048, websockets=False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, server.signal_handler_interrupt)
        await server.serve()

    uvloop.run(main())


def serve(storage_path: str, listen: str, *, dev_auth: bool = False, backup: Any = None,
          archive: Any = None, access_log: str | None = None, metrics: bool | None = None,
          records: str | None = None) -> None:
    """Serve one STORAGE_PATH; `backup` (a ScheduleConfig) turns on scheduled backups.

    SIGTERM (or SIGINT) stops it gracefully: no new connections, in-flight requests finish (up to
    ANVIL_SHUTDOWN_GRACE_SECONDS), open change feeds end, then the scheduler, the watch thread and
    the store are closed and the process exits 0.
    """
    host, port = parse_listen(listen)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Listings and other catalog reads run in threads beside the event loop; a thread that computes
    # in Python keeps the GIL for up to the switch interval whenever the loop wants it back, and a
    # request needs it back several times. 1 ms instead of 5 ms: under two clients listing back to
    # back, GET p50 went 5.4 -> 1.9 ms and p99 214 -> 58 ms (load ~20) with no fewer listings served.
    sys.setswitchinterval(0.001)
    dev_auth = dev_auth or dev_auth_enabled()
    if dev_auth and not is_development():
        raise AnvilError("InvalidArgument", "--dev-auth is refused outside development mode")
    AnvilHttpProtocol.limits = HeaderLimits.from_env()
    grace = _grace_seconds()
    server_kind = asgi_server()
    endpoint = f"http://{host}:{port}"
    sock = _listen_socket(host, port)
    try:
        anvil = Anvil(storage_path, endpoint=endpoint, records=records)
    except BaseException:
        sock.close()
        raise
    anvil.storage.clear_tmp()
    try:
        from anvil.backup.mode import in_recovery

        recovery_mode = in_recovery(anvil.storage.root)
        app = create_app(anvil, recovery_mode=recovery_mode, dev_auth=dev_auth, access_log=access_log,
                         metrics=metrics)
        AnvilHttpProtocol.fast_reads = app.fast_reads
        AnvilHttpProtocol.fast_puts = app.fast_puts
        anvil.watch.start_background()
        if not recovery_mode:  # lifecycle deletes; a store in recovery mode takes no writes
            anvil.lifecycle.start()
        config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=grace, **UVICORN_OPTIONS)
        server = uvicorn.Server(config)
        scheduler = None
        if backup is not None:
            from anvil.api.backup_routes import run_backup
            from anvil.backup.schedule import BackupScheduler, check_schedule

            check_schedule(backup, anvil.storage.root)
            scheduler = BackupScheduler(app, backup, run_backup)
            scheduler.guard = anvil.leases.guard(leases.BACKUP_SCHEDULE)
            scheduler.start()
        archiver = None
        if archive is not None:  # an ArchiveConfig: continuous archiving of the journal (docs/backup.md)
            from anvil.api.backup_routes import start_archiver

            archiver = start_archiver(app, archive)
        print(f"Anvil {storage_path!s} listening on {endpoint}", flush=True)
        print(f"  native API: {endpoint}/anvil/v1/  (OpenAPI: /anvil/v1/openapi.json)", flush=True)
        print(f"  S3 gateway: {endpoint}/  (path style; docs/s3.md)", flush=True)
        observer = app.state.observer
        if observer.registry is not None:
            print(f"  metrics:    {endpoint}/anvil/metrics  ("
                  f"{'public' if observer.metrics_public else 'scope metrics:read|system'}; docs/operations.md)",
                  flush=True)
        if observer.log is not None:
            print(f"  access log: {'stdout' if observer.log.target == '-' else observer.log.target}", flush=True)
        if recovery_mode:
            print("  RECOVERY MODE: restored storage; public writes are refused until "
                  "`anvil recovery validate` + `anvil recovery resume`", flush=True)
        if is_development() and not recovery_mode:  # recovery mode writes nothing, not even a dev app
            _print_dev_credentials(anvil, endpoint)
        if dev_auth:
            banner = "!" * 78
            print(f"{banner}\nWARNING: --dev-auth: requests WITHOUT a token act as the development admin "
                  f"principal.\nFor benchmarks only; never expose this server.\n{banner}", file=sys.stderr, flush=True)

        def stop(_signum: int, _frame: Any) -> None:
            # uvicorn handles these signals while it runs and, once it has shut down gracefully,
            # raises them again for the handler it found: this one, so the process ends normally
            # (exit 0, after the cleanup below) rather than being killed by the re-raised signal.
            # A signal that arrives before uvicorn has taken over asks the server to stop at once.
            server.should_exit = True

        if threading.current_thread() is threading.main_thread():  # signals can only be set there
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, stop)
        # Everything built so far (modules, routes, the OpenAPI document, caches) lives as long as the
        # process: moved out of the collector's generations, so the full collections that requests'
        # garbage triggers no longer walk it (~15 us of CPU per small PUT, measured).
        gc.collect()
        gc.freeze()
        try:
            if server_kind == "granian":
                _run_granian(app, host, port, sock)
            else:
                server.run(sockets=[sock])
        finally:
            if scheduler is not None:
                scheduler.stop()
            archiver = getattr(app.state, "archiver", None)  # started at boot or by an admin since
            if archiver is not None:
                archiver.stop()  # ships what is left: a graceful stop loses nothing
            app.state.observer.close()  # the last buffered access log lines
    finally:
        sock.close()
        anvil.close()
    print(f"Anvil {storage_path!s} stopped", flush=True)
    sys.stdout.flush()
