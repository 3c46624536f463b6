"""Secret-key rotation across restarts, restart durability, bootstrap-once, and production-mode refusals."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest

from anvil.client import AnvilAPIError, exchange_token
from tests.helpers import AnvilServer, unique_bucket

KEY_A, KEY_B = os.urandom(32), os.urandom(32)
JWT = base64.b64encode(os.urandom(40)).decode()


def b64(k: bytes) -> str:
    return base64.b64encode(k).decode()


def keys_env(active: tuple[str, bytes], previous: dict[str, bytes] | None = None) -> dict[str, str]:
    return {"JWT_SECRET": JWT, "ANVIL_SECRET_ENCRYPTION_KEY": b64(active[1]),
            "ANVIL_SECRET_ENCRYPTION_KEY_ID": active[0],
            "ANVIL_SECRET_ENCRYPTION_PREVIOUS_KEYS": ",".join(f"{k}:{b64(v)}" for k, v in (previous or {}).items())}


def test_rotation_with_previous_keys_and_restarts(tmp_path) -> None:
    srv = AnvilServer(tmp_path / "data", env=keys_env(("a", KEY_A))).start()
    try:
        first_admin = (srv.storage_path / "bootstrap" / "first-admin.json").read_text()
        with srv.client() as admin:
            admin.create_tenant("acme")
            app = admin.create_app("acme", "web", scopes=["bucket:create|tenant:acme", "object:*|bucket:*"])
            with srv.client(client_id=app["client_id"], client_secret=app["client_secret"]) as c:
                bucket = unique_bucket()
                c.create_bucket(bucket)
                c.put_object(bucket, "k", b"v")
            summary = admin.identity_summary()
            assert summary["key_ids_in_use"] == ["a"] and summary["apps"] >= 3 and summary["realm"] is True

        # New active key b; a kept for decryption: old envelopes still open.
        srv.env = keys_env(("b", KEY_B), {"a": KEY_A})
        srv.restart()
        with srv.client() as admin:
            assert admin.identity_validate() == {"ok": True, "findings": []}
            before_seq = admin.health()["journal"]["seq"]
            dry = admin.rotate_secret_key(dry_run=True)
            assert dry["active_key_id"] == "b" and app["client_id"] in dry["would_change"]
            assert admin.health()["journal"]["seq"] == before_seq
            assert admin.identity_summary()["key_ids_in_use"] == ["a"]
            done = admin.rotate_secret_key()
            assert sorted(done["changed"]) == sorted(dry["would_change"]) and done["unreadable"] == []
            assert admin.identity_summary()["key_ids_in_use"] == ["b"]
            ev = admin.journal(after=before_seq, limit=10)
            assert [e["kind"] for e in ev] == ["identity.key.rotate"]
            assert admin.rotate_secret_key()["changed"] == []  # idempotent

        # The new key alone now suffices, and everything survived the restarts.
        srv.env = keys_env(("b", KEY_B))
        srv.restart()
        with srv.client() as admin:
            assert admin.identity_validate()["ok"] is True
            assert "acme" in [t["tenant"] for t in admin.list_tenants()]
            pol = admin.policies(app["client_id"])["scopes"]
            assert pol == ["bucket:create|tenant:acme", "object:*|bucket:*"]
        with srv.client(client_id=app["client_id"], client_secret=app["client_secret"]) as c:
            assert c.get_object(bucket, "k") == b"v"
        assert (srv.storage_path / "bootstrap" / "first-admin.json").read_text() == first_admin

        # Only the retired key: validation reports every envelope, nothing else changes.
        srv.env = keys_env(("a", KEY_A))
        srv.restart()
        with srv.client() as admin:
            res = admin.identity_validate()
            assert res["ok"] is False
            assert any(f["item"] == f"app/{app['client_id']}" and "'b'" in f["problem"] for f in res["findings"])
            report = admin.rotate_secret_key()
            assert report["changed"] == [] and len(report["unreadable"]) >= 3
    finally:
        srv.stop()


def test_bootstrap_is_never_recreated_while_the_realm_exists(tmp_path) -> None:
    srv = AnvilServer(tmp_path / "data").start()
    try:
        path = srv.storage_path / "bootstrap" / "first-admin.json"
        cred = path.read_text()
        path.unlink()
        srv.restart()
        assert not path.exists()
        srv.stop()
        path.write_text(cred)
        srv.start()
        with srv.client() as admin:
            assert admin.whoami()["admin"] is True
    finally:
        srv.stop()


def _serve(tmp_path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "ANVIL_SECRET"))}
    return subprocess.run([sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path", str(tmp_path / "p"),
                           "--listen", "127.0.0.1:1", *args], env={**full, **env}, capture_output=True, timeout=60)


def test_production_mode_refuses_missing_secrets_and_dev_auth(tmp_path) -> None:
    res = _serve(tmp_path, {"ANVIL_MODE": "production"})
    assert res.returncode == 2 and b"ANVIL_SECRET_ENCRYPTION_KEY is required" in res.stderr
    key_only = {k: v for k, v in keys_env(("a", KEY_A)).items() if k != "JWT_SECRET"}
    res = _serve(tmp_path, {"ANVIL_MODE": "production", **key_only})
    assert res.returncode == 2 and b"JWT_SECRET is required" in res.stderr
    res = _serve(tmp_path, {"ANVIL_MODE": "production", **keys_env(("a", KEY_A))}, "--dev-auth")
    assert res.returncode == 2 and b"--dev-auth is refused" in res.stderr
    res = _serve(tmp_path, {"JWT_SECRET": "short"})
    assert res.returncode == 2 and b"at least 32 bytes" in res.stderr
    assert not (tmp_path / "p" / "bootstrap" / "first-admin.json").exists()


def test_dev_auth_flag_makes_tokenless_requests_the_dev_principal(tmp_path) -> None:
    srv = AnvilServer(tmp_path / "data", extra_args=["--dev-auth"]).start()
    try:
        import httpx

        r = httpx.put(srv.endpoint + f"/anvil/v1/buckets/{unique_bucket()}", json={})
        assert r.status_code == 201 and r.json()["tenant"] == "default"
        assert "WARNING: --dev-auth" in srv.log()
        # Tokens are still verified: a bad one is refused, not downgraded to the dev principal.
        r = httpx.get(srv.endpoint + "/anvil/v1/buckets", headers={"authorization": "Bearer nope"})
        assert r.status_code == 401
        with pytest.raises(AnvilAPIError):
            exchange_token(srv.endpoint, "ANAAAAAAAAAAAAAAAAAA", "x")
    finally:
        srv.stop()
