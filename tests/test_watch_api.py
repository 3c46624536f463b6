"""Watch streams through a real server: SSE, the SDK iterator, consumers, retention, the CLI."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from anvil.client import AnvilAPIError, AnvilClient
from tests.helpers import AnvilServer, unique_bucket

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines


def journal_seqs(client: AnvilClient, bucket: str, after: int, kinds: tuple[str, ...] = ("object.",)) -> list[int]:
    """What the scope should deliver, straight from the journal (admin read)."""
    seqs, cursor = [], after
    while True:
        page = client.journal(after=cursor, limit=1000)
        if not page:
            return seqs
        seqs += [e["seq"] for e in page if e["payload"].get("bucket") == bucket and e["kind"].startswith(kinds)]
        cursor = page[-1]["seq"]


def head(client: AnvilClient) -> int:
    return client.health()["journal"]["seq"]


def take(stream, n: int, *, on_event=None) -> list[dict]:
    out = []
    for ev in stream:
        out.append(ev)
        if on_event:
            on_event(ev)
        if len(out) >= n:
            break
    return out


def put_many(server: AnvilServer, bucket: str, keys: list[str], threads: int = 4) -> None:
    def work(chunk: list[str]) -> None:
        with server.client() as c:
            for k in chunk:
                c.put_object(bucket, k, b"v")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, [keys[i::threads] for i in range(threads)]))


class CuttableProxy:
    """A TCP proxy in front of the server whose connections the test can cut (a dropped network)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.conns += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        self.cut()


# ------------------------------------------------------------------ delivery


def test_ordered_delivery_without_gaps(server, client, bucket):
    start = head(client)
    keys = [f"k/{i:04d}" for i in range(120)]
    with client.watch(bucket, after=start, heartbeat=1) as stream:
        writer = threading.Thread(target=put_many, args=(server, bucket, keys))
        writer.start()
        got = take(stream, len(keys))
        writer.join()
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert seqs == journal_seqs(client, bucket, start)  # exactly the scope's events, nothing missing
    assert sorted(e["key"] for e in got) == keys
    e = got[0]
    assert e["kind"] == "object.put" and e["bucket"] == bucket and e["size"] == 1 and e["etag"]
    assert e["version_id"] == "null" and e["actor"] and e["request_id"] and e["time"] > 0


def test_reconnects_after_dropped_connections_without_gaps_or_duplicates(server, client, bucket):
    proxy = CuttableProxy(server.port)
    start = head(client)
    keys = [f"r/{i:04d}" for i in range(150)]
    try:
        cred = server.admin_credentials()
        with AnvilClient(f"http://127.0.0.1:{proxy.port}", client_id=cred["client_id"],
                         client_secret=cred["client_secret"]) as via_proxy:
            stream = via_proxy.watch(bucket, after=start, heartbeat=1)
            writer = threading.Thread(target=put_many, args=(server, bucket, keys, 2))
            writer.start()
            cut_after = {30, 70, 110}  # drop the connection after these many events
            count = [0]

            def maybe_cut(ev: dict) -> None:
                count[0] += 1
                if count[0] in cut_after:
                    proxy.cut()

            got = take(stream, len(keys), on_event=maybe_cut)
            writer.join()
            reconnects = stream.reconnects
            stream.close()
    finally:
        proxy.close()
    seqs = [e["seq"] for e in got]
    assert reconnects >= 3
    assert len(set(seqs)) == len(seqs) and seqs == sorted(seqs)
    assert seqs == journal_seqs(client, bucket, start)


