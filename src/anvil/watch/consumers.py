"""Durable named consumers: a scope and a cursor that only moves forward.

Consumer cursors are source records (docs/architecture.md), so create, delete and every checkpoint go
through `Catalog.mutate` and emit one journal event (`watch.consumer.create`,
`watch.consumer.delete`, `watch.checkpoint`). `watch.*` kinds are outside the default watch
scope, so checkpoints do not wake ordinary watchers or feed consumers their own bookkeeping.

A checkpoint behind the stored cursor is refused with `StaleFence` (409): the usual cause is
a second worker, or a restarted one holding an old position, racing the current owner; the
stored cursor is the fence and the caller must re-read it. Equal is an idempotent no-op.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from anvil.context import RequestContext
from anvil.errors import AnvilError
from anvil.storage import Catalog, Txn, journal
from anvil.storage.records import Connection
from anvil.watch.events import Scope, parse_kinds

MIGRATIONS = [
    """
    CREATE TABLE watch_consumers(
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        bucket TEXT,
        prefix TEXT NOT NULL DEFAULT '',
        kinds TEXT NOT NULL,
        cursor INTEGER NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        created_by TEXT NOT NULL,
        PRIMARY KEY(tenant, name)
    );
    """,
]

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_COLUMNS = "tenant, name, bucket, prefix, kinds, cursor, created, updated, created_by"


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise AnvilError("InvalidArgument",
                         "consumer names are 1-63 characters: lowercase letters, digits, '.', '_' and '-'")
    return name


@dataclass(frozen=True)
class Consumer:
    tenant: str
    name: str
    bucket: str | None
    prefix: str
    kinds: list[str]
    cursor: int
    created: float
    updated: float
    created_by: str

    @classmethod
    def from_row(cls, row: tuple) -> Consumer:
        return cls(row[0], row[1], row[2], row[3], json.loads(row[4]), int(row[5]), row[6], row[7], row[8])

    def scope(self) -> Scope:
        return Scope(tenant=self.tenant, bucket=self.bucket, prefix=self.prefix, kinds=parse_kinds(self.kinds))

    def to_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "name": self.name, "bucket": self.bucket, "prefix": self.prefix,
                "kinds": self.kinds, "cursor": self.cursor, "created": self.created, "updated": self.updated,
                "created_by": self.created_by}


def journal_bounds(conn: Connection, head_seq: int | None = None) -> tuple[int, int]:
    """(oldest valid cursor, head): a cursor c is resumable iff base <= c <= head."""
    base = journal.base(conn)[0]
    if head_seq is None:
        row = conn.execute("SELECT max(seq) FROM journal").fetchone()
        head_seq = int(row[0]) if row and row[0] is not None else base
    return base, head_seq


def check_cursor_range(cursor: int, base: int, head: int) -> None:
    if cursor > head:
        raise AnvilError("InvalidArgument", f"cursor {cursor} is beyond the journal head {head}")
    if cursor < base:
        raise cursor_expired(cursor, base)


def cursor_expired(cursor: int, base: int) -> AnvilError:
    return AnvilError(
        "CursorExpired",
        f"cursor {cursor} has been compacted away; the oldest available cursor is {base}",
        headers={"x-anvil-oldest-cursor": str(base)},
    )


def _row(conn: Connection, tenant: str, name: str) -> Consumer | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM watch_consumers WHERE tenant = ? AND name = ?",
                       (tenant, name)).fetchone()
    return Consumer.from_row(row) if row else None


def create(catalog: Catalog, ctx: RequestContext, name: str, scope: Scope, cursor: int | None) -> Consumer:
    """A new consumer starting after `cursor` (default: the head, i.e. only future events)."""
    check_name(name)

    def fn(txn: Txn) -> Consumer:
        if _row(txn.conn, scope.tenant, name) is not None:
            raise AnvilError("AlreadyExists", "consumer already exists")
        base, head = journal_bounds(txn.conn, txn.head_seq)
        start = head if cursor is None else cursor
        check_cursor_range(start, base, head)
        kinds = scope.kinds.to_list()
        txn.conn.execute(
            f"INSERT INTO watch_consumers({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
            (scope.tenant, name, scope.bucket, scope.prefix, json.dumps(kinds), start, txn.now, txn.now, ctx.actor),
        )
        txn.emit(scope.tenant, "watch.consumer.create", f"watch/{name}", {
            "consumer": name, "cursor": start, "bucket": scope.bucket, "prefix": scope.prefix, "kinds": kinds,
        })
        return Consumer(scope.tenant, name, scope.bucket, scope.prefix, kinds, start, txn.now, txn.now, ctx.actor)

    return catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)


def get(conn: Connection, tenant: str, name: str) -> Consumer:
    check_name(name)
    c = _row(conn, tenant, name)
    if c is None:
        raise AnvilError("NotFound", "consumer not found")
    return c


def list_all(conn: Connection, tenant: str | None = None) -> list[Consumer]:
    if tenant is None:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM watch_consumers ORDER BY tenant, name")
    else:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM watch_consumers WHERE tenant = ? ORDER BY name", (tenant,))
    return [Consumer.from_row(r) for r in rows]


def delete(catalog: Catalog, ctx: RequestContext, tenant: str, name: str) -> dict[str, Any]:
    check_name(name)

    def fn(txn: Txn) -> dict[str, Any]:
        c = _row(txn.conn, tenant, name)
        if c is None:
            raise AnvilError("NotFound", "consumer not found")
        txn.conn.execute("DELETE FROM watch_consumers WHERE tenant = ? AND name = ?", (tenant, name))
        txn.emit(tenant, "watch.consumer.delete", f"watch/{name}", {"consumer": name, "cursor": c.cursor})
        return {"name": name, "deleted": True}

    return catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)


def checkpoint(catalog: Catalog, ctx: RequestContext, tenant: str, name: str, cursor: int) -> Consumer:
    """Move the consumer's cursor forward to `cursor` (the seq of the last event it processed)."""
    check_name(name)

    def fn(txn: Txn) -> Consumer:
        c = _row(txn.conn, tenant, name)
        if c is None:
            raise AnvilError("NotFound", "consumer not found")
        if cursor > txn.head_seq:
            raise AnvilError("InvalidArgument", f"cursor {cursor} is beyond the journal head {txn.head_seq}")
        if cursor < c.cursor:
            raise AnvilError("StaleFence", f"checkpoint {cursor} is behind the consumer's cursor {c.cursor}; "
                                           "cursors only move forward")
        if cursor == c.cursor:
            return c  # nothing changes, so no event
        txn.conn.execute("UPDATE watch_consumers SET cursor = ?, updated = ? WHERE tenant = ? AND name = ?",
                         (cursor, txn.now, tenant, name))
        txn.emit(tenant, "watch.checkpoint", f"watch/{name}", {"consumer": name, "cursor": cursor,
                                                               "previous": c.cursor})
        return Consumer(c.tenant, c.name, c.bucket, c.prefix, c.kinds, cursor, c.created, txn.now, c.created_by)

    return catalog.mutate(fn, actor=ctx.actor, request_id=ctx.request_id)


def lag(conn: Connection, c: Consumer, *, now: float | None = None) -> dict[str, Any]:
    """How far behind: events (head − first unprocessed event + 1) and age of that event in seconds.

    `watch.*` bookkeeping events (the consumer's own checkpoints) do not count as work, so a
    consumer that checkpointed the last real event reports lag 0 rather than 1.
    """
    now = time.time() if now is None else now
    base, head = journal_bounds(conn)
    row = conn.execute("SELECT seq, ts FROM journal WHERE seq > ? AND kind NOT LIKE 'watch.%' ORDER BY seq LIMIT 1",
                       (c.cursor,)).fetchone()
    if row is None:
        return {"head": head, "lag": 0, "age_seconds": 0.0, "expired": c.cursor < base}
    return {"head": head, "lag": head - int(row[0]) + 1, "age_seconds": round(max(0.0, now - row[1]), 3),
            "expired": c.cursor < base}


def min_cursor(conn: Connection) -> int | None:
    """The lowest durable cursor (None without consumers): retention's floor, since every event
    after it is still owed to some consumer."""
    row = conn.execute("SELECT min(cursor) FROM watch_consumers").fetchone()
    return None if row is None or row[0] is None else int(row[0])
