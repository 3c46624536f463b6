"""The storage core through a real server: FORMAT, the lock, the journal and restarts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anvil.client import AnvilAPIError, AnvilClient
from tests.helpers import AnvilServer, free_port
from tests.objutil import events_since, journal_seq

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines


def _serve(path: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path", str(path),
         "--listen", f"127.0.0.1:{free_port()}"],
        capture_output=True, timeout=timeout, text=True,
    )


def test_layout_and_format(server: AnvilServer, engine: str) -> None:
    root = server.storage_path
    for name in ("FORMAT", "LOCK", "blobs/sha256", "tmp", "derived", "secrets", "bootstrap"):
        assert (root / name).exists(), name
    # The records live in catalog.db, or only in PostgreSQL.
    assert (root / "catalog.db").exists() == (engine == "sqlite")
    fmt = json.loads((root / "FORMAT").read_text())
    assert fmt["format_version"] == 1 and fmt["deployment_id"]
    with server.client() as c:
        assert c.health()["deployment_id"] == fmt["deployment_id"]


@pytest.mark.parametrize("content", [
    json.dumps({"format_version": 99, "deployment_id": "x"}),
    "not json at all",
    json.dumps({"deployment_id": "x"}),
])
def test_unknown_format_refuses_start(tmp_path: Path, content: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "FORMAT").write_text(content)
    proc = _serve(root)
    assert proc.returncode != 0
    assert "format" in proc.stderr.lower() and "Traceback" not in proc.stderr
    assert (root / "FORMAT").read_text() == content  # left exactly as found
    assert sorted(os.listdir(root)) == ["FORMAT", "LOCK"]  # nothing created beside the lock


def test_missing_format_beside_a_catalog_refuses_start(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "catalog.db").write_bytes(b"")
    proc = _serve(root)
    assert proc.returncode != 0 and "FORMAT" in proc.stderr and "Traceback" not in proc.stderr
    assert not (root / "FORMAT").exists()


def test_second_server_on_same_path_is_refused(server: AnvilServer) -> None:
    proc = _serve(server.storage_path)
    assert proc.returncode != 0
    assert "in use" in proc.stderr and "Traceback" not in proc.stderr
    with server.client() as c:  # the first server is unharmed
        assert c.health()["status"] == "ready"


def test_each_mutation_emits_one_event(client: AnvilClient) -> None:
    """Every mutation appends exactly one event of the right kind, with a replayable payload."""
    seq = journal_seq(client)
    steps = [
        ("bucket.create", lambda: client.create_bucket("journal-check")),
        ("bucket.versioning", lambda: client.set_versioning("journal-check", "Enabled")),
        ("object.put", lambda: client.put_object("journal-check", "k", b"abc", metadata={"m": "é"},
                                                 content_type="text/plain")),
        ("object.put", lambda: client.copy_object("journal-check", "k2", source_key="k")),
        ("object.delete", lambda: client.delete_object("journal-check", "k")),
        ("multipart.create", lambda: client.create_upload("journal-check", "mp")),
    ]
    results = []
    for kind, step in steps:
        before = journal_seq(client)
        results.append(step())
        ev = events_since(client, before)
        assert [e["kind"] for e in ev] == [kind]
    up = results[-1]
    for kind, step in [
        ("multipart.part", lambda: client.upload_part("journal-check", up, 1, b"part")),
        ("multipart.abort", lambda: client.abort_upload("journal-check", up)),
        ("object.delete", lambda: client.delete_object("journal-check", "k", version_id=results[2]["version_id"])),
    ]:
        before = journal_seq(client)
        step()
        assert [e["kind"] for e in events_since(client, before)] == [kind]
    events = events_since(client, seq)
    assert [e["seq"] for e in events] == list(range(seq + 1, seq + 1 + len(events)))
    put = events[2]
    assert put["scope"] == "journal-check/k"
    p = put["payload"]
    assert (p["bucket"], p["key"], p["version_id"], p["size"], p["content_type"], p["metadata"]) == (
        "journal-check", "k", results[2]["version_id"], 3, "text/plain", {"m": "é"})
    assert p["sha256"] == results[2]["sha256"] and p["etag"] == results[2]["etag"]
    assert events[3]["payload"]["copy_source"] == {"bucket": "journal-check", "key": "k",
                                                   "version_id": results[2]["version_id"]}
    assert events[4]["payload"]["delete_marker"] is True
    assert events[4]["payload"]["version_id"] == results[4]["version_id"]
    for e in events:
        assert e["actor"] and e["request_id"] and e["tenant"]
    for prev, cur in zip(events, events[1:], strict=False):
        assert cur["prev_hash"] == prev["hash"]
    # Failed and no-op requests add nothing.
    before = journal_seq(client)
    client.set_versioning("journal-check", "Enabled")
    with pytest.raises(AnvilAPIError):
        client.create_bucket("journal-check")
    assert journal_seq(client) == before
    verdict = client.verify_journal()
    assert verdict["ok"] is True and verdict["checked"] == journal_seq(client)


def test_restart_keeps_everything(tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = AnvilServer(tmp_path_factory.mktemp("restart") / "data").start()
    try:
        with srv.client() as c:
            c.create_bucket("keep", versioning="Enabled")
            v1 = c.put_object("keep", "a", b"one", metadata={"x": "ü"})["version_id"]
            c.put_object("keep", "a", b"two")
            c.put_object("keep", "dir/b", b"bee")
            c.delete_object("keep", "dir/b")
            up = c.create_upload("keep", "mp")
            before = {
                "buckets": c.list_buckets(),
                "versions": c.list_versions("keep"),
                "objects": c.list_objects("keep"),
                "journal": c.journal(limit=1000),
                "uploads": c.list_uploads("keep"),
            }
        srv.restart()
        with srv.client() as c:
            after = {
                "buckets": c.list_buckets(),
                "versions": c.list_versions("keep"),
                "objects": c.list_objects("keep"),
                "journal": c.journal(limit=1000),
                "uploads": c.list_uploads("keep"),
            }
            assert after == before
            assert c.get_object("keep", "a", version_id=v1) == b"one"
            assert c.head_object("keep", "a", version_id=v1)["metadata"] == {"x": "ü"}
            assert [u["upload_id"] for u in after["uploads"]] == [up]
            # The chain continues across the restart.
            c.put_object("keep", "after", b"x")
            events = c.journal(limit=1000)
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            assert events[-1]["prev_hash"] == before["journal"][-1]["hash"]
            assert c.verify_journal()["ok"] is True
    finally:
        srv.stop()


def test_tampered_journal_is_detected(tmp_path_factory: pytest.TempPathFactory) -> None:
    import apsw

    srv = AnvilServer(tmp_path_factory.mktemp("tamper") / "data").start()
    try:
        with srv.client() as c:
            c.create_bucket("tamper")
            c.put_object("tamper", "k", b"x")
            seq = next(e["seq"] for e in c.journal(limit=1000) if e["kind"] == "bucket.create")
        srv.stop()
        conn = apsw.Connection(str(srv.storage_path / "catalog.db"))
        conn.execute("UPDATE journal SET payload = replace(payload, 'tamper', 'evil') WHERE seq = ?", (seq,))
        conn.close()
        srv.start()
        with srv.client() as c:
            verdict = c.verify_journal()
            assert verdict["ok"] is False and [p["seq"] for p in verdict["problems"]] == [seq]
    finally:
        srv.stop()
