"""The admin backup/recovery API, scheduled backups and their bad inputs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anvil.backup.backends.local import LocalBackend
from anvil.backup.repository import Repository
from anvil.client import AnvilAPIError
from tests.helpers import AnvilServer

PASS = "admin pass"
ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": PASS}


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("backup-admin")
    os.environ["ANVIL_BACKUP_KDF"] = "test"
    Repository.init(LocalBackend(base / "repo"), PASS)
    srv = AnvilServer(base / "data", env=ENV,
                      extra_args=["--backup-repo", f"file://{base / 'repo'}", "--backup-every", "1s"]).start()
    yield srv, base
    srv.stop()


def test_scheduled_backup_shows_in_ready(scheduled) -> None:
    srv, base = scheduled
    with srv.client() as c:
        c.create_bucket("sched-bucket")
        c.put_object("sched-bucket", "k", b"v")
        deadline = time.monotonic() + 20
        while True:
            last = c.health()["backup"]["last"]
            if last and last.get("ok"):
                break
            assert time.monotonic() < deadline, f"no successful scheduled backup: {last}"
            time.sleep(0.2)
        assert c.health()["backup"]["schedule"]["every_seconds"] == 1.0
    assert last["snapshot"] in Repository.open(LocalBackend(base / "repo"), PASS).snapshot_ids()


def test_admin_backup_bad_inputs_change_nothing(scheduled) -> None:
    srv, base = scheduled
    with srv.client() as c:
        for body, needle in (
            ({}, "'repo'"),
            ({"repo": f"file://{srv.storage_path}/inner", "passphrase": PASS}, "inside STORAGE_PATH"),
            ({"repo": f"file://{base / 'repo'}", "passphrase": "wrong"}, "wrong passphrase"),
            ({"repo": f"file://{base / 'nothing-here'}", "passphrase": PASS}, "not an Anvil backup repository"),
        ):
            with pytest.raises(AnvilAPIError) as err:
                c._json("POST", "/anvil/v1/admin/backup", json=body)
            assert err.value.status == 400 and needle in err.value.message
        assert not (srv.storage_path / "inner").exists() and not (base / "nothing-here").exists()
        with pytest.raises(AnvilAPIError) as err:
            c._json("POST", "/anvil/v1/admin/recovery/resume", json={})
        assert err.value.status == 412 and "not in recovery mode" in err.value.message
        assert c._json("GET", "/anvil/v1/admin/recovery")["recovery_mode"] is False


@pytest.mark.parametrize("args, needle", [
    (["--backup-every", "1h"], "go together"),
    (["--backup-repo", "file:///tmp/x", "--backup-every", "soon"], "interval must look like"),
    (["--backup-repo", "file:///nonexistent/anvil-repo", "--backup-every", "1h"], "not an Anvil backup repository"),
])
def test_serve_rejects_bad_schedule(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path", str(tmp_path / "d"),
                           "--listen", "127.0.0.1:0", *args], env={**os.environ, **ENV}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and needle in proc.stderr


def test_online_backup_progress_shows_in_ready_while_it_runs(tmp_path: Path) -> None:
    """`backup.running` in /anvil/health/ready carries the bytes done and total of the backup the
    server is taking (the CLI's progress bar reads it); it is gone once the backup is done."""
    import threading

    import httpx

    Repository.init(LocalBackend(tmp_path / "repo"), PASS)
    srv = AnvilServer(tmp_path / "data", env=ENV).start()
    try:
        with srv.client() as c:
            c.create_bucket("progress")
            for i in range(64):
                c.put_object("progress", f"o{i}", os.urandom(1024 * 1024))
            assert c.health()["backup"]["running"] is None
        seen: list[dict] = []
        done = threading.Event()

        def poll() -> None:
            with httpx.Client(base_url=srv.endpoint, timeout=10) as http:
                while not done.is_set():
                    running = http.get("/anvil/health/ready").json()["backup"]["running"]
                    if running:
                        seen.append(running)
                    time.sleep(0.005)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            # Without --json: the CLI draws its bar from the same figures (stderr is not a terminal here).
            proc = subprocess.run([sys.executable, "-m", "anvil.cli.main", "backup", "create", "--repo",
                                   f"file://{tmp_path / 'repo'}", "--endpoint", srv.endpoint],
                                  env={**srv.cli_env(), **ENV}, capture_output=True, text=True,
                                  timeout=300)
        finally:
            done.set()
            poller.join()
        assert proc.returncode == 0, proc.stderr
        assert "snapshot" in proc.stdout
        with_total = [r for r in seen if r.get("bytes_total")]
        assert with_total, seen[:3]
        assert all(0 <= r["bytes_done"] <= r["bytes_total"] for r in with_total)
        assert with_total[-1]["bytes_total"] >= 64 * 1024 * 1024
        with srv.client() as c:
            health = c.health()["backup"]
            assert health["running"] is None and health["last"]["ok"]
    finally:
        srv.stop()
