"""`ANVIL_ASGI_SERVER`: the server runs on uvicorn (the default) or, for comparison, on granian
(bench/asgi.py; docs/performance.md). Real `anvil serve` processes."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from tests.helpers import AnvilServer, free_port, unique_bucket
from tests.s3_helpers import s3_client


def test_granian_serves_native_and_s3_and_stops_cleanly(tmp_path) -> None:
    server = AnvilServer(tmp_path / "data", env={"ANVIL_ASGI_SERVER": "granian"}).start()
    try:
        bucket = unique_bucket()
        with server.client() as c:
            c.create_bucket(bucket)
            c.put_object(bucket, "a/b", b"granian body")
            assert c.get_object(bucket, "a/b") == b"granian body"
            assert [o["key"] for o in c.list_objects(bucket)["objects"]] == ["a/b"]
        s3 = s3_client(server)
        s3.put_object(Bucket=bucket, Key="s3key", Body=b"via s3")
        assert s3.get_object(Bucket=bucket, Key="s3key")["Body"].read() == b"via s3"
        assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["a/b", "s3key"]
        # An unauthenticated request is refused as on uvicorn.
        assert httpx.get(f"{server.endpoint}/anvil/v1/buckets").status_code == 401
        proc = server.proc
        assert proc is not None
    finally:
        server.stop()
    assert proc.returncode == 0, server.log()
    assert "stopped" in server.log()


def test_unknown_asgi_server_is_refused_before_listening(tmp_path) -> None:
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path", str(tmp_path / "data"),
         "--listen", f"127.0.0.1:{port}"],
        env={**os.environ, "ANVIL_ASGI_SERVER": "gunicorn", "ANVIL_ARGON2_FAST": "1"},
        capture_output=True, timeout=60,
    )
    assert proc.returncode != 0
    assert b"ANVIL_ASGI_SERVER must be uvicorn or granian" in proc.stdout + proc.stderr
