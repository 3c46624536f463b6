"""`repair`: rebuild derived participants from source records.

Derived structures (indexes, projections, ...) are recovery participants of kind `derived`;
repair runs their `rebuild`, the same operation restore uses for an invalid generation. It
never edits source records, and every run records a finding saying what it attempted and how
it went. With no derived participant (today: none exist yet) it records that, so the
operator sees the run happened and did nothing.
"""

from __future__ import annotations

import uuid
from typing import Any

from anvil.context import RequestContext
from anvil.diagnostics import findings as fnd
from anvil.errors import AnvilError
from anvil.storage import Storage
from anvil.storage.recovery import Participant, RecoveryContext, has_errors


def run_repair(storage: Storage, participants: list[Participant], ctx: RequestContext,
               names: list[str] | None = None) -> dict[str, Any]:
    """Rebuild `names` (default: every derived participant). Unknown names are refused before
    anything runs; each rebuild's outcome is recorded as a finding."""
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise AnvilError("InvalidArgument", "families must be a list of names")
    derived = {p.name: p for p in participants if p.kind == "derived"}
    unknown = sorted(set(names or []) - derived.keys())
    if unknown:
        raise AnvilError("InvalidArgument", f"unknown derived family: {', '.join(unknown)}")
    selected = sorted(set(names)) if names else sorted(derived)
    run_id = uuid.uuid4().hex
    results: list[dict[str, Any]] = []
    to_record: list[fnd.FindingRecord] = []
    if not selected:
        to_record.append(fnd.make_finding(
            "diagnostics", "info", "repair.nothing_registered",
            "repair ran but no derived families are registered: there was nothing to rebuild",
            {"families": []}, identity={"run_id": run_id}, origin="repair", run_id=run_id,
            resolved_at=0.0, resolution="nothing to rebuild",
        ))
    for name in selected:
        head_seq = storage.catalog.head()[0]
        rctx = RecoveryContext(storage.root, storage.catalog.reader(), storage.blobs, participants)
        try:
            found = derived[name].rebuild(rctx)
            if has_errors(found):
                raise RuntimeError("; ".join(f.message for f in found if f.severity == "error"))
            summary = [f.to_dict() for f in found]
            results.append({"family": name, "ok": True, "summary": summary})
            to_record.append(fnd.make_finding(
                "diagnostics", "info", "repair.rebuilt", f"rebuilt derived family {name} from source records",
                {"family": name, "summary": summary}, identity={"run_id": run_id, "family": name},
                origin="repair", run_id=run_id, cursor=str(head_seq), repair_attempted=True,
                repair_result="rebuilt", resolved_at=0.0, resolution="rebuilt",
            ))
        except Exception as e:  # noqa: BLE001 - a failed rebuild is recorded, not raised
            results.append({"family": name, "ok": False, "error": str(e)})
            to_record.append(fnd.make_finding(
                "diagnostics", "error", "repair.failed", f"rebuilding derived family {name} failed: {e}",
                {"family": name}, identity={"run_id": run_id, "family": name}, origin="repair", run_id=run_id,
                cursor=str(head_seq), repair_attempted=True, repair_result=f"failed: {e}",
                operator_action_required=True,
            ))
    recorded = fnd.record_many(storage.catalog, to_record, actor=ctx.actor, request_id=ctx.request_id)
    return {"run_id": run_id, "families": selected, "results": results,
            "ok": all(r["ok"] for r in results), "findings": [f.to_dict() for f in recorded]}
