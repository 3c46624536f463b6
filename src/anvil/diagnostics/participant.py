"""The diagnostics subsystem's recovery participant: diagnostic and repair findings."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from anvil.diagnostics import findings as df
from anvil.storage.recovery import Finding, Participant, RecoveryContext

MAX_FIXTURES = 20


def _fixtures(conn: Any) -> list[dict[str, Any]]:
    return [{"id": f.id, "severity": f.severity, "invariant": f.invariant, "resolved": f.resolved_at is not None}
            for f in df.list_findings(conn, limit=MAX_FIXTURES)]


class DiagnosticsParticipant(Participant):
    name = "diagnostics"
    kind = "source"
    covers = ["diagnostics"]
    owns = ["catalog.db: findings"]
    tables = ["findings"]
    replays = ("diagnostics.",)

    def migrations(self) -> dict[str, list[str]]:
        return {"diagnostics": df.MIGRATIONS}

    def apply(self, ctx: RecoveryContext, event: Any) -> None:
        df.replay(ctx.conn, event)

    def summary(self, ctx: RecoveryContext) -> dict[str, Any]:
        return {**df.summary(ctx.conn), "fixtures": _fixtures(ctx.conn)}

    def validate(self, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        expected = {k: v for k, v in recorded.items() if k != "fixtures"} if recorded else None
        ctx.checked.update({"findings.severity", "findings.affected", "findings.resolved_before_found"})
        out = [replace(p, message=p.message + (f" (manifest {p.affected.get('expected')!r}, restored "
                                               f"{p.affected.get('actual')!r})" if "expected" in p.affected else ""))
               for p in df.validate(ctx.conn, expected)]
        if not out:
            s = df.summary(ctx.conn)
            out.append(self.finding("info", "diagnostics", f"{s['count']} findings ({s['unresolved']} unresolved) "
                                                           "consistent with the manifest"))
        return out

    def smoke(self, client: Any, ctx: RecoveryContext, recorded: dict[str, Any] | None = None) -> list[Finding]:
        listed = {f["id"]: f for f in client.list_findings(limit=10000)}
        out: list[Finding] = []
        rec = recorded or {}
        if len(listed) < rec.get("count", 0):
            out.append(self.finding("error", "findings", f"the server lists {len(listed)} findings, "
                                                         f"the manifest recorded {rec['count']}"))
        for fx in rec.get("fixtures", []):
            got = listed.get(fx["id"])
            if got is None:
                out.append(self.finding("error", f"finding {fx['id']}", "recorded finding is not listed"))
            elif (got["severity"], got["invariant"], got["resolved_at"] is not None) != (
                    fx["severity"], fx["invariant"], fx["resolved"]):
                out.append(self.finding("error", f"finding {fx['id']}", "listed finding differs from the recorded one"))
        if not out:
            out.append(self.finding("info", "diagnostics", f"{len(listed)} findings listed; "
                                                           f"{len(rec.get('fixtures', []))} recorded ones match"))
        return out
