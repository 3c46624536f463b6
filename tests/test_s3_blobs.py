"""Blob bodies in an S3-compatible backend (`anvil serve --blobs s3://bucket/prefix`).

The backend is a second, real `anvil serve` (its S3 gateway); the node under test keeps its
records in its own catalog.db and every body over the inline threshold in the backend's bucket,
under `prefix/ab/cd/<sha256>`. Objects are driven through the node's S3 gateway with boto3;
what the node stored is looked at (and damaged) through the backend's S3 gateway."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from anvil.client import AnvilAPIError
from tests.helpers import AnvilServer, free_port, run_anvil, unique_bucket
from tests.s3_helpers import dev_credentials, s3_client

# Existing object tests, run here against the S3-backed node (the `server` fixture below). They use
# only the public APIs, so they must pass whichever backend holds the bodies.
from tests.test_objects import (  # noqa: F401
    test_expected_checksums,
    test_large_body_streams_back,
    test_put_get_head_delete,
    test_range_on_version,
    test_streamed_body,
)
from tests.test_objects import test_ranges as test_native_ranges  # noqa: F401
from tests.test_s3 import (  # noqa: F401
    bkt,
    test_bad_checksum_and_md5_store_nothing,
    test_conditional_put,
    test_copy_object,
    test_delete_objects_quiet_and_verbose,
    test_multipart_complete_and_part_reads,
    test_put_get_metadata_and_system_headers,
    test_upload_fileobj_multipart_via_transfer,
    test_upload_part_copy,
    test_versions_and_delete_markers,
    vbkt,
)
from tests.test_s3 import test_ranges as test_s3_ranges  # noqa: F401

MIB = 1024 * 1024
BUCKET = "blobs"
PREFIX = "node-a"
BACKUP_ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "blobs elsewhere"}


def backend_env(backend: AnvilServer, prefix: str, endpoint: str | None = None) -> dict[str, str]:
    keys = dev_credentials(backend)
    return {"ANVIL_BLOBS_URL": f"s3://{BUCKET}/{prefix}", "ANVIL_BLOBS_ENDPOINT": endpoint or backend.endpoint,
            "AWS_ACCESS_KEY_ID": keys["access_key_id"], "AWS_SECRET_ACCESS_KEY": keys["secret_access_key"],
            "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            # Multipart from 5 MiB (S3's smallest part) instead of 64 MiB: small test bodies take that path.
            "ANVIL_BLOBS_MULTIPART_MIN": str(5 * MIB)}


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory):
    srv = AnvilServer(tmp_path_factory.mktemp("blob-backend") / "data").start(timeout=90)
    s3_client(srv).create_bucket(Bucket=BUCKET)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, backend: AnvilServer):
    """The node under test, as the `server` of the shared fixtures (`s3`, `client`, `bucket`), so the
    object tests imported below run against it. Bodies over 1 KiB go to the backend (the default
    inline threshold, 64 KiB, would keep most of those tests' bodies in catalog.db)."""
    env = {**backend_env(backend, PREFIX), "ANVIL_INLINE_MAX": "1024"}
    srv = AnvilServer(tmp_path_factory.mktemp("s3-node") / "data", env=env).start(timeout=90)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def node(server: AnvilServer) -> AnvilServer:
    return server


@pytest.fixture(scope="module")
def store(backend: AnvilServer):
    """The backend's bucket, seen directly."""
    return s3_client(backend)


def key_of(sha: str, prefix: str = PREFIX) -> str:
    return f"{prefix}/{sha[:2]}/{sha[2:4]}/{sha}"


def stored(store, key: str) -> bytes | None:
    try:
        return store.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    except ClientError as e:
        if e.response["ResponseMetadata"]["HTTPStatusCode"] == 404:
            return None
        raise


def cli(node: AnvilServer, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict]:
    proc = run_anvil([*args, "--json"],
                          env={**node.cli_env(), **(env or {})}, capture_output=True, text=True, timeout=120)
    try:
        return proc.returncode, json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"{args}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}") from None


def invariants(report: dict) -> set[str]:
    return {f.get("invariant") for f in report.get("findings", [])}


