"""`repair`: rebuild registered derived families from source records.

Derived structures (indexes, projections, ...) register a rebuild function here. Repair
never edits source records; it only rebuilds what can be recomputed from them, and every
run records a finding saying what it attempted and how it went. With no family registered
(today: none exist yet) it records that, so the operator sees the run happened and did
nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anvil.context import RequestContext
from anvil.diagnostics import findings as fnd
from anvil.errors import AnvilError
from anvil.storage import Storage


@dataclass(frozen=True)
class RepairContext:
    storage: Storage
    derived_root: Path  # the family writes a new generation under derived/<family>/
    head_seq: int  # journal head when the rebuild started: the cursor the new generation covers


@dataclass(frozen=True)
class DerivedFamily:
    name: str
    rebuild: Callable[[RepairContext], dict[str, Any]]  # returns a short JSON-able summary
    description: str = ""


_FAMILIES: dict[str, DerivedFamily] = {}


def register_family(family: DerivedFamily) -> None:
    _FAMILIES[family.name] = family


def unregister_family(name: str) -> None:
    _FAMILIES.pop(name, None)


def families() -> list[str]:
    return sorted(_FAMILIES)


def run_repair(storage: Storage, ctx: RequestContext, names: list[str] | None = None) -> dict[str, Any]:
    """Rebuild `names` (default: every registered family). Unknown names are refused before
    anything runs; each rebuild's outcome is recorded as a finding."""
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise AnvilError("InvalidArgument", "families must be a list of names")
    unknown = sorted(set(names or []) - _FAMILIES.keys())
    if unknown:
        raise AnvilError("InvalidArgument", f"unknown derived family: {', '.join(unknown)}")
    selected = sorted(set(names)) if names else families()
    run_id = uuid.uuid4().hex
    results: list[dict[str, Any]] = []
    to_record: list[fnd.Finding] = []
    if not selected:
        to_record.append(fnd.make_finding(
            "diagnostics", "info", "repair.nothing_registered",
            "repair ran but no derived families are registered: there was nothing to rebuild",
            {"families": []}, identity={"run_id": run_id}, origin="repair", run_id=run_id,
            resolved_at=0.0, resolution="nothing to rebuild",
        ))
    for name in selected:
        fam = _FAMILIES[name]
        rctx = RepairContext(storage, storage.layout.derived / name, storage.catalog.head()[0])
        try:
            summary = fam.rebuild(rctx)
            results.append({"family": name, "ok": True, "summary": summary})
            to_record.append(fnd.make_finding(
                "diagnostics", "info", "repair.rebuilt", f"rebuilt derived family {name} from source records",
                {"family": name, "summary": summary}, identity={"run_id": run_id, "family": name},
                origin="repair", run_id=run_id, cursor=str(rctx.head_seq), repair_attempted=True,
                repair_result="rebuilt", resolved_at=0.0, resolution="rebuilt",
            ))
        except Exception as e:  # noqa: BLE001 - a failed rebuild is recorded, not raised
            results.append({"family": name, "ok": False, "error": str(e)})
            to_record.append(fnd.make_finding(
                "diagnostics", "error", "repair.failed", f"rebuilding derived family {name} failed: {e}",
                {"family": name}, identity={"run_id": run_id, "family": name}, origin="repair", run_id=run_id,
                cursor=str(rctx.head_seq), repair_attempted=True, repair_result=f"failed: {e}",
                operator_action_required=True,
            ))
    recorded = fnd.record_many(storage.catalog, to_record, actor=ctx.actor, request_id=ctx.request_id)
    return {"run_id": run_id, "families": selected, "results": results,
            "ok": all(r["ok"] for r in results), "findings": [f.to_dict() for f in recorded]}
