"""Backups into an S3-compatible target: moto's S3 server as a real subprocess on loopback."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import boto3
import pytest

from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.runtime import Anvil
from tests.helpers import moto_server, run_anvil

ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "s3 pass", "AWS_ACCESS_KEY_ID": "testing",
       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory):
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


def anvil_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_anvil([*args], env={**os.environ, **ENV, **(env or {})},
                          capture_output=True, timeout=120, text=True)


def test_backup_verify_restore_drill_via_s3(moto_endpoint: str, tmp_path: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    s3.create_bucket(Bucket="backups")
    data = tmp_path / "data"
    anvil = Anvil(data)
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        anvil.objects.create_bucket(ctx, "media", versioning="Enabled")
        for i in range(15):
            anvil.objects.put_object(ctx, "media", f"m/{i}", anvil.storage.blobs.put_bytes(os.urandom(3000 + i)))
    finally:
        anvil.close()
    repo = ["--repo", "s3://backups/anvil/prod", "--s3-endpoint", moto_endpoint]
    # Escrowed: the restored copy's envelopes must open without keys in the environment.
    for args in (["backup", "init", *repo],
                 ["backup", "create", *repo, "--storage-path", str(data), "--escrow-secrets"]):
        proc = anvil_cli(*args)
        assert proc.returncode == 0, proc.stderr
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="backups", Prefix="anvil/prod/")["Contents"]]
    assert "anvil/prod/config" in keys
    assert any(k.startswith("anvil/prod/data/") for k in keys) and any(k.startswith("anvil/prod/snapshots/")
                                                                        for k in keys)
    verify = anvil_cli("backup", "verify", *repo, "--read-data", "--json")
    assert verify.returncode == 0 and json.loads(verify.stdout)["chunks_read"] > 0
    restored = anvil_cli("restore", *repo, "--target", str(tmp_path / "restored"), "--json")
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["blobs_restored"] == 15
    # The drill authenticates on the restored copy with a credential of the original deployment.
    cred = json.loads((data / "bootstrap" / "first-admin.json").read_text())
    drill = anvil_cli("drill", *repo, "--report-dir", str(tmp_path / "report"),
                      env={"ANVIL_CLIENT_ID": cred["client_id"], "ANVIL_CLIENT_SECRET": cred["client_secret"]})
    assert drill.returncode == 0, (tmp_path / "report" / "drill-report.md").read_text()
    # Damage in S3 is found too: delete one pack object.
    pack = next(k for k in keys if k.startswith("anvil/prod/data/"))
    s3.delete_object(Bucket="backups", Key=pack)
    broken = anvil_cli("backup", "verify", *repo, "--json")
    assert broken.returncode == 1 and pack.rsplit("/", 1)[1] in broken.stdout
