"""Identity+secrets, watch and diagnostics participants: manifest, escrow policy, validation and drill proofs.

One populated server (a tenant with an application and a policy, two durable watch consumers,
an fsck finding) backed up twice through its admin API: once with `--escrow-secrets`, once
without. Restores, validation and drills run through the CLI, like an operator would.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import apsw
import httpx
import pytest

from tests.helpers import AnvilServer, run_anvil, unique_bucket

ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "escrow passphrase"}
# The server's keys must come from its secrets/ folder (development mode), never from this env.
SCRUB = ("ANVIL_SECRET_ENCRYPTION_KEY", "ANVIL_SECRET_ENCRYPTION_KEY_ID", "ANVIL_SECRET_ENCRYPTION_PREVIOUS_KEYS",
         "JWT_SECRET", "ANVIL_CLIENT_ID", "ANVIL_CLIENT_SECRET")


def run(*args: str, creds: dict[str, str] | None = None, extra: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    return run_anvil([*args], env={**env, **ENV, **(creds or {}),
                          **(extra or {})}, capture_output=True, timeout=300, text=True)


def ok_json(*args: str, **kw) -> dict:
    proc = run(*args, "--json", **kw)
    assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("participants-more")
    srv = AnvilServer(base / "data", env=ENV).start()
    admin = srv.admin_credentials()
    creds = {"ANVIL_CLIENT_ID": admin["client_id"], "ANVIL_CLIENT_SECRET": admin["client_secret"]}
    client = srv.client()
    try:
        client.create_tenant("acme")
        app = client.create_app("acme", "writer", scopes=["bucket:create|tenant:acme", "bucket:read|bucket:*",
                                                          "object:*|bucket:*"])
        bucket = unique_bucket("acme")
        with srv.client(client_id=app["client_id"], client_secret=app["client_secret"]) as ac:
            ac.create_bucket(bucket)
            before = client.health()["journal"]["seq"]
            ac.create_consumer("lagging", bucket=bucket, prefix="docs/", after=before)
            ac.put_object(bucket, "docs/a", b"first")
            ac.put_object(bucket, "other/x", b"not in scope")
            ac.put_object(bucket, "docs/b", b"second")
        client.create_consumer("at-head")
        # Authorisation records (schema, relationships with a caveat and a deletion) for the authz participant.
        client.authz_write_schema("definition user {}\ncaveat on_net(ip ipaddress) { ip.in_cidr('10.0.0.0/8') }\n"
                                  "definition doc {\n  relation viewer: user | user with on_net\n"
                                  "  permission view = viewer\n}\n")
        client.authz_write(["doc:a#viewer@user:amy", 'doc:a#viewer@user:bob[on_net:{"ip":"10.0.0.9"}]',
                            "doc:b#viewer@user:amy"])
        client.authz_write(["doc:b#viewer@user:amy"], operation="delete")
        body = b"orphan for a finding " + os.urandom(8)
        sha = hashlib.sha256(body).hexdigest()
        orphan = srv.storage_path / "blobs" / "sha256" / sha[:2] / sha
        orphan.parent.mkdir(parents=True, exist_ok=True)
        orphan.write_bytes(body)
        finding = next(f for f in client.fsck()["findings"] if f["affected"].get("blob") == sha)
        repo = f"file://{base / 'repo'}"
        ok_json("backup", "init", "--repo", repo)
        escrowed = ok_json("backup", "create", "--repo", repo, "--endpoint", srv.endpoint, "--escrow-secrets",
                           creds=creds)
        plain = ok_json("backup", "create", "--repo", repo, "--endpoint", srv.endpoint, "--no-escrow-secrets",
                        creds=creds)
        # No choice given, development mode: the generated keys are escrowed, and the CLI says so loudly.
        default = run("backup", "create", "--repo", repo, "--endpoint", srv.endpoint, "--json", creds=creds)
        assert default.returncode == 0, default.stderr
        by_default = json.loads(default.stdout)
        assert by_default["secrets_escrowed"] is True and by_default["escrow_policy"].startswith("default: development")
        assert "ESCROWS key material" in default.stderr and "--no-escrow-secrets" in default.stderr
        key = json.loads((srv.storage_path / "secrets" / "encryption_key.json").read_text())
        yield {"srv": srv, "base": base, "repo": repo, "creds": creds, "app": app, "bucket": bucket,
               "escrowed": escrowed, "plain": plain, "by_default": by_default, "finding": finding,
               "key": key, "start_seq": before}
    finally:
        client.close()
        srv.stop()


def test_inspect_shows_identity_watch_and_diagnostics(world) -> None:
    out = ok_json("backup", "inspect", "--repo", world["repo"], world["escrowed"]["id"])
    rows = {r["item"]: r for r in out["checklist"] if r["participant"] in ("identity", "watch", "diagnostics")}
    ident = rows["control-plane secrets (key ids always, key material only when escrowed)"]["summary"]
    assert ident["tenants"] >= 2 and ident["apps"] >= 2 and ident["policies"] >= 4
    assert ident["escrowed"] == ["encryption_key.json", "jwt_secret"]
    assert world["key"]["key_id"] in ident["key_ids_in_use"]
    fx = next(f for f in ident["fixtures"] if f["client_id"] == world["app"]["client_id"])
    assert fx["allowed"] == ["bucket:create", "tenant:acme"] and fx["denied"] == ["admin:write", "system"]
    watch = rows["watch logs, cursors and checkpoints"]["summary"]
    assert watch["consumer_count"] == 2 and watch["consumers"]["acme/lagging"] == world["start_seq"]
    lag = next(f for f in watch["fixtures"] if f["name"] == "lagging")
    assert lag["next"]["kind"] == "object.put" and lag["next"]["seq"] > world["start_seq"]
    assert next(f for f in watch["fixtures"] if f["name"] == "at-head")["next"] is None
    diag = rows["diagnostic and repair findings"]["summary"]
    assert diag["count"] >= 1 and world["finding"]["id"] in [f["id"] for f in diag["fixtures"]]
    assert out["key_ids"]["secrets_escrowed"] is True and world["key"]["key_id"] in out["key_ids"]["secret_keys"]
    assert {"secrets/encryption_key.json", "secrets/jwt_secret"} <= set(out["tree"]["files"])
    # Without escrow: key ids still recorded, no key material in the snapshot.
    plain = ok_json("backup", "inspect", "--repo", world["repo"], world["plain"]["id"])
    assert plain["key_ids"]["secrets_escrowed"] is False and world["key"]["key_id"] in plain["key_ids"]["secret_keys"]
    assert not [f for f in plain["tree"]["files"] if f.startswith("secrets/")]
    text = run("backup", "inspect", "--repo", world["repo"], world["plain"]["id"]).stdout
    assert "identity" in text and "watch" in text and "diagnostics" in text


def test_escrowed_restore_validates_and_a_bad_cursor_is_named(world, tmp_path: Path) -> None:
    target = tmp_path / "restored"
    ok_json("restore", "--repo", world["repo"], "--snapshot", world["escrowed"]["id"], "--target", str(target))
    secrets_dir = target / "secrets"
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    for name in ("encryption_key.json", "jwt_secret"):
        assert stat.S_IMODE((secrets_dir / name).stat().st_mode) == 0o600
    assert json.loads((secrets_dir / "encryption_key.json").read_text()) == world["key"]
    report = ok_json("recovery", "validate", "--storage-path", str(target))
    assert report["ok"], report["needs_operator"]
    found = {f["participant"] for s in report["steps"] for f in s["findings"]}
    assert {"identity", "watch", "diagnostics"} <= found

    conn = apsw.Connection(str(target / "catalog.db"))
    head = conn.execute("SELECT max(seq) FROM journal").fetchone()[0]
    conn.execute("UPDATE watch_consumers SET cursor = ? WHERE tenant = 'acme' AND name = 'lagging'", (head + 5,))
    conn.close()
    proc = run("recovery", "validate", "--storage-path", str(target), "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode != 0 and not report["ok"]
    bad = [f for f in report["needs_operator"] if f["participant"] == "watch"]
    assert any(f["subject"] == "consumer acme/lagging" and "beyond the head" in f["message"] for f in bad), bad


def test_without_escrow_identity_names_every_undecryptable_app(world, tmp_path: Path) -> None:
    target = tmp_path / "plain"
    ok_json("restore", "--repo", world["repo"], "--snapshot", world["plain"]["id"], "--target", str(target))
    assert not (target / "secrets" / "encryption_key.json").exists()
    proc = run("recovery", "validate", "--storage-path", str(target), "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode != 0 and not report["ok"]
    ident = [f for f in report["needs_operator"] if f["participant"] == "identity"]
    kid = world["key"]["key_id"]
    subjects = {f["subject"] for f in ident}
    assert f"app {world['app']['client_id']}" in subjects and f"app {world['creds']['ANVIL_CLIENT_ID']}" in subjects
    for f in ident:
        assert f"key {kid!r} is not configured" in f["message"] and "ANVIL_SECRET_ENCRYPTION_KEY" in f["message"]
    # Validation never makes up key material inside the restored directory.
    assert not (target / "secrets").exists() or not any((target / "secrets").iterdir())
    # Doing what the message says fixes it.
    keys = {"ANVIL_SECRET_ENCRYPTION_KEY": world["key"]["key"], "ANVIL_SECRET_ENCRYPTION_KEY_ID": kid}
    report = ok_json("recovery", "validate", "--storage-path", str(target), extra=keys)
    assert report["ok"], report["needs_operator"]


def test_drill_with_escrow_proves_identity_watch_and_diagnostics(world, tmp_path: Path) -> None:
    proc = run("drill", "--repo", world["repo"], "--snapshot", world["escrowed"]["id"], "--report-dir",
               str(tmp_path), "--json", creds=world["creds"])
    report = json.loads((tmp_path / "drill-report.json").read_text())
    assert proc.returncode == 0, json.dumps([c for c in report["checks"] if not c["ok"]], indent=1)
    checks = {c["check"]: c for c in report["checks"]}
    for name in ("smoke: identity", "smoke: watch", "smoke: diagnostics", "smoke after resume: watch", "smoke: authz"):
        assert checks[name]["ok"], checks[name]
    msg = " ".join(f["message"] for c in checks.values() for f in c["findings"])
    assert "recorded authorisation fixtures decide the same" in msg
    assert "resumed from their recorded cursors" in msg and "ending with the write made after resume" in msg
    assert "recorded ones match" in msg
    assert "1 schemas and 2 relationships read back match the digest; 1 checks agree" in msg
    covered = {c["item"]: c["participants"] for c in report["coverage"]}
    assert covered["watch logs, cursors and checkpoints"] == ["watch"]


def test_drill_without_escrow_or_credential_fails_clearly(world, tmp_path: Path) -> None:
    proc = run("drill", "--repo", world["repo"], "--snapshot", world["plain"]["id"], "--report-dir", str(tmp_path),
               "--json", creds=world["creds"])
    report = json.loads((tmp_path / "drill-report.json").read_text())
    assert proc.returncode == 1 and not report["ok"]
    failed = [f for c in report["checks"] if not c["ok"] for f in c["findings"] if f["severity"] == "error"]
    assert failed and all(f["participant"] == "identity" for f in failed)
    assert "ANVIL_SECRET_ENCRYPTION_KEY" in failed[0]["message"]
    # The human output names the missing key and both ways to supply it, without opening the report.
    text = run("drill", "--repo", world["repo"], "--snapshot", world["plain"]["id"], "--report-dir",
               str(tmp_path / "text"), creds=world["creds"])
    kid = world["key"]["key_id"]
    assert text.returncode == 1
    assert f"key {kid!r} is not configured" in text.stdout, text.stdout
    assert f"ANVIL_SECRET_ENCRYPTION_KEY_ID={kid}" in text.stdout and "--escrow-secrets" in text.stdout


def test_default_escrow_snapshot_drills_without_any_key_in_the_environment(world, tmp_path: Path) -> None:
    proc = run("drill", "--repo", world["repo"], "--snapshot", world["by_default"]["id"], "--report-dir",
               str(tmp_path), "--json", creds=world["creds"])
    report = json.loads((tmp_path / "drill-report.json").read_text())
    assert proc.returncode == 0, json.dumps([c for c in report["checks"] if not c["ok"]], indent=1)


def test_production_mode_escrows_only_when_asked(world, tmp_path: Path) -> None:
    """Production keys come from the environment: without a choice, nothing is escrowed."""
    base = tmp_path
    key = {"ANVIL_MODE": "production", "ANVIL_SECRET_ENCRYPTION_KEY": "a" * 64,
           "ANVIL_SECRET_ENCRYPTION_KEY_ID": "prod-1", "JWT_SECRET": "j" * 40}
    srv = AnvilServer(base / "data", env={**ENV, **key}).start()
    try:
        admin = srv.admin_credentials()
        creds = {"ANVIL_CLIENT_ID": admin["client_id"], "ANVIL_CLIENT_SECRET": admin["client_secret"]}
        repo = f"file://{base / 'repo'}"
        ok_json("backup", "init", "--repo", repo)
        proc = run("backup", "create", "--repo", repo, "--endpoint", srv.endpoint, "--json", creds=creds)
        out = json.loads(proc.stdout)
        assert out["secrets_escrowed"] is False and out["escrow_policy"].startswith("default: no key material")
        assert "ESCROWS" not in proc.stderr
    finally:
        srv.stop()

    nocred = run("drill", "--repo", world["repo"], "--report-dir", str(tmp_path / "none"))
    assert nocred.returncode == 1 and "ANVIL_CLIENT_ID" in nocred.stderr
    assert not (tmp_path / "none").exists()


def test_escrow_field_must_be_a_boolean(world) -> None:
    srv = world["srv"]
    before = ok_json("backup", "list", "--repo", world["repo"])
    r = httpx.post(srv.endpoint + "/anvil/v1/admin/backup", headers=srv.auth_headers(),
                   json={"repo": world["repo"], "passphrase": ENV["ANVIL_BACKUP_PASSPHRASE"], "escrow_secrets": "yes"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidArgument"
    assert "escrow_secrets" in r.json()["error"]["message"]
    assert ok_json("backup", "list", "--repo", world["repo"]) == before
