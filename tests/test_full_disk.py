"""A full disk never wedges the server (docs/storage.md, "Full disk").

Real server processes on a real small filesystem: a tmpfs mounted by the test (tests run as root
here and in CI). The storage path lives on it; server logs stay outside so the server's own
output never competes for the last bytes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from botocore.exceptions import ClientError

from tests.helpers import AnvilServer
from tests.s3_helpers import s3_client
from tests.tmpfs import MiB, fill_to_zero, fill_until_free, free_bytes, mount_tmpfs, umount

FS_SIZE = 64 * MiB
# Defaults on a 64 MiB filesystem: the reserve is 1/16 of it, the threshold the larger of the
# reserve and 1% of it.
RESERVE = FS_SIZE // 16
MIN_FREE = RESERVE


@pytest.fixture
def small_fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # The reserve's own default (sized from the filesystem), not the suite's small one.
    monkeypatch.delenv("ANVIL_DISK_RESERVE", raising=False)
    mnt = tmp_path / "fs"
    mount_tmpfs(mnt, FS_SIZE)
    try:
        yield mnt
    finally:
        umount(mnt)


def _server(mnt: Path, tmp_path: Path, env: dict[str, str] | None = None) -> AnvilServer:
    srv = AnvilServer(mnt / "data", env=env)
    srv.log_path = tmp_path / f"server-{srv.port}.log"  # not on the small filesystem
    return srv


@pytest.fixture
def server(small_fs: Path, tmp_path: Path) -> Iterator[AnvilServer]:
    srv = _server(small_fs, tmp_path).start()
    try:
        yield srv
    finally:
        srv.stop()  # before the filesystem is unmounted


def _pieces(body: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i:i + size]


def _native(srv: AnvilServer) -> httpx.Client:
    return httpx.Client(base_url=srv.endpoint, headers=srv.auth_headers(), timeout=60)


def _obj(bucket: str) -> str:
    return f"/anvil/v1/buckets/{bucket}/object"


def _assert_storage_full(r: httpx.Response) -> None:
    assert r.status_code == 507, (r.status_code, r.text)
    assert r.json()["error"]["code"] == "StorageFull", r.text


def _assert_s3_storage_full(exc: pytest.ExceptionInfo[ClientError]) -> None:
    err = exc.value.response
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 507, err
    assert err["Error"]["Code"] == "StorageFull", err


def _reserve(srv: AnvilServer) -> int:
    return (srv.storage_path / "reserve").stat().st_size


def _check_readable(http: httpx.Client, bucket: str, acked: dict[str, str]) -> None:
    for key, sha in acked.items():
        r = http.get(_obj(bucket), params={"key": key})
        assert r.status_code == 200, (key, r.status_code, r.text)
        assert hashlib.sha256(r.content).hexdigest() == sha, key


def _offline_fsck(path: Path) -> dict:
    import json

    proc = subprocess.run([sys.executable, "-m", "anvil.cli.main", "fsck", "--storage-path", str(path), "--json"],
                          capture_output=True, timeout=120)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"], proc.stdout.decode() + proc.stderr.decode()
    return report


def test_fill_delete_gc_and_write_again_without_restart(small_fs: Path, server: AnvilServer) -> None:
    srv = server
    assert _reserve(srv) == RESERVE  # preallocated at start: 1/16 of a 64 MiB filesystem
    s3 = s3_client(srv)
    http = _native(srv)
    bucket = "full"
    assert http.put(f"/anvil/v1/buckets/{bucket}").status_code == 201
    # An upload in progress, to be aborted at 0 bytes free.
    up = s3.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    s3.upload_part(Bucket=bucket, Key="mp", UploadId=up, PartNumber=1, Body=os.urandom(MiB))

    # 1. PUT until the server refuses: every 200 before that is durable and readable.
    acked: dict[str, str] = {}
    for i in range(100):
        body = os.urandom(MiB - 1)  # the small-body path (held in memory, admitted with its size)
        r = http.put(_obj(bucket), params={"key": f"k{i:03d}"}, content=body)
        if r.status_code != 200:
            _assert_storage_full(r)
            break
        acked[f"k{i:03d}"] = hashlib.sha256(body).hexdigest()
    else:
        pytest.fail("100 MiB of PUTs on a 64 MiB filesystem were never refused")
    assert len(acked) >= 30, len(acked)
    # Refused while there is still room: the threshold keeps space for the catalog and deletes.
    assert free_bytes(small_fs) >= MIN_FREE - MiB
    # A streamed body whose declared length does not fit is refused before it is read.
    _assert_storage_full(http.put(_obj(bucket), params={"key": "streamed"}, content=os.urandom(3 * MiB)))
    _check_readable(http, bucket, acked)
    assert not list((srv.storage_path / "tmp").iterdir())

    # 2. Another process takes the rest: 0 bytes free.
    filler = small_fs / "filler"
    fill_to_zero(filler)
    assert free_bytes(small_fs) == 0
    _check_readable(http, bucket, acked)
    # Every kind of growing write is refused the same way, up front, in both APIs.
    _assert_storage_full(http.put(_obj(bucket), params={"key": "more"}, content=b"z"))
    _assert_storage_full(http.put("/anvil/v1/buckets/another"))
    _assert_storage_full(http.post(f"/anvil/v1/buckets/{bucket}/uploads", json={"key": "mp2"}))
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=bucket, Key="s3-put", Body=b"x" * 1000)
    _assert_s3_storage_full(exc)
    with pytest.raises(ClientError) as exc:
        s3.copy_object(Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": "k000"})
    _assert_s3_storage_full(exc)
    with pytest.raises(ClientError) as exc:
        s3.upload_part(Bucket=bucket, Key="mp", UploadId=up, PartNumber=2, Body=b"y" * 1000)
    _assert_s3_storage_full(exc)
    assert free_bytes(small_fs) == 0

    # 3. Deletes (S3 and native), abort multipart and admin operations work at 0 bytes free.
    doomed = sorted(acked)[:12]
    for key in doomed[:8]:
        resp = s3.delete_object(Bucket=bucket, Key=key)
        assert resp["ResponseMetadata"]["HTTPStatusCode"] == 204
    for key in doomed[8:]:
        r = http.delete(_obj(bucket), params={"key": key})
        assert r.status_code == 200, r.text
    # The first commit found no room for its WAL frames: the reserve was given back for it.
    assert _reserve(srv) == 0
    assert "released the" in srv.log()
    resp = s3.abort_multipart_upload(Bucket=bucket, Key="mp", UploadId=up)
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 204
    r = http.post("/anvil/v1/admin/fsck", json={})
    assert r.status_code == 200, r.text
    r = http.get("/anvil/v1/admin/journal/verify")
    assert r.status_code == 200 and r.json()["ok"], r.text
    for key in doomed:
        acked.pop(key)
        assert http.get(_obj(bucket), params={"key": key}).status_code == 404

    # 4. gc removes what was deleted and aborted (grace 0: the objects are seconds old).
    r = http.post("/anvil/v1/admin/gc", json={"grace_seconds": 0})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["disk_full"] is True
    assert report["blob_count"] == len(doomed) + 1  # the deleted objects and the aborted part
    assert report["bytes_removed"] == len(doomed) * (MiB - 1) + MiB
    assert report["finding"] is not None  # recorded after the blobs went, into the space they left

    # 5. Writes resume without a restart: the freed space is above the threshold again (and
    #    the reserve is held again), then more once the filler is gone.
    assert free_bytes(small_fs) > 0
    body = os.urandom(MiB // 2)
    r = http.put(_obj(bucket), params={"key": "after-gc"}, content=body)
    assert r.status_code == 200, r.text
    acked["after-gc"] = hashlib.sha256(body).hexdigest()
    assert _reserve(srv) == RESERVE
    filler.unlink()
    for i in range(3):
        body = os.urandom(2 * MiB)  # streamed (above the in-memory limit)
        r = http.put(_obj(bucket), params={"key": f"resumed{i}"}, content=body)
        assert r.status_code == 200, r.text
        acked[f"resumed{i}"] = hashlib.sha256(body).hexdigest()
    s3.put_object(Bucket=bucket, Key="s3-after", Body=b"s3 works again")
    acked["s3-after"] = hashlib.sha256(b"s3 works again").hexdigest()
    _check_readable(http, bucket, acked)
    http.close()

    # 6. fsck is clean (the reserve is a known file), and after a restart every acknowledged
    #    write is there.
    srv.stop()
    report = _offline_fsck(srv.storage_path)
    assert report["counts"]["error"] == 0 and report["counts"]["warning"] == 0, report["findings"]
    srv.start()
    with _native(srv) as http:
        _check_readable(http, bucket, acked)
        listed = http.get(f"/anvil/v1/buckets/{bucket}/objects").json()
        assert sorted(o["key"] for o in listed["objects"]) == sorted(acked)
    assert _reserve(srv) == RESERVE


def test_disk_filling_mid_body_answers_507_and_stores_nothing(small_fs: Path, server: AnvilServer,
                                                              tmp_path: Path) -> None:
    """Admitted (above the threshold), then the disk fills under the body: 507, no temp file left."""
    srv = server
    http = _native(srv)
    s3 = s3_client(srv)
    bucket = "midway"
    assert http.put(f"/anvil/v1/buckets/{bucket}").status_code == 201
    kept = os.urandom(MiB // 4)
    assert http.put(_obj(bucket), params={"key": "kept"}, content=kept).status_code == 200

    # Another process leaves just over the threshold free: the PUT is admitted, the body does not fit.
    filler = small_fs / "filler"
    left = MIN_FREE + 2 * MiB
    fill_until_free(filler, small_fs, left)
    body = os.urandom(left + MiB // 4)
    # Chunked: no declared length to refuse up front, so the body really runs into a full disk.
    r = http.put(_obj(bucket), params={"key": "too-big"}, content=_pieces(body))
    _assert_storage_full(r)
    assert list((srv.storage_path / "tmp").iterdir()) == []  # the partial body was removed
    assert free_bytes(small_fs) >= left - 64 * 1024  # and its space given back
    assert http.get(_obj(bucket), params={"key": "too-big"}).status_code == 404

    # Through S3 (declared lengths: refused before the body is stored), a PUT and a multipart part.
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=bucket, Key="s3-too-big", Body=body)
    _assert_s3_storage_full(exc)
    up = s3.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    with pytest.raises(ClientError) as exc:
        s3.upload_part(Bucket=bucket, Key="mp", UploadId=up, PartNumber=1, Body=body)
    _assert_s3_storage_full(exc)
    assert list((srv.storage_path / "tmp").iterdir()) == []
    assert s3.list_parts(Bucket=bucket, Key="mp", UploadId=up).get("Parts", []) == []

    # Nothing is wedged: a body that fits is stored right away, and nothing is left half-done.
    small = os.urandom(MiB)
    assert http.put(_obj(bucket), params={"key": "fits"}, content=small).status_code == 200
    s3.abort_multipart_upload(Bucket=bucket, Key="mp", UploadId=up)
    filler.unlink()
    _check_readable(http, bucket, {"kept": hashlib.sha256(kept).hexdigest(),
                                   "fits": hashlib.sha256(small).hexdigest()})
    http.close()
    srv.stop()
    report = _offline_fsck(srv.storage_path)
    assert report["counts"]["error"] == 0, report["findings"]


def test_settings_are_validated_and_applied(small_fs: Path, tmp_path: Path) -> None:
    """`ANVIL_DISK_RESERVE` / `ANVIL_DISK_MIN_FREE`: sizes with units; a malformed one stops the start."""
    bad = _server(small_fs, tmp_path, env={"ANVIL_DISK_RESERVE": "lots"})
    with pytest.raises(RuntimeError, match="ANVIL_DISK_RESERVE must be a size"):
        bad.start()
    srv = _server(small_fs, tmp_path, env={"ANVIL_DISK_RESERVE": "1M", "ANVIL_DISK_MIN_FREE": "63MiB"}).start()
    try:
        assert _reserve(srv) == MiB
        with _native(srv) as http:
            # 63 MiB free is never available on a 64 MiB filesystem holding a 1 MiB reserve.
            _assert_storage_full(http.put("/anvil/v1/buckets/nope"))
    finally:
        srv.stop()


def test_restart_at_zero_bytes_free_then_delete_gc_and_write(small_fs: Path, tmp_path: Path) -> None:
    """The disk fills while the server is down: it starts, deletes commit (the reserve), and gc with
    its default grace frees the deleted objects' space at once (capped at 60 s while full)."""
    srv = _server(small_fs, tmp_path).start()
    try:
        bucket = "restart"
        acked: dict[str, str] = {}
        with _native(srv) as http:
            assert http.put(f"/anvil/v1/buckets/{bucket}").status_code == 201
            for i in range(12):
                body = os.urandom(MiB)
                assert http.put(_obj(bucket), params={"key": f"k{i:02d}"}, content=body).status_code == 200
                acked[f"k{i:02d}"] = hashlib.sha256(body).hexdigest()
        srv.stop()
        # Written two minutes ago: past the full-disk grace, well within gc's normal hour.
        old = os.path.getmtime(srv.storage_path / "FORMAT") - 120
        for blob in (srv.storage_path / "blobs").rglob("*"):
            if blob.is_file():
                os.utime(blob, (old, old))
        fill_to_zero(small_fs / "filler")
        assert free_bytes(small_fs) == 0

        srv.start()
        s3 = s3_client(srv)
        with _native(srv) as http:
            _check_readable(http, bucket, acked)
            _assert_storage_full(http.put(_obj(bucket), params={"key": "x"}, content=b"x"))
            for key in sorted(acked)[:8]:
                assert s3.delete_object(Bucket=bucket, Key=key)["ResponseMetadata"]["HTTPStatusCode"] == 204
                acked.pop(key)
            r = http.post("/anvil/v1/admin/gc", json={})  # the default grace (an hour) asked for
            assert r.status_code == 200, r.text
            report = r.json()
            assert report["disk_full"] is True and report["grace_seconds"] == 60
            assert report["blob_count"] == 8 and report["bytes_removed"] == 8 * MiB
            # Writes resume without removing the filler or restarting: gc freed enough.
            r = http.put(_obj(bucket), params={"key": "after"}, content=b"after gc")
            assert r.status_code == 200, r.text
            acked["after"] = hashlib.sha256(b"after gc").hexdigest()
            _check_readable(http, bucket, acked)
        assert _reserve(srv) == RESERVE
    finally:
        srv.stop()
    report = _offline_fsck(srv.storage_path)
    assert report["counts"]["error"] == 0, report["findings"]
