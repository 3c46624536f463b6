"""Continuous archiving and point-in-time restore, against real server processes.

Archive while writing, kill the server, restore to a time between two snapshots: every write
acknowledged before that time is there, none started after it. The drill proves the same
restore. An unreachable repository: writes go on, the lag and the error show, and the archive
catches up once the repository is back. Retention keeps what rolls a kept snapshot forward.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import AnvilServer, run_anvil, unique_bucket

ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "pitr passphrase"}
SCRUB = ("ANVIL_CLIENT_ID", "ANVIL_CLIENT_SECRET", "ANVIL_BACKUP_REPO")


def cli(*args: str, creds: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    proc = run_anvil([*args], env={**env, **ENV, **(creds or {})},
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"anvil {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc


def cli_json(*args: str, **kw) -> dict:
    return json.loads(cli(*args, "--json", **kw).stdout)


def creds_of(srv: AnvilServer) -> dict[str, str]:
    a = srv.admin_credentials()
    return {"ANVIL_CLIENT_ID": a["client_id"], "ANVIL_CLIENT_SECRET": a["client_secret"]}


def archived_seq(srv: AnvilServer) -> dict:
    import httpx

    return httpx.get(srv.endpoint + "/anvil/health/ready", timeout=10).json()["backup"]["archive"]


def wait_archived(srv: AnvilServer, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = archived_seq(srv)
        if st["lag_events"] == 0:
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.1)


@pytest.fixture
def repo(tmp_path: Path) -> str:
    url = f"file://{tmp_path / 'repo'}"
    cli("backup", "init", "--repo", url)
    return url


def test_archive_while_writing_kill_then_restore_to_a_time_between_two_snapshots(tmp_path: Path, repo: str) -> None:
    srv = AnvilServer(tmp_path / "data", env=ENV, extra_args=["--archive-repo", repo, "--archive-interval", "1s"])
    srv.start()
    creds = creds_of(srv)
    bucket = unique_bucket("pitr")
    acked: list[tuple[str, float, float]] = []  # key, sent, acknowledged
    stop = threading.Event()
    with srv.client() as c:
        c.create_bucket(bucket, versioning="Enabled")
        c.put_object(bucket, "before-snapshot", b"zero")
    s1 = cli_json("backup", "create", "--repo", repo, "--endpoint", srv.endpoint, creds=creds)

    def writer() -> None:
        with srv.client() as c:
            i = 0
            while not stop.is_set():
                key = f"k{i:05d}"
                sent = time.time()
                c.put_object(bucket, key, f"body {i}".encode())
                acked.append((key, sent, time.time()))
                i += 1
                time.sleep(0.01)

    t = threading.Thread(target=writer)
    t.start()
    # About fifty acknowledged writes on each side of the target time (one every ~10-20 ms), and some
    # after the second snapshot: the restore must split them exactly at the target.
    time.sleep(1.0)
    target_time = time.time()
    time.sleep(1.0)
    s2 = cli_json("backup", "create", "--repo", repo, "--endpoint", srv.endpoint, creds=creds)
    time.sleep(0.5)
    stop.set()
    t.join()
    # The archive keeps up with the writes (lag is visible and small), then the server dies hard.
    st = wait_archived(srv)
    assert st["enabled"] and st["archived_seq"] == st["head_seq"] and st["last_error"] is None, st
    srv.kill()
    assert s1["journal_seq"] < s2["journal_seq"]

    target = tmp_path / "restored"
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(target_time)) + f".{int(target_time * 1000) % 1000:03d}Z"
    res = cli_json("restore", "--repo", repo, "--to-time", when, "--target", str(target))
    pit = res["point_in_time"]
    assert res["ok"] and res["snapshot"] == s1["id"] and pit["events_replayed"] > 0, (pit, when, target_time, s1)
    before = [k for k, _sent, ack in acked if ack < target_time - 0.002]
    after = [k for k, sent, _ack in acked if sent > target_time + 0.002]
    assert before and after
    report = cli_json("recovery", "validate", "--storage-path", str(target))
    assert report["ok"], report["needs_operator"]
    restored = AnvilServer(target, env=ENV).start()
    try:
        with restored.client(client_id=creds["ANVIL_CLIENT_ID"], client_secret=creds["ANVIL_CLIENT_SECRET"]) as c:
            keys = {o["key"] for o in c.iter_objects(bucket)}
            assert "before-snapshot" in keys
            missing = [k for k in before if k not in keys]
            assert not missing, f"{len(missing)} writes acknowledged before the target are missing: {missing[:5]}"
            late = [k for k in after if k in keys]
            assert not late, f"writes made after the target are present: {late[:5]}"
            assert c.get_object(bucket, before[-1]) == f"body {int(before[-1][1:])}".encode()
            assert c.health()["journal"]["seq"] == pit["head_seq"]
        # Recovery mode of the running restored server, from the CLI: status, then resume.
        st = cli_json("recovery", "status", "--endpoint", restored.endpoint, creds=creds)
        assert st["recovery_mode"] is True, st
        both = cli("recovery", "status", "--endpoint", restored.endpoint, "--storage-path", str(target), check=False)
        assert both.returncode == 1 and "exactly one of" in both.stderr
        cli_json("recovery", "resume", "--endpoint", restored.endpoint, creds=creds)
        assert cli_json("recovery", "status", "--endpoint", restored.endpoint, creds=creds)["recovery_mode"] is False
    finally:
        restored.stop()

    # The restored store (same deployment, a new history after the target) must not append to the
    # old archive: that would make segments no restore can cross.
    again = AnvilServer(target, env=ENV, extra_args=["--archive-repo", repo]).start()
    try:
        deadline = time.monotonic() + 20
        while not (st := archived_seq(again))["last_error"]:
            assert time.monotonic() < deadline, st
            time.sleep(0.2)
        assert "different history" in st["last_error"], st
    finally:
        again.stop()

    # The drill proves the same point in time end to end (restore, validate, isolated server, smokes).
    proc = cli("drill", "--repo", repo, "--to-time", when, "--report-dir", str(tmp_path / "drill"), "--json",
               creds=creds, check=False)
    drill = json.loads((tmp_path / "drill" / "drill-report.json").read_text())
    assert proc.returncode == 0, json.dumps([c for c in drill["checks"] if not c["ok"]], indent=1)
    assert drill["point_in_time"]["head_seq"] == pit["head_seq"]

    # --to-seq: exactly that event is the head.
    res2 = cli_json("restore", "--repo", repo, "--to-seq", str(s2["journal_seq"] + 3), "--target",
                    str(tmp_path / "by-seq"))
    assert res2["snapshot"] == s2["id"] and res2["point_in_time"]["head_seq"] == s2["journal_seq"] + 3

    # Bad input is refused and writes nothing.
    bad = cli("restore", "--repo", repo, "--to-time", "yesterday", "--target", str(tmp_path / "bad"), check=False)
    assert bad.returncode == 1 and "ISO 8601" in bad.stderr and not (tmp_path / "bad").exists()
    far = cli("restore", "--repo", repo, "--to-seq", "999999", "--target", str(tmp_path / "far"), check=False)
    assert far.returncode == 1 and "cannot restore to seq 999999" in far.stderr and not (tmp_path / "far").exists()
    early = cli("restore", "--repo", repo, "--to-time", "2000-01-01T00:00:00Z", "--target", str(tmp_path / "e"),
                check=False)
    assert early.returncode == 1 and "no snapshot is older" in early.stderr

    # Status of the repository: snapshots and the archived range, without a server.
    st = cli_json("backup", "status", "--repo", repo)
    arch = st["repository"]["archive"]
    assert len(arch) == 1 and arch[0]["last_seq"] >= pit["head_seq"] and not arch[0]["gaps"]
    verify = cli_json("backup", "verify", "--repo", repo, "--read-data")
    assert verify["ok"] and verify["archive_segments"] >= 1, verify

    # Retention: keep only the newest snapshot; segments it needs stay, older ones go, and it
    # still rolls forward to the archive's end.
    forgot = cli_json("backup", "forget", "--repo", repo, "--keep-last", "1", "--prune")
    assert forgot["removed"] == [s1["id"]] and forgot["segments_removed"] >= 1
    assert cli_json("backup", "verify", "--repo", repo, "--read-data")["ok"]
    res3 = cli_json("restore", "--repo", repo, "--to-seq", str(arch[0]["last_seq"]), "--target",
                    str(tmp_path / "after-forget"))
    assert res3["ok"] and res3["snapshot"] == s2["id"]


def test_unreachable_repository_then_recovery_of_the_lag(tmp_path: Path, repo: str) -> None:
    srv = AnvilServer(tmp_path / "data", env=ENV, extra_args=["--archive-repo", repo]).start()
    try:
        bucket = unique_bucket("lag")
        with srv.client() as c:
            c.create_bucket(bucket)
            wait_archived(srv)
            away = tmp_path / "repo-away"
            (tmp_path / "repo").rename(away)
            for i in range(20):
                c.put_object(bucket, f"during-{i}", b"x" * 100)  # writes never wait for the archive
            deadline = time.monotonic() + 20
            while True:
                st = archived_seq(srv)
                if st["last_error"] and st["lag_events"] >= 20:
                    break
                assert time.monotonic() < deadline, st
                time.sleep(0.2)
            assert "no longer holds a repository" in st["last_error"] and not st["ok"]
            text = cli("backup", "status", "--endpoint", srv.endpoint, creds=creds_of(srv)).stdout
            # The first attempt says the repository is gone; a retry (reopening it) says it has no config.
            assert "failing" in text and "lag" in text and ("no longer holds a repository" in text
                                                           or "no config" in text), text
            away.rename(tmp_path / "repo")
            st = wait_archived(srv, timeout=60)
            assert st["lag_events"] == 0 and st["ok"], st
    finally:
        srv.stop()
    # Everything written while the repository was away is in the archive now.
    res = cli_json("backup", "status", "--repo", repo)
    assert res["repository"]["archive"][0]["last_seq"] >= st["head_seq"]


def test_compaction_keeps_events_the_archive_does_not_hold_yet(tmp_path: Path, repo: str) -> None:
    """Journal retention with a zero window while the repository is away: the events after the
    archive's cursor stay, so the archive catches up with no gap and a restore reaches the head."""
    srv = AnvilServer(tmp_path / "data", env=ENV, extra_args=["--archive-repo", repo]).start()
    try:
        with srv.client() as c:
            bucket = unique_bucket("compact")
            c.create_bucket(bucket)
            cli("backup", "create", "--repo", repo, "--endpoint", srv.endpoint, creds=creds_of(srv))
            c.put_object(bucket, "before", b"archived")
            archived = wait_archived(srv)["archived_seq"]
            (tmp_path / "repo").rename(tmp_path / "away")
            for i in range(10):
                c.put_object(bucket, f"while-away-{i}", b"not archived yet")
            out = c._json("POST", "/anvil/v1/admin/watch/compact", json={"retention_seconds": 0})
            # Only what the archive already holds may go.
            assert out["base"] <= archived, (out, archived)
            journal = c.journal(after=archived, limit=5)
            assert journal and journal[0]["seq"] == archived + 1, journal
            (tmp_path / "away").rename(tmp_path / "repo")
            st = wait_archived(srv, timeout=60)
            assert st["ok"] and not st["gap"], st
            head = st["head_seq"]
            # Now it is archived, compaction may take it.
            out = c._json("POST", "/anvil/v1/admin/watch/compact", json={"retention_seconds": 0})
            assert out["base"] > archived, out
    finally:
        srv.stop()
    res = cli_json("restore", "--repo", repo, "--to-seq", str(head), "--target", str(tmp_path / "restored"))
    assert res["ok"] and res["point_in_time"]["head_seq"] == head, res


