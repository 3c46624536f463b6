"""Small bodies stored inline in the record store (storage.inline, `ANVIL_INLINE_MAX`).

Real servers and CLI subprocesses. Bodies up to the threshold are rows of `inline_blobs` in
catalog.db, written in the transaction of their record; everything that reads blobs treats them
as blobs: GET and ranges (native and S3), copy, multipart parts, deduplication, verify-on-read
(quarantine and findings), fsck --deep, gc, backup and restore, and the heal from a backup.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

from anvil.client import AnvilAPIError
from tests.helpers import AnvilServer, unique_bucket
from tests.s3_helpers import s3_client
from tests.test_repair_from_backup import World, open_findings_about, sha

INLINE_MAX = 64 * 1024


def _rows(root: Path) -> dict[str, bytes]:
    conn = apsw.Connection(str(root / "catalog.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {r[0]: bytes(r[1]) for r in conn.execute("SELECT sha256, body FROM inline_blobs")}
    finally:
        conn.close()


def _flip(root: Path, digest: str, offset: int = 10) -> None:
    """Damage an inline body in place, as a bad disk sector under catalog.db could."""
    conn = apsw.Connection(str(root / "catalog.db"))
    conn.setbusytimeout(10_000)
    try:
        (body,) = conn.execute("SELECT body FROM inline_blobs WHERE sha256 = ?", (digest,)).fetchone()
        raw = bytearray(body)
        raw[offset] ^= 0x01
        conn.execute("UPDATE inline_blobs SET body = ? WHERE sha256 = ?", (bytes(raw), digest))
    finally:
        conn.close()


def _blob_files(root: Path) -> set[str]:
    return {p.name for p in (root / "blobs" / "sha256").rglob("*") if p.is_file()}


def _fsck(root: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "anvil.cli.main", "fsck", "--json", "--storage-path", str(root),
                           *args], capture_output=True, timeout=300)
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    s = AnvilServer(tmp_path_factory.mktemp("inline") / "data").start()
    yield s
    s.stop()


def test_small_bodies_are_inline_and_read_like_blobs(srv: AnvilServer) -> None:
    bucket = unique_bucket("inl")
    bodies = {"tiny": b"x", "4k": os.urandom(4096), "edge": os.urandom(INLINE_MAX), "over": os.urandom(INLINE_MAX + 1),
              "empty": b""}
    s3 = s3_client(srv)
    with srv.client() as c:
        c.create_bucket(bucket)
        for key, body in bodies.items():
            assert c.put_object(bucket, key, body)["sha256"] == sha(body)
        s3_body = os.urandom(5000)
        s3.put_object(Bucket=bucket, Key="s3", Body=s3_body)
        rows, files = _rows(srv.storage_path), _blob_files(srv.storage_path)
        # Up to the threshold inline (no file), above it a file; the API shows no difference.
        for key in ("tiny", "4k", "edge", "empty"):
            assert rows[sha(bodies[key])] == bodies[key] and sha(bodies[key]) not in files
        assert rows[sha(s3_body)] == s3_body and sha(s3_body) not in files
        assert sha(bodies["over"]) in files and sha(bodies["over"]) not in rows
        for key, body in bodies.items():
            assert c.get_object(bucket, key) == body
            assert c.head_object(bucket, key)["size"] == len(body)
        assert c.get_object(bucket, "4k", range="bytes=100-199") == bodies["4k"][100:200]
        assert s3.get_object(Bucket=bucket, Key="s3", Range="bytes=4990-")["Body"].read() == s3_body[4990:]
        # Copy shares the inline body; deduplication keeps one row for identical content.
        c.copy_object(bucket, "4k-copy", source_key="4k")
        assert c.get_object(bucket, "4k-copy") == bodies["4k"]
        c.put_object(bucket, "4k-again", bodies["4k"])
        assert list(_rows(srv.storage_path)).count(sha(bodies["4k"])) == 1
        # A multipart upload with an inline (small, last) part: completing reads it like any part.
        big, small = os.urandom(5 * 1024 * 1024), os.urandom(1000)
        up = c.create_upload(bucket, "multi")
        e1 = c.upload_part(bucket, up, 1, big)["etag"]
        e2 = c.upload_part(bucket, up, 2, small)["etag"]
        assert _rows(srv.storage_path)[sha(small)] == small
        c.complete_upload(bucket, up, [(1, e1), (2, e2)])
        assert c.get_object(bucket, "multi") == big + small
        assert c.get_object(bucket, "multi", range=f"bytes={len(big) - 10}-{len(big) + 9}") == \
            (big + small)[len(big) - 10:len(big) + 10]
    report = json.loads(srv.cli("fsck", "--deep", "--endpoint", srv.endpoint, "--json").stdout)
    assert report["ok"] is True, report


def test_a_wrong_checksum_stores_nothing_inline(srv: AnvilServer) -> None:
    bucket = unique_bucket("inl")
    body = os.urandom(3000)
    with srv.client() as c:
        c.create_bucket(bucket)
        with pytest.raises(AnvilAPIError) as exc:
            c.put_object(bucket, "bad", body, checksum_sha256="0" * 64)
        assert exc.value.code == "BadDigest"
    assert sha(body) not in _rows(srv.storage_path)


def test_threshold_setting(tmp_path: Path) -> None:
    # 0 turns inlining off: every body is a file again, and the store reads the old ones fine.
    s = AnvilServer(tmp_path / "data", env={"ANVIL_INLINE_MAX": "0"}).start()
    try:
        with s.client() as c:
            c.create_bucket("files")
            c.put_object("files", "a", b"file body")
        assert sha(b"file body") in _blob_files(s.storage_path) and _rows(s.storage_path) == {}
    finally:
        s.stop()
    s = AnvilServer(tmp_path / "data").start()  # default threshold on a store of small files
    try:
        with s.client() as c:
            assert c.get_object("files", "a") == b"file body"
            c.put_object("files", "b", b"inline body")
        assert _rows(s.storage_path) == {sha(b"inline body"): b"inline body"}
    finally:
        s.stop()
    # A malformed or too large threshold stops the server before it serves anything.
    for bad in ("lots", "2M"):
        proc = subprocess.run([sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path",
                               str(tmp_path / "data"), "--listen", "127.0.0.1:0"],
                              env={**os.environ, "ANVIL_INLINE_MAX": bad}, capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "ANVIL_INLINE_MAX" in proc.stderr, proc.stderr


def test_gc_removes_unreferenced_inline_bodies_after_the_grace_period(srv: AnvilServer) -> None:
    bucket = unique_bucket("inl")
    gone, kept = os.urandom(2000), os.urandom(2000)
    with srv.client() as c:
        c.create_bucket(bucket)
        c.put_object(bucket, "gone", gone)
        c.put_object(bucket, "kept", kept)
        c.delete_object(bucket, "gone")
        young = c.gc()  # default grace: a young orphan may belong to a write in flight
        assert sha(gone) not in [b["blob"] for b in young["blobs_removed"]] and sha(gone) in _rows(srv.storage_path)
        report = c.gc(grace_seconds=0)
        removed = {b["blob"]: b for b in report["blobs_removed"]}
        assert removed[sha(gone)]["size"] == 2000 and removed[sha(gone)]["inline"] is True
        rows = _rows(srv.storage_path)
        assert sha(gone) not in rows and rows[sha(kept)] == kept
        assert c.get_object(bucket, "kept") == kept


def test_fsck_deep_finds_a_damaged_inline_body(tmp_path: Path) -> None:
    s = AnvilServer(tmp_path / "data").start()
    body = os.urandom(5000)
    try:
        with s.client() as c:
            c.create_bucket("fsck")
            c.put_object("fsck", "k", body)
    finally:
        s.stop()
    _flip(s.storage_path, sha(body))
    assert _fsck(s.storage_path)["ok"] is True  # shallow: present, not hashed
    report = _fsck(s.storage_path, "--deep")
    assert report["ok"] is False
    (f,) = [f for f in report["findings"] if f["invariant"] == "blobs.hash_mismatch"]
    assert f["affected"]["sha256"] == sha(body) and f["affected"]["inline"] is True


def test_corrupt_inline_body_is_refused_quarantined_and_healed_from_backup(tmp_path: Path) -> None:
    """A flipped byte in an inline body (a plain object, and the inline part of a multipart object):
    GET refuses before any byte with DataCorrupted, a finding is recorded, the body moves to
    quarantine/ and out of the table; `anvil repair blobs --from-backup` brings it back; then
    every object reads back and `fsck --deep` is clean."""
    world = World(tmp_path)
    try:
        snap = world.snapshot()
        small, part2 = sha(world.bodies["small/a"]), sha(world.part2)
        rows = _rows(world.storage)
        assert small in rows and part2 in rows  # the world's small bodies are inline
        for digest in (small, part2):
            _flip(world.storage, digest)
        s3 = s3_client(world.server)
        with world.client() as c:
            for key in ("small/a", "big/multi.bin"):
                with pytest.raises(AnvilAPIError) as refused:  # checked before the status line
                    c.get_object(world.bucket, key)
                assert refused.value.code == "DataCorrupted"
            from botocore.exceptions import ClientError
            with pytest.raises(ClientError) as s3_refused:
                s3.get_object(Bucket=world.bucket, Key="small/a")
            assert s3_refused.value.response["Error"]["Code"] in ("DataCorrupted", "NoSuchKey", "InternalError")
            for digest, key in ((small, "small/a"), (part2, "big/multi.bin")):
                (f,) = [f for f in open_findings_about(c, digest) if f["invariant"] == "blob.corrupt"]
                assert f["affected"]["key"] == key and f["affected"]["quarantined"] is True
        assert {small, part2} <= {p.name for p in (world.storage / "quarantine").iterdir()}
        assert small not in _rows(world.storage) and part2 not in _rows(world.storage)

        code, report = world.heal()
        assert code == 0, report
        assert {h["sha256"]: h["snapshot"] for h in report["healed"]} == {small: snap, part2: snap}
        world.assert_all_objects_read_back()
        fsck = world.cli("fsck", "--deep", "--endpoint", world.server.endpoint, "--json")
        assert json.loads(fsck.stdout)["ok"] is True
    finally:
        world.server.stop()


def test_reupload_heals_a_quarantined_inline_body(srv: AnvilServer) -> None:
    bucket = unique_bucket("inl")
    body = os.urandom(4000)
    with srv.client() as c:
        c.create_bucket(bucket)
        c.put_object(bucket, "a", body)
        _flip(srv.storage_path, sha(body))
        with pytest.raises(AnvilAPIError):
            c.get_object(bucket, "a")
        c.put_object(bucket, "b", body)  # the same bytes, under another key
        assert c.get_object(bucket, "a") == body
    assert _rows(srv.storage_path)[sha(body)] == body


def test_backup_and_restore_keep_inline_bodies(tmp_path: Path) -> None:
    """A restored store has the same inline bodies (they travel in catalog.db), writes no blob file
    for them, validates, and its blobs summary is the backed-up one."""
    world = World(tmp_path)
    try:
        snap = world.snapshot()
        before = _rows(world.storage)
        cred = world.server.admin_credentials()
    finally:
        world.server.stop()
    target = tmp_path / "restored"
    proc = world.cli("restore", "--repo", world.repo, "--snapshot", snap, "--target", str(target), "--json")
    res = json.loads(proc.stdout)
    assert res["problems"] == [], res
    assert _rows(target) == before
    assert not (set(before) & _blob_files(target))  # no file copies of inline bodies
    report = _fsck(target, "--deep")
    assert report["ok"] is True, report
    s = AnvilServer(target).start()
    try:
        with s.client(client_id=cred["client_id"], client_secret=cred["client_secret"]) as c:
            for key, body in world.bodies.items():
                assert c.get_object(world.bucket, key) == body, key
    finally:
        s.stop()
    # The digest of every body as backed up: each inline body is also a blob of the snapshot tree.
    assert all(hashlib.sha256(b).hexdigest() == d for d, b in before.items())


def test_large_body_digests_are_the_same_with_md5_on_a_second_thread(tmp_path: Path) -> None:
    """Item 3: a large body's MD5 runs beside its SHA-256 (blocks of PARALLEL_HASH_MIN and more);
    the digests and the stored bytes are exactly those of a serial hash, whatever the block sizes."""
    from anvil.storage.blobs import PARALLEL_HASH_MIN, BlobStore

    (tmp_path / "blobs").mkdir()
    (tmp_path / "tmp").mkdir()
    store = BlobStore(tmp_path / "blobs", tmp_path / "tmp")
    data = os.urandom(5 * 1024 * 1024 + 123)
    cuts = [0, 100, PARALLEL_HASH_MIN, PARALLEL_HASH_MIN + 1, 3 * PARALLEL_HASH_MIN, 1024 * 1024, len(data)]
    w = store.writer()
    pos = 0
    i = 0
    while pos < len(data):
        n = cuts[1 + i % (len(cuts) - 1)] or 1
        w.write(data[pos:pos + n])
        pos += n
        i += 1
    info = w.commit()
    assert (info.sha256, info.md5, info.size) == (hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest(),
                                                  len(data))
    assert store.path(info.sha256).read_bytes() == data
