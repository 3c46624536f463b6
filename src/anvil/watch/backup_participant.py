"""The watch subsystem's recovery participant: watch logs, durable consumers' cursors and checkpoints.

The summary records, besides `anvil.watch.summary`, one fixture per consumer: its scope,
cursor and the seq/kind of the next event in its scope. The drill proves, through the
public API, that a watch opened from the recorded cursor delivers exactly that event first,
and after resume that a write made in the consumer's scope arrives too (no loss).
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

from anvil.backup.participant import Finding, Participant, RecoveryContext
from anvil.storage import journal
from anvil.watch import recovery as wr
from anvil.watch.events import Scope as _Scope
from anvil.watch.events import in_scope, parse_kinds, project

MAX_FIXTURES = 20
SCAN_LIMIT = 10_000  # events scanned past a cursor to find the next one in scope
STREAM_TIMEOUT = 20.0


def _consumer_rows(conn: Any) -> list[dict[str, Any]]:
    try:
        rows = conn.execute("SELECT tenant, name, bucket, prefix, kinds, cursor FROM watch_consumers "
                            "ORDER BY tenant, name").fetchall()
    except Exception:  # noqa: BLE001 - a catalog without the watch migration has no consumers
        return []
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


class WatchParticipant(Participant):
    name = "watch"
    kind = "source"
    covers = ["watch"]
    owns = ["catalog.db: " + ", ".join(wr.OWNS["tables"])]

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        s = wr.summary(ctx.conn)
        fx = []
        for c in _consumer_rows(ctx.conn)[:MAX_FIXTURES]:
            fx.append({**c, "next": next_event(ctx.conn, c)})
        return {**s, "fixtures": fx}

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        findings = []
        for p in wr.validate(ctx.conn, recorded):
            subject = p.get("consumer") and f"consumer {p['consumer']}" or p.get("code", "watch")
            findings.append(self.finding(p["severity"], subject, p["message"]))
        if recorded:
            current = wr.summary(ctx.conn)["consumers"]
            for name, cursor in (recorded.get("consumers") or {}).items():
                if name in current and current[name] > cursor:
                    findings.append(self.finding("error", f"consumer {name}",
                                                 f"consumer {name} cursor {current[name]} is ahead of the recorded "
                                                 f"{cursor}: events between them would be skipped"))
            for fx in recorded.get("fixtures", []):
                now = next_event(ctx.conn, fx)
                if now != fx.get("next"):
                    findings.append(self.finding("error", f"consumer {fx['tenant']}/{fx['name']}",
                                                 f"next event after cursor {fx['cursor']} is {now}, "
                                                 f"recorded {fx.get('next')}"))
        if not findings:
            s = wr.summary(ctx.conn)
            findings.append(self.finding("info", "watch", f"{s['consumer_count']} consumers at or below head "
                                                          f"{s['head_seq']}; chain intact; cursors match the manifest"))
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