def test_gc_keeps_blobs_the_archive_does_not_hold_yet(tmp_path: Path, repo: str) -> None:
    srv = AnvilServer(tmp_path / "data", env=ENV, extra_args=["--archive-repo", repo]).start()
    try:
        with srv.client() as c:
            bucket = unique_bucket("gc")
            c.create_bucket(bucket)
            wait_archived(srv)
            (tmp_path / "repo").rename(tmp_path / "away")
            body = os.urandom(200_000)
            c.put_object(bucket, "short-lived", body)
            c.delete_object(bucket, "short-lived")
            report = c.gc(grace_seconds=0)
            assert report["blob_count"] == 0, report  # unreferenced, but not archived yet
            (tmp_path / "away").rename(tmp_path / "repo")
            wait_archived(srv, timeout=60)
            report = c.gc(grace_seconds=0)
            assert report["blob_count"] == 1, report  # archived: now it may go
    finally:
        srv.stop()


def test_incremental_journal_delta_costs_what_changed_and_restores_and_drills(tmp_path: Path, repo: str) -> None:
    srv = AnvilServer(tmp_path / "data", env=ENV).start()
    creds = creds_of(srv)
    try:
        bucket = unique_bucket("delta")
        with srv.client() as c:
            c.create_bucket(bucket)
            for i in range(30):
                c.put_object(bucket, f"a{i}", os.urandom(3000))
        none = cli("backup", "create", "--repo", repo, "--endpoint", srv.endpoint, "--incremental", "--json",
                   creds=creds, check=False)
        assert none.returncode == 1 and "take a full snapshot first" in none.stdout + none.stderr
        full = cli_json("backup", "create", "--repo", repo, "--endpoint", srv.endpoint, creds=creds)
        with srv.client() as c:
            c.put_object(bucket, "after-full", b"new body")
            c.delete_object(bucket, "a0")
        d1 = cli_json("backup", "create", "--repo", repo, "--endpoint", srv.endpoint, "--incremental", creds=creds)
        assert d1["kind"] == "delta" and d1["base"] == full["id"] and d1["stats"]["events"] == 2
        # Nothing changed: nothing to ship, a manifest of a few hundred bytes.
        d2 = cli_json("backup", "create", "--repo", repo, "--endpoint", srv.endpoint, "--incremental", creds=creds)
        assert d2["stats"]["events"] == 0 and d2["journal_seq"] == d1["journal_seq"] and d2["new_bytes"] == 0
        listed = cli_json("backup", "list", "--repo", repo)
        assert [r["kind"] for r in listed] == ["full", "delta", "delta"]
    finally:
        srv.stop()
    target = tmp_path / "restored"
    res = cli_json("restore", "--repo", repo, "--snapshot", d2["id"], "--target", str(target))
    assert res["ok"] and res["base"] == full["id"] and res["point_in_time"]["head_seq"] == d2["journal_seq"]
    assert cli_json("recovery", "validate", "--storage-path", str(target))["ok"]
    restored = AnvilServer(target, env=ENV).start()
    try:
        with restored.client(client_id=creds["ANVIL_CLIENT_ID"], client_secret=creds["ANVIL_CLIENT_SECRET"]) as c:
            keys = {o["key"] for o in c.iter_objects(bucket)}
            assert "after-full" in keys and "a0" not in keys and "a1" in keys
            assert c.get_object(bucket, "after-full") == b"new body"
    finally:
        restored.stop()
    proc = cli("drill", "--repo", repo, "--report-dir", str(tmp_path / "drill"), "--json", creds=creds, check=False)
    drill = json.loads((tmp_path / "drill" / "drill-report.json").read_text())
    assert proc.returncode == 0, json.dumps([c for c in drill["checks"] if not c["ok"]], indent=1)
    # Retention keeps the base a kept delta needs.
    forgot = cli_json("backup", "forget", "--repo", repo, "--keep-last", "1", "--prune")
    assert set(forgot["kept"]) == {d2["id"], full["id"]}
    # `backup get` of a delta: its base's catalog rolled forward, bodies from the archive or the base.
    out = tmp_path / "got"
    got = cli_json("backup", "get", "--repo", repo, "--snapshot", d2["id"], "-o", str(out), bucket, "after-full")
    assert out.read_bytes() == b"new body" and got["size"] == len(b"new body")
    cli("backup", "get", "--repo", repo, "--snapshot", d2["id"], "-o", str(out), bucket, "a1")
    assert len(out.read_bytes()) == 3000  # unchanged since the base: its body comes from the base
    gone = cli("backup", "get", "--repo", repo, "--snapshot", d2["id"], bucket, "a0", check=False)
    assert gone.returncode == 1 and "is not in snapshot" in gone.stderr, gone.stderr
    gone_in_base = cli("backup", "get", "--repo", repo, "--snapshot", full["id"], bucket, "after-full", check=False)
    assert gone_in_base.returncode == 1 and "is not in snapshot" in gone_in_base.stderr
    # inspect: readable at 80 columns, one row per participant (none repeated per checklist item).
    for snap in (full["id"], d2["id"]):
        text = cli("backup", "inspect", "--repo", repo, snap, creds=creds).stdout
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= 80, "\n".join(ln for ln in lines if len(ln) > 80)
        table = text.split("participant summaries", 1)[1] if snap == full["id"] else ""
        for name in ("objects", "identity", "journal"):
            if table:
                assert sum(1 for ln in table.splitlines() if ln.strip("│ ").startswith(name + " ")) == 1, table


