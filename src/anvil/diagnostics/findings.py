"""Findings: source records of every invariant fsck, gc or repair found broken (or fixed).

A finding is never deleted; it is resolved (with a time and a reason). Recording one goes
through `Catalog.mutate` and appends a `diagnostics.finding` journal event, so findings are
backed up, replayable and watchable like any other source record.
"""

from __future__ import annotations

import copy
import hashlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from anvil.context import Principal
from anvil.errors import AnvilError
from anvil.objects.validation import RESERVED_PREFIX
from anvil.storage import Catalog, Txn
from anvil.storage.records import Connection
from anvil.storage.recovery import Finding

SEVERITIES = ("error", "warning", "info")
REDACTED = "[redacted]"

MIGRATIONS = [
    """
    CREATE TABLE findings(
        id TEXT PRIMARY KEY,
        time REAL NOT NULL,
        subsystem TEXT NOT NULL,
        severity TEXT NOT NULL CHECK (severity IN ('error', 'warning', 'info')),
        invariant TEXT NOT NULL,
        detail TEXT NOT NULL,
        affected TEXT NOT NULL,
        cursor TEXT,
        origin TEXT NOT NULL,
        run_id TEXT,
        fingerprint TEXT NOT NULL,
        repair_attempted INTEGER NOT NULL DEFAULT 0,
        repair_result TEXT,
        operator_action_required INTEGER NOT NULL DEFAULT 0,
        resolved_at REAL,
        resolution TEXT
    );
    CREATE INDEX findings_time ON findings(time);
    CREATE INDEX findings_open ON findings(fingerprint) WHERE resolved_at IS NULL;
    """,
]

_COLUMNS = (
    "id, time, subsystem, severity, invariant, detail, affected, cursor, origin, run_id, fingerprint, "
    "repair_attempted, repair_result, operator_action_required, resolved_at, resolution"
)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class FindingRecord:
    subsystem: str
    severity: str
    invariant: str
    detail: str
    affected: dict[str, Any]
    fingerprint: str
    origin: str = "fsck"
    cursor: str | None = None
    run_id: str | None = None
    repair_attempted: bool = False
    repair_result: str | None = None
    operator_action_required: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    time: float = 0.0
    resolved_at: float | None = None
    resolution: str | None = None

    @classmethod
    def from_row(cls, row: tuple) -> FindingRecord:
        return cls(
            id=row[0], time=row[1], subsystem=row[2], severity=row[3], invariant=row[4], detail=row[5],
            affected=json.loads(row[6]), cursor=row[7], origin=row[8], run_id=row[9], fingerprint=row[10],
            repair_attempted=bool(row[11]), repair_result=row[12], operator_action_required=bool(row[13]),
            resolved_at=row[14], resolution=row[15],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "time": self.time, "subsystem": self.subsystem, "severity": self.severity,
            "invariant": self.invariant, "detail": self.detail, "affected": self.affected, "cursor": self.cursor,
            "origin": self.origin, "run_id": self.run_id, "fingerprint": self.fingerprint,
            "repair_attempted": self.repair_attempted, "repair_result": self.repair_result,
            "operator_action_required": self.operator_action_required, "resolved_at": self.resolved_at,
            "resolution": self.resolution,
        }

    @property
    def tenants(self) -> set[str]:
        return finding_tenants(self.affected)


def make_finding(
    subsystem: str, severity: str, invariant: str, detail: str, affected: dict[str, Any], *,
    identity: dict[str, Any] | None = None, origin: str = "fsck", cursor: str | None = None,
    run_id: str | None = None, repair_attempted: bool = False, repair_result: str | None = None,
    operator_action_required: bool = False, resolved_at: float | None = None, resolution: str | None = None,
) -> FindingRecord:
    """Build a finding. `identity` (default: `affected`) names the broken thing, without
    volatile details like an age, so a re-run of fsck recognises a finding it already recorded."""
    if severity not in SEVERITIES:
        raise AnvilError("InvalidArgument", f"severity must be one of {', '.join(SEVERITIES)}")
    ident = affected if identity is None else identity
    fp = hashlib.sha256(_canonical([subsystem, invariant, ident]).encode()).hexdigest()
    return FindingRecord(
        subsystem=subsystem, severity=severity, invariant=invariant, detail=detail, affected=affected,
        fingerprint=fp, origin=origin, cursor=cursor, run_id=run_id, repair_attempted=repair_attempted,
        repair_result=repair_result, operator_action_required=operator_action_required,
        resolved_at=resolved_at, resolution=resolution,
    )


