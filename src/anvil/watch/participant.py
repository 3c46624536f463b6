"""Watch's recovery participant: consumers, their cursors and checkpoints over the journal.

`summary` and `validate` take a plain record-store connection, so they work on a live
server's reader (the watch status endpoint) as well as on a restored copy no server has
opened yet. The journal's own chain is the journal participant's check, not repeated here.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from typing import Any

from anvil.storage import journal
from anvil.storage.records import Connection, table_exists
from anvil.storage.recovery import Finding, Participant, RecoveryContext
from anvil.watch.events import Scope as _Scope
from anvil.watch.events import in_scope, parse_kinds, project

TABLES = ["watch_consumers"]
MAX_FIXTURES = 20
SCAN_LIMIT = 10_000  # events scanned past a cursor to find the next one in scope
STREAM_TIMEOUT = 20.0


def _consumer_rows(conn: Connection) -> list[dict[str, Any]]:
    if not table_exists(conn, "watch_consumers"):
        return []  # a catalog from before the watch migration: no consumers
    rows = conn.execute("SELECT tenant, name, bucket, prefix, kinds, cursor FROM watch_consumers "
                        "ORDER BY tenant, name").fetchall()
    return [{"tenant": r[0], "name": r[1], "bucket": r[2], "prefix": r[3] or "", "kinds": json.loads(r[4] or "[]"),
             "cursor": int(r[5])} for r in rows]


def _scope(c: dict[str, Any]) -> _Scope:
    return _Scope(tenant=c["tenant"], bucket=c["bucket"], prefix=c["prefix"], kinds=parse_kinds(c["kinds"] or None))


def next_event(conn: Any, c: dict[str, Any]) -> dict[str, Any] | None:
    """The first event after the consumer's cursor that its scope selects (within SCAN_LIMIT)."""
    scope = _scope(c)
    after = c["cursor"]
    scanned = 0
    while scanned < SCAN_LIMIT:
        batch = journal.read(conn, after, 500)
        if not batch:
            return None
        for ev in batch:
            we = project(ev)
            if in_scope(scope, we):
                return {"seq": we.seq, "kind": we.kind}
        after = batch[-1].seq
        scanned += len(batch)
    return None


