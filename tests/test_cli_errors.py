"""Connection and authentication errors say what failed and how to fix it; the SDK raises only its
own exceptions (docs/cli.md, "Errors"). Against real servers and a port nobody listens on."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import httpx
import pytest

from anvil import client as sdk
from tests.helpers import AnvilServer, free_port, run_anvil, unique_bucket

SCRUB = ("ANVIL_CLIENT_ID", "ANVIL_CLIENT_SECRET", "ANVIL_ENDPOINT", "ANVIL_PROFILE")


def anvil(*args: str, env: dict[str, str] | None = None, tmp_home: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in SCRUB}
    return run_anvil([*args],
                          env={**base, "XDG_CONFIG_HOME": tmp_home, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def test_sdk_raises_its_own_documented_exceptions(server: AnvilServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with sdk.AnvilClient(dead) as c, pytest.raises(sdk.Unreachable) as e:
        c.list_buckets()
    assert isinstance(e.value, sdk.ConnectionError) and isinstance(e.value, sdk.AnvilError)
    assert not isinstance(e.value, httpx.HTTPError) and e.value.endpoint == dead
    assert "connection refused" in str(e.value)
    with pytest.raises(sdk.Unreachable):
        sdk.exchange_token(dead, "id", "secret")
    with sdk.AnvilClient(dead, client_id="id", client_secret="secret") as c, pytest.raises(sdk.Unreachable):
        c.list_buckets()  # through the token exchange of the credentials flow
    with pytest.raises(sdk.InvalidEndpoint, match=r"did you mean http://127\.0\.0\.1:9000"):
        sdk.AnvilClient("127.0.0.1:9000")
    with pytest.raises(sdk.InvalidEndpoint):
        sdk.exchange_token("ftp://host", "id", "secret")
    with server.client() as c, pytest.raises(sdk.AnvilAPIError) as api:
        c.get_bucket(unique_bucket("none"))
    assert isinstance(api.value, sdk.AnvilError) and api.value.code == "NotFound" and api.value.request_id
    # Something listens but never answers: a read timeout is the SDK's ConnectionError (not Unreachable).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with sdk.AnvilClient(endpoint, timeout=0.5) as c, pytest.raises(sdk.ConnectionError) as cut:
            c.health()
    assert not isinstance(cut.value, sdk.Unreachable) and cut.value.endpoint == endpoint
    assert "timed out" in cut.value.reason


def test_unreachable_endpoint_is_named_with_the_fix(tmp_path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proc = anvil("bucket", "ls", "--endpoint", dead, tmp_home=str(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert line.startswith(f"error: cannot reach {dead}: connection refused"), line
    assert "anvil serve" in line and "--endpoint" in line and "ANVIL_ENDPOINT" in line
    proc = anvil("bucket", "ls", "--json", tmp_home=str(tmp_path), env={"ANVIL_ENDPOINT": dead})
    err = json.loads(proc.stdout)["error"]
    assert proc.returncode == 1 and err["code"] == "ConnectionError" and err["endpoint"] == dead
    proc = anvil("backup", "create", "--endpoint", dead, "--repo", f"file://{tmp_path}/r", tmp_home=str(tmp_path),
                 env={"ANVIL_BACKUP_PASSPHRASE": "x"})
    assert proc.returncode == 1 and f"cannot reach {dead}" in proc.stderr and "Traceback" not in proc.stderr


def test_endpoint_without_a_scheme_is_refused_clearly(tmp_path) -> None:
    proc = anvil("bucket", "ls", "--endpoint", "127.0.0.1:9000", tmp_home=str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "must be an http:// or https:// URL (did you mean http://127.0.0.1:9000?)" in proc.stderr
    proc = anvil("fsck", "--endpoint", "localhost:9000", tmp_home=str(tmp_path))
    assert proc.returncode == 2 and "did you mean http://localhost:9000?" in proc.stderr, proc.stderr


def test_unauthenticated_says_how_to_authenticate(server: AnvilServer, tmp_path) -> None:
    proc = anvil("bucket", "ls", "--endpoint", server.endpoint, tmp_home=str(tmp_path))
    assert proc.returncode == 1
    assert "Unauthenticated" in proc.stderr and "--client-id/--client-secret" in proc.stderr
    assert "ANVIL_CLIENT_ID" in proc.stderr and "anvil configure" in proc.stderr
    cred = server.admin_credentials()
    proc = anvil("bucket", "ls", "--endpoint", server.endpoint, "--client-id", cred["client_id"],
                 "--client-secret", "wrong", tmp_home=str(tmp_path))
    assert proc.returncode == 1 and "invalid client credentials" in proc.stderr
    assert "check the credentials" in proc.stderr


def test_permission_denied_on_admin_commands_points_at_the_first_admin(server: AnvilServer, tmp_path) -> None:
    with server.client() as admin:
        tenant = unique_bucket("t")
        admin.create_tenant(tenant)
        app = admin.create_app(tenant, "user", scopes=[f"bucket:list|tenant:{tenant}"])
    env = {"ANVIL_ENDPOINT": server.endpoint, "ANVIL_CLIENT_ID": app["client_id"],
           "ANVIL_CLIENT_SECRET": app["client_secret"]}
    proc = anvil("admin", "tenant", "ls", env=env, tmp_home=str(tmp_path))
    assert proc.returncode == 1 and "PermissionDenied" in proc.stderr
    assert "bootstrap/first-admin.json" in proc.stderr and "--storage-path" in proc.stderr
    # The hint is the fix: the same command with --storage-path works.
    proc = anvil("admin", "tenant", "ls", "--storage-path", str(server.storage_path), env=env,
                 tmp_home=str(tmp_path))
    assert proc.returncode == 0 and tenant in proc.stdout, proc.stderr
