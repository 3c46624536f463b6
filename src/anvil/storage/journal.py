"""The journal: the durable, ordered, hash-chained mutation log.

Every source change appends exactly one event in the same SQLite transaction as the rows
it describes (see `Catalog.mutate`). `seq` is gapless; `hash` chains each event to the one
before, so a removed, reordered or edited event is detectable by `verify_chain`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import apsw

from anvil.frozen import fast_init
from anvil.storage import jsonfast
from anvil.storage.digests import sha256_hex

GENESIS_HASH = "0" * 64

MIGRATIONS = [
    """
    CREATE TABLE journal(
        seq INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        tenant TEXT NOT NULL,
        kind TEXT NOT NULL,
        scope TEXT NOT NULL,
        actor TEXT NOT NULL,
        request_id TEXT NOT NULL,
        payload TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE TABLE journal_base(
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        hash TEXT NOT NULL
    );
    INSERT INTO journal_base(id, seq, hash) VALUES (1, 0, printf('%.64c', '0'));
    """,
    # The deployment id, once per record store (so once for every node of a scaled deployment):
    # snapshots, their parents and the archive are grouped by it. Set by the first process that opens
    # the store, from its FORMAT file (`claim_deployment_id`); a migration inserts no row, so a
    # freshly migrated store is still empty for a restore.
    """
    CREATE TABLE deployment(
        id INTEGER PRIMARY KEY CHECK (id = 1),
        deployment_id TEXT NOT NULL,
        created REAL NOT NULL
    )
    """,
]


def claim_deployment_id(conn: Any, candidate: str, now: float) -> str:
    """The record store's deployment id; `candidate` (this path's FORMAT) becomes it if it has none
    yet. Idempotent, and safe with several nodes starting at once (the first insert wins)."""
    with conn:
        conn.execute("INSERT INTO deployment(id, deployment_id, created) VALUES (1, ?, ?) ON CONFLICT DO NOTHING",
                     (candidate, now))
        row = conn.execute("SELECT deployment_id FROM deployment WHERE id = 1").fetchone()
    return str(row[0])


@fast_init
@dataclass(frozen=True)
class Event:
    seq: int
    ts: float
    tenant: str
    kind: str
    scope: str
    actor: str
    request_id: str
    payload: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "tenant": self.tenant,
            "kind": self.kind,
            "scope": self.scope,
            "actor": self.actor,
            "request_id": self.request_id,
            "payload": self.payload,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


# Built once, and its C encoder too: `json.dumps` with options builds a new encoder per call, and
# `JSONEncoder.encode` a new C encoder per call (every event of every commit, in the writer thread).
_encode_canonical = jsonfast.encoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_payload(payload: dict[str, Any]) -> str:
    """Byte for byte `json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`."""
    return _encode_canonical(payload)


# One encoder, built once: `json.dumps` with options builds a new encoder per call, and fsck
# re-hashes every event (the output is byte-identical).
_encode_record = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def event_hash(
    prev_hash: str, seq: int, ts: float, tenant: str, kind: str, scope: str, actor: str,
    request_id: str, payload_json: str,
) -> str:
    """The chain link: covers every column, so editing any of them breaks the chain."""
    record = _encode_record([seq, repr(ts), tenant, kind, scope, actor, request_id, payload_json])
    return hashlib.sha256(f"{prev_hash}\n{record}".encode()).hexdigest()


_COLUMNS = "seq, ts, tenant, kind, scope, actor, request_id, payload, prev_hash, hash"

# What `_encode_record` does to a str (the encoder's own C function, for ensure_ascii=False).
_quote = json.encoder.encode_basestring


def _record_text(seq: Any, ts: Any, tenant: Any, kind: Any, scope: Any, actor: Any, request_id: Any,
                 payload_json: Any, quote_payload: Callable[[str], str] = _quote) -> str:
    """`_encode_record([seq, repr(ts), ...])`, byte for byte, without building an encoder per
    call (JSONEncoder.encode does, and that was most of verify_chain's cost per event). Only an
    int seq and str columns take the short way; anything else (NULL, a damaged row) goes
    through the encoder itself. `quote_payload`: `_quote_canonical` for a payload the writer has
    just encoded canonically (the same text, cheaper)."""
    if type(seq) is int:
        try:
            return (f"[{seq},{_quote(repr(ts))},{_quote(tenant)},{_quote(kind)},{_quote(scope)},{_quote(actor)},"
                    f"{_quote(request_id)},{quote_payload(payload_json)}]")
        except TypeError:
            pass
    return _encode_record([seq, repr(ts), tenant, kind, scope, actor, request_id, payload_json])


def _row_to_event(row: tuple) -> Event:
    return Event(row[0], row[1], row[2], row[3], row[4], row[5], row[6], json.loads(row[7]), row[8], row[9])


INSERT = f"INSERT INTO journal({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)"


def _quote_canonical(payload_json: str) -> str:
    """`_quote(payload_json)` for a payload written by `canonical_payload`: that text holds no character
    below U+0020 (the encoder escapes them inside strings, and nothing else can carry one), so the only
    characters `encode_basestring` escapes in it are `"` and `\\`: two `str.replace` (C, memchr speed)
    instead of its per-character loop, which was ~20 k instructions per event in the writer thread."""
    return '"' + payload_json.replace("\\", "\\\\").replace('"', '\\"') + '"'


def link(
    head: tuple[int, str], *, ts: float, tenant: str, kind: str, scope: str, actor: str, request_id: str,
    payload: dict[str, Any],
) -> tuple[Event, tuple]:
    """The event that follows `head`, and its row for `INSERT` (the writer inserts a batch's rows at once).
    Its hash is `event_hash`'s, over the same bytes (`_record_text` with the payload quoted by
    `_quote_canonical`), without OpenSSL's algorithm lookup (`sha256_hex`)."""
    prev_seq, prev_hash = head
    seq = prev_seq + 1
    payload_json = _encode_canonical(payload)
    record = _record_text(seq, ts, tenant, kind, scope, actor, request_id, payload_json, _quote_canonical)
    h = sha256_hex(f"{prev_hash}\n{record}".encode())
    return (Event(seq, ts, tenant, kind, scope, actor, request_id, payload, prev_hash, h),
            (seq, ts, tenant, kind, scope, actor, request_id, payload_json, prev_hash, h))


def append(
    conn: apsw.Connection, head: tuple[int, str], *, ts: float, tenant: str, kind: str, scope: str,
    actor: str, request_id: str, payload: dict[str, Any],
) -> Event:
    event, row = link(head, ts=ts, tenant=tenant, kind=kind, scope=scope, actor=actor, request_id=request_id,
                      payload=payload)
    conn.execute(INSERT, row)
    return event


def head(conn: apsw.Connection) -> tuple[int, str]:
    row = conn.execute("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
    if row:
        return int(row[0]), str(row[1])
    return base(conn)


def base(conn: apsw.Connection) -> tuple[int, str]:
    """(seq, hash) of the last event compacted away: (0, GENESIS_HASH) until the first compaction.

    Every cursor c with base <= c <= head can resume; `verify_chain` anchors on this hash."""
    row = conn.execute("SELECT seq, hash FROM journal_base WHERE id = 1").fetchone()
    return int(row[0]), str(row[1])


def oldest_seq(conn: apsw.Connection) -> int:
    """The first seq still held (earlier ones may have been compacted away)."""
    row = conn.execute("SELECT min(seq) FROM journal").fetchone()
    if row and row[0] is not None:
        return int(row[0])
    return head(conn)[0] + 1


def read(conn: apsw.Connection, after: int = 0, limit: int = 1000) -> list[Event]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM journal WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
    ).fetchall()
    return [_row_to_event(r) for r in rows]


def iterate(conn: apsw.Connection, after: int = 0, batch: int = 5000) -> Iterator[Event]:
    while True:
        events = read(conn, after, batch)
        if not events:
            return
        yield from events
        after = events[-1].seq


class ReplayRefused(Exception):
    """An event cannot be appended where it was offered: a gap, a broken link or an altered event."""


def check_link(head: tuple[int, str], ev: Event, payload_json: str | None = None) -> str:
    """`ev` is the next event after `head`, unaltered (its hash recomputes); else ReplayRefused.
    Returns the canonical payload (what `insert_event` stores)."""
    seq, h = head
    if ev.seq != seq + 1:
        raise ReplayRefused(f"event {ev.seq} does not follow the head {seq} (expected seq {seq + 1})")
    if ev.prev_hash != h:
        raise ReplayRefused(f"event {ev.seq} does not chain to the head: prev_hash {ev.prev_hash[:16]}…, "
                            f"head hash {h[:16]}…")
    payload_json = payload_json or canonical_payload(ev.payload)
    recomputed = event_hash(ev.prev_hash, ev.seq, ev.ts, ev.tenant, ev.kind, ev.scope, ev.actor, ev.request_id,
                            payload_json)
    if recomputed != ev.hash:
        raise ReplayRefused(f"event {ev.seq} ({ev.kind}) does not hash to its recorded hash: it was altered")
    return payload_json


def insert_event(conn: apsw.Connection, ev: Event, payload_json: str | None = None) -> None:
    """Store an event exactly as recorded (replay); the caller checked the link."""
    conn.execute(
        f"INSERT INTO journal({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
        (ev.seq, ev.ts, ev.tenant, ev.kind, ev.scope, ev.actor, ev.request_id,
         payload_json or canonical_payload(ev.payload), ev.prev_hash, ev.hash),
    )


def event_from_dict(d: dict[str, Any]) -> Event:
    return Event(int(d["seq"]), float(d["ts"]), d["tenant"], d["kind"], d["scope"], d["actor"], d["request_id"],
                 d["payload"], d["prev_hash"], d["hash"])


def rebase(conn: apsw.Connection, through: int, h: str) -> None:
    """Replay of a compaction: drop the events through `through` and anchor the chain on `h`."""
    conn.execute("DELETE FROM journal WHERE seq <= ?", (through,))
    conn.execute("UPDATE journal_base SET seq = ?, hash = ? WHERE id = 1", (through, h))


@dataclass
class ChainProblem:
    seq: int
    problem: str


def verify_chain(conn: apsw.Connection, after: tuple[int, str] | None = None) -> tuple[int, list[ChainProblem]]:
    """Walk the whole journal; return (events checked, problems). Read-only.

    `after` (seq, hash): walk only the events after that one, anchored on its hash (a backup
    extends its parent snapshot's verification; the caller has checked that event is still there)."""
    base_seq, base_hash = after if after is not None else base(conn)
    expected_seq, expected_prev = base_seq + 1, base_hash
    problems: list[ChainProblem] = []
    checked = 0
    # `event_hash` inlined, over the same bytes (`_record_text`), with its callables bound once.
    record_text, sha256 = _record_text, hashlib.sha256
    # The whole walk reads every row (one left at or below the base is a problem it reports).
    rows = (conn.execute(f"SELECT {_COLUMNS} FROM journal ORDER BY seq") if after is None else
            conn.execute(f"SELECT {_COLUMNS} FROM journal WHERE seq > ? ORDER BY seq", (base_seq,)))
    for seq, ts, tenant, kind, scope, actor, request_id, payload_json, prev_hash, h in rows:
        checked += 1
        if seq != expected_seq:
            problems.append(ChainProblem(seq, f"gap: expected seq {expected_seq}, found {seq}"))
        if prev_hash != expected_prev:
            problems.append(ChainProblem(seq, "prev_hash does not match the previous event's hash"))
        record = record_text(seq, ts, tenant, kind, scope, actor, request_id, payload_json)
        if sha256(f"{prev_hash}\n{record}".encode()).hexdigest() != h:
            problems.append(ChainProblem(seq, "hash does not match the event's contents"))
        expected_seq, expected_prev = seq + 1, h
    return checked, problems


@dataclass(frozen=True)
class Compaction:
    deleted: int  # events removed by this step (0: nothing may go yet)
    base_seq: int  # the base after the step: the last event removed, or the unchanged base
    base_hash: str


def compact(conn: apsw.Connection, *, floor: int | None, cutoff: float, max_rows: int) -> Compaction:
    """Remove the oldest events that every reader has passed and that are older than `cutoff`,
    at most `max_rows` of them, and move `journal_base` to the last one removed.

    The mechanism only: the caller owns the policy. `floor` is the highest seq every durable
    reader of the journal has already processed (the minimum of their cursors; None when there
    are none); nothing above it goes. Moving the base keeps `verify_chain` anchored on a known
    hash and `head` right even when no event remains. Run it in the writer's transaction
    (`Catalog.mutate`), which is also where the caller records that it compacted: reading the
    floor, deleting and moving the base then happen atomically.
    """
    base_seq, base_hash = base(conn)
    limit = base_seq + max_rows
    if floor is not None:
        limit = min(limit, int(floor))
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
        return Compaction(0, base_seq, base_hash)
    through, h = int(row[0]), str(row[1])
    deleted = int(conn.execute("SELECT count(*) FROM journal WHERE seq <= ?", (through,)).fetchone()[0])
    conn.execute("DELETE FROM journal WHERE seq <= ?", (through,))
    conn.execute("UPDATE journal_base SET seq = ?, hash = ? WHERE id = 1", (through, h))
    return Compaction(deleted, through, h)