# ------------------------------------------------------------------ writes (Catalog.mutate only)


def _insert(txn: Txn, f: FindingRecord) -> FindingRecord:
    f = replace(f, time=txn.now, resolved_at=txn.now if f.resolved_at is not None else None)
    txn.conn.execute(
        f"INSERT INTO findings({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (f.id, f.time, f.subsystem, f.severity, f.invariant, f.detail, _canonical(f.affected), f.cursor,
         f.origin, f.run_id, f.fingerprint, int(f.repair_attempted), f.repair_result,
         int(f.operator_action_required), f.resolved_at, f.resolution),
    )
    tenants = sorted(f.tenants)
    txn.emit(tenants[0] if len(tenants) == 1 else "system", "diagnostics.finding", f.subsystem, f.to_dict())
    return f


def replay(conn: Connection, ev: Any) -> None:
    """Rebuild the rows of a `diagnostics.finding` (its payload is the whole row) or `diagnostics.resolve`."""
    p = ev.payload
    if ev.kind == "diagnostics.finding":
        f = FindingRecord(**{k: p[k] for k in FindingRecord.__dataclass_fields__ if k in p})
        conn.execute(
            f"INSERT INTO findings({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (f.id, f.time, f.subsystem, f.severity, f.invariant, f.detail, _canonical(f.affected), f.cursor,
             f.origin, f.run_id, f.fingerprint, int(f.repair_attempted), f.repair_result,
             int(f.operator_action_required), f.resolved_at, f.resolution),
        )
    elif ev.kind == "diagnostics.resolve":
        conn.execute("UPDATE findings SET resolved_at = ?, resolution = ? WHERE id = ?",
                     (ev.ts, p["resolution"], p["id"]))
    else:
        raise ValueError(f"diagnostics cannot replay event kind {ev.kind!r}")


def record(catalog: Catalog, finding: FindingRecord, *, actor: str, request_id: str,
           dedupe: bool = False) -> FindingRecord:
    """Record one finding (one mutation, one journal event).

    With `dedupe`, an unresolved finding with the same fingerprint is returned instead of a
    second copy: fsck re-run every hour must not pile up identical records."""
    return record_many(catalog, [finding], actor=actor, request_id=request_id, dedupe=dedupe)[0]


def record_many(
    catalog: Catalog, findings: Iterable[FindingRecord], *, actor: str, request_id: str, dedupe: bool = False
) -> list[FindingRecord]:
    """Record each finding as its own mutation; they are queued together so group commit
    makes hundreds of them cost one fsync, not hundreds."""

    def job(f: FindingRecord):
        def fn(txn: Txn) -> FindingRecord:
            if dedupe:
                row = txn.conn.execute(
                    f"SELECT {_COLUMNS} FROM findings WHERE fingerprint = ? AND resolved_at IS NULL LIMIT 1",
                    (f.fingerprint,),
                ).fetchone()
                if row is not None:
                    return FindingRecord.from_row(row)
            return _insert(txn, f)

        return fn

    futures = [catalog.submit(job(f), actor=actor, request_id=request_id) for f in findings]
    return [fut.result() for fut in futures]


def resolve(catalog: Catalog, finding_id: str, resolution: str, *, actor: str, request_id: str) -> FindingRecord:
    """Mark a finding resolved (a `diagnostics.resolve` event). Resolving twice is refused."""
    if not isinstance(resolution, str) or not resolution.strip() or len(resolution) > 2000:
        raise AnvilError("InvalidArgument", "a resolution (1-2000 characters) is required")

    def fn(txn: Txn) -> FindingRecord:
        row = txn.conn.execute(f"SELECT {_COLUMNS} FROM findings WHERE id = ?", (finding_id,)).fetchone()
        if row is None:
            raise AnvilError("NotFound", "finding not found")
        f = FindingRecord.from_row(row)
        if f.resolved_at is not None:
            raise AnvilError("PreconditionFailed", "the finding is already resolved")
        txn.conn.execute("UPDATE findings SET resolved_at = ?, resolution = ? WHERE id = ?",
                         (txn.now, resolution, finding_id))
        tenants = sorted(f.tenants)
        txn.emit(tenants[0] if len(tenants) == 1 else "system", "diagnostics.resolve", f.subsystem,
                 {"id": finding_id, "resolution": resolution, "fingerprint": f.fingerprint})
        return replace(f, resolved_at=txn.now, resolution=resolution)

    return catalog.mutate(fn, actor=actor, request_id=request_id)