def test_bodies_live_in_the_backend_under_their_hash(node: AnvilServer, s3, store) -> None:
    bucket = unique_bucket()
    s3.create_bucket(Bucket=bucket)
    small, medium = b"tiny" * 10, os.urandom(200 * 1024)
    s3.put_object(Bucket=bucket, Key="small", Body=small)
    s3.put_object(Bucket=bucket, Key="medium", Body=medium)
    s3.put_object(Bucket=bucket, Key="again", Body=medium)  # deduplicated: one body
    assert s3.get_object(Bucket=bucket, Key="medium")["Body"].read() == medium
    assert s3.get_object(Bucket=bucket, Key="again", Range="bytes=1000-1999")["Body"].read() == medium[1000:2000]
    assert s3.get_object(Bucket=bucket, Key="small")["Body"].read() == small
    sha = hashlib.sha256(medium).hexdigest()
    assert stored(store, key_of(sha)) == medium
    # A small body stays inline in the node's record store; nothing is written on the node's disk.
    assert stored(store, key_of(hashlib.sha256(small).hexdigest())) is None
    assert not [p for p in (node.storage_path / "blobs" / "sha256").rglob("*") if p.is_file()]
    listed = store.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/{sha[:2]}/{sha[2:4]}/")["Contents"]
    assert [o["Key"] for o in listed] == [key_of(sha)]


