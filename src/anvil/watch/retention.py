"""Journal retention: compact events every consumer has passed and the retention window has aged out.

An event may go only when BOTH hold: its seq is at or below every durable consumer's cursor
(and every hold's in the record store, e.g. continuous archiving's cursor: storage.holds), and it is older than the
retention window. This module is the policy: it picks the window and
the floor (the lowest consumer cursor, read through `watch.consumers`); the mechanism, deleting
the rows and moving `journal_base` to the last deleted event's (seq, hash), is
`anvil.storage.journal.compact`. A cursor below the base then fails with `CursorExpired` naming
the oldest available cursor; nothing is ever skipped silently.

Compaction is itself a mutation (it removes rows from the journal) and so goes through
`Catalog.mutate` and records one `watch.compact` event.
"""

from __future__ import annotations

import time
from typing import Any

from anvil.context import RequestContext
from anvil.storage import Catalog, Txn, holds, journal
from anvil.watch import consumers

MAX_ROWS_PER_STEP = 20_000  # keeps each compaction transaction (and the writer's pause) short


def compact_step(catalog: Catalog, ctx: RequestContext, retention_seconds: float, *,
                 now: float | None = None, max_rows: int = MAX_ROWS_PER_STEP) -> dict[str, Any]:
    now = time.time() if now is None else now
    cutoff = now - retention_seconds

    def fn(txn: Txn) -> dict[str, Any]:
        # The floor is read in the same transaction as the deletes, so a consumer created or
        # moved meanwhile cannot lose an event it still needs.
        floor = consumers.min_cursor(txn.conn)
        # Continuous archiving holds what it has not shipped, a running backup what follows its
        # snapshot: compaction must not open a gap in the archive (point-in-time restore could not
        # cross it). The holds are in the record store, so an archiver on another node counts too.
        held = holds.journal_floor(txn.conn, txn.now)
        if held is not None:
            floor = held if floor is None else min(floor, held)
        done = journal.compact(txn.conn, floor=floor, cutoff=cutoff, max_rows=max_rows)
        if done.deleted == 0:
            return {"deleted": 0, "base": done.base_seq}
        txn.emit(ctx.tenant, "watch.compact", "journal", {"through_seq": done.base_seq, "hash": done.base_hash,
                                                          "deleted": done.deleted,
                                                          "retention_seconds": retention_seconds})
        return {"deleted": done.deleted, "base": done.base_seq}

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
