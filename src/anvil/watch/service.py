"""`WatchService`: scoped, resumable reads of the journal for many concurrent watchers.

How a watcher runs, and why memory stays bounded:

- The journal in SQLite is the only buffer. Each watcher keeps just its cursor and reads the
  next bounded batch when it is ready for more; delivery awaits the socket, so a slow client
  slows only itself and costs one batch of memory. Writers never wait for watchers.
- A shared *tail cache* holds the most recent projected events (bounded). After each commit
  the writer thread calls `on_commit`, which hands off to the event loop; one fill task reads
  the new events from SQLite in a worker thread, appends them to the cache and then wakes
  every watcher. Watchers at the head are served from memory, so N watchers cost one
  SQLite read per commit, not N. Watchers further behind read SQLite themselves, in threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio.to_thread

from anvil.context import Principal, RequestContext, new_request_id
from anvil.errors import AnvilError
from anvil.storage import Storage, journal
from anvil.watch import consumers as cons
from anvil.watch import participant, retention
from anvil.watch.events import ReadFilter, Scope, WatchEvent, authorize_scope, project

log = logging.getLogger("anvil.watch")

READ_BATCH = 500
INLINE_READ = 64
NOTIFY_INTERVAL = 0.005
SYSTEM_PRINCIPAL = Principal(tenant="system", subject="watch-compactor", admin=True)
CACHE_EVENTS = 8192
CACHE_BYTES = 8 * 1024 * 1024
CHUNK_BYTES = 256 * 1024  # one send to a watcher: bounds what a stalled client pins


@dataclass(frozen=True)
class WatchSettings:
    heartbeat_seconds: float = 15.0
    retention_seconds: float = 7 * 24 * 3600.0
    compact_interval_seconds: float = 3600.0  # 0 disables periodic compaction

    @classmethod
    def from_env(cls) -> WatchSettings:
        def num(name: str, default: float) -> float:
            raw = os.environ.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = float(raw)
            except ValueError:
                raise AnvilError("InvalidArgument", f"{name} must be a number of seconds") from None
            if value < 0:
                raise AnvilError("InvalidArgument", f"{name} must not be negative")
            return value

        return cls(
            heartbeat_seconds=num("ANVIL_WATCH_HEARTBEAT", cls.heartbeat_seconds) or cls.heartbeat_seconds,
            retention_seconds=num("ANVIL_WATCH_RETENTION", cls.retention_seconds),
            compact_interval_seconds=num("ANVIL_WATCH_COMPACT_INTERVAL", cls.compact_interval_seconds),
        )


@dataclass(frozen=True)
class Heartbeat:
    cursor: int  # every event up to here has been considered for this watcher


@dataclass(frozen=True)
class StreamError:
    error: AnvilError


StreamItem = list[WatchEvent] | Heartbeat | StreamError


class TailCache:
    """The newest projected events, contiguous from `lo` to `hi`; only the fill task appends.

    Bounded by count and by the bytes of their frames, whichever is hit first.
    """

    def __init__(self, head: int, capacity: int = CACHE_EVENTS, max_bytes: int = CACHE_BYTES):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._events: list[WatchEvent] = []
        self._dead = 0  # trimmed entries still at the front of the list (removed in bulk)
        self._bytes = 0
        self._lo = head + 1  # seq of self._events[self._dead]
        self.hi = head

    def __len__(self) -> int:
        return len(self._events) - self._dead

    def get(self, after: int, limit: int) -> list[WatchEvent] | None:
        """Events after `after`, or None when they are older than the cache holds."""
        with self._lock:
            if after < self._lo - 1 or after > self.hi:
                return None
            start = self._dead + after + 1 - self._lo
            return self._events[start:start + limit]

    def extend(self, events: list[WatchEvent]) -> None:
        with self._lock:
            if not events:
                return
            if events[0].seq != self.hi + 1:
                self._events, self._dead, self._bytes, self._lo = [], 0, 0, events[0].seq
            self._events.extend(events)
            self._bytes += sum(len(e.frame) for e in events)
            self.hi = events[-1].seq
            self._trim(lambda: len(self) > self.capacity or self._bytes > self.max_bytes)

    def drop_through(self, seq: int) -> None:
        """Forget events at or below `seq` (compacted): below the base nothing may be served."""
        with self._lock:
            self._trim(lambda: len(self) > 0 and self._lo <= seq)

    def _trim(self, more: Callable[[], bool]) -> None:
        while more():
            self._bytes -= len(self._events[self._dead].frame)
            self._dead += 1
            self._lo += 1
        if self._dead > len(self._events) // 2:
            del self._events[:self._dead]
            self._dead = 0


class WatchService:
    def __init__(self, storage: Storage, *, bucket_exists: Callable[[str], bool] | None = None,
                 settings: WatchSettings | None = None):
        self.catalog = storage.catalog
        self.catalog.migrate("watch", cons.MIGRATIONS)
        self.settings = settings or WatchSettings.from_env()
        self._bucket_exists = bucket_exists
        head_seq, _ = self.catalog.head()
        self.base_seq = cons.journal_bounds(self.catalog.reader())[0]
        self.tail = TailCache(head_seq)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._filling = False
        self._refill = False
        self._committed_head = head_seq
        self._notify_handle: asyncio.TimerHandle | None = None
        self._last_notify = 0.0
        self.watchers = 0
        self._stop = threading.Event()
        self._compactor: threading.Thread | None = None
        # Runs each periodic compaction: with many nodes, only on the holder of its lease (storage.leases).
        self.guard: Callable[[Callable[[], Any]], Any] = lambda fn: fn()
        self.catalog.add_commit_listener(self.on_commit)

    # ------------------------------------------------------------ commit notification

    def on_commit(self, head: int) -> None:
        """Writer thread: never block here; hand the news to the event loop."""
        self._committed_head = head
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._schedule_fill)
            except RuntimeError:
                pass  # the loop is shutting down

    def _attach(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # Start the cache near the head: commits made while nobody watched are read on demand.
            head, _ = self.catalog.head()
            if head - self.tail.hi > self.tail.capacity:
                self.tail = TailCache(head - self.tail.capacity)
            self._loop = loop
            self._wake = asyncio.Event()
            self._notify_handle = None
            self._schedule_fill()

    def _notify(self) -> None:
        self._notify_handle = None
        self._last_notify = asyncio.get_running_loop().time()
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    def _notify_soon(self) -> None:
        """Wake watchers at most every NOTIFY_INTERVAL: under load each wake then carries several
        commits, so the per-watcher cost of a send is paid per batch, not per commit."""
        if self._notify_handle is not None:
            return
        loop = asyncio.get_running_loop()
        due = self._last_notify + NOTIFY_INTERVAL
        if due <= loop.time():
            self._notify()
        else:
            self._notify_handle = loop.call_at(due, self._notify)

    def _schedule_fill(self) -> None:
        if self._filling:
            self._refill = True  # the running fill reads again before it stops
            return
        self._filling = True
        asyncio.get_running_loop().create_task(self._fill())

    async def _fill(self) -> None:
        try:
            while True:
                self._refill = False
                if self.tail.hi < self.base_seq:
                    self.tail = TailCache(self.base_seq)
                if 0 <= self._committed_head - self.tail.hi <= INLINE_READ:
                    # A handful of rows from the page cache: cheaper on the loop than a thread hop,
                    # which under GIL contention costs more than the read itself.
                    events = self._read_raw(self.tail.hi, INLINE_READ)
                else:
                    events = await anyio.to_thread.run_sync(self._read_raw, self.tail.hi, READ_BATCH)
                self.tail.extend(events)
                if events:
                    self._notify_soon()  # wake watchers batch by batch, even under continuous load
                if (not events or self.tail.hi >= self._committed_head) and not self._refill:
                    break
        except Exception:  # noqa: BLE001 - the next commit retries; watchers can still read SQLite
            log.exception("watch tail fill failed")
        finally:
            self._filling = False
            self._notify_soon()

    # ------------------------------------------------------------ reading

    def _read_raw(self, after: int, limit: int) -> list[WatchEvent]:
        conn = self.catalog.reader()
        with conn:  # one read transaction: the base check and the rows agree
            base = int(conn.execute("SELECT seq FROM journal_base WHERE id = 1").fetchone()[0])
            if after < base:
                raise cons.cursor_expired(after, base)
            return [project(e) for e in journal.read(conn, after, limit)]

    def read_after(self, after: int, limit: int = READ_BATCH) -> list[WatchEvent]:
        """Projected events after `after` (blocking; CursorExpired if compacted away)."""
        if after < self.base_seq:
            raise cons.cursor_expired(after, self.base_seq)
        cached = self.tail.get(after, limit)
        if cached is not None:
            return cached
        return self._read_raw(after, limit)

    def bounds(self) -> tuple[int, int]:
        """(oldest valid cursor, head)."""
        return cons.journal_bounds(self.catalog.reader())

    def check_cursor(self, cursor: int) -> None:
        base, head = self.bounds()
        cons.check_cursor_range(cursor, base, head)

    def open(self, principal: Principal, scope: Scope, after: int | None) -> int:
        """Authorise the scope and validate the cursor; returns the starting cursor (blocking)."""
        authorize_scope(principal, scope)
        if scope.bucket is not None and self._bucket_exists is not None and not self._bucket_exists(scope.bucket):
            raise AnvilError("NotFound", "bucket not found")
        base, head = self.bounds()
        start = head if after is None else after
        cons.check_cursor_range(start, base, head)
        return start

    async def stream(self, principal: Principal, scope: Scope, after: int, *,
                     heartbeat: float | None = None) -> AsyncIterator[StreamItem]:
        """Batches of visible events in seq order, Heartbeats when idle, a StreamError at the end if any."""
        self._attach()
        interval = heartbeat or self.settings.heartbeat_seconds
        read_filter = ReadFilter(principal)
        cursor = after
        last_output = time.monotonic()
        self.watchers += 1
        try:
            while True:
                wake = self._wake  # taken before reading, so a commit in between is not missed
                try:
                    if cursor < self.base_seq:
                        raise cons.cursor_expired(cursor, self.base_seq)
                    batch = self.tail.get(cursor, READ_BATCH)
                    if batch is None:
                        batch = await anyio.to_thread.run_sync(self._read_raw, cursor, READ_BATCH)
                except AnvilError as err:
                    yield StreamError(err)
                    return
                if batch:
                    visible = [ev for ev in batch if read_filter.visible(scope, ev)]
                    cursor = batch[-1].seq
                    if visible:
                        chunk: list[WatchEvent] = []
                        size = 0
                        for ev in visible:
                            chunk.append(ev)
                            size += len(ev.frame)
                            if size >= CHUNK_BYTES:
                                yield chunk
                                chunk, size = [], 0
                        if chunk:
                            yield chunk
                        last_output = time.monotonic()
                    elif time.monotonic() - last_output >= interval:
                        yield Heartbeat(cursor)
                        last_output = time.monotonic()
                    continue
                timeout = interval - (time.monotonic() - last_output)
                if timeout > 0:
                    try:
                        async with asyncio.timeout(timeout):  # cheaper than wait_for: no extra task
                            await wake.wait()
                        continue
                    except TimeoutError:
                        pass
                yield Heartbeat(cursor)
                last_output = time.monotonic()
        finally:
            self.watchers -= 1

    # ------------------------------------------------------------ consumers

    def create_consumer(self, ctx: RequestContext, name: str, scope: Scope, after: int | None) -> dict[str, Any]:
        authorize_scope(ctx.principal, scope)
        # As `open` does: the gate answers NotFound for an absent bucket only to non-admins, so an
        # admin created a consumer no watch could then open (`?consumer=` failed NotFound).
        if scope.bucket is not None and self._bucket_exists is not None and not self._bucket_exists(scope.bucket):
            raise AnvilError("NotFound", "bucket not found")
        return cons.create(self.catalog, ctx, name, scope, after).to_dict()

    def _visible_consumer(self, principal: Principal, name: str, tenant: str | None) -> cons.Consumer:
        c = cons.get(self.catalog.reader(), tenant or principal.tenant, name)
        try:
            authorize_scope(principal, c.scope())
        except AnvilError:
            raise AnvilError("NotFound", "consumer not found") from None  # never confirm what the caller can't see
        return c

    def get_consumer(self, principal: Principal, name: str, tenant: str | None = None) -> cons.Consumer:
        return self._visible_consumer(principal, name, tenant)

    def describe_consumer(self, c: cons.Consumer) -> dict[str, Any]:
        return {**c.to_dict(), **cons.lag(self.catalog.reader(), c)}

    def list_consumers(self, principal: Principal) -> list[dict[str, Any]]:
        conn = self.catalog.reader()
        out = []
        for c in cons.list_all(conn, None if principal.admin else principal.tenant):
            try:
                authorize_scope(principal, c.scope())
            except AnvilError:
                continue
            out.append({**c.to_dict(), **cons.lag(conn, c)})
        return out

    def delete_consumer(self, ctx: RequestContext, name: str, tenant: str | None = None) -> dict[str, Any]:
        c = self._visible_consumer(ctx.principal, name, tenant)
        return cons.delete(self.catalog, ctx, c.tenant, c.name)

    def checkpoint(self, ctx: RequestContext, name: str, cursor: int, tenant: str | None = None) -> dict[str, Any]:
        c = self._visible_consumer(ctx.principal, name, tenant)
        return self.describe_consumer(cons.checkpoint(self.catalog, ctx, c.tenant, c.name, cursor))

    # ------------------------------------------------------------ retention

    def compact(self, ctx: RequestContext, retention_seconds: float | None = None) -> dict[str, Any]:
        window = self.settings.retention_seconds if retention_seconds is None else retention_seconds
        result = retention.compact(self.catalog, ctx, window)
        self.base_seq = max(self.base_seq, int(result["base"]))
        self.tail.drop_through(self.base_seq)
        return result

    def start_background(self) -> None:
        """Periodic compaction in a daemon thread (the writer thread does the actual deletes)."""
        interval = self.settings.compact_interval_seconds
        if interval <= 0 or self._compactor is not None:
            return

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.guard(lambda: self.compact(RequestContext(principal=SYSTEM_PRINCIPAL,
                                                                   request_id=new_request_id())))
                except Exception:  # noqa: BLE001 - retry next interval; serving must go on
                    log.exception("periodic journal compaction failed")

        self._compactor = threading.Thread(target=run, name="anvil-watch-compact", daemon=True)
        self._compactor.start()

    def close(self) -> None:
        self._stop.set()
        if self._compactor is not None:
            self._compactor.join(timeout=5)
            self._compactor = None

    def cursor_summary(self) -> dict[str, Any]:
        """Head, compaction base and every durable consumer's cursor (the status endpoint's body), in
        constant time in the journal's length (one read transaction: head and base agree)."""
        conn = self.catalog.reader()
        with conn:
            return participant.summary(conn, count_events=False)
