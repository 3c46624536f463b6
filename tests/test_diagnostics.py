"""fsck and gc offline on a stopped store: corrupt each thing fsck checks, get exactly the expected finding.

One baseline store is built once (in-process, through the real object service), then each
test corrupts its own copy and runs the real `anvil` CLI on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import apsw
import pytest

from anvil.context import DEV_PRINCIPAL, Principal, RequestContext
from anvil.diagnostics import open_offline_target, run_fsck
from anvil.runtime import Anvil, recovery_participants
from tests.helpers import run_anvil

TENANT_B = Principal(tenant="tenant-b", subject="bob", admin=False, scopes=("*",))


@pytest.fixture(scope="module", autouse=True)
def _blob_files():
    """These tests damage, delete or age blob *files*: small bodies are kept as files here
    (ANVIL_INLINE_MAX=0). Inline bodies get the same checks in tests/test_inline.py."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANVIL_INLINE_MAX", "0")
        yield


def put(anvil: Anvil, ctx: RequestContext, bucket: str, key: str, data: bytes) -> dict[str, Any]:
    w = anvil.storage.blobs.writer()
    w.write(data)
    info = anvil.objects.store_body(w)
    return anvil.objects.put_object(ctx, bucket, key, info)


def blob_path(root: Path, sha: str) -> Path:
    return root / "blobs" / "sha256" / sha[:2] / sha


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("diag-baseline") / "data"
    anvil = Anvil(root)
    ctx = RequestContext(DEV_PRINCIPAL)
    ctx_b = RequestContext(TENANT_B)
    try:
        anvil.objects.create_bucket(ctx, "alpha")
        anvil.objects.create_bucket(ctx_b, "beta", versioning="Enabled")
        anvil.objects.create_bucket(ctx, "uploads-only")
        for i in range(40):
            put(anvil, ctx, "alpha", f"k/{i:03d}", f"alpha object {i} ".encode() * 50)
        put(anvil, ctx, "alpha", "shared-1", b"shared body")
        put(anvil, ctx_b, "beta", "shared-2", b"shared body")  # same blob, another tenant
        put(anvil, ctx_b, "beta", "doc", b"version one")
        put(anvil, ctx_b, "beta", "doc", b"version two")
        anvil.objects.delete_object(ctx_b, "beta", "doc")  # a delete marker: no body, no blob
        up = anvil.objects.create_multipart(ctx, "uploads-only", "big")
        w = anvil.storage.blobs.writer()
        w.write(b"part one bytes")
        anvil.objects.upload_part(ctx, "uploads-only", up["upload_id"], 1, anvil.objects.store_body(w))
    finally:
        anvil.close()
    return root


