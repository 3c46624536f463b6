"""Recovery participant data for watch logs, consumers and checkpoints (wired in by the backup engine).

Both functions take a plain read connection to `catalog.db`, so they work on a live server's
reader as well as on a restored copy that no server has opened yet.
"""

from __future__ import annotations

import hashlib
from typing import Any

from anvil.storage import journal
from anvil.storage.records import Connection, table_exists

OWNS = {
    "name": "watch",
    "kind": "source",
    "covers": "watch logs, cursors and checkpoints",
    "tables": ["journal", "journal_base", "watch_consumers"],
}


def _consumers(conn: Connection) -> list[tuple[str, str, int]]:
    if not table_exists(conn, "watch_consumers"):
        return []  # a catalog from before the watch migration: no consumers
    rows = conn.execute("SELECT tenant, name, cursor FROM watch_consumers ORDER BY tenant, name").fetchall()
    return [(r[0], r[1], int(r[2])) for r in rows]


def summary(conn: Connection) -> dict[str, Any]:
    """Head seq and chain hash, the compaction base, and every consumer's cursor, with a digest."""
    head_seq, head_hash = journal.head(conn)
    base_seq, base_hash = journal.base(conn)
    events = int(conn.execute("SELECT count(*) FROM journal").fetchone()[0])
    consumers = _consumers(conn)
    digest = hashlib.sha256("\n".join(f"{t}\t{n}\t{c}" for t, n, c in consumers).encode()).hexdigest()
    return {
        "head_seq": head_seq,
        "head_hash": head_hash,
        "base_seq": base_seq,
        "base_hash": base_hash,
        "events": events,
        "consumers": {f"{t}/{n}": c for t, n, c in consumers},
        "consumer_count": len(consumers),
        "consumers_digest": digest,
    }


def validate(conn: Connection, expected: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Findings (empty when all is well): chain intact, every cursor <= head, and, given the
    summary recorded at backup time, that the restored state matches it."""
    findings: list[dict[str, Any]] = []
    head_seq, head_hash = journal.head(conn)
    _, problems = journal.verify_chain(conn)
    for p in problems[:100]:
        findings.append({"severity": "error", "code": "journal.chain", "seq": p.seq, "message": p.problem})
    if len(problems) > 100:
        findings.append({"severity": "error", "code": "journal.chain",
                         "message": f"{len(problems) - 100} more chain problems"})
    base_seq = journal.base(conn)[0]
    for tenant, name, cursor in _consumers(conn):
        if cursor > head_seq:
            findings.append({"severity": "error", "code": "watch.cursor_beyond_head", "consumer": f"{tenant}/{name}",
                             "message": f"consumer {tenant}/{name} cursor {cursor} is beyond the head {head_seq}"})
        elif cursor < base_seq:
            findings.append({"severity": "warning", "code": "watch.cursor_expired", "consumer": f"{tenant}/{name}",
                             "message": f"consumer {tenant}/{name} cursor {cursor} is below the oldest "
                                        f"available cursor {base_seq}"})
    if expected is not None:
        if head_seq < int(expected.get("head_seq", 0)):
            findings.append({"severity": "error", "code": "watch.head_behind",
                             "message": f"journal head {head_seq} is behind the recorded {expected['head_seq']}"})
        elif head_seq == int(expected.get("head_seq", -1)) and head_hash != expected.get("head_hash"):
            findings.append({"severity": "error", "code": "watch.head_hash",
                             "message": f"journal head {head_seq} hash differs from the recorded hash"})
        recorded = expected.get("consumers") or {}
        current = {f"{t}/{n}": c for t, n, c in _consumers(conn)}
        for name, cursor in recorded.items():
            if name not in current:
                findings.append({"severity": "error", "code": "watch.consumer_missing", "consumer": name,
                                 "message": f"consumer {name} recorded in the backup is missing"})
            elif current[name] < cursor:
                findings.append({"severity": "error", "code": "watch.cursor_regressed", "consumer": name,
                                 "message": f"consumer {name} cursor {current[name]} is behind the recorded {cursor}"})
    return findings
