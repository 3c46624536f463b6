"""Integrity on read, against a real server: every GET (native and S3), range, copy and part copy
verifies the bytes it serves. A byte flipped or a blob truncated on disk is refused (small
bodies: a clean 500 DataCorrupted before any body; streams: the transfer breaks), the blob is
quarantined, a finding names the object, and re-uploading the same bytes heals it."""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.parse
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.exceptions import BotoCoreError, ClientError

from anvil.client import AnvilAPIError, AnvilClient, AnvilError
from anvil.storage.blobs import CHUNK_SIZE
from tests.helpers import AnvilServer, unique_bucket

MIB = 1024 * 1024


@pytest.fixture(scope="module", autouse=True)
def _blob_files():
    """These tests damage, delete or age blob *files*: small bodies are kept as files here
    (ANVIL_INLINE_MAX=0). Inline bodies get the same checks in tests/test_inline.py."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANVIL_INLINE_MAX", "0")
        yield


def _blob(server: AnvilServer, sha: str) -> Path:
    return server.storage_path / "blobs" / "sha256" / sha[:2] / sha


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def _quarantined(server: AnvilServer) -> set[str]:
    q = server.storage_path / "quarantine"
    return set(os.listdir(q)) if q.exists() else set()


def _chunks(client: AnvilClient, bucket: str, key: str) -> list[tuple[str, int]]:
    """The object's blobs, from its object.put journal event."""
    events = [e for e in client.journal(limit=1000) if e["kind"] == "object.put"
              and e["payload"]["bucket"] == bucket and e["payload"]["key"] == key]
    return [tuple(c) for c in events[-1]["payload"]["chunks"]]


def _raw_get(server: AnvilServer, bucket: str, key: str, token_headers: dict[str, str],
             rng: str | None = None) -> tuple[bytes, bytes, int, bool]:
    """(status line, body as received, declared length, reset) over a raw socket, reading to EOF
    or to a connection reset (after which the kernel may have dropped what was not yet read)."""
    path = f"/anvil/v1/buckets/{bucket}/object?key={urllib.parse.quote(key, safe='')}"
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             f"Authorization: {token_headers['authorization']}"] + ([f"Range: {rng}"] if rng else [])
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = bytearray()
        reset = False
        try:
            while chunk := s.recv(1 << 20):
                data += chunk
        except ConnectionResetError:
            reset = True
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    length = -1
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head.split(b"\r\n")[0], body, length, reset


@pytest.fixture(scope="module")
def token(server: AnvilServer) -> dict[str, str]:
    return server.auth_headers()


def _findings(client: AnvilClient, sha: str) -> list[dict]:
    return [f for f in client.list_findings(subsystem="blobs")
            if f["invariant"] == "blob.corrupt" and f["affected"].get("sha256") == sha]


# ------------------------------------------------------------------ small bodies: clean 500


def test_small_flipped_blob_is_refused_before_any_body_native(server, client, bucket, token):
    data = os.urandom(10_000)
    put = client.put_object(bucket, "small", data)
    _flip(_blob(server, put["sha256"]), 1234)
    status, body, _, _ = _raw_get(server, bucket, "small", token)
    assert status.startswith(b"HTTP/1.1 500"), status
    assert b'"DataCorrupted"' in body and data[:100] not in body
    assert put["sha256"] in _quarantined(server)
    assert not _blob(server, put["sha256"]).exists()
    [f] = _findings(client, put["sha256"])
    assert f["severity"] == "error" and f["origin"] == "read"
    assert {k: f["affected"][k] for k in ("bucket", "key", "version_id", "sha256")} == {
        "bucket": bucket, "key": "small", "version_id": put["version_id"], "sha256": put["sha256"]}
    assert f["affected"]["tenant"] and bucket in f["detail"] and "small" in f["detail"]
    # Every later read refuses too (the blob is gone), without piling up findings.
    with pytest.raises(AnvilAPIError) as e:
        client.get_object(bucket, "small")
    assert e.value.status == 500 and e.value.code == "DataCorrupted"
    assert len(_findings(client, put["sha256"])) == 1


def test_small_flipped_blob_is_refused_s3(server, client, s3, bucket):
    data = os.urandom(20_000)
    put = client.put_object(bucket, "s3-small", data)
    _flip(_blob(server, put["sha256"]), 0)
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket=bucket, Key="s3-small")
    assert e.value.response["Error"]["Code"] == "DataCorrupted"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert put["sha256"] in _quarantined(server)