def test_many_concurrent_watchers_see_the_same_stream(server, client, bucket):
    start = head(client)
    keys = [f"m/{i:03d}" for i in range(40)]
    results: dict[int, list[int]] = {}

    def watcher(i: int) -> None:
        with server.client() as c, c.watch(bucket, after=start, heartbeat=1) as stream:
            results[i] = [e["seq"] for e in take(stream, len(keys))]

    threads = [threading.Thread(target=watcher, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    put_many(server, bucket, keys)
    for t in threads:
        t.join(60)
    expected = journal_seqs(client, bucket, start)
    assert len(results) == 20 and all(r == expected for r in results.values())


def test_stalled_reader_does_not_block_writers_and_loses_nothing(server, client, bucket):
    start = head(client)
    # Long keys make the events large, so the stalled socket fills its buffers quickly.
    keys = [f"s/{i:04d}/" + "x" * 900 for i in range(800)]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    auth = server.auth_headers()["authorization"]
    sock.sendall(f"GET /anvil/v1/watch?bucket={bucket}&after={start}&heartbeat=0.2 HTTP/1.1\r\n"
                 f"Host: x\r\nAuthorization: {auth}\r\n\r\n".encode())
    try:
        put_many(server, bucket, keys)  # completes although the reader reads nothing
        # Writers were never held up; now drain the stream and check it is complete and in order.
        sock.settimeout(20)
        buf = b""
        expected = journal_seqs(client, bucket, start)
        seen: list[int] = []
        while len(seen) < len(expected):
            chunk = sock.recv(1 << 20)
            assert chunk, "stream ended early"
            buf += chunk
            *frames, buf = buf.split(b"\n\n")
            for frame in frames:
                for line in frame.split(b"\n"):
                    if line.startswith(b"data: "):
                        seen.append(json.loads(line[6:])["seq"])
        assert seen == expected
    finally:
        sock.close()


def test_heartbeats_carry_the_scan_position(server, client, bucket):
    other = unique_bucket()
    client.create_bucket(other)
    start = head(client)
    client.put_object(other, "elsewhere", b"1")  # outside the scope: filtered, but scanned past
    lines: list[str] = []
    with httpx.stream("GET", server.endpoint + "/anvil/v1/watch",
                      params={"bucket": bucket, "after": start, "heartbeat": 0.1}, timeout=10,
                      headers=server.auth_headers()) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            lines.append(line)
            if line == f"id: {start + 1}" and ": heartbeat" in lines:
                break
    assert lines[:2] == ["retry: 2000", f"id: {start}"]
    assert not any(line.startswith("data:") for line in lines)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("params,headers,fragment", [
    ({"after": "abc"}, {}, "malformed after cursor"),
    ({"after": "-3"}, {}, "malformed after cursor"),
    ({}, {"last-event-id": "1e3"}, "malformed Last-Event-ID"),
    ({"after": "999999999"}, {}, "beyond the journal head"),
    ({"kinds": "object.explode"}, {}, "unknown event kind"),
    ({"kinds": "blob.*"}, {}, "unknown event kind"),
    ({"scope": "everything"}, {}, "unknown watch parameter"),
    ({"prefix": "a/"}, {}, "a prefix needs a bucket"),
    ({"heartbeat": "0"}, {}, "heartbeat must be between"),
])
def test_bad_watch_requests_are_refused_clearly(server, bucket, params, headers, fragment):
    params = {"bucket": bucket, **params} if "prefix" not in params else params
    r = httpx.get(server.endpoint + "/anvil/v1/watch", params=params, headers={**server.auth_headers(), **headers},
                  timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "InvalidArgument" and fragment in err["message"]


def test_watch_errors_surface_in_the_sdk(client):
    with pytest.raises(AnvilAPIError) as e:
        next(iter(client.watch(unique_bucket(), after=0)))
    assert e.value.code == "NotFound"
    with pytest.raises(AnvilAPIError) as e:
        next(iter(client.watch(kinds=["object.nope"])))
    assert e.value.code == "InvalidArgument"


# ------------------------------------------------------------------ consumers and retention


def test_consumers_over_http_and_sdk(client, bucket):
    name = "c-" + bucket[-8:]
    c = client.create_consumer(name, bucket=bucket, kinds=["object.*"])
    assert c["cursor"] == head(client) - 1 and c["kinds"] == ["object.*"]
    client.put_object(bucket, "one", b"1")
    info = client.get_consumer(name)
    assert info["lag"] == 1 and info["age_seconds"] >= 0
    # A consumer watch starts at the consumer's cursor and uses its scope.
    with client.watch(consumer=name, heartbeat=1) as stream:
        ev = next(iter(stream))
    assert ev["key"] == "one"
    assert client.checkpoint(name, ev["seq"])["lag"] == 0
    with pytest.raises(AnvilAPIError) as e:
        client.checkpoint(name, ev["seq"] - 1)
    assert e.value.code == "StaleFence" and e.value.status == 409
    with pytest.raises(AnvilAPIError) as e:
        client.checkpoint(name, head(client) + 5)
    assert e.value.code == "InvalidArgument"
    with pytest.raises(AnvilAPIError) as e:
        client.create_consumer(name, bucket=bucket)
    assert e.value.code == "AlreadyExists"
    with pytest.raises(AnvilAPIError) as e:
        client.create_consumer("Not Valid", bucket=bucket)
    assert e.value.code == "InvalidArgument"
    assert client.get_consumer(name)["cursor"] == ev["seq"]  # the refusals changed nothing
    assert name in [x["name"] for x in client.list_consumers()]
    client.delete_consumer(name)
    with pytest.raises(AnvilAPIError) as e:
        client.get_consumer(name)
    assert e.value.code == "NotFound"


def test_cursor_expired_after_compaction(client, bucket):
    for i in range(5):
        client.put_object(bucket, f"old/{i}", b"x")
    old = head(client)
    time.sleep(0.02)
    res = client.compact_journal(retention_seconds=0)
    assert res["base"] >= old
    with pytest.raises(AnvilAPIError) as e:
        next(iter(client.watch(bucket, after=1)))
    assert e.value.code == "CursorExpired" and e.value.status == 410
    assert f"oldest available cursor is {res['base']}" in e.value.message
    assert e.value.headers["x-anvil-oldest-cursor"] == str(res["base"])
    assert client.verify_journal()["ok"]
    client.put_object(bucket, "new", b"y")
    with client.watch(bucket, after=res["base"], heartbeat=1) as stream:
        assert next(iter(stream))["key"] == "new"
    status = client.watch_status()
    assert status["base_seq"] == res["base"] and status["head_seq"] == head(client)
    # The status takes the number of events from the bounds (no count over the journal): it must
    # still be the number of events held, as the chain walk counts them.
    assert status["events"] == status["head_seq"] - status["base_seq"] == client.verify_journal()["checked"]


# ------------------------------------------------------------------ CLI


def test_cli_watch_and_consumers(server, client, bucket):
    start = head(client)
    for k in ("a", "b", "c"):
        client.put_object(bucket, k, b"1")
    out = server.cli("watch", bucket, "--after", str(start), "--json", "--limit", "3").stdout.decode()
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["key"] for e in events] == ["a", "b", "c"]
    text = server.cli("watch", bucket, "--after", str(start), "--limit", "1").stdout.decode()
    assert "object.put" in text and f"{bucket}/a" in text
    bad = server.cli("watch", bucket, "--after", "999999999", check=False)
    assert bad.returncode == 1 and b"beyond the journal head" in bad.stderr
    name = "cli-" + bucket[-8:]
    created = json.loads(server.cli("watch", "consumer", "create", name, "--bucket", bucket, "--after",
                                    str(start), "--json").stdout)
    assert created["cursor"] == start
    listed = json.loads(server.cli("watch", "consumer", "ls", "--json").stdout)
    assert any(c["name"] == name and c["lag"] >= 3 for c in listed)
    moved = json.loads(server.cli("watch", "consumer", "checkpoint", name, str(events[-1]["seq"]), "--json").stdout)
    assert moved["cursor"] == events[-1]["seq"]
    back = server.cli("watch", "consumer", "checkpoint", name, str(start), check=False)
    assert back.returncode == 1 and b"StaleFence" in back.stderr
    server.cli("watch", "consumer", "rm", name)
    assert name not in [c["name"] for c in client.list_consumers()]


def test_s3_tagging_acl_and_bucket_settings_stream_as_exact_kinds(server, client, bucket, s3):
    start = head(client)
    client.put_object(bucket, "t/obj", b"v")
    s3.put_object_tagging(Bucket=bucket, Key="t/obj", Tagging={"TagSet": [{"Key": "team", "Value": "ml"}]})
    s3.put_object_acl(Bucket=bucket, Key="t/obj", ACL="public-read")
    s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": [{"Key": "env", "Value": "dev"}]})
    s3.delete_bucket_tagging(Bucket=bucket)
    kinds = ["object.tagging", "object.acl", "bucket.tagging"]
    with client.watch(bucket, after=start, kinds=kinds, heartbeat=1) as stream:
        got = take(stream, 3)
    assert [e["kind"] for e in got] == ["object.tagging", "object.acl", "bucket.tagging"]
    assert got[0]["key"] == "t/obj" and got[0]["tags"] and got[1]["public"] is True
    assert got[2]["document"] is not None  # the set; its removal follows as a second bucket.tagging
    with client.watch(bucket, after=got[2]["seq"], kinds=["bucket.tagging"], heartbeat=1) as stream:
        assert take(stream, 1)[0]["document"] is None
