"""Identity lifecycle against a real server: disable, enable, delete, token revocation by jti,
secret rotation cutting old tokens, tenant bounds, journal events, and backup/restore keeping it.

Requests carry a fixed bearer token (raw httpx) so that what is tested is the token itself, not an
SDK that would quietly exchange a new one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from anvil.client import AnvilAPIError, AnvilClient, exchange_token
from tests.helpers import AnvilServer, run_anvil, unique_bucket
from tests.s3_helpers import REGION

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines

FULL_TENANT = ["bucket:create|tenant:{t}", "bucket:list|tenant:{t}", "bucket:*|bucket:*", "object:*|bucket:*"]


def new_tenant(admin: AnvilClient) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    admin.create_tenant(name)
    return name


def new_app(admin: AnvilClient, tenant: str, scopes: list[str]) -> dict:
    return admin.create_app(tenant, f"app-{uuid.uuid4().hex[:6]}", scopes=[s.format(t=tenant) for s in scopes])


def api_error(fn, *args, **kwargs) -> AnvilAPIError:
    with pytest.raises(AnvilAPIError) as e:
        fn(*args, **kwargs)
    return e.value


def token_of(server: AnvilServer, app: dict) -> str:
    return exchange_token(server.endpoint, app["client_id"], app["client_secret"])["access_token"]


def bearer_get(server: AnvilServer, token: str, path: str) -> httpx.Response:
    return httpx.get(server.endpoint + path, headers={"authorization": f"Bearer {token}"}, timeout=30)


def refused(resp: httpx.Response, words: str) -> None:
    assert resp.status_code == 401, resp.text
    err = resp.json()["error"]
    assert err["code"] == "Unauthenticated" and words in err["message"], err


def s3_for(server: AnvilServer, app: dict):
    cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 1})
    return boto3.client("s3", endpoint_url=server.endpoint, region_name=REGION, config=cfg,
                        aws_access_key_id=app["client_id"], aws_secret_access_key=app["client_secret"])


def s3_code(fn, **kwargs) -> tuple[str, int, str]:
    with pytest.raises(ClientError) as e:
        fn(**kwargs)
    err = e.value.response
    return err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"], err["Error"].get("Message", "")


def last_event(admin: AnvilClient) -> dict:
    seq = admin.health()["journal"]["seq"]
    return admin.journal(after=seq - 1, limit=1)[0]


@pytest.fixture(scope="module")
def admin(server: AnvilServer):
    with server.client() as c:
        yield c


@pytest.fixture
def world(server: AnvilServer, admin: AnvilClient) -> dict:
    """A tenant, a full-access application, its bucket with one object."""
    tenant = new_tenant(admin)
    app = new_app(admin, tenant, FULL_TENANT)
    bucket = unique_bucket("life")
    with server.client(client_id=app["client_id"], client_secret=app["client_secret"]) as c:
        c.create_bucket(bucket)
        c.put_object(bucket, "k", b"hello")
    return {"tenant": tenant, "app": app, "bucket": bucket, "path": f"/anvil/v1/buckets/{bucket}/object?key=k"}


def test_disable_refuses_existing_token_and_sigv4_enable_restores(server: AnvilServer, admin: AnvilClient,
                                                                   world: dict) -> None:
    app, path, bucket = world["app"], world["path"], world["bucket"]
    cid = app["client_id"]
    token = token_of(server, app)
    s3 = s3_for(server, app)
    assert bearer_get(server, token, path).content == b"hello"
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"hello"

    res = admin.disable_app(cid)
    assert res == {"client_id": cid, "tenant": world["tenant"], "status": "disabled", "changed": True}
    ev = last_event(admin)
    assert ev["kind"] == "identity.app.disable" and ev["payload"]["client_id"] == cid
    # The same, unexpired token is refused at its very next request; so are SigV4 and a new exchange.
    refused(bearer_get(server, token, path), f"application {cid} is disabled")
    code, status, message = s3_code(s3.get_object, Bucket=bucket, Key="k")
    assert (code, status) == ("AccessDenied", 403) and "disabled" in message
    err = api_error(exchange_token, server.endpoint, cid, app["client_secret"])
    assert err.status == 401 and "disabled" in err.message
    assert {a["client_id"]: a["status"] for a in admin.list_apps(world["tenant"])}[cid] == "disabled"
    assert admin.disable_app(cid)["changed"] is False  # idempotent, no second event
    assert last_event(admin)["seq"] == ev["seq"]
    assert admin.identity_summary()["apps_disabled"] >= 1

    assert admin.enable_app(cid)["changed"] is True
    assert last_event(admin)["kind"] == "identity.app.enable"
    assert bearer_get(server, token, path).content == b"hello"
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"hello"
    assert token_of(server, app)


def test_revoke_one_token_by_jti(server: AnvilServer, admin: AnvilClient, world: dict) -> None:
    app, path = world["app"], world["path"]
    first = exchange_token(server.endpoint, app["client_id"], app["client_secret"])
    second = token_of(server, app)
    me = bearer_get(server, first["access_token"], "/anvil/v1/auth/whoami").json()
    assert me["jti"] == first["jti"] and me["expires_at"] == first["expires_at"]

    res = admin.revoke_token(first["jti"], client_id=app["client_id"])
    assert res["changed"] is True and res["expires"] >= first["expires_at"]
    ev = last_event(admin)
    assert ev["kind"] == "identity.token.revoke" and ev["payload"]["jti"] == first["jti"]
    refused(bearer_get(server, first["access_token"], path), "revoked")
    assert bearer_get(server, second, path).content == b"hello"  # only that one token
    assert admin.revoke_token(first["jti"], client_id=app["client_id"])["changed"] is False
    assert last_event(admin)["seq"] == ev["seq"]
    # A system admin may revoke without naming the application.
    third = exchange_token(server.endpoint, app["client_id"], app["client_secret"])
    assert admin.revoke_token(third["jti"])["changed"] is True
    refused(bearer_get(server, third["access_token"], path), "revoked")
    for bad in ("", "x" * 32, first["jti"].upper(), first["jti"] + "0"):
        assert api_error(admin.revoke_token, bad).code == "InvalidArgument"
    assert api_error(admin.revoke_token, first["jti"], client_id="ANAAAAAAAAAAAAAAAAAA").code == "NotFound"


def test_rotate_secret_cuts_tokens_of_the_old_secret(server: AnvilServer, admin: AnvilClient, world: dict) -> None:
    app, path = world["app"], world["path"]
    old = token_of(server, app)
    rotated = admin.rotate_app_secret(app["client_id"])
    refused(bearer_get(server, old, path), "rotated")
    new = token_of(server, {**app, "client_secret": rotated["client_secret"]})
    assert bearer_get(server, new, path).content == b"hello"


def test_delete_removes_app_and_grants_for_good(server: AnvilServer, admin: AnvilClient, world: dict) -> None:
    app, path, bucket = world["app"], world["path"], world["bucket"]
    cid = app["client_id"]
    token = token_of(server, app)
    s3 = s3_for(server, app)
    res = admin.delete_app(cid)
    assert res["client_id"] == cid and sorted(res["scopes_removed"]) == sorted(
        s.format(t=world["tenant"]) for s in FULL_TENANT)
    ev = last_event(admin)
    assert ev["kind"] == "identity.app.delete" and ev["payload"]["client_id"] == cid
    refused(bearer_get(server, token, path), f"application {cid} is deleted")
    assert s3_code(s3.get_object, Bucket=bucket, Key="k")[0] == "InvalidAccessKeyId"
    assert api_error(exchange_token, server.endpoint, cid, app["client_secret"]).message == "invalid client credentials"
    assert cid not in [a["client_id"] for a in admin.list_apps(world["tenant"])]
    for fn in (admin.policies, admin.delete_app, admin.disable_app, admin.enable_app, admin.rotate_app_secret):
        assert api_error(fn, cid).code == "NotFound"
    assert admin.identity_summary()["apps_deleted"] >= 1
    assert admin.identity_validate()["ok"]


def test_tenant_admin_is_bounded_to_its_tenant(server: AnvilServer, admin: AnvilClient) -> None:
    mine, theirs = new_tenant(admin), new_tenant(admin)
    boss = new_app(admin, mine, ["app:create|tenant:{t}", "app:read|tenant:{t}", "policy:grant|tenant:{t}",
                                 "bucket:list|tenant:{t}"])
    worker = new_app(admin, mine, ["bucket:list|tenant:{t}"])
    other = new_app(admin, theirs, ["bucket:list|tenant:{t}"])
    other_token = exchange_token(server.endpoint, other["client_id"], other["client_secret"])
    before = admin.health()["journal"]["seq"]
    with server.client(client_id=boss["client_id"], client_secret=boss["client_secret"]) as b, \
            server.client(client_id=worker["client_id"], client_secret=worker["client_secret"]) as w:
        for fn in (b.disable_app, b.enable_app, b.delete_app):
            assert api_error(fn, other["client_id"]).code == "NotFound"  # another tenant's app: unseen
        assert api_error(b.revoke_token, other_token["jti"], client_id=other["client_id"]).code == "NotFound"
        assert api_error(b.revoke_token, other_token["jti"]).code == "PermissionDenied"  # any-app: system only
        assert api_error(b.disable_app, boss["client_id"]).code == "InvalidArgument"  # not itself
        assert api_error(w.disable_app, boss["client_id"]).code == "PermissionDenied"  # no app:create
        assert admin.health()["journal"]["seq"] == before  # nothing changed
        assert b.disable_app(worker["client_id"])["changed"] is True  # within its tenant: allowed
        assert b.enable_app(worker["client_id"])["changed"] is True
        w_token = token_of(server, worker)
        jti = bearer_get(server, w_token, "/anvil/v1/auth/whoami").json()["jti"]
        assert b.revoke_token(jti, client_id=worker["client_id"])["changed"] is True
        refused(bearer_get(server, w_token, "/anvil/v1/buckets"), "revoked")
        assert b.delete_app(worker["client_id"])["tenant"] == mine
    assert bearer_get(server, other_token["access_token"], "/anvil/v1/buckets").status_code == 200


def test_cli_lifecycle_commands(server: AnvilServer, admin: AnvilClient, world: dict) -> None:
    app = world["app"]
    cid = app["client_id"]
    out = json.loads(server.cli("admin", "app", "disable", cid, "--json").stdout)
    assert out["status"] == "disabled"
    assert b"disabled" in server.cli("admin", "app", "ls", "--tenant", world["tenant"]).stdout
    assert server.cli("admin", "app", "enable", cid).stdout.decode().strip() == f"{cid}: enabled"
    tok = exchange_token(server.endpoint, cid, app["client_secret"])
    assert "revoked" in server.cli("admin", "token", "revoke", tok["jti"], "--app", cid).stdout.decode()
    bad = server.cli("admin", "token", "revoke", "nope", check=False)
    assert bad.returncode == 1 and b"InvalidArgument" in bad.stderr
    assert b"deleted application" in server.cli("admin", "app", "delete", cid, "--yes").stdout
    assert server.cli("admin", "app", "delete", cid, "--yes", check=False).returncode == 1


# ------------------------------------------------------------------ backup and restore keep the state

BACKUP_ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "correct horse battery staple"}


def _anvil(env: dict[str, str], *args: str) -> dict:
    proc = run_anvil([*args, "--json"], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"anvil {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)


def test_backup_and_restore_keep_disabled_deleted_and_revoked(tmp_path: Path) -> None:
    srv = AnvilServer(tmp_path / "data", env=BACKUP_ENV).start()
    try:
        cred = srv.admin_credentials()
        env = {**BACKUP_ENV, "ANVIL_CLIENT_ID": cred["client_id"], "ANVIL_CLIENT_SECRET": cred["client_secret"]}
        with srv.client() as admin:
            tenant = new_tenant(admin)
            disabled, revoked_app, deleted = (new_app(admin, tenant, FULL_TENANT) for _ in range(3))
            bucket = unique_bucket("kept")
            with srv.client(client_id=disabled["client_id"], client_secret=disabled["client_secret"]) as c:
                c.create_bucket(bucket)
                c.put_object(bucket, "k", b"kept")
            tokens = {name: exchange_token(srv.endpoint, a["client_id"], a["client_secret"])
                      for name, a in (("disabled", disabled), ("revoked", revoked_app), ("deleted", deleted))}
            spare = token_of(srv, revoked_app)  # same app, not revoked: must keep working after restore
            admin.disable_app(disabled["client_id"])
            admin.revoke_token(tokens["revoked"]["jti"], client_id=revoked_app["client_id"])
            admin.delete_app(deleted["client_id"])
            recorded = admin.identity_summary()
        repo = f"file://{tmp_path / 'repo'}"
        _anvil(env, "backup", "init", "--repo", repo, "--storage-path", str(srv.storage_path))
        snap = _anvil(env, "backup", "create", "--repo", repo, "--endpoint", srv.endpoint, "--escrow-secrets")
    finally:
        srv.stop()
    inspect = _anvil(env, "backup", "inspect", "--repo", repo, snap["id"])
    ident = inspect["participants"]["identity"]["summary"]  # what restore validation compares against
    assert ident["apps_disabled"] == recorded["apps_disabled"] == 1
    assert ident["revoked_tokens"] == 1 and ident["apps_deleted"] == 1
    assert ident["disabled_fixtures"] == [disabled["client_id"]]

    target = tmp_path / "restored"
    assert _anvil(env, "restore", "--repo", repo, "--snapshot", snap["id"], "--target", str(target))["ok"]
    report = _anvil(env, "recovery", "validate", "--storage-path", str(target))
    assert report["ok"], report
    restored = AnvilServer(target, env=BACKUP_ENV).start()  # same escrowed JWT secret: old tokens verify
    try:
        path = f"/anvil/v1/buckets/{bucket}/object?key=k"
        refused(bearer_get(restored, tokens["disabled"]["access_token"], path), "disabled")
        refused(bearer_get(restored, tokens["revoked"]["access_token"], "/anvil/v1/buckets"), "revoked")
        refused(bearer_get(restored, tokens["deleted"]["access_token"], "/anvil/v1/buckets"), "deleted")
        assert bearer_get(restored, spare, "/anvil/v1/buckets").status_code == 200
        with restored.client(client_id=cred["client_id"], client_secret=cred["client_secret"]) as admin:
            now = admin.identity_summary()
            for field in ("apps_disabled", "apps_deleted", "revoked_tokens", "lifecycle_digest", "digest"):
                assert now[field] == recorded[field], field
            assert {a["client_id"]: a["status"] for a in admin.list_apps(tenant)}[disabled["client_id"]] == "disabled"
    finally:
        restored.stop()
    drill = subprocess.run([sys.executable, "-m", "anvil.cli.main", "drill", "--repo", repo, "--snapshot", snap["id"],
                            "--report-dir", str(tmp_path), "--json"], env={**os.environ, **env},
                           capture_output=True, text=True, timeout=300)
    checks = json.loads((tmp_path / "drill-report.json").read_text())["checks"]
    assert drill.returncode == 0, [c for c in checks if not c["ok"]]
    assert any("stay disabled" in json.dumps(c) for c in checks)


# ------------------------------------------------------------------ the participant sees lifecycle damage


def test_participant_validates_lifecycle_rows_and_the_recorded_summary(tmp_path: Path) -> None:
    import apsw

    from anvil.context import DEV_PRINCIPAL, RequestContext
    from anvil.identity.participant import IdentityParticipant
    from anvil.runtime import Anvil, recovery_participants
    from anvil.storage import BlobStore, records
    from anvil.storage.recovery import RecoveryContext

    root = tmp_path / "data"
    a = Anvil(root)
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        a.identity.create_tenant(ctx, "acme")
        off = a.identity.create_app(ctx, "acme", "off", ["object:read|bucket:*"])
        a.identity.set_app_enabled(ctx, off["client_id"], False)
        a.identity.revoke_token(ctx, "ab" * 16)
    finally:
        a.close()
    p = IdentityParticipant()

    def check(recorded=None) -> tuple[dict, list]:
        conn = records.open_readonly(root / "catalog.db")
        try:
            rc = RecoveryContext(root, conn, BlobStore(root / "blobs" / "sha256", root / "tmp"),
                                 recovery_participants())
            return p.summary(rc), p.validate(rc, recorded)
        finally:
            records.close(conn)

    recorded, found = check()
    assert not [f for f in found if f.severity == "error"]
    assert (recorded["apps_disabled"], recorded["revoked_tokens"]) == (1, 1)
    assert recorded["disabled_fixtures"] == [off["client_id"]]

    # Re-enabled behind the journal's back (as a restore of the wrong state would look) ...
    db = apsw.Connection(str(root / "catalog.db"))
    db.execute("UPDATE identity_apps SET status = 'enabled' WHERE client_id = ?", (off["client_id"],))
    _, found = check(recorded)
    assert {f.invariant for f in found if f.severity == "error"} == {"identity.summary_differs"}
    assert {f.affected["field"] for f in found if f.severity == "error"} == {"apps_disabled", "lifecycle_digest"}
    # ... and rows that cannot be right at all.
    db.execute("UPDATE identity_apps SET status = 'paused' WHERE client_id = ?", (off["client_id"],))
    db.execute("INSERT INTO identity_policies(client_id, scope, granted, granted_by) VALUES (?,?,?,?)",
               ("ANZZZZZZZZZZZZZZZZZZ", "object:read|bucket:*", 0.0, "test"))
    db.execute("UPDATE identity_revoked_tokens SET expires = revoked - 1")
    db.close()
    _, found = check()
    assert {f.invariant for f in found if f.severity == "error"} == {
        "identity.app_status", "identity.policy_orphan", "identity.revocation"}