def test_truncated_blob_fails_before_headers(server, client, bucket, token):
    data = os.urandom(3 * MIB + 17)
    put = client.put_object(bucket, "trunc", data)
    path = _blob(server, put["sha256"])
    os.truncate(path, 2 * MIB)
    status, body, _, _ = _raw_get(server, bucket, "trunc", token)
    # Before: 200 with the full Content-Length, then a closed connection. Now no 200 is ever sent.
    assert status.startswith(b"HTTP/1.1 500"), status
    assert b'"DataCorrupted"' in body
    assert put["sha256"] in _quarantined(server)


# ------------------------------------------------------------------ large bodies: broken transfer, ranges


def test_large_flipped_chunk_ranges_and_stream(server, client, bucket, token):
    data = os.urandom(5 * MIB + 100)
    put = client.put_object(bucket, "large", data)
    sha = put["sha256"]
    assert (_blob(server, sha).parent / f"{sha}.chunks").exists()
    bad = 3 * CHUNK_SIZE + 4321
    _flip(_blob(server, sha), bad)
    # A range over intact chunks is served (only its chunks are checked) ...
    got = client.get_object(bucket, "large", range=f"bytes={MIB + 5}-{2 * MIB + 5}")
    assert got == data[MIB + 5:2 * MIB + 6]
    assert sha not in _quarantined(server)
    # ... a small range over the bad chunk is a clean 500, no bytes of it served.
    status, body, _, _ = _raw_get(server, bucket, "large", token, rng=f"bytes={bad - 10}-{bad + 10}")
    assert status.startswith(b"HTTP/1.1 500") and b'"DataCorrupted"' in body
    assert sha in _quarantined(server)
    assert len(_findings(client, sha)) == 1


def test_large_stream_breaks_native(server, client, bucket, token):
    data = os.urandom(6 * MIB)
    put = client.put_object(bucket, "stream", data)
    _flip(_blob(server, put["sha256"]), 4 * CHUNK_SIZE + 1)
    status, body, length, reset = _raw_get(server, bucket, "stream", token)
    # The transfer is reset before the bad chunk (the kernel may drop what the client had not read
    # yet, even the status line): never the announced length, and every byte received is good.
    assert reset
    assert status == b"" or (status.startswith(b"HTTP/1.1 200") and length == len(data))
    assert len(body) <= 4 * CHUNK_SIZE and len(body) < len(data)
    assert data.startswith(body)
    with pytest.raises(AnvilAPIError) as e:  # the blob is quarantined now: refused up front
        client.get_object(bucket, "stream")
    assert e.value.code == "DataCorrupted"
    # httpx, as a client would read it, raises instead of returning a short body.
    put2 = client.put_object(bucket, "stream2", data + b"x")
    _flip(_blob(server, put2["sha256"]), 5 * CHUNK_SIZE + 7)
    with pytest.raises(httpx.HTTPError):
        with httpx.stream("GET", f"{server.endpoint}/anvil/v1/buckets/{bucket}/object",
                          params={"key": "stream2"}, headers=token, timeout=30) as r:
            assert r.status_code == 200
            for _ in r.iter_bytes():
                pass


def test_large_stream_breaks_s3(server, client, s3, bucket):
    data = os.urandom(4 * MIB + 3)
    put = client.put_object(bucket, "s3-large", data)
    _flip(_blob(server, put["sha256"]), 2 * CHUNK_SIZE)
    r = s3.get_object(Bucket=bucket, Key="s3-large")
    with pytest.raises((BotoCoreError, OSError, httpx.HTTPError, ValueError)):
        body = r["Body"].read()
        # urllib3 may hand back what it got: a short read is still a failure to detect.
        assert len(body) == len(data), f"short body {len(body)} accepted"
        raise AssertionError("a corrupt large body was read completely")


def _s3_multipart(s3: boto3.client, bucket: str, key: str, parts: list[bytes]) -> None:
    up = s3.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32")
    done = []
    for i, p in enumerate(parts, 1):
        r = s3.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=i, Body=p,
                           ChecksumAlgorithm="CRC32")
        done.append({"PartNumber": i, "ETag": r["ETag"], "ChecksumCRC32": r["ChecksumCRC32"]})
    s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"],
                                 MultipartUpload={"Parts": done})


