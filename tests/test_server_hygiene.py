"""Server hygiene (issue 12, item 8), each against a real `anvil serve` process:

- a client that disconnects mid-upload is one INFO line, no traceback, and nothing is stored;
- SIGTERM drains in-flight requests (a slow upload, a streaming GET, an open change feed) and
  the process exits 0;
- a port already in use fails before the "listening" banner, with one clear line.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import AnvilServer, unique_bucket
from tests.s3_helpers import dev_credentials
from tests.s3_sign import sign

MIB = 1024 * 1024

pytestmark = pytest.mark.timeout(90)


def _wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _tmp_files(server: AnvilServer) -> list[str]:
    return sorted(os.listdir(server.storage_path / "tmp"))


def _half_upload(port: int, head: bytes, send: int) -> None:
    """Send the head and `send` bytes of a longer declared body, then hang up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        piece = b"z" * (256 * 1024)
        sent = 0
        while sent < send:
            sock.sendall(piece)
            sent += len(piece)
        time.sleep(0.2)  # let the server take what was sent before the connection goes


def _native_put_head(bucket: str, key: str, token: str, length: int) -> bytes:
    return (f"PUT /anvil/v1/buckets/{bucket}/object?key={key} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: {token}\r\nContent-Length: {length}\r\n\r\n").encode()


@pytest.mark.parametrize("length, send", [(8 * MIB, 3 * MIB), (900 * 1024, 256 * 1024)],
                         ids=["streamed", "buffered"])
def test_native_disconnect_mid_upload_is_an_info_line(server: AnvilServer, client, bucket: str,
                                                      length: int, send: int) -> None:
    token = server.auth_headers()["authorization"]
    key = f"half-{length}"
    before = server.log()
    _half_upload(server.port, _native_put_head(bucket, key, token, length), send)
    _wait_for(lambda: "client disconnected during upload" in server.log()[len(before):], what="the log line")
    new = server.log()[len(before):]
    line = next(ln for ln in new.splitlines() if "client disconnected during upload" in ln)
    assert " INFO " in line and f"/anvil/v1/buckets/{bucket}/object" in line and " after " in line, line
    assert "Traceback" not in new and " ERROR " not in new, new
    assert client.list_objects(bucket)["objects"] == []
    _wait_for(lambda: _tmp_files(server) == [], what="tmp/ to be empty")


def test_s3_disconnect_mid_upload_is_an_info_line(server: AnvilServer, s3) -> None:
    bucket = unique_bucket("s")
    s3.create_bucket(Bucket=bucket)
    path = f"/{bucket}/half"
    host = f"127.0.0.1:{server.port}"
    headers, _ = sign("PUT", f"http://{host}{path}", dev_credentials(server),
                      headers={"Content-Length": str(8 * MIB)}, payload_hash="UNSIGNED-PAYLOAD")
    head = (f"PUT {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n").encode()
    before = server.log()
    _half_upload(server.port, head, 3 * MIB)
    _wait_for(lambda: "client disconnected during upload" in server.log()[len(before):], what="the log line")
    new = server.log()[len(before):]
    assert "Traceback" not in new and " ERROR " not in new, new
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    _wait_for(lambda: _tmp_files(server) == [], what="tmp/ to be empty")


# ------------------------------------------------------------------ SIGTERM


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    return False