def resolve_missing(
    catalog: Catalog, *, origin: str, invariants: set[str], still_present: set[str], resolution: str,
    actor: str, request_id: str,
) -> list[str]:
    """Resolve unresolved findings of `origin` whose invariant was checked again and whose
    fingerprint was not seen: the problem is gone. Returns the resolved ids."""
    conn = catalog.reader()
    stale = [
        r[0] for r in conn.execute(
            "SELECT id, invariant, fingerprint FROM findings WHERE resolved_at IS NULL AND origin = ?", (origin,)
        ).fetchall()
        if r[1] in invariants and r[2] not in still_present
    ]
    done: list[str] = []
    for fid in stale:
        try:
            resolve(catalog, fid, resolution, actor=actor, request_id=request_id)
            done.append(fid)
        except AnvilError as e:
            if e.code != "PreconditionFailed":  # resolved concurrently: fine
                raise
    return done


# ------------------------------------------------------------------ reads


def list_findings(
    conn: Connection, *, subsystem: str | None = None, severity: str | None = None,
    unresolved: bool = False, limit: int = 1000,
) -> list[FindingRecord]:
    """Newest first. Bad filters are refused rather than silently matching nothing."""
    if severity is not None and severity not in SEVERITIES:
        raise AnvilError("InvalidArgument", f"severity must be one of {', '.join(SEVERITIES)}")
    if subsystem is not None and (not subsystem or len(subsystem) > 64):
        raise AnvilError("InvalidArgument", "subsystem must be 1-64 characters")
    if not 1 <= limit <= 10000:
        raise AnvilError("InvalidArgument", "limit must be between 1 and 10000")
    sql = f"SELECT {_COLUMNS} FROM findings WHERE 1=1"
    args: list[Any] = []
    if subsystem is not None:
        sql += " AND subsystem = ?"
        args.append(subsystem)
    if severity is not None:
        sql += " AND severity = ?"
        args.append(severity)
    if unresolved:
        sql += " AND resolved_at IS NULL"
    sql += " ORDER BY time DESC, id LIMIT ?"
    args.append(limit)
    return [FindingRecord.from_row(r) for r in conn.execute(sql, args).fetchall()]


def get_finding(conn: Connection, finding_id: str) -> FindingRecord:
    row = conn.execute(f"SELECT {_COLUMNS} FROM findings WHERE id = ?", (finding_id,)).fetchone()
    if row is None:
        raise AnvilError("NotFound", "finding not found")
    return FindingRecord.from_row(row)


# ------------------------------------------------------------------ tenant scoping


def finding_tenants(affected: dict[str, Any]) -> set[str]:
    """Every tenant a finding is about: `affected.tenant` and each `affected.references[].tenant`."""
    out: set[str] = set()
    t = affected.get("tenant")
    if isinstance(t, str):
        out.add(t)
    for ref in affected.get("references") or []:
        if isinstance(ref, dict) and isinstance(ref.get("tenant"), str):
            out.add(ref["tenant"])
    return out


def visible_to(principal: Principal, finding: FindingRecord) -> bool:
    return principal.admin or principal.tenant in finding.tenants


