"""Anvil backing up into a second Anvil's S3 gateway: the repository is just S3 objects there."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.runtime import Anvil
from tests.helpers import AnvilServer, run_anvil
from tests.s3_helpers import dev_credentials, s3_client

BASE_ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "anvil to anvil", "AWS_DEFAULT_REGION": "us-east-1"}


def anvil_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_anvil([*args], env={**os.environ, **env},
                          capture_output=True, timeout=180, text=True)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory):
    """The second deployment, whose S3 gateway stores the backup repository."""
    srv = AnvilServer(tmp_path_factory.mktemp("backup-target") / "data").start()
    try:
        yield srv
    finally:
        srv.stop()


def test_backup_into_a_second_anvil(tmp_path: Path, target: AnvilServer) -> None:
    s3 = s3_client(target)
    s3.create_bucket(Bucket="backups")
    keys = dev_credentials(target)
    env = {**BASE_ENV, "AWS_ACCESS_KEY_ID": keys["access_key_id"], "AWS_SECRET_ACCESS_KEY": keys["secret_access_key"]}

    data = tmp_path / "source"
    source = Anvil(data)
    bodies: dict[str, bytes] = {}
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        source.objects.create_bucket(ctx, "media", versioning="Enabled")
        for i in range(12):
            bodies[f"m/{i}"] = os.urandom(2000 + i * 97)
            source.objects.put_object(ctx, "media", f"m/{i}", source.storage.blobs.put_bytes(bodies[f"m/{i}"]))
    finally:
        source.close()

    repo = ["--repo", "s3://backups/site-a", "--s3-endpoint", target.endpoint]
    # Escrow: the restored copy (and the drill) must open the source's secret envelopes.
    create = ["backup", "create", *repo, "--storage-path", str(data), "--escrow-secrets"]
    for args in (["backup", "init", *repo], create):
        proc = anvil_cli(*args, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket="backups", Prefix="site-a/")["Contents"]]
    assert "site-a/config" in listed and any(k.startswith("site-a/data/") for k in listed)

    verify = anvil_cli("backup", "verify", *repo, "--read-data", "--json", env=env)
    assert verify.returncode == 0 and json.loads(verify.stdout)["chunks_read"] > 0, verify.stdout + verify.stderr

    out = tmp_path / "m7.bin"
    got = anvil_cli("backup", "get", *repo, "--snapshot", "latest", "media", "m/7", "--output", str(out), env=env)
    assert got.returncode == 0, got.stdout + got.stderr
    assert out.read_bytes() == bodies["m/7"]

    cred = json.loads((data / "bootstrap" / "first-admin.json").read_text())
    drill = anvil_cli("drill", *repo, "--report-dir", str(tmp_path / "report"),
                      env={**env, "ANVIL_CLIENT_ID": cred["client_id"], "ANVIL_CLIENT_SECRET": cred["client_secret"]})
    assert drill.returncode == 0, (tmp_path / "report" / "drill-report.md").read_text()

    # A pack deleted through the target's S3 gateway is reported by verify.
    pack = next(k for k in listed if k.startswith("site-a/data/"))
    s3.delete_object(Bucket="backups", Key=pack)
    broken = anvil_cli("backup", "verify", *repo, "--json", env=env)
    assert broken.returncode == 1 and pack.rsplit("/", 1)[1] in broken.stdout
