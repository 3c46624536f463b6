"""`catalog.db`: connections, numbered migrations and the one mutation path.

One writer thread owns the only write connection. Mutations are queued to it and applied
in batches: each mutation runs inside its own SAVEPOINT (so a failed precondition undoes
only that mutation), all of a batch commit in one `synchronous=FULL` transaction, and only
then are callers acknowledged. This is group commit: every acknowledged write is durable,
yet concurrent writers share one fsync instead of paying one each.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import apsw

from anvil.errors import AnvilError
from anvil.storage import holds, journal, leases
from anvil.storage.space import storage_full

T = TypeVar("T")

log = logging.getLogger("anvil.catalog")

MAX_BATCH = 256
# Gathering a batch (docs/performance.md, "Group commit"): a commit's fsync costs the writer ~0.2 ms of
# CPU whatever it carries, so when the last batch had several writers the next one waits, briefly, for
# as many: the callers it answered are sending their next writes, one request at a time from the event
# loop. It waits at most GATHER_MAX_WAIT in all, and stops as soon as GATHER_GAP passes without a new
# write; a lone writer (last batch of one) never waits.
GATHER_MAX_WAIT = 0.002
GATHER_GAP = 0.001
# Upper bounds of the batch-size histogram the metrics endpoint exports (docs/operations.md).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, MAX_BATCH)


class Txn:
    """What a mutation function gets: the write connection inside its savepoint. A plain slotted class
    (one per mutation, made in the writer thread): a dataclass's `__init__` with three default
    factories cost several times this one."""

    __slots__ = ("conn", "run", "actor", "request_id", "now", "head_seq", "events", "appended", "deferred")

    def __init__(self, conn: apsw.Connection, actor: str, request_id: str, now: float, head_seq: int,
                 run: Any = None):
        self.conn = conn
        # The batch's own cursor (`Catalog._batch_statements`), for a statement whose rows are read whole
        # (`fetchall`) or that returns none: no cursor made, registered and freed for it (~3 k instructions
        # each). `conn.execute` for anything else: a result iterated while another statement runs.
        self.run = conn if run is None else run
        self.actor = actor
        self.request_id = request_id
        self.now = now
        self.head_seq = head_seq
        # (tenant, kind, scope, payload): a plain tuple per event, not an object.
        self.events: list[tuple[str, str, str, dict[str, Any]]] = []
        self.appended: list[journal.Event] = []
        self.deferred: list[tuple[str, tuple]] = []

    def emit(self, tenant: str, kind: str, scope: str, payload: dict[str, Any]) -> None:
        """Record the journal event for this mutation; appended when the function returns."""
        self.events.append((tenant, kind, scope, payload))

    def defer(self, statement: str, params: tuple) -> None:
        """Run a write at the end of the batch, with the same statement of the batch's other mutations
        in one `executemany`, in the same transaction: kept only if this mutation succeeds. For writes
        no later statement of the batch reads back (an inline body's upsert): one prepared statement
        and one call per batch instead of one per mutation."""
        self.deferred.append((statement, params))

    @property
    def next_seq(self) -> int:
        """The seq the next event emitted by this mutation will take (records use it for order)."""
        return self.head_seq + len(self.events) + 1

    @property
    def seq(self) -> int | None:
        return self.appended[-1].seq if self.appended else None


class Settled:
    """A mutation's outcome for a caller that hands it on from the writer thread instead of waiting for it
    (`Catalog.submit(..., then=...)`: the small PUT answered from the parser callbacks, which asks the event
    loop to answer from there). The part of `concurrent.futures.Future` such a caller uses, without its
    lock, condition and waiters: a Future made, given a callback, settled and read back costs ~30 k
    instructions (callgrind), over 4 % of a small PUT."""

    __slots__ = ("_then", "_ok", "_value")

    def __init__(self, then: Callable[[Settled], None]):
        self._then = then
        self._ok: bool | None = None  # None until settled
        self._value: Any = None

    def done(self) -> bool:
        return self._ok is not None

    def set_result(self, value: Any) -> None:
        self._settle(True, value)

    def set_exception(self, exc: BaseException) -> None:
        self._settle(False, exc)

    def _settle(self, ok: bool, value: Any) -> None:
        self._ok, self._value = ok, value
        try:
            self._then(self)
        except Exception:  # noqa: BLE001 - a caller's callback must never break the writer
            log.exception("mutation callback failed")

    def result(self) -> Any:
        """The mutation's result, or its exception raised (once settled: `then` has been called)."""
        if self._ok is None:
            raise RuntimeError("the mutation has not been settled yet")
        if self._ok:
            return self._value
        raise self._value


@dataclass
class _Job:
    fn: Callable[[Txn], Any]
    actor: str
    request_id: str
    future: concurrent.futures.Future | Settled
    # (lease name, fence token) of background work (storage.leases): checked in the commit.
    fence: tuple[str, int] | None = None


def _configure(conn: apsw.Connection, *, writer: bool) -> None:
    # One PRAGMA per execute: a multi-statement string may silently skip later ones.
    conn.setbusytimeout(10_000)
    if writer:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")


class _ThreadState(threading.local):
    """A thread's reader slot and the lease fence its writes carry. Class-level defaults: reading one a
    thread never set raises nothing (`getattr(local, name, None)` made and discarded an AttributeError
    on every mutation submitted outside a lease)."""

    reader: _ReaderSlot | None = None
    fence: tuple[str, int] | None = None


class _ReaderSlot:
    """A thread's reader connection, in its threading.local: when the thread ends, the local's value
    is released and the connection closed (Catalog._drop_reader)."""

    def __init__(self, catalog: Catalog, conn: Any):
        self.catalog, self.conn = catalog, conn

    def __del__(self) -> None:
        try:
            self.catalog._drop_reader(self.conn)
        except Exception:  # noqa: BLE001 - at interpreter exit, modules may already be gone
            pass


# All of SQLite's memory in the process (every connection's page cache, statements, sorts) above which
# it reuses cache pages instead of allocating: a server's readers (one per thread that reads) and the
# writer each keep a page cache of up to 2 MiB, and with enough threads that was tens of MiB that
# grew with the store (small stores never fill their caches). A soft limit: nothing fails above it.
SQLITE_SOFT_HEAP_LIMIT = 24 * 1024 * 1024
apsw.softheaplimit(SQLITE_SOFT_HEAP_LIMIT)


class Catalog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._writer = self._open_writer()
        self._cursor: Any = None  # (`_batch_statements`)
        self._local = _ThreadState()
        self._readers: list[apsw.Connection] = []
        self._readers_lock = threading.RLock()  # re-entrant: a _ReaderSlot may be released under it
        # SimpleQueue: put and get are C calls (queue.Queue takes a Python lock and Condition on each
        # side: the event loop's submit and the writer's get), and the writer is its only consumer.
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._head: tuple[int, str] | None = None
        self._commit_listeners: list[Callable[[int], None]] = []
        self._event_listeners: list[Callable[[list[journal.Event]], None]] = []
        # Called when a commit fails for lack of disk space; True if it freed some (storage.space).
        self.on_full: Callable[[], bool] | None = None
        # Group-commit figures, written only by the writer thread and read by the metrics scrape:
        # committed batches, the mutations in them, and per-bucket (not cumulative) batch counts.
        self.batches = 0
        self.batched_mutations = 0
        self.batch_counts = [0] * len(BATCH_BUCKETS)
        # Fenced background writes refused because their lease moved on (storage.leases).
        self.stale_fences = 0
        try:
            self.migrate("journal", journal.MIGRATIONS)
            self.migrate("leases", leases.MIGRATIONS)
            # Readers of the journal that are not records (archiving, a running backup) hold compaction
            # and gc back through the record store, so every node's compaction and gc see them.
            self.migrate("holds", holds.MIGRATIONS)
        except BaseException:
            # A refused store (a PostgreSQL one not migrated, or newer): nobody gets this catalog to
            # close, so close what it opened now (a connection pool left to the garbage collector
            # ends in a pool thread that cannot join itself).
            self.close()
            raise

    # -- the engine: SQLite here; storage.pg.PgCatalog overrides these for PostgreSQL ------------

    def _open_writer(self) -> Any:
        writer = apsw.Connection(str(self.path))
        _configure(writer, writer=True)
        writer.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations("
            "component TEXT NOT NULL, version INTEGER NOT NULL, applied REAL NOT NULL, "
            "PRIMARY KEY(component, version))"
        )
        return writer

    def _begin(self, conn: Any) -> None:
        """Open the batch's write transaction (the head is the writer's own: it is the only one). On the
        batch's own cursor (`_batch_statements`), as COMMIT is: no cursor made and freed for it."""
        self._batch_statements(conn).execute("BEGIN IMMEDIATE")

    def _batch_statements(self, conn: Any) -> Any:
        """What runs a batch's own statements (BEGIN, savepoints, the batched `executemany`s, COMMIT): one
        cursor of the writer connection, made once. `Connection.execute` makes, registers
        with the connection and frees a cursor per call (~3 k instructions; three per lone write), and
        these statements return no rows that anything iterates while another runs."""
        cursor = self._cursor
        if cursor is None:
            cursor = self._cursor = conn.cursor()
        return cursor

    def _rollback(self, conn: Any) -> None:
        try:
            conn.execute("ROLLBACK")
        except apsw.Error:
            pass

    def _before_commit(self, conn: Any, head: int, advanced: bool) -> None:
        """Last statement of a batch's transaction (PostgreSQL: NOTIFY the other nodes)."""

    def follow(self, on_events: Callable[[list[journal.Event]], None]) -> None:
        """Call `on_events` with the events other nodes commit, and the commit listeners with the new
        head (PostgreSQL: storage.pg.PgFollower). The embedded store is one process: nothing to do."""

    def sync(self) -> None:
        """Bring what `follow` feeds up to the journal's head now (PostgreSQL; a no-op here)."""

    def _is_full(self, exc: BaseException) -> bool:
        return isinstance(exc, apsw.FullError)

    def _new_reader(self) -> Any:
        conn = apsw.Connection(str(self.path), flags=apsw.SQLITE_OPEN_READONLY)
        _configure(conn, writer=False)
        return conn

    def _close_reader(self, conn: Any) -> None:
        try:
            conn.close()
        except apsw.Error:
            pass

    # -- schema -------------------------------------------------------------------------

    def migrate(self, component: str, migrations: Iterable[str]) -> None:
        """Apply the component's numbered migrations (1-based list index) not yet applied, all in one
        transaction: a component's schema moves from one version to the other or not at all, and a
        new store commits (and syncs) once per component rather than once per migration."""
        done = {
            row[0]
            for row in self._writer.execute(
                "SELECT version FROM schema_migrations WHERE component = ?", (component,)
            )
        }
        missing = [(number, sql) for number, sql in enumerate(migrations, start=1) if number not in done]
        if not missing:
            return
        with self._writer:
            for number, sql in missing:
                self._writer.execute(sql)
                self._writer.execute(
                    "INSERT INTO schema_migrations(component, version, applied) VALUES (?,?,?)",
                    (component, number, time.time()),
                )

    # -- reads --------------------------------------------------------------------------

    def reader(self) -> apsw.Connection:
        """A connection for this thread; WAL lets readers run beside the writer."""
        slot = self._local.reader
        if slot is None:
            conn = self._new_reader()
            slot = self._local.reader = _ReaderSlot(self, conn)
            with self._readers_lock:
                self._readers.append(conn)
        return slot.conn

    def _drop_reader(self, conn: Any) -> None:
        """A reading thread ended: close its connection. Worker pools start and retire threads all the
        time (anyio's retire after 10 s idle); each kept its connection and its page cache (up to
        2 MiB) for the life of the process, so the server's RSS grew with every burst of work."""
        with self._readers_lock:
            try:
                self._readers.remove(conn)
            except ValueError:
                return  # closed already (Catalog.close)
        self._close_reader(conn)

    def head(self) -> tuple[int, str]:
        return journal.head(self.reader())

    # -- writes -------------------------------------------------------------------------

    _start_lock = threading.Lock()

    def start(self) -> None:
        # Locked: the first submits may come from many threads at once, and a second writer
        # thread on the one connection would interleave two batches' transactions.
        with self._start_lock:
            if self._thread is None:
                self._head = journal.head(self._writer)
                self._thread = threading.Thread(target=self._run, name="anvil-writer", daemon=True)
                self._thread.start()

    def add_commit_listener(self, listener: Callable[[int], None]) -> None:
        """Called from the writer thread with the new head seq after each durable commit."""
        self._commit_listeners.append(listener)

    def add_event_listener(self, listener: Callable[[list[journal.Event]], None]) -> None:
        """Called from the writer thread with the events of each durable commit, before any of its
        callers is answered: a cache dropped here is never read stale by a request that follows the
        change's answer (the journal follower hands other nodes' events to the same kind of handler)."""
        self._event_listeners.append(listener)

    def submit(self, fn: Callable[[Txn], T], *, actor: str, request_id: str,
               then: Callable[[Settled], None] | None = None) -> concurrent.futures.Future:
        """Queue a mutation: a future of its outcome, settled once it is durably committed (or failed). With
        `then`, a `Settled` instead, handed to `then` from the writer thread when settled (a caller that
        neither waits on the outcome nor cancels it)."""
        if self._thread is None:
            self.start()
        fut = concurrent.futures.Future() if then is None else Settled(then)
        self._queue.put(_Job(fn, actor, request_id, fut, self._local.fence))
        return fut  # type: ignore[return-value]  # (a Settled offers what its caller uses of a Future)

    @contextlib.contextmanager
    def fenced(self, name: str, fence: int) -> Any:
        """Mutations submitted from this thread inside the block commit only while lease `name` still
        carries `fence` (else StaleFence, nothing written): background work under a lease."""
        before = self._local.fence
        self._local.fence = (name, fence)
        try:
            yield
        finally:
            self._local.fence = before

    def confirm_fence(self) -> None:
        """Inside `fenced`: fail with StaleFence now if the lease moved on (work outside the record store,
        such as gc's deletes in a blob backend, checks before each batch). A no-op outside `fenced`."""
        if self._local.fence is not None:
            self.mutate(lambda txn: None, actor="system/leases", request_id="fence-check")

    def mutate(self, fn: Callable[[Txn], T], *, actor: str, request_id: str) -> T:
        """The one mutation path: run `fn` in a transaction, append its event, commit durably."""
        return self.submit(fn, actor=actor, request_id=request_id).result()

    def _run(self) -> None:
        expect = 1  # writers seen in the last batch: as many are likely to come back
        q = self._queue
        while True:
            job = q.get()
            if job is None:
                return
            batch = [job]
            stop = False
            deadline = 0.0
            while len(batch) < MAX_BATCH:
                # The only consumer: not empty means get_nowait succeeds (no queue.Empty raised and
                # caught at the end of every batch).
                if not q.empty():
                    nxt = q.get_nowait()
                else:
                    if len(batch) >= expect:
                        break
                    now = time.monotonic()
                    if not deadline:
                        deadline = now + GATHER_MAX_WAIT
                    wait = min(deadline - now, GATHER_GAP)
                    if wait <= 0:
                        break
                    try:
                        nxt = q.get(timeout=wait)
                    except queue.Empty:
                        break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            expect = len(batch)
            self._apply(batch)
            if stop:
                return

    def _apply(self, batch: list[_Job]) -> None:
        events: list[journal.Event] = []
        outcomes = self._commit(batch, events)
        if self._is_full(outcomes) and self.on_full is not None and self.on_full():
            # The disk is full and the reserve was just given back: a delete, abort, gc or admin
            # change can now commit (admission keeps new writes out). Re-running the batch is safe:
            # the failed transaction was rolled back, and mutations are functions of their txn.
            events.clear()
            outcomes = self._commit(batch, events)
        if isinstance(outcomes, BaseException):
            failure = (storage_full("the record store could not commit") if self._is_full(outcomes)
                       else AnvilError("Internal", f"commit failed: {outcomes}"))
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(failure)
            return
        assert self._head is not None
        self.batches += 1
        self.batched_mutations += len(batch)
        self.batch_counts[bisect.bisect_left(BATCH_BUCKETS, len(batch))] += 1
        if events:
            for event_listener in self._event_listeners:
                try:
                    event_listener(events)
                except Exception:  # noqa: BLE001 - a listener must never break the writer
                    log.exception("commit event listener failed")
        for job, (ok, value) in zip(batch, outcomes, strict=False):
            try:
                if ok:
                    job.future.set_result(value)
                else:
                    job.future.set_exception(value)
            except concurrent.futures.InvalidStateError:
                pass  # the caller cancelled its future; the writer must carry on regardless
        for listener in self._commit_listeners:
            try:
                listener(self._head[0])
            except Exception:  # noqa: BLE001 - a listener must never break the writer
                pass

    def _commit(self, batch: list[_Job], events: list[journal.Event]) -> list[tuple[bool, Any]] | BaseException:
        """Run the batch in one transaction: each job's outcome, or the failure that undid them all.
        `events` receives the journal events of the jobs that succeeded, in order."""
        outcomes: list[tuple[bool, Any]] = []
        try:
            self._begin(self._writer)
            conn = self._writer
            run = self._batch_statements(conn)
            assert self._head is not None
            batch_start = self._head[0]
            # The journal rows of the batch, and the writes mutations deferred (Txn.defer), each kind
            # written by one executemany after the last mutation: one prepared statement and one call
            # per batch. Only successful mutations' rows are kept; the chain is linked as they succeed.
            journal_rows: list[tuple] = []
            deferred: dict[str, list[tuple]] = {}
            # A batch of one needs no savepoint: if its mutation fails, the whole transaction is rolled
            # back, which undoes exactly what ROLLBACK TO would have (and commits nothing instead of an
            # empty transaction). Two statements fewer per lone write (a sequential client's every PUT).
            alone = len(batch) == 1
            for job in batch:
                head_before = self._head
                txn = Txn(conn, job.actor, job.request_id, time.time(), self._head[0], run)
                if not alone:
                    run.execute("SAVEPOINT m")
                try:
                    if job.fence is not None:
                        self._check_fence(conn, job.fence, txn.now)
                    result = job.fn(txn)
                    rows = []
                    for tenant, kind, scope, payload in txn.events:
                        appended, row = journal.link(
                            self._head, ts=txn.now, tenant=tenant, kind=kind, scope=scope,
                            actor=job.actor, request_id=job.request_id, payload=payload,
                        )
                        txn.appended.append(appended)
                        rows.append(row)
                        self._head = (appended.seq, appended.hash)
                    if not alone:
                        run.execute("RELEASE m")
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    if self._is_full(exc):
                        raise  # no space for a page spilled mid-mutation: the whole batch fails
                    self._head = head_before
                    if alone:
                        self._rollback(conn)
                        return [(False, exc)]
                    run.execute("ROLLBACK TO m")
                    run.execute("RELEASE m")
                    outcomes.append((False, exc))
                    continue
                journal_rows += rows
                events += txn.appended
                for statement, params in txn.deferred:
                    deferred.setdefault(statement, []).append(params)
                outcomes.append((True, result))
            for statement, param_rows in deferred.items():
                run.executemany(statement, param_rows)
            if journal_rows:
                run.executemany(journal.INSERT, journal_rows)
            self._before_commit(conn, self._head[0], self._head[0] != batch_start)
            run.execute("COMMIT")
        except BaseException as exc:  # noqa: BLE001 - the whole batch failed to commit
            self._rollback(self._writer)
            try:
                self._head = journal.head(self._writer)
            except BaseException:  # noqa: BLE001 - re-read by the next batch (PostgreSQL: in _begin)
                pass
            return exc
        return outcomes

    def _check_fence(self, conn: Any, fence: tuple[str, int], now: float) -> None:
        try:
            leases.check_fence(conn, fence[0], fence[1], now)
        except AnvilError as e:
            self.stale_fences += 1
            log.warning("background write refused (StaleFence): %s", e.message)
            raise

    # -- replay -------------------------------------------------------------------------

    def replay(self, events: Iterable[journal.Event], apply: Callable[[apsw.Connection, journal.Event], None], *,
               batch: int = 1000, on_batch: Callable[[int], None] | None = None) -> int:
        """Re-apply events recorded elsewhere (an archive, another store's journal), in order: each one's
        rows through `apply`, then the event itself exactly as recorded, so the chain continues unbroken.

        Every event must link to the head (seq, prev_hash, its own hash): a gap or an altered event
        stops the replay (`journal.ReplayRefused`) with everything before it committed. Runs on the
        caller's thread: the writer thread must not be running (an offline store being restored).
        """
        if self._thread is not None:
            raise RuntimeError("replay needs the store offline (the writer thread is running)")
        conn = self._writer
        head = journal.head(conn)
        done = 0
        pending: list[journal.Event] = []

        def flush() -> None:
            nonlocal head, done
            # Links are checked before anything is written: the events before a bad one commit,
            # so the caller learns exactly where the replay stopped.
            h, good, refused = head, 0, None
            payloads: list[str] = []
            for ev in pending:
                try:
                    payloads.append(journal.check_link(h, ev))
                except journal.ReplayRefused as e:
                    refused = e
                    break
                h, good = (ev.seq, ev.hash), good + 1
            if good:
                self._begin(conn)
                try:
                    for ev, payload_json in zip(pending[:good], payloads, strict=True):
                        apply(conn, ev)
                        journal.insert_event(conn, ev, payload_json)
                    conn.execute("COMMIT")
                except BaseException:
                    self._rollback(conn)
                    raise
                head = (pending[good - 1].seq, pending[good - 1].hash)
                done += good
                self._head = head
                if on_batch:
                    on_batch(done)
            pending.clear()
            if refused is not None:
                raise refused

        for ev in events:
            pending.append(ev)
            if len(pending) >= batch:
                flush()
        flush()
        return done

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        with self._readers_lock:
            for conn in list(self._readers):
                self._close_reader(conn)
            self._readers.clear()
        self._writer.close()
