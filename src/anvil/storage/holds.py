"""Holds: what compaction and gc must keep for a reader that is not a record (scale-out, issue 21).

Continuous archiving and a running backup read things after the fact: the archive ships journal
events (and the blobs they reference) some time after they commit, and a backup reads the blobs its
snapshot references some time after the snapshot's instant. While they do, journal compaction must
not drop the events and gc must not delete the blobs. With many nodes over one record store the
archiver, the backup and the compaction or gc may run on different nodes, so the holds live in the
record store (the `holds` table, both engines) and every node's compaction and gc read them:

- `seq`: compaction keeps every event after it (the archive's cursor; a backup's snapshot point).
- `blobs`: `events` -- gc keeps every blob the events after `seq` reference (what the archive still
  has to ship); `all` -- gc deletes no blob at all while the hold lasts (a backup reads the blobs its
  snapshot referenced, and some of them may have lost their last reference since).
- `expires`: a hold its holder stopped renewing (a crashed node, archiving switched off) lapses, so
  it cannot stop compaction and gc for ever. A backup renews its hold every ttl/3 while it runs and
  removes it at its end; the archiver renews its hold at each shipment (ARCHIVE_TTL).

A hold is coordination, not a record: written without a journal event, like a lease.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anvil.storage.catalog import Catalog, Txn

log = logging.getLogger("anvil.holds")

MIGRATIONS = [
    """CREATE TABLE holds(
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        seq INTEGER NOT NULL,
        blobs TEXT NOT NULL,
        expires REAL NOT NULL,
        updated REAL NOT NULL
    )""",
]

EVENTS = "events"  # gc keeps the blobs referenced by the events after `seq`
ALL = "all"        # gc deletes no blob while the hold lasts

ARCHIVE = "archive"
DEFAULT_ARCHIVE_TTL = 24 * 3600.0


def archive_ttl() -> float:
    """How long the archive's hold outlives the last shipment (ANVIL_ARCHIVE_HOLD_SECONDS): a node that
    archived and stopped (crashed, or archiving switched off) holds compaction back that long."""
    raw = os.environ.get("ANVIL_ARCHIVE_HOLD_SECONDS", str(DEFAULT_ARCHIVE_TTL))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"ANVIL_ARCHIVE_HOLD_SECONDS must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError("ANVIL_ARCHIVE_HOLD_SECONDS must be > 0")
    return value


@dataclass(frozen=True)
class Hold:
    name: str
    holder: str
    seq: int
    blobs: str
    expires: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "holder": self.holder, "seq": self.seq, "blobs": self.blobs,
                "expires": self.expires}


def active(conn: Any, now: float | None = None) -> list[Hold]:
    """The holds that have not lapsed, by name."""
    now = time.time() if now is None else now
    return [Hold(str(r[0]), str(r[1]), int(r[2]), str(r[3]), float(r[4])) for r in conn.execute(
        "SELECT name, holder, seq, blobs, expires FROM holds WHERE expires > ? ORDER BY name", (now,))]


def journal_floor(conn: Any, now: float | None = None) -> int | None:
    """The lowest seq a hold keeps the events after (None: no hold)."""
    seqs = [h.seq for h in active(conn, now)]
    return min(seqs) if seqs else None


def put(catalog: Catalog, name: str, *, holder: str, seq: int, blobs: str, ttl: float) -> None:
    """Create or move hold `name` (through the mutation path: on PostgreSQL serialised with every node's
    compaction, which reads the holds in its own transaction). Inside `Catalog.fenced` it is fenced."""
    if blobs not in (EVENTS, ALL, ""):
        raise ValueError(f"unknown blob hold {blobs!r}")

    def fn(txn: Txn) -> None:
        expires = txn.now + ttl
        row = txn.conn.execute("SELECT 1 FROM holds WHERE name = ?", (name,)).fetchone()
        if row is not None:
            txn.conn.execute("UPDATE holds SET holder = ?, seq = ?, blobs = ?, expires = ?, updated = ? "
                             "WHERE name = ?", (holder, int(seq), blobs, expires, txn.now, name))
        else:
            txn.conn.execute("INSERT INTO holds(name, holder, seq, blobs, expires, updated) VALUES (?,?,?,?,?,?)",
                             (name, holder, int(seq), blobs, expires, txn.now))

    catalog.mutate(fn, actor="system/holds", request_id=f"hold-{name}")


def release(catalog: Catalog, name: str, *, holder: str | None = None) -> None:
    """Remove hold `name` (only if `holder` still owns it, when given)."""

    def fn(txn: Txn) -> None:
        if holder is None:
            txn.conn.execute("DELETE FROM holds WHERE name = ?", (name,))
        else:
            txn.conn.execute("DELETE FROM holds WHERE name = ? AND holder = ?", (name, holder))

    catalog.mutate(fn, actor="system/holds", request_id=f"hold-{name}")


@contextmanager
def holding(catalog: Catalog, name: str, *, holder: str, seq: int, blobs: str, ttl: float) -> Iterator[None]:
    """Hold for the block: created now, renewed every ttl/3 on a thread, removed at the end (a crashed
    holder's hold lapses after `ttl`)."""
    put(catalog, name, holder=holder, seq=seq, blobs=blobs, ttl=ttl)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl / 3):
            try:
                put(catalog, name, holder=holder, seq=seq, blobs=blobs, ttl=ttl)
            except Exception:  # noqa: BLE001 - the record store is away: the hold lapses, as a lease does
                log.warning("renewing hold %s failed", name)

    thread = threading.Thread(target=renew, name=f"anvil-hold-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        try:
            release(catalog, name, holder=holder)
        except Exception:  # noqa: BLE001 - it lapses on its own after its time to live
            log.warning("could not release hold %s", name)
