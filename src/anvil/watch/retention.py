"""Journal retention: compact events every consumer has passed and the retention window has aged out.

An event may go only when BOTH hold: its seq is at or below every durable consumer's cursor,
and it is older than the retention window. Compaction deletes those rows and moves
`journal_base` to the last deleted event's (seq, hash), so `verify_chain` still checks the
remaining chain from a known anchor and `journal.head` stays right even if nothing remains.
A cursor below the base then fails with `CursorExpired` naming the oldest available cursor;
nothing is ever skipped silently.

Compaction is itself a mutation (it removes rows from the journal) and so goes through
`Catalog.mutate` and records one `watch.compact` event.
"""

from __future__ import annotations

import time
from typing import Any

from anvil.context import RequestContext
from anvil.storage import Catalog, Txn

MAX_ROWS_PER_STEP = 20_000  # keeps each compaction transaction (and the writer's pause) short


def compact_step(catalog: Catalog, ctx: RequestContext, retention_seconds: float, *,
                 now: float | None = None, max_rows: int = MAX_ROWS_PER_STEP) -> dict[str, Any]:
    now = time.time() if now is None else now
    cutoff = now - retention_seconds

    def fn(txn: Txn) -> dict[str, Any]:
        conn = txn.conn
        base_seq = int(conn.execute("SELECT seq FROM journal_base WHERE id = 1").fetchone()[0])
        min_cursor = conn.execute("SELECT min(cursor) FROM watch_consumers").fetchone()[0]
        limit = base_seq + max_rows
        if min_cursor is not None:
            limit = min(limit, int(min_cursor))
        row = conn.execute(
            "SELECT seq, hash FROM journal WHERE seq <= ? AND ts < ? ORDER BY seq DESC LIMIT 1", (limit, cutoff)
        ).fetchone()
        # ts is not strictly monotonic across clock steps; only cut where every earlier event is old too.
        if row is not None:
            newer = conn.execute("SELECT min(seq) FROM journal WHERE seq <= ? AND ts >= ?",
                                 (row[0], cutoff)).fetchone()[0]
            if newer is not None:
                row = conn.execute("SELECT seq, hash FROM journal WHERE seq < ? ORDER BY seq DESC LIMIT 1",
                                   (newer,)).fetchone()
        if row is None or int(row[0]) <= base_seq:
            return {"deleted": 0, "base": base_seq}
        through, h = int(row[0]), str(row[1])
        deleted = conn.execute("SELECT count(*) FROM journal WHERE seq <= ?", (through,)).fetchone()[0]
        conn.execute("DELETE FROM journal WHERE seq <= ?", (through,))
        conn.execute("UPDATE journal_base SET seq = ?, hash = ? WHERE id = 1", (through, h))
        txn.emit(ctx.tenant, "watch.compact", "journal", {"through_seq": through, "hash": h, "deleted": deleted,
                                                          "retention_seconds": retention_seconds})
        return {"deleted": int(deleted), "base": through}

    return catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)


def compact(catalog: Catalog, ctx: RequestContext, retention_seconds: float, *,
            now: float | None = None, max_rows: int = MAX_ROWS_PER_STEP) -> dict[str, Any]:
    """Compact in bounded steps until nothing more may go; returns the total and the new base."""
    # One fixed `now` for every step: each step's own `watch.compact` event is newer than the
    # cutoff, so with a zero window the loop cannot keep eating the events it just wrote.
    now = time.time() if now is None else now
    total = 0
    result: dict[str, Any] = {"deleted": 0, "base": 0}
    while True:
        result = compact_step(catalog, ctx, retention_seconds, now=now, max_rows=max_rows)
        total += result["deleted"]
        if result["deleted"] == 0:
            break
    return {"deleted": total, "base": result["base"], "retention_seconds": retention_seconds}
