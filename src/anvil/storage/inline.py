"""Small bodies kept inline in the record store (`catalog.db` table `inline_blobs`).

A body of at most `ANVIL_INLINE_MAX` bytes (default 64 KiB) is stored as a row, addressed by its
SHA-256 exactly like a blob file, and written in the same transaction as the record that
references it and that record's journal event: one group-commit flush then makes body, record and
event durable together, instead of a file fsync, a folder fsync and the WAL commit in that order
(docs/performance.md). Everything that reads blobs goes through `BlobStore`, which looks here as
well as in `blobs/sha256/`; which of the two holds a body is never visible through any API.

Rows are immutable content, like blob files. `stored` plays the part of a blob file's mtime: a
write that deduplicates onto a row refreshes it in its own transaction, so gc (which deletes only
unreferenced rows older than its grace period) can never take a body a new record is about to use.
Inline bodies are never larger than one verification chunk, so they have no chunk-digest sidecar:
every read checks the whole body against its SHA-256.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from anvil.errors import AnvilError
from anvil.storage import catalogcheck, records
from anvil.storage.records import Connection
from anvil.storage.space import parse_size

TABLE = "inline_blobs"

MIGRATIONS = [
    """
    CREATE TABLE inline_blobs(
        sha256 TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        body BLOB NOT NULL,
        stored REAL NOT NULL
    );
    """,
]

ENV = "ANVIL_INLINE_MAX"
# Measured with bench/objects.py at 16, 64 and 128 KiB (docs/performance.md, "Inline bodies").
DEFAULT_MAX = 64 * 1024
# Never above one verification chunk (1 MiB): an inline body is always verified whole, has no
# sidecar, and is small enough to be read into memory on the event loop's behalf.
LIMIT = 1024 * 1024


def max_from_env(environ: dict[str, str] | None = None) -> int:
    """The threshold from `ANVIL_INLINE_MAX` (bytes, or with K/M binary units; 0 turns inlining off)."""
    raw = (os.environ if environ is None else environ).get(ENV)
    if raw is None or not raw.strip():
        return DEFAULT_MAX
    value = parse_size(ENV, raw)
    if value > LIMIT:
        raise AnvilError("InvalidArgument", f"{ENV} may be at most {LIMIT} bytes (1 MiB), got {raw!r}")
    return value


# Parameters: sha256, size, body, stored (the writer may run it for a batch at once: Txn.defer).
PUT = ("INSERT INTO inline_blobs(sha256, size, body, stored) VALUES (?,?,?,?) "
       "ON CONFLICT (sha256) DO UPDATE SET size = excluded.size, body = excluded.body, stored = excluded.stored")


def put(conn: Connection, sha256: str, body: bytes, now: float) -> None:
    """Store a body (inside the caller's transaction). An existing row is overwritten with these
    bytes, which are known good (just hashed): a damaged row heals, and `stored` is refreshed."""
    conn.execute(PUT, (sha256, len(body), body, now))


def get(conn: Connection, sha256: str) -> bytes | None:
    try:
        row = conn.execute("SELECT body FROM inline_blobs WHERE sha256 = ?", (sha256,)).fetchone()
    except records.RecordError:
        return None  # a store from before this table (or a catalog that is not one)
    return bytes(row[0]) if row else None


def size(conn: Connection, sha256: str) -> int | None:
    try:
        row = conn.execute("SELECT size FROM inline_blobs WHERE sha256 = ?", (sha256,)).fetchone()
    except records.RecordError:
        return None
    return int(row[0]) if row else None


def rows(conn: Connection) -> dict[str, int]:
    """sha256 -> size of every inline body. `stored` is not read here: it follows the body in the
    row, so on SQLite reading it walks each body's overflow pages (fsck read every body twice)."""
    try:
        return {r[0]: int(r[1]) for r in conn.execute("SELECT sha256, size FROM inline_blobs")}
    except records.RecordError:
        return {}


def stored_at(conn: Connection, shas: Iterable[str]) -> dict[str, float]:
    """sha256 -> `stored` of those rows that exist (the few gc and fsck consider as orphans)."""
    out: dict[str, float] = {}
    for sha in shas:
        row = conn.execute("SELECT stored FROM inline_blobs WHERE sha256 = ?", (sha,)).fetchone()
        if row is not None:
            out[sha] = float(row[0])
    return out


def iter_sizes(conn: Connection) -> Iterator[tuple[str, int]]:
    """(sha256, size) of every inline body, in hash order, streamed (the primary key's order)."""
    try:
        for r in conn.execute("SELECT sha256, size FROM inline_blobs ORDER BY sha256"):
            yield r[0], int(r[1])
    except records.RecordError:
        return


def among(conn: Connection, shas: Iterable[str], batch: int = 500) -> set[str]:
    """Which of `shas` are inline bodies (looked up a batch at a time by primary key)."""
    out: set[str] = set()
    items = list(shas)
    try:
        for i in range(0, len(items), batch):
            part = items[i:i + batch]
            marks = ",".join("?" * len(part))
            found = {r[0] for r in conn.execute(f"SELECT sha256 FROM inline_blobs WHERE sha256 IN ({marks})", part)}
            # The caller's strings are kept, not the rows': a set over a whole restore's references
            # then costs its slots only (~30 bytes a member), not a second string per body.
            out.update(s for s in part if s in found)
    except records.RecordError:
        return set()
    return out


def bodies(conn: Connection) -> Iterator[tuple[str, int, bytes]]:
    """(sha256, recorded size, body) of every inline body, in table order (fsck --deep): one
    sequential pass, not a lookup through the primary-key index per row."""
    try:
        cur = conn.execute("SELECT sha256, size, body FROM inline_blobs")
        for r in cur:
            yield r[0], int(r[1]), bytes(r[2])
    except records.RecordError:
        return


# (sha256, recorded size, size read, actual sha256) of an inline body that fails its check.
Mismatch = catalogcheck.Mismatch


def check_bodies(conn: Connection, threads: int) -> tuple[int, list[Mismatch]]:
    """fsck --deep: hash every inline body against its address and recorded size; (bodies hashed,
    mismatches).

    On SQLite, `threads` workers read rowid ranges of the table on connections of their own and
    hash what they read (`catalogcheck.check_bodies`; fsck runs it with the integrity check, in a
    child process for a large catalog: `catalogcheck.check_catalog`). Other engines: one reader
    here, hashing in batches on `threads` workers."""
    path = records.sqlite_file(conn)
    if path is None:
        return _check_batches(conn, threads)
    return catalogcheck.check_bodies(path, threads)


def _check_batches(conn: Connection, threads: int) -> tuple[int, list[Mismatch]]:
    """Rows read on this thread (one connection), hashed in ~4 MiB batches on `threads` others;
    at most 2 x threads batches in flight."""
    pending: deque[Future[tuple[int, list[Mismatch]]]] = deque()
    seen = 0
    bad: list[Mismatch] = []

    def collect(f: Future[tuple[int, list[Mismatch]]]) -> None:
        nonlocal seen
        n, b = f.result()
        seen += n
        bad.extend(b)

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="anvil-inline-hash") as pool:
        batch: list[tuple[str, int, bytes]] = []
        size = 0
        for row in bodies(conn):
            batch.append(row)
            size += len(row[2])
            if size >= 4 << 20:
                pending.append(pool.submit(catalogcheck.check_rows, batch))
                batch, size = [], 0
                while len(pending) > 2 * threads:
                    collect(pending.popleft())
        if batch:
            pending.append(pool.submit(catalogcheck.check_rows, batch))
        while pending:
            collect(pending.popleft())
    return seen, bad


def touch(conn: Connection, shas: Iterable[str], now: float) -> None:
    """Refresh `stored` of the rows a new record is about to reference (a copy, a completed upload),
    in the record's own transaction, as a deduplicating write refreshes a blob file's mtime."""
    for sha in set(shas):
        conn.execute("UPDATE inline_blobs SET stored = ? WHERE sha256 = ?", (now, sha))


def delete(conn: Connection, sha256: str, *, stored_before: float | None = None) -> bool:
    """Remove a row (gc: only if older than `stored_before`); True if one was removed."""
    if stored_before is None:
        found = conn.execute("SELECT 1 FROM inline_blobs WHERE sha256 = ?", (sha256,)).fetchone()
        conn.execute("DELETE FROM inline_blobs WHERE sha256 = ?", (sha256,))
    else:
        found = conn.execute("SELECT 1 FROM inline_blobs WHERE sha256 = ? AND stored < ?",
                             (sha256, stored_before)).fetchone()
        conn.execute("DELETE FROM inline_blobs WHERE sha256 = ? AND stored < ?", (sha256, stored_before))
    return found is not None