def _read_stream(client: Any, params: dict[str, Any], after: int, until: Any) -> tuple[list[dict[str, Any]], str]:
    """Events from a watch opened at `after` until `until(event)` is true; on a thread, bounded in time."""
    got: list[dict[str, Any]] = []
    error: list[str] = []
    stream = client.watch(after=after, heartbeat=1.0, reconnect=False, **params)

    def run() -> None:
        try:
            for ev in stream:
                got.append(ev)
                if until(ev):
                    return
        except Exception as e:  # noqa: BLE001 - reported below as the reason the proof failed
            error.append(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(STREAM_TIMEOUT)
    stream.close()
    return got, (error[0] if error else "" if not t.is_alive() else f"no matching event within {STREAM_TIMEOUT}s")


def _params(fx: dict[str, Any]) -> dict[str, Any]:
    p: dict[str, Any] = {"tenant": fx["tenant"], "kinds": fx["kinds"] or None}
    if fx["bucket"]:
        p["bucket"] = fx["bucket"]
        p["prefix"] = fx["prefix"]
    return p


def _consumers(conn: Connection) -> list[tuple[str, str, int]]:
    if not table_exists(conn, "watch_consumers"):
        return []  # a catalog from before the watch migration: no consumers
    rows = conn.execute("SELECT tenant, name, cursor FROM watch_consumers ORDER BY tenant, name").fetchall()
    return [(r[0], r[1], int(r[2])) for r in rows]


def summary(conn: Connection, *, count_events: bool = True) -> dict[str, Any]:
    """Head seq and chain hash, the compaction base, and every consumer's cursor, with a digest.

    `count_events=False` (the status endpoint) takes the number of events held from the bounds:
    the journal is gapless, so it holds exactly base+1..head, and the answer costs two index
    lookups instead of a count over the whole journal. Recovery keeps the count, which is what
    would notice a journal that lost rows."""
    head_seq, head_hash = journal.head(conn)
    base_seq, base_hash = journal.base(conn)
    if count_events:
        events = int(conn.execute("SELECT count(*) FROM journal").fetchone()[0])
    else:
        events = head_seq - base_seq
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
    """Findings (empty when all is well): every cursor <= head, and, given the
    summary recorded at backup time, that the restored state matches it."""
    findings: list[dict[str, Any]] = []
    head_seq, head_hash = journal.head(conn)
    base_seq = journal.base(conn)[0]
    for tenant, name, cursor in _consumers(conn):
        if cursor > head_seq:
            findings.append({"severity": "error", "code": "watch.cursor_ahead", "consumer": f"{tenant}/{name}",
                             "message": f"consumer {tenant}/{name} cursor {cursor} is beyond the head {head_seq}",
                             "cursor": cursor, "head": head_seq})
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


class WatchParticipant(Participant):
    name = "watch"
    kind = "source"
    covers = ["watch"]
    owns = ["catalog.db: watch_consumers (the journal itself is the journal participant's)"]
    tables = TABLES
    replays = ("watch.",)

    def migrations(self) -> dict[str, list[str]]:
        from anvil.watch.consumers import MIGRATIONS

        return {"watch": MIGRATIONS}

    def apply(self, ctx: RecoveryContext, event: Any) -> None:
        p, conn = event.payload, ctx.conn
        if event.kind == "watch.consumer.create":
            conn.execute("INSERT INTO watch_consumers(tenant, name, bucket, prefix, kinds, cursor, created, updated, "
                         "created_by) VALUES (?,?,?,?,?,?,?,?,?)",
                         (event.tenant, p["consumer"], p.get("bucket"), p.get("prefix") or "",
                          json.dumps(p["kinds"]), p["cursor"], event.ts, event.ts, event.actor))
        elif event.kind == "watch.consumer.delete":
            conn.execute("DELETE FROM watch_consumers WHERE tenant = ? AND name = ?", (event.tenant, p["consumer"]))
        elif event.kind == "watch.checkpoint":
            conn.execute("UPDATE watch_consumers SET cursor = ?, updated = ? WHERE tenant = ? AND name = ?",
                         (p["cursor"], event.ts, event.tenant, p["consumer"]))
        elif event.kind == "watch.compact":
            journal.rebase(conn, int(p["through_seq"]), p["hash"])
        else:
            raise ValueError(f"watch cannot replay event kind {event.kind!r}")

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        s = summary(ctx.conn)
        fx = []
        for c in _consumer_rows(ctx.conn)[:MAX_FIXTURES]:
            fx.append({**c, "next": next_event(ctx.conn, c)})
        return {**s, "fixtures": fx}

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        findings = []
        problems = validate(ctx.conn, recorded)
        ctx.checked.update({"watch.cursor_ahead", "watch.cursor_expired"})
        ctx.stats["watch"] = {"cursors": len(_consumers(ctx.conn)), "head": journal.head(ctx.conn)[0]}
        for p in problems:
            consumer = p.get("consumer")
            affected = {"source": "watch_consumers", "consumer": consumer} if consumer else {}
            identity = dict(affected) if consumer else None
            if "cursor" in p:
                affected.update(cursor=p["cursor"], head=p["head"])
            findings.append(self.finding(p["severity"], f"consumer {consumer}" if consumer else p["code"],
                                         p["message"], p["code"], affected, identity=identity,
                                         cursor=str(p["cursor"]) if "cursor" in p else None))
        if recorded:
            current = summary(ctx.conn)["consumers"]
            for name, cursor in (recorded.get("consumers") or {}).items():
                if name in current and current[name] > cursor:
                    findings.append(self.finding("error", f"consumer {name}",
                                                 f"consumer {name} cursor {current[name]} is ahead of the recorded "
                                                 f"{cursor}: events between them would be skipped",
                                                 "watch.cursor_ahead_of_recorded", {"consumer": name}))
            for fx in recorded.get("fixtures", []):
                now = next_event(ctx.conn, fx)
                if now != fx.get("next"):
                    findings.append(self.finding("error", f"consumer {fx['tenant']}/{fx['name']}",
                                                 f"next event after cursor {fx['cursor']} is {now}, "
                                                 f"recorded {fx.get('next')}", "watch.next_event_differs"))
        if not findings:
            s = ctx.stats["watch"]
            findings.append(self.finding("info", "watch", f"{s['cursors']} consumers at or below head {s['head']}"
                                         + ("; cursors match the manifest" if recorded else "")))
        return findings

    def smoke(self, client: Any, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        findings: list[Finding] = []
        proved = 0
        for fx in (recorded or {}).get("fixtures", []):
            if fx.get("next") is None:
                continue  # at the head of its scope: proved after resume, with a write
            subject = f"consumer {fx['tenant']}/{fx['name']}"
            got, err = _read_stream(client, _params(fx), fx["cursor"], lambda ev: True)
            if not got:
                findings.append(self.finding("error", subject, f"watch from cursor {fx['cursor']} delivered "
                                                               f"nothing: {err}"))
            elif (got[0]["seq"], got[0]["kind"]) != (fx["next"]["seq"], fx["next"]["kind"]):
                findings.append(self.finding("error", subject, f"first event after cursor {fx['cursor']} is "
                                                               f"{got[0]['seq']} {got[0]['kind']}, recorded "
                                                               f"{fx['next']['seq']} {fx['next']['kind']}"))
            proved += 1
        status = client.watch_status()
        if not findings:
            findings.append(self.finding("info", "watch", f"{proved} consumers resumed from their recorded cursors "
                                                          f"and received the recorded next event; head "
                                                          f"{status.get('head', status.get('head_seq'))}"))
        return findings

    def smoke_resumed(self, client: Any, ctx: RecoveryContext,
                      recorded: dict[str, Any] | None = None) -> list[Finding]:
        """Write into a recorded consumer's scope; a watch from its recorded cursor must deliver every
        event up to that write, starting with the recorded next one."""
        candidates = [fx for fx in (recorded or {}).get("fixtures", [])
                      if fx["bucket"] and parse_kinds(fx["kinds"] or None).matches("object.put")]
        if not candidates:
            return [self.finding("info", "watch", "no recorded consumer watches object writes in a bucket")]
        fx = candidates[0]
        subject = f"consumer {fx['tenant']}/{fx['name']}"
        key = f"{fx['prefix']}drill-watch-{uuid.uuid4().hex[:8]}"
        put = client.put_object(fx["bucket"], key, b"drill watch probe")
        try:
            got, err = _read_stream(client, _params(fx), fx["cursor"], lambda ev: ev.get("key") == key)
        finally:
            client.delete_object(fx["bucket"], key, version_id=put.get("version_id"))
        if not got or got[-1].get("key") != key:
            return [self.finding("error", subject, f"the write after resume did not arrive: {err}")]
        seqs = [ev["seq"] for ev in got]
        if seqs != sorted(set(seqs)):
            return [self.finding("error", subject, "events arrived out of order or repeated")]
        if fx.get("next") and seqs[0] != fx["next"]["seq"]:
            return [self.finding("error", subject, f"first event {seqs[0]}, recorded {fx['next']['seq']}")]
        return [self.finding("info", subject, f"watch from recorded cursor {fx['cursor']} delivered {len(got)} "
                                              f"events in order, ending with the write made after resume")]
