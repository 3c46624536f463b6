"""SIGKILL during a stream of PUTs: every acknowledged object survives byte-identical, nothing half-written shows."""

from __future__ import annotations

import hashlib
import random
import threading
import time

import httpx
import pytest

from anvil.client import AnvilAPIError
from tests.helpers import AnvilServer

WRITERS = 3
RUN_SECONDS = 2.5


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
            except (httpx.HTTPError, AnvilAPIError):
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
            # No record points at a missing blob.
            blobs = srv.storage_path / "blobs" / "sha256"
            for obj in listed.values():
                path = blobs / obj["sha256"][:2] / obj["sha256"]
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