def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path: Path) -> None:
    srv = AnvilServer(tmp_path / "data").start()
    try:
        auth = srv.auth_headers()
        token = auth["authorization"]
        bucket = unique_bucket("g")
        big = os.urandom(24 * MIB)
        with srv.client() as c:
            c.create_bucket(bucket)
            c.put_object(bucket, "big", big)

        results: dict[str, object] = {}
        upload_started = threading.Event()
        download_started = threading.Event()
        body = os.urandom(3 * MIB)

        def slow_upload() -> None:
            """A PUT whose body trickles in over about 1.5 s."""
            with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
                sock.sendall(_native_put_head(bucket, "slow", token, len(body)))
                for i in range(0, len(body), 256 * 1024):
                    sock.sendall(body[i:i + 256 * 1024])
                    upload_started.set()
                    time.sleep(0.12)
                answer = b""
                while b"\r\n\r\n" not in answer:
                    data = sock.recv(65536)
                    if not data:
                        break
                    answer += data
                results["upload"] = answer

        def slow_download() -> None:
            """A GET of 24 MiB read at about 12 MiB/s: the server is still sending at SIGTERM."""
            got = hashlib.sha256()
            with httpx.stream("GET", f"{srv.endpoint}/anvil/v1/buckets/{bucket}/object", params={"key": "big"},
                              headers=auth, timeout=30) as resp:
                results["download_status"] = resp.status_code
                for chunk in resp.iter_bytes(1024 * 1024):
                    got.update(chunk)
                    download_started.set()
                    time.sleep(0.08)
            results["download"] = got.hexdigest()

        def feed() -> None:
            """An open change feed: it never ends by itself, so shutdown must end it."""
            try:
                with httpx.stream("GET", f"{srv.endpoint}/anvil/v1/watch", headers=auth, timeout=30) as resp:
                    for _ in resp.iter_bytes():
                        pass
                results["feed"] = "ended"
            except httpx.HTTPError as e:
                results["feed"] = f"error: {e!r}"

        threads = [threading.Thread(target=f) for f in (slow_upload, slow_download, feed)]
        for t in threads:
            t.start()
        assert upload_started.wait(10) and download_started.wait(10)
        time.sleep(0.2)
        srv.proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: _refused(srv.port), timeout=5, what="new connections to be refused")
        started = time.monotonic()
        rc = srv.proc.wait(30)
        for t in threads:
            t.join(30)
        log = srv.log()
        assert rc == 0, log
        assert time.monotonic() - started < 8, "the shutdown waited for the grace period: something hung"
        assert results["upload"].startswith(b"HTTP/1.1 200"), (results, log)
        assert results["download_status"] == 200 and results["download"] == hashlib.sha256(big).hexdigest()
        assert results["feed"] == "ended", results
        assert "Traceback" not in log and " ERROR " not in log, log
        assert f"Anvil {srv.storage_path} stopped" in log
        srv.proc = None
        srv.start()  # the store closed cleanly and the slow upload was committed
        with srv.client() as c:
            assert c.get_object(bucket, "slow") == body
    finally:
        srv.stop()


# ------------------------------------------------------------------ port in use


def test_port_in_use_fails_before_the_banner(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        data = tmp_path / "data"
        proc = subprocess.run(
            [sys.executable, "-m", "anvil.cli.main", "serve", "--storage-path", str(data),
             "--listen", f"127.0.0.1:{port}"],
            capture_output=True, timeout=60, env={**os.environ, "ANVIL_ARGON2_FAST": "1"},
        )
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode != 0
    assert "listening" not in out, out
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], err
    assert not data.exists(), "the store was opened although the server could not listen"


def _get_live(sock: socket.socket) -> bytes:
    """One keep-alive GET of the liveness probe on `sock`: the answer's head."""
    sock.sendall(b"GET /anvil/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, "the server closed the connection"
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n")
                  if line.startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_keep_alive_timeout_runs_from_the_last_response(server: AnvilServer) -> None:
    """uvicorn's 5 s keep-alive timeout, counted from the connection's last response: the protocol arms one
    timer per idle period (not one per request), which waits out the rest when the connection was busy
    meanwhile and closes it only after 5 s with nothing received."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        assert _get_live(sock).startswith(b"HTTP/1.1 200")
        time.sleep(3)
        assert _get_live(sock).startswith(b"HTTP/1.1 200")
        time.sleep(3.5)  # 6.5 s after the first answer, 3.5 s after the last: still open
        assert _get_live(sock).startswith(b"HTTP/1.1 200")
        answered = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server, 5 s after that answer
        assert 4.0 <= time.monotonic() - answered <= 8.0
