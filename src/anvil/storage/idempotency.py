"""Idempotency keys for every mutation.

Checked and recorded inside the mutation's own transaction, so a retried request either
sees the first result or performs the mutation once — never both, never twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from anvil.errors import AnvilError
from anvil.storage.catalog import Txn

RETENTION_SECONDS = 24 * 3600
MAX_KEY_LENGTH = 255
# The journal event that carries a record (replayed by the journal participant).
EVENT = "idempotency.record"

MIGRATIONS = [
    """
    CREATE TABLE idempotency(
        actor TEXT NOT NULL,
        key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        response TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY(actor, key)
    );
    CREATE INDEX idempotency_created ON idempotency(created);
    """,
]


def validate_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise AnvilError("InvalidArgument", f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable characters")


def run(txn: Txn, key: str | None, fingerprint: str, fn: Callable[[Txn], dict[str, Any]]) -> dict[str, Any]:
    """Run `fn` once per (actor, key); replay its stored result for an identical request."""
    if key is None:
        return fn(txn)
    row = txn.conn.execute(
        "SELECT fingerprint, response, created FROM idempotency WHERE actor = ? AND key = ?",
        (txn.actor, key),
    ).fetchone()
    if row and row[2] >= txn.now - RETENTION_SECONDS:
        if row[0] != fingerprint:
            raise AnvilError(
                "IdempotencyMismatch", "this Idempotency-Key was already used for a different request"
            )
        return {**json.loads(row[1]), "idempotent_replay": True}
    result = fn(txn)
    response = json.dumps(result)
    record(txn.conn, txn.actor, key, fingerprint, response, txn.now)
    # The record is journaled with the mutation (same transaction), so a store rebuilt from the
    # journal (point-in-time restore, replay) answers a retried request as the original did. Its
    # own event, in the system tenant: tenants' watchers never see other requests' keys.
    txn.emit("system", EVENT, "idempotency", {"key": key, "fingerprint": fingerprint, "response": response})
    return result


def record(conn: Any, actor: str, key: str, fingerprint: str, response: str, now: float) -> None:
    """Store one answer and forget a few expired ones (live, and the same again on replay)."""
    conn.execute(
        "INSERT INTO idempotency(actor, key, fingerprint, response, created) VALUES (?,?,?,?,?) "
        "ON CONFLICT(actor, key) DO UPDATE SET fingerprint = excluded.fingerprint, "
        "response = excluded.response, created = excluded.created",
        (actor, key, fingerprint, response, now),
    )
    # Keep the table bounded: forget keys past the retention window as we go (portable SQL: the
    # same statement runs on PostgreSQL). Ordered, so a replay of the journal forgets the same rows.
    conn.execute(
        "DELETE FROM idempotency WHERE (actor, key) IN "
        "(SELECT actor, key FROM idempotency WHERE created < ? ORDER BY created, actor, key LIMIT 16)",
        (now - RETENTION_SECONDS,),
    )


def apply_event(conn: Any, event: Any) -> None:
    """Replay an `idempotency.record` event: the same row, created at the mutation's own clock."""
    p = event.payload
    record(conn, event.actor, p["key"], p["fingerprint"], p["response"], event.ts)
