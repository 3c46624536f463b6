"""Artefacts in backup, restore, validation, fsck and the drill (which pulls one artefact whole
through the Hugging Face-compatible routes)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tests.helpers import AnvilServer, run_anvil, unique_bucket

ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "correct horse battery staple"}


def _cli(creds: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = run_anvil([*args], env={**os.environ, **ENV, **creds},
                          capture_output=True, timeout=300, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"anvil {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_backup_restore_validate_fsck_and_drill(tmp_path: Path) -> None:
    srv = AnvilServer(tmp_path / "data", env=ENV).start()
    cred = srv.admin_credentials()
    creds = {"ANVIL_CLIENT_ID": cred["client_id"], "ANVIL_CLIENT_SECRET": cred["client_secret"]}
    bucket = unique_bucket("art")
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": np.arange(4096, dtype=np.float32).reshape(64, 64)}, str(model / "model.safetensors"))
    (model / "config.json").write_text('{"a": 1}')
    try:
        with srv.client() as c:
            c.create_bucket(bucket)
            pushed = c.push_model(bucket, "m", model, tag="v1")
            fsck = c.fsck(deep=True)
            assert fsck["ok"], fsck
        repo = f"file://{tmp_path / 'repo'}"
        _cli(creds, "backup", "init", "--repo", repo)
        snap = json.loads(_cli(creds, "backup", "create", "--repo", repo, "--endpoint", srv.endpoint,
                               "--escrow-secrets", "--json").stdout)
    finally:
        srv.stop()
    target = tmp_path / "restored"
    res = json.loads(_cli(creds, "restore", "--repo", repo, "--snapshot", snap["id"], "--target", str(target),
                          "--json").stdout)
    assert res["ok"], res
    index_files = list((target / "derived" / "artefact-tensors").rglob("*.json"))
    assert len(index_files) == 1  # the derived tensor index came back with the backup
    report = json.loads(_cli(creds, "recovery", "validate", "--storage-path", str(target), "--json").stdout)
    assert report["ok"], report
    # A tensor index that no longer matches its file's header is found, and (derived) rebuilt by validation.
    good = index_files[0].read_text()
    doc = json.loads(good)
    doc["tensors"][0]["offset"] += 4
    index_files[0].write_text(json.dumps(doc))
    again = json.loads(_cli(creds, "recovery", "validate", "--storage-path", str(target), "--json").stdout)
    assert again["ok"] and "artefacts.tensor_index_differs" in json.dumps(again)
    assert json.loads(index_files[0].read_text()) == json.loads(good)
    # The drill restores on its own, validates, and pulls the artefact through the Hub-compatible path.
    drill_dir = tmp_path / "drill"
    proc = _cli(creds, "drill", "--repo", repo, "--snapshot", snap["id"], "--report-dir", str(drill_dir), "--json",
                check=False)
    drill = json.loads((drill_dir / "drill-report.json").read_text())
    assert proc.returncode == 0, [c for c in drill["checks"] if not c["ok"]]
    smoke = [c for c in drill["checks"] if c["check"] == "smoke: artefacts"]
    assert smoke and smoke[0]["ok"] and "verified every SHA-256" in json.dumps(smoke[0]), smoke
    assert pushed["id"]
