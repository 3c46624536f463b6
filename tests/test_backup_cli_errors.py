"""`anvil backup` against failures: a server that dies during `backup create`, orphan packs in
verify/forget text, and the lock/orphan thresholds as options. Real server, real CLI processes."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import AnvilServer, run_anvil, unique_bucket

ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "correct horse battery staple"}
MiB = 1024 * 1024


def anvil(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_anvil([*args], env={**os.environ, **ENV, **(env or {})},
                          capture_output=True, text=True, timeout=300)


def test_server_dying_during_backup_create_gives_one_clear_line(tmp_path: Path) -> None:
    srv = AnvilServer(tmp_path / "data", env=ENV).start()
    repo_dir = tmp_path / "repo"
    repo = f"file://{repo_dir}"
    try:
        cred = srv.admin_credentials()
        creds = {"ANVIL_CLIENT_ID": cred["client_id"], "ANVIL_CLIENT_SECRET": cred["client_secret"]}
        bucket = unique_bucket("big")
        rng = random.Random(3)
        with srv.client() as c:
            c.create_bucket(bucket)
            for i in range(24):  # incompressible: chunking, zstd and AES over 96 MiB take a while
                c.put_object(bucket, f"blob-{i}", rng.randbytes(4 * MiB))
        assert anvil("backup", "init", "--repo", repo, "--storage-path", str(srv.storage_path)).returncode == 0
        proc = subprocess.Popen([sys.executable, "-m", "anvil.cli.main", "backup", "create", "--repo", repo,
                                 "--endpoint", srv.endpoint], env={**os.environ, **ENV, **creds},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The repository lock appears once the server has started the snapshot: kill it then.
        deadline = time.monotonic() + 60
        while not any((repo_dir / "locks").glob("*")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        assert proc.poll() is None, proc.communicate()
        srv.kill()
        out, err = proc.communicate(timeout=60)
    finally:
        srv.kill()
    assert proc.returncode == 1, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: server at {srv.endpoint} closed the connection during backup create"), err
    assert not list((repo_dir / "snapshots").glob("*"))  # nothing was recorded as a snapshot

    # The same command against nothing listening: one line too.
    again = anvil("backup", "create", "--repo", repo, "--endpoint", srv.endpoint, env=creds)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert [ln for ln in again.stderr.splitlines() if ln.strip()] == [
        ln for ln in again.stderr.splitlines() if ln.startswith("error: ")]


def test_orphan_packs_in_verify_and_forget_text_and_threshold_options(tmp_path: Path) -> None:
    srv = AnvilServer(tmp_path / "data", env=ENV).start()
    srv.stop()  # offline backups of a stopped path
    repo_dir = tmp_path / "repo"
    repo = f"file://{repo_dir}"
    assert anvil("backup", "init", "--repo", repo).returncode == 0
    created = anvil("backup", "create", "--repo", repo, "--storage-path", str(srv.storage_path),
                    "--orphan-grace", "1h", "--lock-stale", "10m")
    assert created.returncode == 0, created.stderr
    assert "removed 0 orphan pack(s)" in created.stdout

    # A pack no index names, as a create that died leaves behind.
    junk = os.urandom(4096)
    pack_id = hashlib.sha256(junk).hexdigest()
    (repo_dir / "data" / pack_id[:2]).mkdir(parents=True, exist_ok=True)
    (repo_dir / "data" / pack_id[:2] / pack_id).write_bytes(junk)

    verify = anvil("backup", "verify", "--repo", repo, "--orphan-grace", "90s")
    assert verify.returncode == 0, verify.stderr
    assert "1 orphan pack(s) found" in verify.stdout and "older than 90s" in verify.stdout

    # Younger than the grace period: kept, and said so.
    kept = anvil("backup", "forget", "--repo", repo, "--keep-last", "1", "--prune", "--orphan-grace", "1h")
    assert kept.returncode == 0, kept.stderr
    assert "removed 0 orphan pack(s)" in kept.stdout and "kept 1 younger than the grace period" in kept.stdout
    # The environment variable still works and the option wins over it.
    gone = anvil("backup", "forget", "--repo", repo, "--keep-last", "1", "--prune", "--orphan-grace", "0",
                 env={"ANVIL_BACKUP_ORPHAN_GRACE": "1h"})
    assert gone.returncode == 0, gone.stderr
    assert "removed 1 orphan pack(s) (4.0 KiB)" in gone.stdout
    assert "no orphan packs found" in anvil("backup", "verify", "--repo", repo).stdout

    bad = anvil("backup", "verify", "--repo", repo, "--lock-stale", "soon")
    assert bad.returncode == 1
    assert bad.stderr.strip() == "error: --lock-stale must be a finite duration like 600, 90s, 15m or 1h, got 'soon'"
    online = anvil("backup", "create", "--repo", repo, "--endpoint", "http://127.0.0.1:9", "--orphan-grace", "1h")
    assert online.returncode == 1 and "applies to offline backups" in online.stderr
