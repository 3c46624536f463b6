"""Recovery mode: the marker a restore leaves, validation through the participants, resume.

A restored STORAGE_PATH holds `RECOVERY` (JSON: which snapshot, what was recorded at backup
time, any restore problems). While it exists `anvil serve` refuses public writes with
`RecoveryMode`. `validate` walks the restore sequence (docs/backup.md) and writes
`recovery/validation.json` + `.md`; `resume` removes the marker only after a passing
validation at the current journal head, or when forced with a reason, and records that in
the journal either way.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from anvil.backup.errors import BackupError
from anvil.storage import Storage
from anvil.storage.layout import write_file_durably
from anvil.storage.recovery import NOT_PRESENT, Finding, Participant, RecoveryContext, has_errors

MARKER_FILE = "RECOVERY"
REPORT_DIR = "recovery"

# The restore sequence: (step, checklist items validated in it).
STEPS: list[tuple[str, list[str]]] = [
    ("validate object manifests and hashes", ["object-bodies", "object-journal", "bucket-metadata", "path-indexes"]),
    ("validate authorisation state", ["authz"]),
    ("validate watch cursors", ["watch"]),
    ("validate index generations", ["metadata-indexes", "fulltext", "vector"]),
    ("open PersonalDB groups and verify heads against certificates", ["personaldb"]),
    # Every participant not validated by a step above (the store's own structure among them).
    ("validate other source records", []),
]


def read_marker(root: Path) -> dict[str, Any] | None:
    p = Path(root) / MARKER_FILE
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError:
        return {"problems": ["the RECOVERY marker is unreadable"]}


def in_recovery(root: Path) -> bool:
    return (Path(root) / MARKER_FILE).exists()


def write_marker(root: Path, marker: dict[str, Any]) -> None:
    write_file_durably(Path(root) / MARKER_FILE, (json.dumps(marker, indent=2) + "\n").encode())


def validate(storage: Storage, participants: list[Participant]) -> dict[str, Any]:
    """Run the restore sequence's validation steps; write and return the report."""
    root = storage.root
    marker = read_marker(root) or {}
    recorded = marker.get("recorded") or {}
    conn = storage.catalog.reader()
    ctx = RecoveryContext(root, conn, storage.blobs, participants)
    steps: list[dict[str, Any]] = []
    restore_findings = [Finding("restore", "error", "restore", p) for p in marker.get("problems", [])]
    steps.append({"step": "restore durable state", "participants": [],
                  "status": "failed" if restore_findings else "passed",
                  "findings": [f.to_dict() for f in restore_findings]
                  or [{"participant": "restore", "severity": "info", "subject": "restore",
                       "message": f"snapshot {marker.get('snapshot', '(none: not a restored path)')}"}]})
    done: set[str] = set()
    rebuilt: list[str] = []
    all_findings = list(restore_findings)
    for step, items in STEPS:
        members = [p for p in participants if p.name not in done and (set(p.covers) & set(items) or not items)]
        if not members:
            steps.append({"step": step, "participants": [], "status": NOT_PRESENT, "findings": []})
            continue
        findings: list[Finding] = []
        for p in members:
            done.add(p.name)
            found = p.validate(ctx, recorded.get(p.name))
            if p.kind == "derived" and has_errors(found):
                # Derived state is rebuilt from source records instead of being trusted, then re-validated;
                # what was wrong before stays in the report as a warning.
                before = [replace(f, severity="warning", message=f"before rebuild: {f.message}")
                          if f.severity == "error" else f for f in found]
                found = [*before, *p.rebuild(ctx), *p.validate(ctx, recorded.get(p.name))]
                rebuilt.append(p.name)
            findings.extend(found)
        all_findings.extend(findings)
        steps.append({"step": step, "participants": [p.name for p in members],
                      "status": "failed" if has_errors(findings) else "passed",
                      "findings": [f.to_dict() for f in findings]})
    steps.append({"step": "rebuild invalid derived structures", "participants": rebuilt,
                  "status": "passed", "findings": []})
    steps.append({"step": "S3 and native API smoke tests", "participants": [p.name for p in participants],
                  "status": "not run (needs a running server: `anvil drill` runs them)", "findings": []})
    seq, h = storage.catalog.head()
    report = {
        "ok": not any(s["status"] == "failed" for s in steps),
        "storage_path": str(root), "snapshot": marker.get("snapshot"), "in_recovery_mode": bool(marker),
        "validated_at": time.time(), "journal_seq": seq, "journal_hash": h,
        "steps": steps, "rebuilt": rebuilt,
        "needs_operator": [f.to_dict() for f in all_findings if f.severity == "error"],
    }
    out = root / REPORT_DIR
    out.mkdir(exist_ok=True)
    write_file_durably(out / "validation.json", (json.dumps(report, indent=2) + "\n").encode())
    write_file_durably(out / "validation.md", render_markdown(report, "Recovery validation").encode())
    return report


def render_markdown(report: dict[str, Any], title: str) -> str:
    lines = [f"# {title}: {'PASSED' if report['ok'] else 'FAILED'}", ""]
    for k in ("storage_path", "snapshot", "journal_seq"):
        if k in report:
            lines.append(f"- **{k}**: {report[k]}")
    lines.append("")
    for s in report["steps"]:
        who = ", ".join(s["participants"]) or "—"
        lines.append(f"## {s['step']} — {s['status']} ({who})")
        for f in s["findings"]:
            lines.append(f"- [{f['severity']}] {f['participant']}: {f['subject']}: {f['message']}")
        lines.append("")
    if report.get("needs_operator"):
        lines.append("## Needs an operator")
        lines.extend(f"- {f['participant']}: {f['subject']}: {f['message']}" for f in report["needs_operator"])
    return "\n".join(lines) + "\n"


def last_validation(root: Path) -> dict[str, Any] | None:
    p = Path(root) / REPORT_DIR / "validation.json"
    return json.loads(p.read_text()) if p.exists() else None


def resume(storage: Storage, *, force: bool = False, reason: str | None = None, actor: str = "system/recovery"
           ) -> dict[str, Any]:
    """Leave recovery mode; recorded as a `recovery.resume` journal event."""
    root = storage.root
    marker = read_marker(root)
    if marker is None:
        raise BackupError(f"{root} is not in recovery mode")
    report = last_validation(root)
    seq, _ = storage.catalog.head()
    if force:
        if not reason or not reason.strip():
            raise BackupError("--force needs --reason TEXT: a forced resume is recorded with its reason")
    elif report is None:
        raise BackupError("no validation has run: run `anvil recovery validate` first (or --force --reason)")
    elif not report["ok"]:
        raise BackupError(f"the last validation failed ({len(report['needs_operator'])} findings need an operator); "
                          "fix them and validate again, or resume with --force --reason")
    elif report["journal_seq"] != seq:
        raise BackupError(f"the journal moved from seq {report['journal_seq']} to {seq} since validation: "
                          "validate again")
    payload = {"snapshot": marker.get("snapshot"), "forced": force, "reason": reason,
               "validation_ok": bool(report and report["ok"]),
               "validated_at": report["validated_at"] if report else None}

    def fn(txn: Any) -> int:
        txn.emit("system", "recovery.resume", "recovery", payload)
        return txn.next_seq

    storage.catalog.mutate(fn, actor=actor, request_id=uuid.uuid4().hex)
    (root / MARKER_FILE).unlink()
    return {"resumed": True, **payload, "journal_seq": storage.catalog.head()[0]}
