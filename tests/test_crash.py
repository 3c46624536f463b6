"""SIGKILL during a stream of PUTs: every acknowledged object survives byte-identical, nothing half-written shows."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from pathlib import Path

import apsw
import httpx
import pytest

from anvil.client import AnvilError
from tests.helpers import AnvilServer, assert_fsck_clean
from tests.s3_helpers import s3_client

WRITERS = 3
RUN_SECONDS = 1.0  # then on until at least 20 PUTs are acknowledged (the wait below)


def _writer(srv: AnvilServer, wid: int, sent: dict[str, tuple[str, str]], acked: dict[str, tuple[str, str]],
            stop: threading.Event) -> None:
    rng = random.Random(wid)
    i = 0
    with srv.client(timeout=10) as c:
        while not stop.is_set():
            size = rng.choice([0, 1, 100, 4096, 65_536, 300_000, 1024 * 1024])
            body = rng.randbytes(size)
            key = f"w{wid}/obj-{i:05d}"
            i += 1
            digest = (hashlib.sha256(body).hexdigest(), hashlib.md5(body).hexdigest())
            sent[key] = digest

            def pieces(data: bytes = body) -> object:
                # Streamed in pieces so the kill can land in the middle of a body.
                for off in range(0, len(data), 64 * 1024):
                    yield data[off:off + 64 * 1024]

            try:
                res = c.put_object("crash", key, pieces() if size else body)
            except (httpx.HTTPError, AnvilError):  # the SDK's own errors: API or connection
                return  # the server died under us: this PUT is not acknowledged
            # A mismatch is recorded under a marker value the main thread's checks will catch.
            acked[key] = digest if (res["sha256"], res["etag"]) == digest else ("mismatch", key)


def test_sigkill_during_puts(tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = AnvilServer(tmp_path_factory.mktemp("crash") / "data").start()
    try:
        with srv.client() as c:
            c.create_bucket("crash")
        sent: dict[str, tuple[str, str]] = {}
        acked: dict[str, tuple[str, str]] = {}
        stop = threading.Event()
        threads = [threading.Thread(target=_writer, args=(srv, w, sent, acked, stop)) for w in range(WRITERS)]
        for t in threads:
            t.start()
        time.sleep(RUN_SECONDS)
        deadline = time.monotonic() + 10  # a loaded machine may need longer to acknowledge enough
        while len(acked) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        srv.kill()  # SIGKILL mid-stream
        stop.set()
        for t in threads:
            t.join(30)
        assert len(acked) >= 10, "the workload did not get going"
        assert set(acked) <= set(sent)
        assert all(v[0] != "mismatch" for v in acked.values())

        srv.start()
        # Bodies in flight at the kill were never acknowledged: start-up clears them from tmp/.
        assert list((srv.storage_path / "tmp").iterdir()) == []
        with srv.client() as c:
            listed = {o["key"]: o for o in c.iter_objects("crash")}
            # Every acknowledged PUT is there, byte-identical.
            for key, (sha, md5) in acked.items():
                assert key in listed, key
                data = c.get_object("crash", key)
                assert hashlib.sha256(data).hexdigest() == sha and hashlib.md5(data).hexdigest() == md5
            # Anything visible was sent whole: an unacknowledged PUT is either absent or complete.
            for key, obj in listed.items():
                assert key in sent
                sha, md5 = sent[key]
                assert (obj["sha256"], obj["etag"]) == (sha, md5)
                if key not in acked:
                    assert hashlib.sha256(c.get_object("crash", key)).hexdigest() == sha
            # No record points at a missing blob (a file, or a small body stored inline).
            blobs = srv.storage_path / "blobs" / "sha256"
            inlined = inline_sizes(srv.storage_path)
            for obj in listed.values():
                path = blobs / obj["sha256"][:2] / obj["sha256"]
                if obj["size"] <= INLINE_MAX:
                    assert inlined.get(obj["sha256"]) == obj["size"], obj
                else:
                    assert path.is_file() and path.stat().st_size == obj["size"]
            # The journal chain is intact and holds one put per visible object.
            verdict = c.verify_journal()
            assert verdict["ok"] is True, verdict["problems"]
            events = c.journal(limit=1000)
            while len(events) < verdict["checked"]:
                events += c.journal(after=events[-1]["seq"], limit=1000)
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            assert sorted(e["payload"]["key"] for e in events if e["kind"] == "object.put") == sorted(listed)
            # And the server takes writes again, continuing the chain.
            c.put_object("crash", "after", b"alive")
            assert c.verify_journal()["ok"] is True
    finally:
        srv.stop()
    assert_fsck_clean(srv.storage_path)


INLINE_MAX = 64 * 1024  # the default ANVIL_INLINE_MAX


def inline_sizes(storage_path: Path) -> dict[str, int]:
    """sha256 -> size of the bodies stored inline in catalog.db (storage.inline)."""
    conn = apsw.Connection(str(storage_path / "catalog.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return {r[0]: r[1] for r in conn.execute("SELECT sha256, size FROM inline_blobs")}
    finally:
        conn.close()


PART = 5 * 1024 * 1024


def test_sigkill_during_s3_uploads(tmp_path_factory: pytest.TempPathFactory) -> None:
    """boto3 PutObject and UploadPart streams, SIGKILL, restart: every acknowledged object and part is
    there, the interrupted multipart upload completes from its acknowledged parts, fsck is clean."""
    srv = AnvilServer(tmp_path_factory.mktemp("s3crash") / "data").start()
    acked_objects: dict[str, str] = {}
    acked_parts: dict[int, tuple[str, bytes]] = {}
    stop = threading.Event()
    try:
        s3 = s3_client(srv)
        s3.create_bucket(Bucket="s3crash")
        upload_id = s3.create_multipart_upload(Bucket="s3crash", Key="big")["UploadId"]

        def put_objects() -> None:
            c, rng, i = s3_client(srv), random.Random(1), 0
            while not stop.is_set():
                body = rng.randbytes(rng.choice([0, 10, 5000, 200_000]))
                try:
                    etag = c.put_object(Bucket="s3crash", Key=f"o/{i:05d}", Body=body)["ETag"]
                except Exception:  # noqa: BLE001 - the server died under us: not acknowledged
                    return
                acked_objects[f"o/{i:05d}"] = etag
                assert etag.strip('"') == hashlib.md5(body).hexdigest()
                i += 1

        def upload_parts() -> None:
            c, rng = s3_client(srv), random.Random(2)
            for n in range(1, 200):
                if stop.is_set():
                    return
                body = rng.randbytes(PART)
                try:
                    etag = c.upload_part(Bucket="s3crash", Key="big", UploadId=upload_id, PartNumber=n,
                                         Body=body)["ETag"]
                except Exception:  # noqa: BLE001
                    return
                acked_parts[n] = (etag, body)

        threads = [threading.Thread(target=put_objects), threading.Thread(target=upload_parts)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 15
        while (len(acked_parts) < 3 or len(acked_objects) < 10) and time.monotonic() < deadline:
            time.sleep(0.05)
        srv.kill()  # SIGKILL with both streams mid-flight
        stop.set()
        for t in threads:
            t.join(30)
        assert len(acked_parts) >= 3 and len(acked_objects) >= 10, "the workload did not get going"

        srv.start()
        s3 = s3_client(srv)
        for key, etag in acked_objects.items():
            assert s3.head_object(Bucket="s3crash", Key=key)["ETag"] == etag
        listed = {p["PartNumber"]: p["ETag"] for p in
                  s3.list_parts(Bucket="s3crash", Key="big", UploadId=upload_id, MaxParts=1000)["Parts"]}
        assert {n: e for n, (e, _) in acked_parts.items()}.items() <= listed.items()
        numbers = sorted(acked_parts)
        s3.complete_multipart_upload(
            Bucket="s3crash", Key="big", UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": acked_parts[n][0]} for n in numbers]})
        whole = hashlib.sha256()
        for n in numbers:
            whole.update(acked_parts[n][1])
        got = s3.get_object(Bucket="s3crash", Key="big")["Body"].read()
        assert len(got) == PART * len(numbers) and hashlib.sha256(got).hexdigest() == whole.hexdigest()
    finally:
        stop.set()
        srv.stop()
    assert_fsck_clean(srv.storage_path)


STORM_CLIENTS = 8


def test_sigkill_during_small_put_storm(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Small bodies go inline with their record (one flush for body, record and event): SIGKILL during
    a storm of small PUTs from several clients, restart, and every acknowledged PUT reads back with
    its bytes, no blob file was written for them, and `fsck --deep` is clean."""
    srv = AnvilServer(tmp_path_factory.mktemp("storm") / "data").start()
    acked: dict[str, bytes] = {}
    stop = threading.Event()
    lock = threading.Lock()
    try:
        with srv.client() as c:
            c.create_bucket("storm")
        headers = srv.auth_headers()

        def client(n: int) -> None:
            rng = random.Random(n)
            with httpx.Client(base_url=srv.endpoint, headers=headers, timeout=10) as http:
                i = 0
                while not stop.is_set():
                    # Mostly 4 KiB, some up to the inline threshold, a few repeated (deduplicated).
                    size = rng.choice([4096, 4096, 4096, 1, 20_000, INLINE_MAX])
                    body = rng.randbytes(size) if rng.random() < 0.9 else b"same" * (size // 4)
                    key = f"c{n}/{i:06d}"
                    i += 1
                    try:
                        r = http.put("/anvil/v1/buckets/storm/object", params={"key": key}, content=body)
                    except httpx.HTTPError:
                        return  # the server died under us: not acknowledged
                    if r.status_code != 200:
                        return
                    assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
                    with lock:
                        acked[key] = body

        threads = [threading.Thread(target=client, args=(n,)) for n in range(STORM_CLIENTS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while len(acked) < 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        srv.kill()  # SIGKILL with eight clients mid-PUT
        stop.set()
        for t in threads:
            t.join(30)
        assert len(acked) >= 50, "the workload did not get going"

        srv.start()
        with srv.client() as c:
            for key, body in acked.items():
                assert c.get_object("storm", key) == body, key
            listed = {o["key"]: o for o in c.iter_objects("storm")}
            assert set(acked) <= set(listed)
            assert c.verify_journal()["ok"] is True
        # Every small body is inline: not one blob file was written for them.
        inlined = inline_sizes(srv.storage_path)
        for obj in listed.values():
            assert inlined.get(obj["sha256"]) == obj["size"]
        assert not any(p.is_file() for p in (srv.storage_path / "blobs" / "sha256").rglob("*"))
    finally:
        stop.set()
        srv.stop()
    assert_fsck_clean(srv.storage_path)
