"""`anvil drill`: restore into a temporary directory, start an isolated server, prove the backup.

Every proof is a participant's `smoke()` against a real server process on a free loopback
port, plus the recovery-mode contract (writes refused, then resumed) and ordinary client
operations after resume. Any failure makes the drill fail; the report says which.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anvil.backup import ops
from anvil.backup.errors import BackupError
from anvil.backup.repository import Repository
from anvil.backup.restore import restore
from anvil.serveproc import ServeFailed, ServeProcess
from anvil.storage import records
from anvil.storage.blobs import open_blob_store
from anvil.storage.recovery import NOT_PRESENT, Finding, Participant, RecoveryContext, ResumedSmoke, coverage


def _drill_server(storage: Path, log_path: Path) -> ServeProcess:
    # Always the embedded engine on the restored path: an operator's ANVIL_RECORDS_URL (a scaled
    # deployment's PostgreSQL) must never point the drill's server at live records.
    env = {k: v for k, v in os.environ.items() if k != "ANVIL_RECORDS_URL"}
    return ServeProcess(storage, log_path, env=env)


def _check(name: str, findings: list[Finding], started: float) -> dict[str, Any]:
    return {"check": name, "ok": not any(f.severity == "error" for f in findings),
            "duration": round(time.time() - started, 3), "findings": [f.to_dict() for f in findings]}


def run_drill(repo: Repository, snapshot: str | None, participants: list[Participant], report_dir: Path, *,
              keep: bool = False,
              log: Callable[[str], None] | None = None, client_id: str | None = None,
              client_secret: str | None = None, point: dict[str, Any] | None = None,
              progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """`point` ({"to_seq"} or {"to_time"}) proves a point-in-time restore instead of one snapshot;
    `progress(bytes done, bytes total, what)` follows the restore (the drill's long step)."""
    say = log or (lambda _msg: None)
    started = time.time()
    # The proofs authenticate like any client; without a credential every one of them would fail late.
    client_id = client_id or os.environ.get("ANVIL_CLIENT_ID") or None
    client_secret = client_secret or os.environ.get("ANVIL_CLIENT_SECRET") or None
    if not client_id or not client_secret:
        raise BackupError("the drill needs a credential of the backed-up deployment (an admin application): "
                          "set ANVIL_CLIENT_ID and ANVIL_CLIENT_SECRET")
    if point is not None:
        from anvil.backup.pitr import choose_snapshot

        manifest = choose_snapshot(repo, to_seq=point.get("to_seq"), to_time=point.get("to_time"))
        # Summaries describe the snapshot's checkpoint, not the replayed state: the drill proves the
        # replayed chain, and the participants' smokes prove what the restored server serves.
        recorded: dict[str, Any] = {}
    else:
        manifest = repo.resolve_snapshot(snapshot)
        recorded = {name: p["summary"] for name, p in manifest["participants"].items()}
        if manifest.get("kind") == "delta":
            # A journal delta is proved as its base rolled forward to the delta's seq.
            point = {"to_seq": int(manifest["consistency"]["journal_seq"]), "base": manifest["base"]}
            recorded = {}
    pit: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="anvil-drill-"))
    target = work / "data"
    checks: list[dict[str, Any]] = []
    server: ServeProcess | None = None

    def step(name: str, fn: Callable[[], list[Finding]]) -> bool:
        t0 = time.time()
        try:
            findings = fn()
        except Exception as e:  # noqa: BLE001 - a drill reports every failure instead of crashing
            findings = [Finding("drill", "error", name, f"{type(e).__name__}: {e}")]
        checks.append(_check(name, findings, t0))
        say(f"{'ok  ' if checks[-1]['ok'] else 'FAIL'} {name}")
        # A failure says why right here, not only in the report: each distinct problem once.
        seen: set[str] = set()
        errors = [f for f in findings if f.severity == "error"]
        for f in errors:
            if f.message not in seen and len(seen) < 5:
                seen.add(f.message)
                same = sum(1 for g in errors if g.message == f.message)
                say(f"     {f.participant}: {f.subject}{f' (and {same - 1} more)' if same > 1 else ''}: {f.message}")
        return checks[-1]["ok"]

    try:
        def do_restore() -> list[Finding]:
            if point is not None:
                from anvil.backup.pitr import restore_to_point

                res = restore_to_point(repo, target, participants, to_seq=point.get("to_seq"),
                                       to_time=point.get("to_time"), progress=progress,
                                       base=repo.load_snapshot(point["base"]) if point.get("base") else None)
                pit.update(res["point_in_time"])
                recorded["journal"] = {"head_seq": pit["head_seq"]}
                out = [Finding("restore", "error", "restore", p) for p in res["problems"]]
                out += [Finding("restore", "warning", "point in time", w) for w in pit["warnings"]]
                return out or [Finding("restore", "info", "restore",
                                       f"snapshot {res['snapshot']} at seq {pit['snapshot_seq']}, then "
                                       f"{pit['events_replayed']} archived events replayed up to seq "
                                       f"{pit['head_seq']} in {res['duration']}s")]
            res = restore(repo, manifest, target, participants, progress=progress)
            out = [Finding("restore", "error", "restore", p) for p in res["problems"]]
            return out or [Finding("restore", "info", "restore",
                                   f"{res['blobs_restored']} blobs, {res['bytes']} bytes in {res['duration']}s")]

        def do_validate() -> list[Finding]:
            report = ops.validate_path(target, participants)
            out = [Finding(**f) for s in report["steps"] for f in s["findings"]]
            return out

        ok = step("restore into an isolated directory", do_restore)
        ok = ok and step("validate restored state (restore sequence)", do_validate)
        if ok:
            server = _drill_server(target, work / "server.log")
            from anvil.client import AnvilAPIError, AnvilClient

            client = AnvilClient(server.endpoint, client_id=client_id, client_secret=client_secret)
            try:
                def do_start() -> list[Finding]:
                    try:
                        server.start()
                    except ServeFailed as e:
                        raise BackupError(f"the drill server {e}") from None
                    health = client.health()
                    if not health.get("recovery_mode"):
                        return [Finding("drill", "error", "recovery mode", "restored server is not in recovery mode")]
                    try:
                        client.create_bucket(f"drill-probe-{uuid.uuid4().hex[:8]}")
                        return [Finding("drill", "error", "recovery mode", "a write was accepted in recovery mode")]
                    except AnvilAPIError as e:
                        if e.code != "RecoveryMode" or e.status != 503:
                            return [Finding("drill", "error", "recovery mode", f"write answered {e.status} {e.code}")]
                    return [Finding("drill", "info", "recovery mode", "server started; writes refused (503)")]

                if step("start isolated server in recovery mode", do_start):
                    conn = records.open_readonly(target / "catalog.db")
                    try:
                        blobs = open_blob_store(target / "blobs" / "sha256", target / "tmp")
                        ctx = RecoveryContext(target, conn, blobs, participants, credentials=(client_id, client_secret))
                        for p in participants:
                            step(f"smoke: {p.name}", lambda p=p: p.smoke(client, ctx, recorded.get(p.name)))
                    finally:
                        records.close(conn)

                    def do_resume() -> list[Finding]:
                        res = client.recovery_resume()
                        if client.health().get("recovery_mode"):
                            return [Finding("drill", "error", "resume", "server still in recovery mode")]
                        return [Finding("drill", "info", "resume", f"resumed at journal seq {res['journal_seq']}")]

                    if step("resume normal traffic after passing validation", do_resume):
                        for p in participants:
                            if isinstance(p, ResumedSmoke):
                                step(f"smoke after resume: {p.name}",
                                     lambda p=p: p.smoke_resumed(client, ctx, recorded.get(p.name)))
            finally:
                client.close()
    finally:
        if server is not None:
            server.stop()
            if not all(c["ok"] for c in checks):
                checks.append({"check": "server log (tail)", "ok": True, "duration": 0,
                               "findings": [{"participant": "drill", "severity": "info", "subject": "log",
                                             "message": server.tail()}]})
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    cov = coverage(p.describe() for p in participants)
    report = {
        "ok": bool(checks) and all(c["ok"] for c in checks),
        "snapshot": manifest["id"], "repository": repo.backend.url,
        "journal_seq": pit.get("head_seq", manifest["consistency"]["journal_seq"]), "started": started,
        "point_in_time": pit or None,
        "duration": round(time.time() - started, 3), "kept_restore": str(target) if keep else None,
        "checks": checks,
        "coverage": [{"item": c["label"], "participants": c["participants"] or NOT_PRESENT} for c in cov],
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "drill-report.json").write_text(json.dumps(report, indent=2) + "\n")
    (report_dir / "drill-report.md").write_text(render_markdown(report))
    return report


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Restore drill: {'PASSED' if report['ok'] else 'FAILED'}", "",
             f"- snapshot: {report['snapshot']} (journal seq {report['journal_seq']})",
             f"- repository: {report['repository']}", f"- duration: {report['duration']} s", "", "## Checks", ""]
    for c in report["checks"]:
        lines.append(f"### {'✔' if c['ok'] else '✘'} {c['check']} ({c['duration']} s)")
        for f in c["findings"]:
            msg = f["message"] if f["subject"] != "log" else "\n```\n" + f["message"] + "\n```"
            lines.append(f"- [{f['severity']}] {f['participant']}: {f['subject']}: {msg}")
        lines.append("")
    lines += ["## Coverage", "", "| item | participants |", "| --- | --- |"]
    for c in report["coverage"]:
        who = c["participants"] if isinstance(c["participants"], str) else ", ".join(c["participants"])
        lines.append(f"| {c['item']} | {who} |")
    return "\n".join(lines) + "\n"

