"""PersonalDB through recovery, with real servers and real SQLite session changesets:

- a SIGKILL during commits leaves the chain intact (every acknowledged commit, certified);
- back up, keep committing from one replica, restore: validation checks every head against its
  certificate chain; a replica in sync at backup time catches up; a replica that saw commits
  after the backup is told `snapshot_required` (divergent) and is never silently forked;
- the drill passes with the personaldb smoke.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from anvil.client import AnvilClient
from anvil.personaldb import Replica
from anvil.personaldb.certs import verify_group
from tests.helpers import AnvilServer, run_anvil

ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "correct horse battery staple"}
SCHEMA = "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT NOT NULL)"


def cli(srv: AnvilServer | None, *args: str, check: bool = True,
        extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # The backup passphrase of this module wins over anything another test left in os.environ.
    env = {**(srv.cli_env() if srv is not None else os.environ), **ENV, **(extra or {})}
    proc = run_anvil([*args], env=env, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"anvil {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_sigkill_during_commits_leaves_the_chain_intact(tmp_path: Path) -> None:
    srv = AnvilServer(tmp_path / "data").start()
    group = f"k-{uuid.uuid4().hex[:8]}"
    acked: list[tuple[int, str]] = []
    try:
        with srv.client() as c:
            c.pdb_create(group, SCHEMA)
        stop = threading.Event()

        def writer() -> None:
            with srv.client() as c:
                r = Replica(tmp_path / "w.sqlite", c, group)
                i = 0
                while not stop.is_set():
                    i += 1
                    r.execute("INSERT INTO notes(id, body) VALUES (?, ?)", (i, "x" * 200))
                    try:
                        r.sync()
                    except Exception:  # noqa: BLE001 - the server was killed under us
                        return
                    acked.append(r.head)

        t = threading.Thread(target=writer)
        t.start()
        deadline = time.monotonic() + 20
        while len(acked) < 30 and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.kill()  # SIGKILL, mid-stream
        stop.set()
        t.join(30)
        assert len(acked) >= 30
        srv.start()
        with srv.client() as c:
            res = verify_group(c, group)  # every certificate from genesis to the head verifies
            last = acked[-1]
            assert res["head_index"] >= last[0]
            page = c.pdb_catch_up(group, last[0], last[1])
            assert page["status"] == "ok"  # every acknowledged head is on the chain
            r = Replica(tmp_path / "fresh.sqlite", c, group)
            assert r.head == (res["head_index"], res["head_hash"])
            assert r.query("SELECT count(*) FROM notes")[0][0] == res["head_index"]
            r.close()
        srv.stop()
        fsck = json.loads(cli(None, "fsck", "--storage-path", str(srv.storage_path), "--json", check=False).stdout)
        assert fsck["ok"], fsck["findings"]
        srv_errors = [f for f in fsck["findings"] if f["subsystem"].startswith("personaldb")
                      and f["severity"] == "error"]
        assert srv_errors == []
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def restored(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("pdb-recovery")
    srv = AnvilServer(base / "data", env=ENV).start()
    group = "recov"
    try:
        with srv.client() as c:
            c.pdb_create(group, SCHEMA, snapshot_every=3)
            # A row binding (row permissions by relationship) is source state: restored with the group.
            c.authz_write_schema("definition user {}\ndefinition note {\n relation owner: user\n"
                                 " permission edit = owner\n}")
            c.pdb_bind(group, {"resource_type": "note", "update": "edit"})
            a = Replica(base / "a.sqlite", c, group)  # in sync at backup time
            b = Replica(base / "b.sqlite", c, group)  # will commit after the backup
            for i in range(4):
                a.execute("INSERT INTO notes(id, body) VALUES (?, ?)", (i, f"a{i}"))
                a.sync()
            b.sync()
            c.pdb_build_snapshot(group)
            repo = f"file://{base / 'repo'}"
            cli(srv, "backup", "init", "--repo", repo, "--storage-path", str(srv.storage_path))
            snap = json.loads(cli(srv, "backup", "create", "--repo", repo, "--endpoint", srv.endpoint,
                                  "--escrow-secrets", "--json").stdout)
            at_backup = a.head
            b.execute("INSERT INTO notes(id, body) VALUES (100, 'after the backup')")
            b.sync()
            assert b.head[0] == at_backup[0] + 1
            a.close()
            b.close()
        cred = srv.admin_credentials()
    finally:
        srv.stop()
    target = base / "restored"
    res = json.loads(cli(None, "restore", "--repo", repo, "--snapshot", snap["id"], "--target", str(target),
                         "--json").stdout)
    validation = json.loads(cli(None, "recovery", "validate", "--storage-path", str(target), "--json",
                                check=False).stdout)
    cli(None, "recovery", "resume", "--storage-path", str(target))
    srv2 = AnvilServer(target, env=ENV).start()
    try:
        yield {"base": base, "srv": srv2, "group": group, "at_backup": at_backup, "restore": res,
               "validation": validation, "repo": repo,
               "snap": snap, "cred": cred}
    finally:
        srv2.stop()


def test_restore_validation_checks_the_chain(restored) -> None:
    v = restored["validation"]
    text = json.dumps(v)
    assert "certificates up to each head" in text, text[:2000]  # the personaldb participant's verdict
    errors = [f for f in json.loads(text).get("findings", []) if f.get("severity") == "error"]
    assert errors == [], errors


def test_restore_keeps_the_row_binding(restored) -> None:
    cred = restored["cred"]
    with AnvilClient(restored["srv"].endpoint, client_id=cred["client_id"], client_secret=cred["client_secret"]) as c:
        assert c.pdb_binding(restored["group"])["binding"]["update"] == "edit"


def test_in_sync_replica_catches_up_and_divergent_one_is_told(restored) -> None:
    srv, group, base = restored["srv"], restored["group"], restored["base"]
    cred = restored["cred"]
    with AnvilClient(srv.endpoint, client_id=cred["client_id"], client_secret=cred["client_secret"]) as c:
        assert c.pdb_get(group)["head_index"] == restored["at_backup"][0]
        # Someone commits on the restored server.
        other = Replica(base / "c.sqlite", c, group)
        other.execute("INSERT INTO notes(id, body) VALUES (50, 'after restore')")
        other.sync()
        a = Replica(base / "a.sqlite", c, group)
        assert a.head == restored["at_backup"]
        a.sync()
        assert a.head == other.head and a.state_hash() == other.state_hash() and not a.diverged
        # b saw index at_backup+1 that the restored server never had: divergent, never forked silently.
        b = Replica(base / "b.sqlite", c, group, on_diverge="raise")
        page = c.pdb_catch_up(group, *b.head)
        assert page["status"] == "snapshot_required" and page["reason"] == "divergent"
        from anvil.personaldb.replica import ReplicaDiverged

        with pytest.raises(ReplicaDiverged):
            b.sync()
        b.close()
        b = Replica(base / "b.sqlite", c, group)  # the default: keep the old file, reset, re-apply pending
        b.sync()
        assert b.diverged and Path(b.diverged[0]["kept"]).exists()
        assert b.head == a.head and b.state_hash() == a.state_hash()
        assert (100, "after the backup") not in b.query("SELECT id, body FROM notes")
        for r in (a, b, other):
            r.close()
        # Not on the chain: answered with snapshot_required, never an error or a fork.
        assert c.pdb_catch_up(group, 0, "nothex")["status"] == "snapshot_required"


def test_drill_runs_the_personaldb_smoke(restored, tmp_path: Path) -> None:
    cred = restored["cred"]
    proc = cli(None, "drill", "--repo", restored["repo"], "--snapshot", restored["snap"]["id"],
               "--report-dir", str(tmp_path), "--json", check=False,
               extra={"ANVIL_CLIENT_ID": cred["client_id"], "ANVIL_CLIENT_SECRET": cred["client_secret"]})
    report = json.loads((tmp_path / "drill-report.json").read_text())
    assert proc.returncode == 0, json.dumps([c for c in report["checks"] if not c["ok"]], indent=1)
    checks = {c["check"]: c for c in report["checks"]}
    assert "smoke: personaldb" in checks and checks["smoke: personaldb"]["ok"]


def test_fsck_detects_a_tampered_stored_chain(tmp_path: Path) -> None:
    import apsw

    srv = AnvilServer(tmp_path / "data").start()
    try:
        with srv.client() as c:
            c.pdb_create("tamper", SCHEMA)
            r = Replica(tmp_path / "r.sqlite", c, "tamper")
            for i in range(3):
                r.execute("INSERT INTO notes(id, body) VALUES (?, 'x')", (i,))
                r.sync()
            r.close()
    finally:
        srv.stop()
    clean = json.loads(cli(None, "fsck", "--storage-path", str(srv.storage_path), "--json", check=False).stdout)
    assert clean["ok"] and not [f for f in clean["findings"] if f["subsystem"] == "personaldb"]
    conn = apsw.Connection(str(srv.storage_path / "catalog.db"))
    conn.execute("UPDATE pdb_log SET changeset = ? WHERE grp = 'tamper' AND idx = 2", (b"rewritten history",))
    conn.close()
    out = json.loads(cli(None, "fsck", "--storage-path", str(srv.storage_path), "--json", check=False).stdout)
    bad = [f for f in out["findings"] if f["subsystem"] == "personaldb" and f["severity"] == "error"]
    assert not out["ok"] and bad and bad[0]["invariant"] == "personaldb.chain" and "entry 2" in bad[0]["detail"]
