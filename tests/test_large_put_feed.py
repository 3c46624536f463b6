"""Large bodies on Anvil's own server (docs/performance.md, "Large PUT"), against a real `anvil serve`:

- a body of known length reaches the writer in blocks straight from the protocol's `on_body`
  (`api.server._BodyFeed`, `api.common.BodyBlocks`), with no ASGI `receive` per piece: what is stored
  is the body, an `Expect: 100-continue` is answered, and the connection serves the next request;
- a wrong Content-MD5, x-anvil-checksum-sha256 or x-amz-content-sha256 on such a body stores nothing;
- a client that leaves mid-body (reading paused behind the writer or not) leaves no blob, no record,
  nothing in tmp/;
- a large blob read cold is dropped behind the read (`BlobStore.read_verified`) and still verified
  span by span: a flipped byte breaks the transfer before any bad byte and quarantines the blob.

The server drops bodies behind from 4 MiB (ANVIL_DROP_BEHIND), so bodies of a few MiB take every path.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import mmap
import os
import socket
import sys
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest
from botocore.exceptions import ClientError

from anvil.storage.blobs import CHUNK_SIZE, BlobStore
from tests.helpers import AnvilServer, unique_bucket
from tests.s3_helpers import dev_credentials
from tests.s3_sign import sign

MIB = 1024 * 1024

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def _small_drop_behind():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANVIL_DROP_BEHIND", "4M")
        yield


def _wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _blob(server: AnvilServer, sha: str) -> Path:
    return server.storage_path / "blobs" / "sha256" / sha[:2] / sha


def _tmp_empty(server: AnvilServer) -> bool:
    return os.listdir(server.storage_path / "tmp") == []


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one response with a Content-Length, leaving the connection usable."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, "connection closed before the response head"
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        data = sock.recv(65536)
        assert data, "connection closed mid-body"
        rest += data
    return status, rest[:length]


def _path(bucket: str, key: str) -> str:
    return f"/anvil/v1/buckets/{bucket}/object?key={urllib.parse.quote(key, safe='')}"


def test_known_length_body_in_odd_pieces_with_100_continue_then_keep_alive(server, client, bucket):
    body = os.urandom(6 * MIB + 12_345)
    sizes = [1, 7, 4096, 65_535, 300_000, 2 * MIB + 5, 3]
    token = server.auth_headers()["authorization"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall((f"PUT {_path(bucket, 'fed')} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {token}\r\n"
                      f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        at, k = 0, 0
        while at < len(body):
            n = sizes[k % len(sizes)]
            sock.sendall(body[at:at + n])
            at += n
            k += 1
        status, answer = _read_response(sock)
        assert status == 200, answer
        # The same connection goes on: the feed let go of it once the body was in.
        small = b"after the large body"
        sock.sendall((f"PUT {_path(bucket, 'next')} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {token}\r\n"
                      f"Content-Length: {len(small)}\r\n\r\n").encode() + small)
        assert _read_response(sock)[0] == 200
        sock.sendall((f"GET {_path(bucket, 'fed')} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {token}\r\n"
                      "\r\n").encode())
        status, got = _read_response(sock)
        assert status == 200 and got == body
    assert client.get_object(bucket, "next") == small
    head = client.head_object(bucket, "fed")
    assert head["etag"].strip('"') == hashlib.md5(body).hexdigest()


def test_wrong_digests_on_a_large_body_store_nothing_native(server, client, bucket):
    body = os.urandom(5 * MIB + 3)
    sha = hashlib.sha256(body).hexdigest()
    url = f"{server.endpoint}/anvil/v1/buckets/{bucket}/object"
    headers = server.auth_headers()
    wrong = [{"content-md5": base64.b64encode(hashlib.md5(b"other").digest()).decode()},
             {"x-anvil-checksum-sha256": hashlib.sha256(b"other").hexdigest()}]
    with httpx.Client(timeout=60) as http:
        for extra in wrong:
            r = http.put(url, params={"key": "bad"}, content=body, headers={**headers, **extra})
            assert r.status_code == 400 and r.json()["error"]["code"] == "BadDigest", r.text
    assert client.list_objects(bucket)["objects"] == []
    assert not _blob(server, sha).exists()
    _wait_for(lambda: _tmp_empty(server), what="tmp/ to be empty")


def test_wrong_digests_on_a_large_body_store_nothing_s3(server, client, s3):
    bucket = unique_bucket("f")
    s3.create_bucket(Bucket=bucket)
    body = os.urandom(5 * MIB + 3)
    sha = hashlib.sha256(body).hexdigest()
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="bad-md5", Body=body,
                      ContentMD5=base64.b64encode(hashlib.md5(b"other").digest()).decode())
    assert e.value.response["Error"]["Code"] == "BadDigest"
    # A signed x-amz-content-sha256 that is not the body's.
    path = f"/{bucket}/bad-sha"
    host = f"127.0.0.1:{server.port}"
    headers, _ = sign("PUT", f"http://{host}{path}", dev_credentials(server),
                      headers={"Content-Length": str(len(body))}, payload_hash=hashlib.sha256(b"other").hexdigest())
    r = httpx.put(f"http://{host}{path}", content=body, headers=headers, timeout=60)
    assert r.status_code == 400 and b"XAmzContentSHA256Mismatch" in r.content, r.text
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    assert not _blob(server, sha).exists()
    _wait_for(lambda: _tmp_empty(server), what="tmp/ to be empty")


def _leave_mid_body(server: AnvilServer, head: bytes, send: int) -> None:
    """Send the head and `send` bytes of a longer declared body as fast as the server takes them,
    then hang up (the server may have paused reading behind its writer meanwhile)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)
        piece = os.urandom(MIB)
        for _ in range(send // MIB):
            sock.sendall(piece)
        time.sleep(0.2)


@pytest.mark.parametrize("api", ["native", "s3"])
def test_client_leaving_mid_body_leaves_nothing(server, client, s3, api):
    bucket = unique_bucket("g")
    client.create_bucket(bucket)
    declared = 64 * MIB
    if api == "native":
        token = server.auth_headers()["authorization"]
        head = (f"PUT {_path(bucket, 'gone')} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {token}\r\n"
                f"Content-Length: {declared}\r\n\r\n").encode()
    else:
        path = f"/{bucket}/gone"
        host = f"127.0.0.1:{server.port}"
        headers, _ = sign("PUT", f"http://{host}{path}", dev_credentials(server),
                          headers={"Content-Length": str(declared)}, payload_hash="UNSIGNED-PAYLOAD")
        head = (f"PUT {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                + "\r\n").encode()
    before = server.log()
    _leave_mid_body(server, head, 20 * MIB)
    _wait_for(lambda: "client disconnected during upload" in server.log()[len(before):], what="the log line")
    new = server.log()[len(before):]
    assert "Traceback" not in new and " ERROR " not in new, new
    assert client.list_objects(bucket)["objects"] == []
    _wait_for(lambda: _tmp_empty(server), what="tmp/ to be empty")
    # The server is not left paused or holding anything: the next upload goes through.
    body = os.urandom(5 * MIB)
    assert client.put_object(bucket, "after", body)["size"] == len(body)
    assert client.get_object(bucket, "after") == body


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_cold_large_read_is_verified_span_by_span(server, client, bucket):
    data = os.urandom(10 * MIB + 99)
    put = client.put_object(bucket, "cold", data)
    sha = put["sha256"]
    assert client.get_object(bucket, "cold") == data  # read cold (dropped behind the PUT), then again
    assert client.get_object(bucket, "cold") == data
    bad = 6 * CHUNK_SIZE + 77  # inside the second span (chunks 4-7)
    _flip(_blob(server, sha), bad)
    # A range over the intact chunks of that span is served: only the chunks it touches are read.
    assert client.get_object(bucket, "cold", range=f"bytes={4 * MIB + 1}-{6 * MIB - 1}") == \
        data[4 * MIB + 1:6 * MIB]
    token = server.auth_headers()["authorization"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall((f"GET {_path(bucket, 'cold')} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                      f"Authorization: {token}\r\n\r\n").encode())
        received = bytearray()
        reset = False
        try:
            while chunk := sock.recv(MIB):
                received += chunk
        except ConnectionResetError:
            reset = True
    body = bytes(received).partition(b"\r\n\r\n")[2]
    # Broken before the bad span: never the whole body, and every byte received is good.
    assert reset or len(body) < len(data)
    assert len(body) <= 4 * CHUNK_SIZE and data.startswith(body)
    _wait_for(lambda: (server.storage_path / "quarantine" / sha).exists(), what="the quarantine")
    with pytest.raises(Exception) as e:
        client.get_object(bucket, "cold")
    assert getattr(e.value, "code", None) == "DataCorrupted"


# ------------------------------------------------------------------ in process: the read's drop-behind


def _cached_pages(path: Path) -> int:
    """How many of a file's pages are in the page cache: mincore(2) over a mapping of it, which reads
    nothing (a probing read would start the kernel's read-ahead and fill what it measures)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            vec = ctypes.create_string_buffer((size + page - 1) // page)
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT") or not sys.platform.startswith("linux"),
                    reason="needs preadv2 RWF_NOWAIT and mincore (Linux)")
def test_cold_read_is_dropped_behind_and_a_cached_one_stays(tmp_path: Path) -> None:
    (tmp_path / "blobs" / "sha256").mkdir(parents=True)
    (tmp_path / "tmp").mkdir()
    store = BlobStore(tmp_path / "blobs" / "sha256", tmp_path / "tmp")
    store.drop_behind = 4 * MIB
    data = os.urandom(24 * MIB + 5)
    w = store.writer()
    for at in range(0, len(data), MIB):
        w.write_pieces([data[at:at + MIB]])
    info = w.commit()  # dropped behind the writes: nothing of it is cached
    path = store.path(info.sha256)
    pages = (len(data) + os.sysconf("SC_PAGE_SIZE") - 1) // os.sysconf("SC_PAGE_SIZE")
    assert _cached_pages(path) < pages // 4
    # Pages still under writeback when the writer dropped them stay cached (a busy disk); the read's probe
    # then rightly finds them and keeps the read cached. Written back and dropped now: the read starts cold.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert _cached_pages(path) == 0
    assert b"".join(store.read_verified(info.sha256, len(data))) == data
    assert _cached_pages(path) < pages // 4  # read cold: given back behind the read
    # A range still reads and verifies exactly its bytes.
    lo = 5 * MIB - 3
    assert b"".join(store.read_verified(info.sha256, len(data), lo, 9 * MIB)) == data[lo:lo + 9 * MIB]
    # A blob in the page cache is read from it and left there.
    with open(path, "rb") as f:
        assert f.read() == data
    assert _cached_pages(path) == pages
    assert b"".join(store.read_verified(info.sha256, len(data))) == data
    assert _cached_pages(path) == pages
    # Without drop-behind (ANVIL_DROP_BEHIND=0) a cold read leaves its pages cached, as before.
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    store.drop_behind = 0
    assert b"".join(store.read_verified(info.sha256, len(data))) == data
    assert _cached_pages(path) > pages // 2


def test_client_leaving_mid_get_releases_the_blob(server, client, bucket):
    """The streamed GET reads a piece ahead in a thread: a client that leaves mid-body must not leave
    the blob's file open (closed once the read in flight is done)."""
    data = os.urandom(24 * MIB)
    sha = client.put_object(bucket, "leave", data)["sha256"]
    path = str(_blob(server, sha))
    token = server.auth_headers()["authorization"]
    fds = Path(f"/proc/{server.proc.pid}/fd")

    def open_on_blob() -> int:
        n = 0
        for fd in fds.iterdir():
            try:
                n += os.readlink(fd) == path
            except OSError:
                pass
        return n

    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall((f"GET {_path(bucket, 'leave')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          f"Authorization: {token}\r\n\r\n").encode())
            got = sock.recv(65536)
            assert got.startswith(b"HTTP/1.1 200")
            _wait_for(lambda: open_on_blob() == 1, what="the GET to hold the blob open")
    _wait_for(lambda: open_on_blob() == 0, what="the blob's file to be closed")
    assert client.get_object(bucket, "leave") == data
