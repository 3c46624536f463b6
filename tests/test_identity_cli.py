"""The identity CLI against a real server: admin commands, tokens, profiles, client credentials."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import uuid

from tests.helpers import AnvilServer, run_anvil, unique_bucket

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
# SQLite only: these CLI flows do not depend on the engine; identity's SQL runs on PostgreSQL in
# test_identity.py and test_identity_lifecycle.py (kept off the second engine to hold the suite's time).


def run(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = run_anvil([*args], env=env, capture_output=True,
                          timeout=120, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"anvil {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def bare_env(server: AnvilServer, tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANVIL_")}
    return {**env, "XDG_CONFIG_HOME": str(tmp_path / "config")}


def test_admin_flow_profiles_and_tokens(server: AnvilServer, tmp_path) -> None:
    env = bare_env(server, tmp_path)
    sp = ["--storage-path", str(server.storage_path), "--endpoint", server.endpoint]
    tenant = f"cli-{uuid.uuid4().hex[:6]}"
    # Admin commands with the bootstrap credential.
    run(env, "admin", "tenant", "create", tenant, *sp)
    assert tenant in [t["tenant"] for t in json.loads(run(env, "admin", "tenant", "ls", "--json", *sp).stdout)]
    created = json.loads(run(env, "admin", "app", "create", tenant, "web", "--scope", f"bucket:create|tenant:{tenant}",
                             "--scope", f"bucket:list|tenant:{tenant}", "--json", *sp).stdout)
    cid, secret = created["client_id"], created["client_secret"]
    text = run(env, "admin", "app", "create", tenant, "other", *sp).stdout
    assert "shown only this once" in text
    res = json.loads(run(env, "admin", "policy", "grant", cid, "object:*|bucket:*", "bucket:*|bucket:*", "--json",
                         *sp).stdout)
    assert res["changed"] == ["object:*|bucket:*", "bucket:*|bucket:*"]
    assert "object:*|bucket:*" in json.loads(run(env, "admin", "policy", "ls", cid, "--json", *sp).stdout)["scopes"]
    bad = run(env, "admin", "policy", "grant", cid, "object:read", "--json", *sp, check=False)
    assert bad.returncode == 1 and json.loads(bad.stdout)["error"]["code"] == "InvalidTokenScope"
    apps = json.loads(run(env, "admin", "app", "ls", "--tenant", tenant, "--json", *sp).stdout)
    assert {a["name"] for a in apps} == {"web", "other"}

    # A profile, stored 0600 under XDG_CONFIG_HOME, then used by client commands.
    run(env, "configure", "--profile", "acme", "--endpoint", server.endpoint, "--client-id", cid,
        "--client-secret", secret)
    path = tmp_path / "config" / "anvil" / "profiles.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    b = unique_bucket("cli")
    run(env, "bucket", "create", b, "--profile", "acme")
    listed = json.loads(run(env, "bucket", "ls", "--json", "--profile", "acme").stdout)
    assert [x["name"] for x in listed] == [b] and listed[0]["tenant"] == tenant
    missing = run(env, "bucket", "ls", "--profile", "nope", check=False)
    assert missing.returncode == 2 and "no profile named 'nope'" in missing.stderr

    # Environment credentials, and the token command.
    cred_env = {**env, "ANVIL_ENDPOINT": server.endpoint, "ANVIL_CLIENT_ID": cid, "ANVIL_CLIENT_SECRET": secret}
    token = run(cred_env, "auth", "token", "--scope", "object:read|bucket:*").stdout.strip()
    assert token.count(".") == 2
    info = json.loads(run(cred_env, "auth", "token", "--json").stdout)
    assert info["tenant"] == tenant and "object:*|bucket:*" in info["scopes"]
    wrong = run({**cred_env, "ANVIL_CLIENT_SECRET": "wrong"}, "auth", "token", "--json", check=False)
    assert wrong.returncode == 1 and json.loads(wrong.stdout)["error"]["code"] == "Unauthenticated"
    # A tenant application cannot use admin commands.
    denied = run(cred_env, "admin", "tenant", "create", "evil", "--json", check=False)
    assert denied.returncode == 1 and json.loads(denied.stdout)["error"]["code"] == "PermissionDenied"
    # Unauthenticated client commands fail clearly.
    anon = run({**env, "ANVIL_ENDPOINT": server.endpoint}, "bucket", "ls", "--json", check=False)
    assert anon.returncode == 1 and json.loads(anon.stdout)["error"]["code"] == "Unauthenticated"

    # Public access, rotation, audit, key rotation dry run, validation.
    run(env, "admin", "bucket", "public-access", b, "on", *sp)
    rotated = json.loads(run(env, "admin", "app", "rotate-secret", cid, "--json", *sp).stdout)
    assert rotated["client_secret"] != secret
    audit = json.loads(run(env, "admin", "audit", "--json", *sp).stdout)
    assert any(e["code"] == "PermissionDenied" for e in audit)
    dry = json.loads(run(env, "admin", "secret-key", "rotate", "--dry-run", "--json", *sp).stdout)
    assert dry["dry_run"] is True and dry["would_change"] == []
    assert "every envelope decrypts" in run(env, "admin", "identity", "validate", *sp).stdout


def test_server_helper_cli_env_is_admin(server: AnvilServer) -> None:
    out = json.loads(server.cli("admin", "tenant", "ls", "--json").stdout)
    assert "system" in [t["tenant"] for t in out]
