"""Drill decision replay (docs/authz.md, "Recovery"): a backup records a sample of check decisions at
the checkpoint revision in the authz participant's summary; after restore, `recovery validate` and
the drill replay them at that exact revision and require identical answers. Tampering with a
restored relationship makes them fail with a clear finding."""

from __future__ import annotations

import json
from pathlib import Path

import apsw
import pytest

from tests.helpers import AnvilServer, Cli, unique_bucket

ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "decision passphrase"}
SCRUB = ("ANVIL_SECRET_ENCRYPTION_KEY", "ANVIL_SECRET_ENCRYPTION_KEY_ID", "ANVIL_SECRET_ENCRYPTION_PREVIOUS_KEYS",
         "JWT_SECRET", "ANVIL_CLIENT_ID", "ANVIL_CLIENT_SECRET")

SCHEMA = """
definition user {}
definition group {
    relation member: user | group#member
}
definition folder {
    relation parent: folder
    relation viewer: user | group#member
    permission view = viewer + parent->view
}
definition document {
    relation folder: folder
    relation owner: user
    relation viewer: user | group#member
    permission view = viewer + owner + folder->view
    permission edit = owner
}
"""


_CLI = Cli(ENV, SCRUB)
run, ok_json = _CLI.run, _CLI.json


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("authz-decisions")
    srv = AnvilServer(base / "data", env=ENV).start()
    admin = srv.admin_credentials()
    creds = {"ANVIL_CLIENT_ID": admin["client_id"], "ANVIL_CLIENT_SECRET": admin["client_secret"]}
    client = srv.client()
    try:
        client.authz_write_schema(SCHEMA)
        client.authz_write(["group:eng#member@user:amy", "group:ops#member@group:eng#member",
                            "folder:root#viewer@group:ops#member", "folder:docs#parent@folder:root",
                            "document:spec#folder@folder:docs", "document:memo#owner@user:bob",
                            "document:memo#viewer@user:carl", "document:plan#viewer@user:dan"])
        # Written, then replaced: the decisions are those of the checkpoint revision only.
        client.authz_write(["document:plan#viewer@user:dan"], operation="delete")
        client.authz_write(["document:plan#owner@user:dan"])
        b = unique_bucket("dec")
        client.create_bucket(b)
        client.authz_bind_bucket(b, {"resource_type": "document", "read": "view", "write": "edit"})
        repo = f"file://{base / 'repo'}"
        ok_json("backup", "init", "--repo", repo)
        snap = ok_json("backup", "create", "--repo", repo, "--endpoint", srv.endpoint, "--escrow-secrets",
                       creds=creds)
        # Changes after the backup are not in it (and do not disturb the replay).
        client.authz_write(["document:memo#viewer@user:eve"])
        yield {"srv": srv, "repo": repo, "creds": creds, "snap": snap, "bucket": b}
    finally:
        client.close()
        srv.stop()


def test_backup_records_decisions_at_the_checkpoint_revision(world) -> None:
    out = ok_json("backup", "inspect", "--repo", world["repo"], world["snap"]["id"])
    authz = next(r["summary"] for r in out["checklist"] if r["participant"] == "authz")
    dec = authz["decisions"]
    assert dec["revision"] > 0 and len(dec["checks"]) >= 8
    answers = {(c["resource"], c["permission"], c["subject"]): c["permissionship"] for c in dec["checks"]}
    assert "has_permission" in answers.values() and "no_permission" in answers.values()
    assert answers.get(("document:memo", "edit", "user:bob")) == "has_permission"
    assert authz["bindings"] == 1


def test_drill_replays_the_decisions_and_passes(world, tmp_path: Path) -> None:
    proc = run("drill", "--repo", world["repo"], "--snapshot", world["snap"]["id"], "--report-dir", str(tmp_path),
               "--json", creds=world["creds"])
    report = json.loads((tmp_path / "drill-report.json").read_text())
    assert proc.returncode == 0, json.dumps([c for c in report["checks"] if not c["ok"]], indent=1)
    msgs = " ".join(f["message"] for c in report["checks"] for f in c["findings"] if f["participant"] == "authz")
    assert "check decisions recorded at backup answer the same at revision" in msgs, msgs


def test_tampered_relationship_fails_validation_with_a_clear_finding(world, tmp_path: Path) -> None:
    target = tmp_path / "restored"
    ok_json("restore", "--repo", world["repo"], "--snapshot", world["snap"]["id"], "--target", str(target))
    report = ok_json("recovery", "validate", "--storage-path", str(target))
    assert report["ok"], report["needs_operator"]
    conn = apsw.Connection(str(target / "catalog.db"))
    # bob loses ownership of memo in the restored copy (same revision numbers: only the answer moves).
    conn.execute("UPDATE authz_relationships SET sid = 'mallory' WHERE rid = 'memo' AND relation = 'owner'")
    conn.close()
    proc = run("recovery", "validate", "--storage-path", str(target), "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode != 0 and not report["ok"]
    bad = [f for f in report["needs_operator"] if f["participant"] == "authz"]
    differ = [f for f in bad if f.get("invariant") == "authz.decision_differs"]
    assert differ, bad
    assert any("document:memo edit user:bob" in f["message"] and "answers no_permission, recorded at backup "
               "has_permission" in f["message"] for f in differ), differ
