"""The blob backend contract (storage.blobbackend), the same checks for every backend: local files
and S3 — here against moto's S3 server (a real subprocess on loopback), a second S3 implementation
beside the Anvil gateway that tests/test_s3_blobs.py uses. Then `BlobStore` over the S3 backend,
in process: spooled writes (multipart), verified reads, quarantine."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from anvil.errors import AnvilError
from anvil.storage.blobbackend import LocalBlobBackend, backend_from_env
from anvil.storage.blobs import CHUNK_SIZE, BlobCorrupted, BlobStore
from tests.helpers import free_port, moto_server

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory):
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


@pytest.fixture
def s3_env(moto: str, monkeypatch: pytest.MonkeyPatch):
    import boto3

    bucket = f"blobs-{os.urandom(4).hex()}"
    boto3.client("s3", endpoint_url=moto, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                 "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                 "ANVIL_BLOBS_URL": f"s3://{bucket}/store", "ANVIL_BLOBS_ENDPOINT": moto,
                 "ANVIL_BLOBS_MULTIPART_MIN": str(5 * MIB)}.items():
        monkeypatch.setenv(k, v)
    return bucket


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return LocalBlobBackend(tmp_path / "blobs" / "sha256", tmp_path / "quarantine")
    request.getfixturevalue("s3_env")
    b = backend_from_env()
    assert b is not None and not b.local
    return b


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_backend_contract(backend, tmp_path: Path) -> None:
    small, big = os.urandom(1000), os.urandom(6 * MIB + 3)  # big: a multipart upload on S3
    spool = tmp_path / "spool"
    spool.write_bytes(big)
    assert backend.stat(sha(small)) is None and backend.touch(sha(small)) is False
    assert backend.put_bytes(sha(small), small) is True
    assert backend.put_bytes(sha(small), small) is False  # present: never written again
    assert backend.put_file(sha(big), spool, len(big)) is True
    assert backend.put_file(sha(big), spool, len(big)) is False
    assert backend.stat(sha(big))[0] == len(big)
    with backend.open_range(sha(big)) as f:
        assert f.read() == big
    with backend.open_range(sha(big), MIB - 5, 10) as f:
        assert f.read(10) == big[MIB - 5:MIB + 5]
    with pytest.raises(FileNotFoundError):
        backend.open_range("0" * 64)
    assert {(b.sha256, b.size) for b in backend.list_blobs()} == {(sha(small), len(small)), (sha(big), len(big))}

    backend.put_sidecar(sha(big), b"digests")
    assert backend.get_sidecar(sha(big)) == b"digests" and backend.get_sidecar(sha(small)) is None
    assert [s for s, _ in backend.list_sidecars()] == [sha(big)]
    assert sha(big) not in {b.sha256 for b in backend.list_blobs()} - {sha(big)}  # sidecars are not blobs

    assert backend.quarantine(sha(big)) is True and backend.quarantine(sha(big)) is False
    assert backend.stat(sha(big)) is None and backend.get_sidecar(sha(big)) is None  # its sidecar goes too
    assert backend.quarantined() == [sha(big)]
    assert backend.drop_quarantined(sha(big)) is True and backend.quarantined() == []
    assert backend.delete(sha(small)) is True and backend.delete(sha(small)) is False
    assert list(backend.list_blobs()) == []


def test_blob_store_over_s3(s3_env: str, tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    store = BlobStore(tmp_path / "blobs" / "sha256", tmp_path / "tmp", backend=backend_from_env())
    assert store.remote
    body = os.urandom(5 * MIB + CHUNK_SIZE // 2)
    w = store.writer()
    for i in range(0, len(body), 300_000):
        w.write(body[i:i + 300_000])
    info = w.commit()
    assert info.sha256 == sha(body) and info.md5 == hashlib.md5(body).hexdigest()
    assert not list((tmp_path / "tmp").iterdir())  # the spool file is gone once uploaded
    assert store.size(info.sha256) == len(body) and store.sidecar_problem(info.sha256, len(body)) is None
    assert b"".join(store.read_verified(info.sha256, len(body), 2 * MIB - 1, MIB + 2)) == body[2 * MIB - 1:3 * MIB + 1]
    with pytest.raises(BlobCorrupted) as wrong:
        store.check_size(info.sha256, len(body) - 1)  # a record that disagrees with the stored size
    assert "recorded" in wrong.value.detail
    small = store.put_bytes(b"x" * 5000)
    assert store.read_small(small.sha256, 5000) == b"x" * 5000
    scan = store.scan(deep=True)
    assert set(scan.blobs) == {info.sha256, small.sha256} and not scan.bad
    assert store.quarantine(small.sha256) and store.quarantined() == [small.sha256]
    with pytest.raises(BlobCorrupted) as gone:
        store.read_small(small.sha256, 5000)
    assert gone.value.missing


def test_unreachable_s3_is_blob_backend_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANVIL_BLOBS_URL", "s3://nowhere/p")
    monkeypatch.setenv("ANVIL_BLOBS_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    (tmp_path / "tmp").mkdir()
    store = BlobStore(tmp_path / "blobs" / "sha256", tmp_path / "tmp", backend=backend_from_env())
    w = store.writer()
    w.write(os.urandom(200_000))
    with pytest.raises(AnvilError) as exc:
        w.commit()
    assert (exc.value.code, exc.value.status) == ("BlobBackendUnavailable", 503)
    assert not list((tmp_path / "tmp").iterdir())


def test_malformed_blobs_url_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("http://bucket/prefix", "s3://", "s3:///prefix", "/srv/blobs"):
        monkeypatch.setenv("ANVIL_BLOBS_URL", bad)
        with pytest.raises(AnvilError) as exc:
            backend_from_env()
        assert exc.value.code == "InvalidArgument"