def test_archiving_configured_by_an_admin_at_runtime(tmp_path: Path, repo: str) -> None:
    import httpx

    srv = AnvilServer(tmp_path / "data", env=ENV).start()
    try:
        h = srv.auth_headers()
        assert archived_seq(srv) == {"enabled": False}
        bad = httpx.post(srv.endpoint + "/anvil/v1/admin/archive", headers=h,
                         json={"repo": repo, "interval_seconds": 0})
        assert bad.status_code == 400 and "interval_seconds" in bad.json()["error"]["message"]
        wrong = httpx.post(srv.endpoint + "/anvil/v1/admin/archive", headers=h,
                           json={"repo": repo, "passphrase": "not it"})
        assert wrong.status_code == 400 and "wrong passphrase" in wrong.json()["error"]["message"]
        assert archived_seq(srv) == {"enabled": False}
        on = httpx.post(srv.endpoint + "/anvil/v1/admin/archive", headers=h, json={"repo": repo})
        assert on.status_code == 201 and on.json()["enabled"], on.text
        with srv.client() as c:
            c.create_bucket(unique_bucket("rt"))
        flushed = httpx.post(srv.endpoint + "/anvil/v1/admin/archive/flush", headers=h, timeout=60).json()
        assert flushed["lag_events"] == 0 and flushed["archived_seq"] == flushed["head_seq"]
        again = httpx.post(srv.endpoint + "/anvil/v1/admin/archive", headers=h, json={"repo": repo})
        assert again.status_code == 412
        off = httpx.delete(srv.endpoint + "/anvil/v1/admin/archive", headers=h, timeout=60)
        assert off.status_code == 200 and archived_seq(srv) == {"enabled": False}
    finally:
        srv.stop()