@pytest.fixture
def store(baseline: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(baseline, dst)
    return dst


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ANVIL_ENDPOINT"}
    return run_anvil([*args], capture_output=True, env=env, timeout=120)


def fsck(root: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    proc = cli("fsck", "--storage-path", str(root), "--json", *extra)
    assert proc.returncode in (0, 1), proc.stderr.decode() + proc.stdout.decode()
    return proc.returncode, json.loads(proc.stdout)


def invariants(report: dict[str, Any]) -> list[str]:
    return sorted(f["invariant"] for f in report["findings"])


def source_digest(root: Path) -> str:
    """Every table except findings, and the journal without diagnostics events: the source records."""
    conn = apsw.Connection(str(root / "catalog.db"), flags=apsw.SQLITE_OPEN_READONLY)
    h = hashlib.sha256()
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        for t in tables:
            if t == "findings":
                continue
            where = " WHERE kind NOT LIKE 'diagnostics.%'" if t == "journal" else ""
            for row in conn.execute(f'SELECT * FROM "{t}"{where} ORDER BY 1, 2'):
                h.update(repr((t, row)).encode())
    finally:
        conn.close()
    return h.hexdigest()


def version_blobs(root: Path, bucket: str, key: str) -> list[str]:
    conn = apsw.Connection(str(root / "catalog.db"))
    try:
        (chunks,) = conn.execute(
            "SELECT chunks FROM versions WHERE bucket = ? AND key = ? AND is_latest = 1", (bucket, key)).fetchone()
    finally:
        conn.close()
    return [c[0] for c in json.loads(chunks)]


def sql(root: Path, statement: str, args: tuple = ()) -> None:
    conn = apsw.Connection(str(root / "catalog.db"))
    try:
        conn.execute(statement, args)
    finally:
        conn.close()


# ------------------------------------------------------------------ clean


def test_clean_store_gives_zero_findings_and_writes_nothing(store: Path) -> None:
    before = source_digest(store)
    rc, report = fsck(store, "--deep")
    assert rc == 0 and report["ok"] is True
    assert report["findings"] == []
    blobs = report["checks"]["blobs"]
    # 40 alpha bodies + 1 shared + 2 beta versions + 1 part = 44 blobs, all referenced, all hashed
    assert blobs["on_disk"] == blobs["referenced"] == blobs["hashed"] == 44
    assert blobs["shared"] == 1 and blobs["orphans"] == 0 and blobs["missing"] == 0
    assert report["checks"]["journal"]["problems"] == 0
    assert report["checks"]["watch"]["cursors"] == 0
    assert report["checks"]["derived"] == {"skipped": "no derived manifests"}
    assert source_digest(store) == before


# ------------------------------------------------------------------ each corruption, exactly one finding


def test_flipped_byte_is_found_only_by_deep(store: Path) -> None:
    target = version_blobs(store, "alpha", "k/007")[0]
    p = blob_path(store, target)
    data = bytearray(p.read_bytes())
    data[10] ^= 0x01
    p.write_bytes(bytes(data))
    rc, shallow = fsck(store)
    assert rc == 0 and shallow["findings"] == []
    rc, deep = fsck(store, "--deep")
    assert rc == 1 and invariants(deep) == ["blobs.hash_mismatch"]
    f = deep["findings"][0]
    assert f["severity"] == "error" and f["affected"]["blob"] == target
    assert f["affected"]["actual_sha256"] == sha(bytes(data))
    assert f["affected"]["references"] == [{"tenant": "default", "bucket": "alpha", "key": "k/007",
                                            "version_id": "null"}]
    assert f["operator_action_required"] is True
    # A shallow run cannot re-check it, so neither reports nor resolves it, but says it is open.
    rc, shallow = fsck(store)
    assert rc == 0 and shallow["findings"] == [] and shallow["resolved"] == [] and shallow["unresolved_earlier"] == 1


def test_deleted_blob_is_reported_with_every_version_using_it(store: Path) -> None:
    shared = sha(b"shared body")
    blob_path(store, shared).unlink()
    rc, report = fsck(store)
    assert rc == 1 and invariants(report) == ["objects.blob_missing"]
    f = report["findings"][0]
    assert f["affected"]["blob"] == shared and f["affected"]["reference_count"] == 2
    assert sorted((r["tenant"], r["bucket"], r["key"]) for r in f["affected"]["references"]) == [
        ("default", "alpha", "shared-1"), ("tenant-b", "beta", "shared-2")]


def test_dangling_version_row_is_reported(store: Path) -> None:
    ghost = sha(b"never stored")
    sql(store, "INSERT INTO versions(bucket, key, version_id, seq, is_latest, delete_marker, size, etag, sha256, "
               "content_type, metadata, chunks, created) VALUES ('alpha', 'ghost', 'null', 999, 1, 0, 12, 'x', ?, "
               "'application/octet-stream', '{}', ?, 0)", (ghost, json.dumps([[ghost, 12]])))
    rc, report = fsck(store)
    assert rc == 1 and invariants(report) == ["objects.blob_missing"]
    assert report["findings"][0]["affected"]["references"] == [
        {"tenant": "default", "bucket": "alpha", "key": "ghost", "version_id": "null"}]


def test_orphan_blob_is_a_warning_with_its_age(store: Path) -> None:
    body = b"nobody references me"
    p = blob_path(store, sha(body))
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(body)
    old = time.time() - 7200
    os.utime(p, (old, old))
    rc, report = fsck(store, "--deep")
    assert rc == 0 and invariants(report) == ["blobs.orphan"]
    f = report["findings"][0]
    assert f["severity"] == "warning" and f["affected"]["blob"] == sha(body)
    assert 7190 <= f["affected"]["age_seconds"] <= 7400 and f["affected"]["size"] == len(body)


def test_edited_journal_payload_breaks_the_chain_at_that_event(store: Path) -> None:
    sql(store, "UPDATE journal SET payload = replace(payload, 'alpha', 'omega') WHERE seq = 5")
    rc, report = fsck(store)
    assert rc == 1 and invariants(report) == ["journal.chain"]
    f = report["findings"][0]
    assert f["affected"] == {"seq": 5} and f["cursor"] == "5" and "does not match" in f["detail"]


def test_removed_journal_event_is_a_gap(store: Path) -> None:
    sql(store, "DELETE FROM journal WHERE seq = 7")
    rc, report = fsck(store)
    assert rc == 1 and invariants(report) == ["journal.chain", "journal.gapless"]
    assert {f["affected"]["seq"] for f in report["findings"]} == {8}


def test_damaged_catalog_page_fails_integrity_check(store: Path) -> None:
    conn = apsw.Connection(str(store / "catalog.db"))
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        (root_page,) = conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'versions_order'").fetchone()
    finally:
        conn.close()
    assert 1 < root_page < pages  # a page in the middle of the file
    # Overwrite the cell contents at the end of the index page (cells grow from the page end).
    with open(store / "catalog.db", "r+b") as f:
        f.seek(root_page * page_size - 300)
        f.write(b"\xa5" * 200)
    rc, report = fsck(store)
    # A check whose query runs into the damaged index reports that it could not read, not a false result.
    found = invariants(report)
    assert rc == 1 and "storage.catalog_integrity" in found
    assert all(i == "storage.catalog_integrity" or i.endswith(".unreadable") for i in found), found
    assert report["findings"][0]["affected"]["messages"]


def test_missing_format_is_reported_not_recreated(store: Path) -> None:
    (store / "FORMAT").unlink()
    rc, report = fsck(store)
    assert rc == 1 and invariants(report) == ["storage.format"]
    assert not (store / "FORMAT").exists()


def test_multipart_part_with_missing_blob(store: Path) -> None:
    blob_path(store, sha(b"part one bytes")).unlink()
    rc, report = fsck(store)
    assert rc == 1 and invariants(report) == ["multipart.part_blob_missing"]
    ref = report["findings"][0]["affected"]["references"][0]
    assert (ref["bucket"], ref["key"], ref["part_number"]) == ("uploads-only", "big", 1)


def test_upload_for_a_missing_bucket(store: Path) -> None:
    sql(store, "DELETE FROM buckets WHERE name = 'uploads-only'")
    rc, report = fsck(store)
    assert rc == 1 and invariants(report) == ["multipart.bucket_missing"]
    assert report["findings"][0]["affected"]["bucket"] == "uploads-only"


def test_watch_cursor_beyond_head(store: Path) -> None:
    sql(store, "INSERT INTO watch_consumers(tenant, name, kinds, cursor, created, updated, created_by) "
               "VALUES ('t', 'ok', '[]', 3, 0, 0, 'x'), ('t', 'ahead', '[]', 100000, 0, 0, 'x')")
    rc, report = fsck(store)
    assert rc == 1 and invariants(report) == ["watch.cursor_ahead"]
    assert report["findings"][0]["affected"]["consumer"] == "t/ahead"
    assert report["checks"]["watch"]["cursors"] == 2


def test_derived_manifest_files_are_verified(store: Path) -> None:
    gen = store / "derived" / "paths" / "gen-1"
    gen.mkdir(parents=True)
    (gen / "seg.bin").write_bytes(b"segment bytes")
    (gen / "other.bin").write_bytes(b"other bytes")
    manifest = {"cursor": 3, "files": [
        {"path": "seg.bin", "sha256": sha(b"segment bytes"), "size": 13},
        {"path": "other.bin", "sha256": sha(b"other bytes")},
    ]}
    (gen / "MANIFEST.json").write_text(json.dumps(manifest))
    rc, report = fsck(store, "--deep")
    assert rc == 0 and report["findings"] == [] and report["checks"]["derived"] == {"manifests": 1, "files": 2}
    (gen / "other.bin").write_bytes(b"OTHER bytes")  # same size, different content
    rc, report = fsck(store)
    assert rc == 0 and report["findings"] == []  # only --deep re-hashes
    rc, report = fsck(store, "--deep")
    assert rc == 1 and invariants(report) == ["derived.file_hash"]
    assert report["findings"][0]["affected"]["file"] == "other.bin"
    (gen / "seg.bin").unlink()
    rc, report = fsck(store)
    assert invariants(report) == ["derived.file_missing"]


# ------------------------------------------------------------------ recording


def test_findings_are_deduplicated_and_resolved_when_gone(store: Path) -> None:
    body = b"orphan for dedupe"
    p = blob_path(store, sha(body))
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(body)
    with open_offline_target(store) as target:
        first = run_fsck(target, recovery_participants())
        again = run_fsck(target, recovery_participants())
        assert first.new_findings == 1 and again.new_findings == 0
        assert again.findings[0].id == first.findings[0].id
        p.unlink()
        gone = run_fsck(target, recovery_participants())
        assert gone.findings == [] and gone.resolved == [first.findings[0].id]
        conn = target.catalog.reader()
        kinds = [r[0] for r in conn.execute("SELECT kind FROM journal WHERE kind LIKE 'diagnostics.%' ORDER BY seq")]
    assert kinds == ["diagnostics.finding", "diagnostics.resolve"]


def test_fsck_writes_only_findings(store: Path) -> None:
    blob_path(store, sha(b"version one")).unlink()
    body = b"an orphan"
    p = blob_path(store, sha(body))
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(body)
    before = source_digest(store)
    rc, report = fsck(store, "--deep")
    assert rc == 1 and invariants(report) == ["blobs.orphan", "objects.blob_missing"]
    assert source_digest(store) == before
    # Each finding is one journal event, and the chain still verifies with them appended.
    rc, again = fsck(store)
    assert again["new_findings"] == 0 and again["checks"]["journal"]["problems"] == 0


# ------------------------------------------------------------------ refusals


def test_offline_refuses_a_path_that_is_not_a_store(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    proc = cli("fsck", "--storage-path", str(missing))
    assert proc.returncode == 2 and b"does not exist" in proc.stderr
    assert not missing.exists()
    (tmp_path / "empty").mkdir()
    proc = cli("fsck", "--storage-path", str(tmp_path / "empty"), "--json")
    assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["code"] == "InvalidArgument"
    assert list((tmp_path / "empty").iterdir()) == []


def test_fsck_needs_exactly_one_target(store: Path) -> None:
    proc = cli("fsck")
    assert proc.returncode == 2 and b"--storage-path" in proc.stderr
    proc = cli("fsck", "--storage-path", str(store), "--endpoint", "http://127.0.0.1:9")
    assert proc.returncode == 2 and b"not both" in proc.stderr


# ------------------------------------------------------------------ gc


def test_gc_removes_old_orphans_and_expired_uploads_only(store: Path) -> None:
    old = time.time() - 7200

    def orphan(body: bytes, mtime: float | None) -> Path:
        p = blob_path(store, sha(body))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body)
        if mtime:
            os.utime(p, (mtime, mtime))
        return p

    old_orphan = orphan(b"old orphan", old)
    young_orphan = orphan(b"young orphan", None)
    referenced = blob_path(store, version_blobs(store, "alpha", "k/001")[0])
    os.utime(referenced, (old, old))  # old but referenced: must stay
    tmp_left = store / "tmp" / "upload-deadbeef"
    tmp_left.write_bytes(b"half an upload")
    os.utime(tmp_left, (old, old))

    before = {p: p.exists() for p in (old_orphan, young_orphan, referenced, tmp_left)}
    proc = cli("gc", "--storage-path", str(store), "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    dry = json.loads(proc.stdout)
    assert [b["blob"] for b in dry["blobs_removed"]] == [sha(b"old orphan")] and dry["finding"] is None
    assert {p: p.exists() for p in before} == before  # a dry run changes nothing

    # Uploads younger than the expiry stay; their part blob is referenced and stays too.
    proc = cli("gc", "--storage-path", str(store), "--json")
    report = json.loads(proc.stdout)
    assert report["blob_count"] == 1 and report["uploads_expired"] == [] and report["young_orphans_kept"] == 1
    assert not old_orphan.exists() and young_orphan.exists() and referenced.exists() and not tmp_left.exists()
    assert report["finding"]["invariant"] == "gc.removed" and report["finding"]["severity"] == "info"

    part_blob = blob_path(store, sha(b"part one bytes"))
    os.utime(part_blob, (old, old))
    proc = cli("gc", "--storage-path", str(store), "--upload-expiry", "0", "--json")
    report = json.loads(proc.stdout)
    assert [u["key"] for u in report["uploads_expired"]] == ["big"]
    assert [b["blob"] for b in report["blobs_removed"]] == [sha(b"part one bytes")] and not part_blob.exists()
    rc, after = fsck(store, "--deep")
    assert invariants(after) == ["blobs.orphan"]  # only the young orphan is left
    conn = apsw.Connection(str(store / "catalog.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        kinds = [r[0] for r in conn.execute("SELECT kind FROM journal WHERE seq > 0 ORDER BY seq")]
        assert kinds.count("multipart.abort") == 1
        assert conn.execute("SELECT count(*) FROM multipart_uploads").fetchone()[0] == 0
    finally:
        conn.close()


def test_gc_rejects_bad_input(store: Path) -> None:
    proc = cli("gc", "--storage-path", str(store), "--grace", "-5")
    assert proc.returncode == 2 and b"--grace" in proc.stderr


def test_version_record_contradicting_itself(store: Path) -> None:
    sql(store, "UPDATE versions SET size = size + 1 WHERE bucket = 'alpha' AND key = 'k/003'")
    sql(store, "UPDATE versions SET sha256 = ? WHERE bucket = 'alpha' AND key = 'k/004'", (sha(b"other"),))
    rc, report = fsck(store)
    assert rc == 1 and invariants(report) == ["objects.record_inconsistent"] * 2
    got = sorted((f["affected"]["references"][0]["key"], f["affected"]["problem"]) for f in report["findings"])
    assert got == [("k/003", "size"), ("k/004", "sha256")]