def _mentions_reserved(value: Any) -> bool:
    if isinstance(value, str):
        return RESERVED_PREFIX in value
    if isinstance(value, dict):
        return any(_mentions_reserved(k) or _mentions_reserved(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_mentions_reserved(v) for v in value)
    return False


def _scrub_reserved(value: Any) -> Any:
    """Every string naming something under `_anvil/` becomes `[redacted]`, at any depth.

    Matched anywhere in a string, not only at its start: a detail, a `bucket/key` label or a
    cursor embeds the key in longer text. A tenant key that merely contains `_anvil/` after its
    first character is redacted too; hiding a little too much is the safe side."""
    if isinstance(value, str):
        return REDACTED if RESERVED_PREFIX in value else value
    if isinstance(value, dict):
        return {_scrub_reserved(k): _scrub_reserved(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_reserved(v) for v in value]
    return value


def redact_for(principal: Principal, findings: Iterable[FindingRecord]) -> list[dict[str, Any]]:
    """What `principal` may see: admins everything; anyone else only findings about its own
    tenant's resources, with every other tenant's names removed (a shared blob's other
    references become `[redacted]`, and a detail that could name them is replaced), and no
    name in Anvil's reserved namespace (`_anvil/` keys are Anvil's own, not the tenant's) in
    any field: such strings become `[redacted]` and the detail is replaced."""
    out: list[dict[str, Any]] = []
    for f in findings:
        if not visible_to(principal, f):
            continue
        d = f.to_dict()
        if principal.admin:
            out.append(d)
            continue
        affected = copy.deepcopy(f.affected)
        others = False
        if affected.get("tenant") not in (None, principal.tenant):
            affected["tenant"] = REDACTED
            others = True
        refs = affected.get("references")
        if isinstance(refs, list):
            new_refs = []
            for ref in refs:
                if isinstance(ref, dict) and ref.get("tenant") == principal.tenant:
                    new_refs.append(ref)
                else:
                    new_refs.append({k: REDACTED for k in (ref if isinstance(ref, dict) else {"tenant": 1})})
                    others = True
            affected["references"] = new_refs
        d["affected"] = affected
        if others:
            d["detail"] = f"{f.invariant}: details outside your tenant are redacted"
        if _mentions_reserved(d):
            d = _scrub_reserved(d)
            d["detail"] = f"{_scrub_reserved(f.invariant)}: names in Anvil's reserved namespace are redacted"
        out.append(d)
    return out


# ------------------------------------------------------------------ recovery participant


def summary(conn: Connection) -> dict[str, Any]:
    """Counts and a digest of every finding, for the backup manifest; compared after restore."""
    by_severity = dict.fromkeys(SEVERITIES, 0)
    digest = hashlib.sha256()
    count = unresolved = 0
    with conn:
        for row in conn.execute(f"SELECT {_COLUMNS} FROM findings ORDER BY id"):
            count += 1
            by_severity[row[3]] = by_severity.get(row[3], 0) + 1
            if row[14] is None:
                unresolved += 1
            digest.update(_canonical(list(row)).encode() + b"\n")
    return {"count": count, "by_severity": by_severity, "unresolved": unresolved, "digest": digest.hexdigest()}


def validate(conn: Connection, expected: dict[str, Any] | None = None) -> list[Finding]:
    """Check the findings table after a restore: rows well formed, fingerprints intact and,
    given the summary recorded at backup time, the same counts and digest. Returns
    (unrecorded) findings; the caller decides where to record them."""
    problems: list[Finding] = []

    def problem(invariant: str, detail: str, affected: dict[str, Any]) -> None:
        subject = f"{invariant} {affected.get('finding') or affected.get('field') or ''}".strip()
        problems.append(Finding("diagnostics", "error", subject, detail, invariant, affected))

    for row in conn.execute(f"SELECT {_COLUMNS} FROM findings ORDER BY id"):
        fid = row[0]
        if row[3] not in SEVERITIES:
            problem("findings.severity", f"finding {fid} has an unknown severity", {"finding": fid})
        try:
            affected = json.loads(row[6])
            if not isinstance(affected, dict):
                raise ValueError
        except ValueError:
            problem("findings.affected", f"finding {fid} has unreadable 'affected' JSON", {"finding": fid})
            continue
        if row[14] is not None and row[14] < row[1]:
            problem("findings.resolved_before_found", f"finding {fid} is resolved before it was found",
                    {"finding": fid})
    if expected is not None:
        actual = summary(conn)
        for k in ("count", "unresolved", "digest"):
            if expected.get(k) != actual[k]:
                problem("findings.summary", f"findings {k} differs from the backup manifest",
                        {"field": k, "expected": expected.get(k), "actual": actual[k]})
    return problems


def open_by_severity(conn: Connection) -> dict[str, int]:
    """Unresolved findings per severity (every severity present, zero included): the metrics gauge."""
    counts = dict.fromkeys(SEVERITIES, 0)
    for severity, n in conn.execute(
            "SELECT severity, COUNT(*) FROM findings WHERE resolved_at IS NULL GROUP BY severity").fetchall():
        counts[severity] = int(n)
    return counts