def test_an_idempotent_retry_after_point_in_time_restore_gets_the_original_answer(tmp_path: Path,
                                                                                   repo: str) -> None:
    """The idempotency record comes back by replay (it is journaled with the PUT), not from a
    snapshot: the snapshot is taken before the keyed PUT."""
    srv = AnvilServer(tmp_path / "data", env=ENV, extra_args=["--archive-repo", repo, "--archive-interval", "1s"])
    srv.start()
    creds = creds_of(srv)
    bucket = unique_bucket("idem")
    try:
        with srv.client() as c:
            c.create_bucket(bucket, versioning="Enabled")
            cli_json("backup", "create", "--repo", repo, "--endpoint", srv.endpoint, creds=creds)
            first = c.put_object(bucket, "k", b"the one body", idempotency_key="retry-me")
            head = c.health()["journal"]["seq"]
        wait_archived(srv)
    finally:
        srv.kill()
    target = tmp_path / "restored"
    res = cli_json("restore", "--repo", repo, "--to-seq", str(head), "--target", str(target))
    assert res["ok"] and res["point_in_time"]["events_replayed"] >= 2, res
    restored = AnvilServer(target, env=ENV).start()
    try:
        cli_json("recovery", "resume", "--endpoint", restored.endpoint, creds=creds)
        with restored.client(client_id=creds["ANVIL_CLIENT_ID"], client_secret=creds["ANVIL_CLIENT_SECRET"]) as c:
            seq = c.health()["journal"]["seq"]
            again = c.put_object(bucket, "k", b"the one body", idempotency_key="retry-me")
            assert again.pop("idempotent_replay", None) is True
            assert again == first
            assert c.health()["journal"]["seq"] == seq  # the retry changed nothing
            assert len(c.list_versions(bucket)["versions"]) == 1
            # The same key for another request is still refused, as on the original server.
            with pytest.raises(Exception, match="IdempotencyMismatch"):
                c.put_object(bucket, "k", b"another body", idempotency_key="retry-me")
    finally:
        restored.stop()