def test_multipart_part_flipped_is_detected(server, client, s3, bucket, token):
    parts = [os.urandom(5 * MIB), os.urandom(MIB // 2)]
    _s3_multipart(s3, bucket, "multi", parts)
    chunks = _chunks(client, bucket, "multi")
    assert [c[1] for c in chunks] == [len(p) for p in parts]
    # The S3 upload path writes sidecars too: the 5 MiB part has one, the small last part needs none.
    assert (_blob(server, chunks[0][0]).parent / f"{chunks[0][0]}.chunks").exists()
    assert not (_blob(server, chunks[1][0]).parent / f"{chunks[1][0]}.chunks").exists()
    _flip(_blob(server, chunks[1][0]), 99)
    # Before: a multipart object went undetected even with ChecksumMode=ENABLED.
    r = s3.get_object(Bucket=bucket, Key="multi", ChecksumMode="ENABLED")
    with pytest.raises((BotoCoreError, OSError, ValueError)):
        body = r["Body"].read()
        assert len(body) == sum(map(len, parts)), f"short body {len(body)} accepted"
        raise AssertionError("a corrupt multipart body was read completely")
    assert chunks[1][0] in _quarantined(server)
    assert chunks[0][0] not in _quarantined(server)
    # The intact first part is still served by range; the damaged one is refused cleanly.
    assert client.get_object(bucket, "multi", range="bytes=0-999") == parts[0][:1000]
    status, body, _, _ = _raw_get(server, bucket, "multi", token, rng=f"bytes={5 * MIB}-{5 * MIB + 10}")
    assert status.startswith(b"HTTP/1.1 500") and b'"DataCorrupted"' in body
    [f] = _findings(client, chunks[1][0])
    assert f["affected"]["key"] == "multi"


# ------------------------------------------------------------------ copies


def test_copy_from_corrupt_source_fails_and_writes_nothing(server, client, s3, bucket):
    small = client.put_object(bucket, "src-small", os.urandom(5000))
    large = client.put_object(bucket, "src-large", os.urandom(3 * MIB))
    _flip(_blob(server, small["sha256"]), 10)
    _flip(_blob(server, large["sha256"]), 2 * MIB + 10)
    before = len(client.journal(limit=1000))
    with pytest.raises(ClientError) as e:
        s3.copy_object(Bucket=bucket, Key="dst-small", CopySource={"Bucket": bucket, "Key": "src-small"})
    assert e.value.response["Error"]["Code"] == "DataCorrupted"
    with pytest.raises(AnvilAPIError) as e2:
        client.copy_object(bucket, "dst-large", source_key="src-large")
    assert e2.value.code == "DataCorrupted" and e2.value.status == 500
    for key in ("dst-small", "dst-large"):
        with pytest.raises(AnvilAPIError) as nf:
            client.head_object(bucket, key)
        assert nf.value.status == 404
    # Nothing was written except the two findings.
    kinds = [ev["kind"] for ev in client.journal(limit=1000)[before:]]
    assert kinds == ["diagnostics.finding", "diagnostics.finding"], kinds
    assert {small["sha256"], large["sha256"]} <= _quarantined(server)


def test_upload_part_copy_from_corrupt_source_fails(server, client, s3, bucket):
    src = client.put_object(bucket, "part-src", os.urandom(2 * MIB + 1))
    _flip(_blob(server, src["sha256"]), MIB + 1)
    up = s3.create_multipart_upload(Bucket=bucket, Key="part-dst")
    with pytest.raises(ClientError) as e:
        s3.upload_part_copy(Bucket=bucket, Key="part-dst", UploadId=up["UploadId"], PartNumber=1,
                            CopySource={"Bucket": bucket, "Key": "part-src"})
    assert e.value.response["Error"]["Code"] == "DataCorrupted"
    assert s3.list_parts(Bucket=bucket, Key="part-dst", UploadId=up["UploadId"]).get("Parts", []) == []


def test_intact_objects_are_served_unchanged(client, s3, bucket):
    """Verification changes nothing for good data: full, ranged, empty, multi-chunk, copies."""
    bodies = {"empty": b"", "one": b"x", "chunk": os.urandom(CHUNK_SIZE), "chunk+1": os.urandom(CHUNK_SIZE + 1),
              "big": os.urandom(3 * MIB + 5)}
    for k, b in bodies.items():
        client.put_object(bucket, k, b)
        assert client.get_object(bucket, k) == b
        assert s3.get_object(Bucket=bucket, Key=k)["Body"].read() == b
    big = bodies["big"]
    for lo, hi in ((0, 0), (CHUNK_SIZE - 1, CHUNK_SIZE), (5, 3 * MIB + 4), (3 * MIB, 3 * MIB + 4)):
        assert client.get_object(bucket, "big", range=f"bytes={lo}-{hi}") == big[lo:hi + 1]
    client.copy_object(bucket, "big-copy", source_key="big")
    assert hashlib.sha256(client.get_object(bucket, "big-copy")).digest() == hashlib.sha256(big).digest()


# ------------------------------------------------------------------ healing


def test_reupload_heals_and_fsck_is_clean(tmp_path):
    srv = AnvilServer(tmp_path / "data").start()
    try:
        with srv.client() as c:
            b = unique_bucket()
            c.create_bucket(b, versioning="Enabled")
            small, large = os.urandom(3000), os.urandom(4 * MIB + 1)
            ps = c.put_object(b, "s", small)
            pl = c.put_object(b, "l", large)
            _flip(_blob(srv, ps["sha256"]), 7)
            _flip(_blob(srv, pl["sha256"]), 3 * MIB)
            for key in ("s", "l"):
                with pytest.raises(AnvilError):  # API error, or (large, mid-stream) the SDK's ConnectionError
                    c.get_object(b, key)
            assert {ps["sha256"], pl["sha256"]} <= _quarantined(srv)
            report = c.fsck(deep=True)
            assert not report["ok"]
            missing = {f["affected"].get("sha256") for f in report["findings"] if f["severity"] == "error"}
            assert {ps["sha256"], pl["sha256"]} <= missing  # fsck's missing-blob findings name the sha256
            # The same bytes again (any key): stored fresh, not deduplicated onto the bad copy.
            c.put_object(b, "again-s", small)
            c.put_object(b, "again-l", large)
            assert c.get_object(b, "s", version_id=ps["version_id"]) == small
            assert c.get_object(b, "l", version_id=pl["version_id"]) == large
            assert (_blob(srv, pl["sha256"]).parent / f"{pl['sha256']}.chunks").exists()
            report = c.fsck(deep=True)
            assert report["ok"], [f for f in report["findings"] if f["severity"] != "info"]
            assert report["counts"]["error"] == 0 and report["counts"]["warning"] == 0
    finally:
        srv.stop()


# ------------------------------------------------------------------ units: the blob store


@pytest.fixture
def store(tmp_path: Path):
    from anvil.storage.blobs import BlobStore

    (tmp_path / "blobs" / "sha256").mkdir(parents=True)
    (tmp_path / "tmp").mkdir()
    bs = BlobStore(tmp_path / "blobs" / "sha256", tmp_path / "tmp")
    bs.prepare_fanout()
    return bs


def test_writer_splits_digests_on_absolute_chunk_boundaries(store):
    from anvil.storage.blobs import chunk_digest, decode_sidecar

    data = os.urandom(3 * CHUNK_SIZE + 5)
    w = store.writer()
    for i in range(0, len(data), 333_333):  # pieces that straddle every boundary
        w.write(data[i:i + 333_333])
    info = w.commit()
    _, digests = decode_sidecar(store.sidecar_path(info.sha256).read_bytes(), len(data))
    assert digests == [chunk_digest(data[i:i + CHUNK_SIZE]) for i in range(0, len(data), CHUNK_SIZE)]
    # put_bytes (O_TMPFILE path) writes the same sidecar for the same bytes.
    store.remove(info.sha256)
    assert not store.sidecar_path(info.sha256).exists()
    again = store.put_bytes(data)
    assert decode_sidecar(store.sidecar_path(again.sha256).read_bytes(), len(data))[1] == digests
    # One chunk or less: no sidecar; iter_all yields blobs only.
    small = store.put_bytes(os.urandom(CHUNK_SIZE))
    assert not store.sidecar_path(small.sha256).exists()
    assert sorted(s for s, _ in store.iter_all()) == sorted([again.sha256, small.sha256])


def test_range_reads_only_the_chunks_it_touches(store, monkeypatch):
    from anvil.storage import blobs as blobs_mod

    data = os.urandom(8 * CHUNK_SIZE)
    info = store.put_bytes(data)
    hashed: list[int] = []
    real = blobs_mod.chunk_digest

    def counting(d, alg=blobs_mod.CHUNK_ALGORITHM):
        hashed.append(len(d))
        return real(d, alg)

    monkeypatch.setattr(blobs_mod, "chunk_digest", counting)
    got = b"".join(store.read_verified(info.sha256, len(data), 5 * CHUNK_SIZE - 3, 10))
    assert got == data[5 * CHUNK_SIZE - 3:5 * CHUNK_SIZE + 7]
    assert len(hashed) == 2  # chunks 4 and 5, nothing else


def test_bad_sidecar_with_good_blob_is_rewritten_and_the_read_goes_on(store):
    data = os.urandom(2 * CHUNK_SIZE + 1)
    info = store.put_bytes(data)
    sc = store.sidecar_path(info.sha256)
    raw = bytearray(sc.read_bytes())
    raw[-1] ^= 1
    sc.write_bytes(raw)
    assert b"".join(store.read_verified(info.sha256, len(data))) == data
    assert sc.read_bytes() != bytes(raw) and store.sidecar_problem(info.sha256, len(data)) is None
    assert store.quarantined() == []


def test_blob_without_sidecar_is_verified_whole_then_gets_one(store):
    from anvil.storage.blobs import BlobCorrupted

    data = os.urandom(2 * CHUNK_SIZE + 7)
    info = store.put_bytes(data)
    store.remove_sidecar(info.sha256)  # as written before sidecars existed
    assert store.sidecar_problem(info.sha256, len(data)) == "missing"
    assert b"".join(store.read_verified(info.sha256, len(data), 10, 20)) == data[10:30]
    assert store.sidecar_problem(info.sha256, len(data)) is None
    # Without a sidecar, a flipped byte anywhere is caught before the first byte is handed out.
    store.remove_sidecar(info.sha256)
    _flip(store.path(info.sha256), 2 * CHUNK_SIZE + 3)
    it = store.read_verified(info.sha256, len(data), 0, 10)
    with pytest.raises(BlobCorrupted) as e:
        next(it)
    assert e.value.confirmed and not store.sidecar_path(info.sha256).exists()


def test_corruption_kinds_and_quarantine(store):
    from anvil.storage.blobs import BlobCorrupted

    small = store.put_bytes(b"hello world")
    _flip(store.path(small.sha256), 3)
    with pytest.raises(BlobCorrupted) as e:
        b"".join(store.read_verified(small.sha256, small.size))
    assert e.value.confirmed
    big_data = os.urandom(3 * CHUNK_SIZE)
    big = store.put_bytes(big_data)
    os.truncate(store.path(big.sha256), CHUNK_SIZE)
    with pytest.raises(BlobCorrupted) as e:
        store.check_size(big.sha256, big.size)
    assert e.value.confirmed and "bytes" in e.value.detail
    assert store.quarantine(big.sha256) is True and store.quarantine(big.sha256) is False
    assert store.quarantined() == [big.sha256]
    assert not store.path(big.sha256).exists() and not store.sidecar_path(big.sha256).exists()
    with pytest.raises(BlobCorrupted) as e:
        store.check_size(big.sha256, big.size)
    assert e.value.missing and not e.value.confirmed
    # The same content again is stored fresh (with its sidecar), not deduplicated onto nothing.
    again = store.put_bytes(big_data)
    assert b"".join(store.read_verified(again.sha256, again.size)) == big_data


def test_blob_digests_participant_validate_rebuild_and_gc(tmp_path):
    from anvil.context import DEV_PRINCIPAL, RequestContext
    from anvil.runtime import Anvil
    from anvil.storage.recovery import RecoveryContext

    a = Anvil(tmp_path / "data")
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        a.objects.create_bucket(ctx, "bkt")
        data = os.urandom(2 * CHUNK_SIZE + 1)
        info = a.objects.store_bytes(data)
        a.objects.put_object(ctx, "bkt", "k", info)
        blobs = a.storage.blobs
        p = next(p for p in a.participants() if p.name == "blob-digests")

        def validate():
            rctx = RecoveryContext(a.storage.root, a.storage.catalog.reader(), blobs, a.participants())
            return {f.invariant: f for f in p.validate(rctx)}

        assert validate() == {}
        blobs.remove_sidecar(info.sha256)
        found = validate()
        assert found["blobs.sidecar_missing"].severity == "warning"
        assert found["blobs.sidecar_missing"].affected["blobs"] == [info.sha256]
        assert found["blobs.sidecar_missing"].affected["count"] == 1
        blobs.sidecar_path(info.sha256).write_bytes(b"ANVLCHK1 garbage")
        assert validate()["blobs.sidecar_invalid"].severity == "error"
        report = a.diagnostics.repair(ctx, ["blob-digests"])
        assert report["ok"], report
        assert validate() == {} and blobs.sidecar_problem(info.sha256, len(data)) is None
        # A sidecar whose blob is gone: reported once old, removed by gc.
        orphan = "ab" + "0" * 62
        sc = blobs.sidecar_path(orphan)
        sc.write_bytes(b"x")
        os.utime(sc, (1, 1))
        assert validate()["blobs.sidecar_orphan"].affected["sha256"] == orphan
        leftover = sc.parent / f".{orphan}.chunks.0123456789ab.tmp"  # a crash mid-sidecar
        leftover.write_bytes(b"half")
        gc = a.diagnostics.gc(ctx, grace=0)
        assert gc.sidecars_removed == 1 and not sc.exists()
        assert not leftover.exists() and gc.tmp_files_removed == 1
        # gc takes an orphan blob's sidecar with it.
        lonely = blobs.put_bytes(os.urandom(2 * CHUNK_SIZE))
        os.utime(blobs.path(lonely.sha256), (1, 1))
        gc = a.diagnostics.gc(ctx, grace=0)
        assert lonely.sha256 in [b["blob"] for b in gc.blobs_removed]
        assert not blobs.sidecar_path(lonely.sha256).exists()
    finally:
        a.close()


def test_backup_leaves_a_corrupt_blob_out_and_says_so(tmp_path, monkeypatch):
    from anvil.backup import engine
    from anvil.backup.backends.local import LocalBackend
    from anvil.backup.repository import Repository
    from anvil.context import DEV_PRINCIPAL, RequestContext
    from anvil.runtime import Anvil

    monkeypatch.setenv("ANVIL_BACKUP_KDF", "test")
    a = Anvil(tmp_path / "data")
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        a.objects.create_bucket(ctx, "bkt")
        good = a.objects.store_bytes(b"good" * 100)
        bad = a.objects.store_bytes(b"bad" * 100)
        a.objects.put_object(ctx, "bkt", "good", good)
        a.objects.put_object(ctx, "bkt", "bad", bad)
        _flip(a.storage.blobs.path(bad.sha256), 5)
        repo = Repository.init(LocalBackend(tmp_path / "repo"), "pw")
        m = engine.create_snapshot(a.storage.root, a.storage.layout.catalog_path, a.storage.blobs,
                                   a.storage.layout.tmp, a.storage.format.deployment_id, a.participants(), repo)
    finally:
        a.close()
    assert good.sha256 in m["tree"]["blobs"] and bad.sha256 not in m["tree"]["blobs"]
    [problem] = m["problems"]
    assert bad.sha256 in problem and "corrupt" in problem and "not stored" in problem


def test_blob_from_before_sidecars_is_verified_whole_and_gets_one(server, client, bucket, token):
    data = os.urandom(3 * MIB + 1)
    put = client.put_object(bucket, "legacy", data)
    sidecar = _blob(server, put["sha256"]).parent / f"{put['sha256']}.chunks"
    sidecar.unlink()  # as stored before this change (or restored from a backup)
    assert client.get_object(bucket, "legacy", range="bytes=10-19") == data[10:20]
    assert sidecar.exists()
    # Without a sidecar, damage anywhere is found before any of the blob's bytes is sent.
    sidecar.unlink()
    _flip(_blob(server, put["sha256"]), 3 * MIB)
    status, body, length, reset = _raw_get(server, bucket, "legacy", token)
    assert body == b"" or not status.startswith(b"HTTP/1.1 200"), (status, len(body))
    assert put["sha256"] in _quarantined(server)