def test_large_bodies_ranges_multipart_copy_and_delete(node: AnvilServer, s3, store) -> None:
    bucket = unique_bucket()
    s3.create_bucket(Bucket=bucket)
    big = os.urandom(6 * MIB + 12345)  # over the 5 MiB multipart threshold: uploaded in parts
    s3.put_object(Bucket=bucket, Key="big", Body=big)
    sha = hashlib.sha256(big).hexdigest()
    head = store.head_object(Bucket=BUCKET, Key=key_of(sha))
    assert head["ContentLength"] == len(big) and head["ETag"].strip('"').endswith("-2")  # a multipart upload
    assert stored(store, key_of(sha) + ".chunks") is not None  # per-chunk digests beside it
    # Ranges across chunk boundaries, each chunk verified against those digests.
    for lo, hi in ((0, 99), (MIB - 10, MIB + 10), (3 * MIB + 5, 6 * MIB + 12344)):
        got = s3.get_object(Bucket=bucket, Key="big", Range=f"bytes={lo}-{hi}")["Body"].read()
        assert got == big[lo:hi + 1]
    assert s3.get_object(Bucket=bucket, Key="big")["Body"].read() == big

    # A multipart upload to the node: each part a body in the backend.
    parts = [os.urandom(5 * MIB), os.urandom(300 * 1024)]
    up = s3.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    etags = [s3.upload_part(Bucket=bucket, Key="mp", UploadId=up, PartNumber=i + 1, Body=p)["ETag"]
             for i, p in enumerate(parts)]
    s3.complete_multipart_upload(Bucket=bucket, Key="mp", UploadId=up, MultipartUpload={
        "Parts": [{"PartNumber": i + 1, "ETag": e} for i, e in enumerate(etags)]})
    assert s3.get_object(Bucket=bucket, Key="mp")["Body"].read() == b"".join(parts)
    for p in parts:
        assert stored(store, key_of(hashlib.sha256(p).hexdigest())) == p

    s3.copy_object(Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": "big"})
    assert s3.get_object(Bucket=bucket, Key="copy", Range="bytes=5-9")["Body"].read() == big[5:10]
    s3.delete_object(Bucket=bucket, Key="big")
    with pytest.raises(ClientError):
        s3.get_object(Bucket=bucket, Key="big")
    assert s3.get_object(Bucket=bucket, Key="copy")["Body"].read() == big  # the body is shared


def test_gc_removes_orphans_from_the_backend(node: AnvilServer, s3, store) -> None:
    bucket = unique_bucket()
    s3.create_bucket(Bucket=bucket)
    body = os.urandom(2 * MIB)
    sha = hashlib.sha256(body).hexdigest()
    s3.put_object(Bucket=bucket, Key="doomed", Body=body)
    s3.delete_object(Bucket=bucket, Key="doomed")
    assert stored(store, key_of(sha)) == body
    with node.client() as c:
        kept = c.gc()  # the default grace (1 h): a young orphan stays
        assert not any(b["blob"] == sha for b in kept["blobs_removed"]) and kept["young_orphans_kept"] >= 1
        assert stored(store, key_of(sha)) == body
        report = c.gc(grace_seconds=0)
    assert sha in {b["blob"] for b in report["blobs_removed"]}
    assert stored(store, key_of(sha)) is None and stored(store, key_of(sha) + ".chunks") is None


def test_fsck_deep_finds_a_corrupt_body_and_reads_refuse_it(node: AnvilServer, s3, store) -> None:
    bucket = unique_bucket()
    s3.create_bucket(Bucket=bucket)
    body = os.urandom(300 * 1024)
    sha = hashlib.sha256(body).hexdigest()
    s3.put_object(Bucket=bucket, Key="victim", Body=body)
    client = node.client()
    clean = client.fsck(deep=True)
    assert "blobs.hash_mismatch" not in invariants(clean), clean
    # Same size, one byte different, written straight into the backend.
    bad = bytearray(body)
    bad[1234] ^= 0xFF
    store.put_object(Bucket=BUCKET, Key=key_of(sha), Body=bytes(bad))
    shallow = client.fsck()
    assert "blobs.hash_mismatch" not in invariants(shallow)  # names and sizes still match
    deep = client.fsck(deep=True)
    client.close()
    hits = [f for f in deep["findings"] if f["invariant"] == "blobs.hash_mismatch"]
    assert [f["affected"]["sha256"] for f in hits] == [sha]
    # Verify-on-read refuses the bytes and quarantines the body in the backend.
    with pytest.raises(ClientError) as exc:
        s3.get_object(Bucket=bucket, Key="victim")["Body"].read()
    assert exc.value.response["Error"]["Code"] == "DataCorrupted"
    assert stored(store, key_of(sha)) is None
    assert stored(store, f"{PREFIX}/quarantine/{sha}") == bytes(bad)
    # Uploading the same content again stores a fresh, good body.
    s3.put_object(Bucket=bucket, Key="healed", Body=body)
    assert s3.get_object(Bucket=bucket, Key="victim")["Body"].read() == body


def test_per_chunk_digests_in_the_backend(node: AnvilServer, s3, store) -> None:
    bucket = unique_bucket()
    s3.create_bucket(Bucket=bucket)
    body = os.urandom(3 * MIB + 100)
    sha = hashlib.sha256(body).hexdigest()
    s3.put_object(Bucket=bucket, Key="big", Body=body)
    sidecar = stored(store, key_of(sha) + ".chunks")
    # A damaged sidecar is not trusted on its own: the body's SHA-256 decides, the read goes on
    # and the digests are written again.
    store.put_object(Bucket=BUCKET, Key=key_of(sha) + ".chunks", Body=b"garbage")
    assert s3.get_object(Bucket=bucket, Key="big", Range="bytes=10-20")["Body"].read() == body[10:21]
    assert stored(store, key_of(sha) + ".chunks") == sidecar
    # One flipped byte in chunk 2: a range over chunk 0 reads only chunk 0 and is served; a range
    # touching chunk 2 is refused (DataCorrupted) and the body goes to quarantine.
    bad = bytearray(body)
    bad[2 * MIB + 5] ^= 0x01
    store.put_object(Bucket=BUCKET, Key=key_of(sha), Body=bytes(bad))
    assert s3.get_object(Bucket=bucket, Key="big", Range="bytes=0-99")["Body"].read() == body[:100]
    with pytest.raises(ClientError) as exc:
        s3.get_object(Bucket=bucket, Key="big", Range=f"bytes={2 * MIB}-{2 * MIB + 9}")
    assert exc.value.response["Error"]["Code"] == "DataCorrupted"
    assert stored(store, f"{PREFIX}/quarantine/{sha}") == bytes(bad)
    assert stored(store, key_of(sha)) is None and stored(store, key_of(sha) + ".chunks") is None
    # The same bytes uploaded again (any key) heal it; the module's later tests see a sound store.
    s3.put_object(Bucket=bucket, Key="heal", Body=body)
    assert s3.get_object(Bucket=bucket, Key="big", Range=f"bytes={2 * MIB}-{2 * MIB + 9}")["Body"].read() == \
        body[2 * MIB:2 * MIB + 10]


def test_backup_and_restore_of_an_s3_backed_store(node: AnvilServer, backend: AnvilServer, s3, store,
                                                  tmp_path: Path) -> None:
    bucket = unique_bucket()
    s3.create_bucket(Bucket=bucket)
    bodies = {f"k{i}": os.urandom(100 * 1024 + i) for i in range(3)}
    bodies["large"] = os.urandom(2 * MIB + 7)
    for k, b in bodies.items():
        s3.put_object(Bucket=bucket, Key=k, Body=b)
    repo = f"file://{tmp_path / 'repo'}"
    for args in (("backup", "init", "--repo", repo),
                 ("backup", "create", "--repo", repo, "--endpoint", node.endpoint, "--escrow-secrets")):
        rc, out = cli(node, *args, env=BACKUP_ENV)
        assert rc == 0, out
    assert not out["problems"]
    # Restore into a new STORAGE_PATH whose blobs go to another prefix of the backend.
    target = tmp_path / "restored"
    env = {**BACKUP_ENV, **backend_env(backend, "restored")}
    rc, res = cli(node, "restore", "--repo", repo, "--target", str(target), env=env)
    assert rc == 0 and res["ok"], res
    for b in bodies.values():
        assert stored(store, key_of(hashlib.sha256(b).hexdigest(), "restored")) == b
    assert not [p for p in (target / "blobs" / "sha256").rglob("*") if p.is_file()]
    rc, report = cli(node, "fsck", "--deep", "--storage-path", str(target), env=env)
    assert not [f for f in report["findings"] if f["severity"] == "error"], report


class _Forwarder:
    """A TCP forwarder to the backend that the test can cut: the backend becomes unreachable."""

    def __init__(self, target_port: int):
        self.port = free_port()
        self.target = target_port
        self.sock = socket.create_server(("127.0.0.1", self.port))
        self.conns: list[socket.socket] = []
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.open:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.open = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close() alone would not)
        except OSError:
            pass
        self.sock.close()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def test_unreachable_backend_is_503_and_records_nothing(backend: AnvilServer, tmp_path: Path) -> None:
    # At start: a backend nobody listens on is refused with the code, not a stack trace.
    env = {**os.environ, **backend_env(backend, "down", endpoint=f"http://127.0.0.1:{free_port()}")}
    proc = subprocess.run([sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path",
                           str(tmp_path / "never"), "--listen", f"127.0.0.1:{free_port()}"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "BlobBackendUnavailable" in proc.stderr, proc.stderr

    fwd = _Forwarder(backend.port)
    srv = AnvilServer(tmp_path / "data", env=backend_env(backend, "cut", endpoint=f"http://127.0.0.1:{fwd.port}"))
    srv.start(timeout=90)
    try:
        s3 = s3_client(srv)
        bucket = unique_bucket()
        s3.create_bucket(Bucket=bucket)
        kept = os.urandom(200 * 1024)
        s3.put_object(Bucket=bucket, Key="kept", Body=kept)
        fwd.cut()
        with pytest.raises(ClientError) as put:
            s3.put_object(Bucket=bucket, Key="lost", Body=os.urandom(200 * 1024))
        assert put.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert put.value.response["Error"]["Code"] == "ServiceUnavailable"
        assert "blob backend" in put.value.response["Error"]["Message"]
        with pytest.raises(ClientError) as get:
            s3.get_object(Bucket=bucket, Key="kept")
        assert get.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        # No record without its body: the failed PUT left nothing behind.
        assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["kept"]
        assert not list((srv.storage_path / "tmp").iterdir())
        with srv.client() as c, pytest.raises(AnvilAPIError) as native:
            c.put_object(bucket, "native", os.urandom(100 * 1024))
        assert (native.value.status, native.value.code) == (503, "BlobBackendUnavailable")
    finally:
        srv.stop()
