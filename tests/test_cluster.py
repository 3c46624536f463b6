"""Many nodes over one PostgreSQL (docs/scale-out.md), with real processes: two `anvil serve` nodes
on one migrated database (tests/pg.py), sharing their secrets folder, and one S3 blob backend (moto).

Small bodies stay inline in the record store (under ANVIL_INLINE_MAX); larger ones go to the shared
backend, so both nodes serve every body. Concurrent conditional writes through two nodes (one
winner) are in tests/test_pg_records.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from anvil.authz.binding import object_id
from anvil.client import AnvilAPIError, AnvilClient
from tests.helpers import moto_server, unique_bucket

# A short lease so the SIGSTOP test takes seconds; a fast lifecycle clock ("day" = 10 ms); a cheap
# backup key derivation.
BACKUP_ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "cluster passphrase"}
NODE_ENV = {"ANVIL_LEASE_TTL_SECONDS": "1", "ANVIL_LIFECYCLE_INTERVAL_SECONDS": "0.2",
            "ANVIL_LIFECYCLE_DAY_SECONDS": "0.01", "ANVIL_ARGON2_FAST": "1", **BACKUP_ENV}
BLOBS_BUCKET, BLOBS_PREFIX = "cluster-blobs", "deployment"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
MIB = 1024 * 1024


class Node:
    """One node of the cluster `python -m anvil.devcluster` (`make run-cluster`) started."""

    def __init__(self, endpoint: str, pid: int, storage_path: Path, log_path: Path):
        self.endpoint = endpoint
        self.pid = pid
        self.storage_path = storage_path
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def admin_credentials(self) -> dict:
        return json.loads((self.storage_path.parent / "node-a" / "bootstrap" / "first-admin.json").read_text())

    def client(self, **kwargs) -> AnvilClient:
        return AnvilClient(self.endpoint, **kwargs)


@pytest.fixture(scope="module")
def blob_store(tmp_path_factory):
    """One S3 blob backend for both nodes (moto's server); yields (endpoint, a boto3 client on it)."""
    import boto3

    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
        s3.create_bucket(Bucket=BLOBS_BUCKET)
        yield endpoint, s3


@pytest.fixture(scope="module")
def cluster(postgres, tmp_path_factory, blob_store):
    """`python -m anvil.devcluster` (what `make run-cluster` runs) with two nodes, on a fresh database
    of the suite's PostgreSQL (`make run-cluster` starts its own with the same class,
    anvil.devcluster.PostgresServer). The last test stops it with Ctrl-C (SIGINT)."""
    url = postgres.new_database()
    root = tmp_path_factory.mktemp("cluster")
    repo = f"file://{root / 'repo'}"
    init = subprocess.run([sys.executable, "-m", "anvil.cli.main", "backup", "init", "--repo", repo],
                          env={**os.environ, **BACKUP_ENV}, capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    proc = subprocess.Popen([sys.executable, "-m", "anvil.devcluster", "--dir", str(root), "--records", url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **NODE_ENV, **AWS_ENV, "ANVIL_BLOBS_ENDPOINT": blob_store[0],
                                 "ANVIL_BLOBS_URL": f"s3://{BLOBS_BUCKET}/{BLOBS_PREFIX}"})
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Ctrl-C") or line.startswith("run-cluster:"):
            break
    out = "".join(lines)
    nodes = []
    for line in lines:
        m = re.match(r"node (node-\w): (\S+)  \(pid (\d+), log (\S+)\)", line)
        if m:
            nodes.append(Node(m.group(2), int(m.group(3)), root / m.group(1), Path(m.group(4))))
    try:
        assert len(nodes) == 2, out
        assert re.search(r"first admin: client_id=\S+ client_secret=\S+", out), out
        yield {"a": nodes[0], "b": nodes[1], "url": url, "proc": proc, "out": out, "repo": repo,
               "store": blob_store[1]}
    finally:
        for node in nodes:
            try:
                os.kill(node.pid, signal.SIGCONT)  # never leave a stopped process behind
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _client(node: Node, cred: dict) -> AnvilClient:
    return node.client(client_id=cred["client_id"], client_secret=cred["client_secret"])


def _watch_on_b_sees_a_writes_in_order_within_milliseconds(cluster) -> None:
    a, b = cluster["a"], cluster["b"]
    cred = a.admin_credentials()
    ca, cb = _client(a, cred), _client(b, cred)
    bucket = unique_bucket("watch")
    ca.create_bucket(bucket)
    n = 200
    keys = [f"k{i:04d}" for i in range(n)]
    acked: dict[str, float] = {}
    seen: list[tuple[str, int, float]] = []
    start = cb.health()["journal"]["seq"]
    stream = cb.watch(bucket, after=start, heartbeat=1)
    done = threading.Event()

    def read() -> None:
        for ev in stream:
            if ev.get("kind") == "object.put":
                seen.append((ev["key"], ev["seq"], time.monotonic()))
                if len(seen) == n:
                    break
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        for key in keys:
            ca.put_object(bucket, key, b"x")
            acked[key] = time.monotonic()
        assert done.wait(30), f"node B delivered {len(seen)} of {n} events"
    finally:
        stream.close()
        ca.close()
        cb.close()
    assert [k for k, _, _ in seen] == keys  # every write, in commit order
    assert [s for _, s, _ in seen] == sorted(s for _, s, _ in seen)
    delays = sorted(max(0.0, t - acked[k]) for k, _, t in seen)
    p50, p99 = statistics.median(delays), delays[int(0.99 * len(delays)) - 1]
    print(f"\nwatch on node B after a write acknowledged by node A: p50 {p50 * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms over {n} writes")
    # NOTIFY wakes B at once; the periodic poll (0.5 s) alone would put the median near 250 ms.
    assert p50 < 0.1, delays
    assert p99 < 1.0, delays


def _disabled_app_and_new_binding_take_effect_on_the_other_node(cluster) -> None:
    a, b = cluster["a"], cluster["b"]
    cred = a.admin_credentials()
    admin_a, admin_b = _client(a, cred), _client(b, cred)
    tenant = "clu" + unique_bucket("")[1:9]
    admin_a.create_tenant(tenant)
    app = admin_a.create_app(tenant, "svc", scopes=["object:*|bucket:*", "bucket:*|bucket:*",
                                                    f"bucket:*|tenant:{tenant}", f"authz:*|tenant:{tenant}"])
    cid, secret = app["client_id"], app["client_secret"]
    svc_a = AnvilClient(a.endpoint, client_id=cid, client_secret=secret)
    bob_b = AnvilClient(b.endpoint, client_id=cid, client_secret=secret, subject="user:bob")
    svc_b = AnvilClient(b.endpoint, client_id=cid, client_secret=secret)
    try:
        # Bindings: B caches "no binding" for the bucket, then A binds it.
        svc_a.authz_write_schema("definition user {}\n\ndefinition document {\n    relation viewer: user\n"
                                 "    permission view = viewer\n    permission edit = viewer\n}\n")
        bucket = unique_bucket("bind")
        svc_a.create_bucket(bucket)
        svc_a.put_object(bucket, "doc.txt", b"secret")
        assert bob_b.get_object(bucket, "doc.txt") == b"secret"  # unbound: the app's scopes decide
        svc_a.authz_bind_bucket(bucket, {"resource_type": "document", "read": "view", "write": "edit"})
        with pytest.raises(AnvilAPIError) as e:
            bob_b.get_object(bucket, "doc.txt")
        assert e.value.code == "PermissionDenied", e.value
        # A relationship written through A is the newest revision on B at once (minimize_latency).
        svc_a.authz_write([f"document:{object_id(bucket, 'doc.txt')}#viewer@user:bob"])
        assert bob_b.get_object(bucket, "doc.txt") == b"secret"
        # Disabled through A: B refuses the app's token and its S3 credentials at the next request.
        assert svc_b.whoami()["tenant"] == tenant
        admin_a.disable_app(cid)
        with pytest.raises(AnvilAPIError) as e:
            svc_b.list_objects(bucket)
        assert e.value.code == "Unauthenticated", e.value
        admin_b.enable_app(cid)
        assert svc_a.whoami()["tenant"] == tenant  # enabled through B: A serves it again
    finally:
        for c in (svc_a, bob_b, svc_b, admin_a, admin_b):
            c.close()


def _key_of(sha: str) -> str:
    return f"{BLOBS_PREFIX}/{sha[:2]}/{sha[2:4]}/{sha}"


def _in_store(store, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        store.head_object(Bucket=BLOBS_BUCKET, Key=key)
        return True
    except ClientError:
        return False


def _a_large_body_through_a_is_read_verified_and_copied_through_b(cluster) -> None:
    """A body over the inline threshold, written through A, lives in the shared backend: B serves it
    whole and by range (each chunk checked against the digests A stored beside it), copies it, and
    refuses it once its bytes are damaged in the backend."""
    a, b, store = cluster["a"], cluster["b"], cluster["store"]
    cred = a.admin_credentials()
    with _client(a, cred) as ca, _client(b, cred) as cb:
        bucket = unique_bucket("big")
        ca.create_bucket(bucket)
        body = os.urandom(2 * MIB + 1000)  # three 1 MiB chunks
        sha = hashlib.sha256(body).hexdigest()
        ca.put_object(bucket, "big", body)
        assert _in_store(store, _key_of(sha)) and _in_store(store, _key_of(sha) + ".chunks")
        assert cb.get_object(bucket, "big") == body
        assert cb.get_object(bucket, "big", range=f"bytes={MIB - 5}-{MIB + 4}") == body[MIB - 5:MIB + 5]
        cb.copy_object(bucket, "copy", source_key="big")
        assert ca.get_object(bucket, "copy") == body
        bad = bytearray(body)
        bad[2 * MIB + 10] ^= 0x01
        store.put_object(Bucket=BLOBS_BUCKET, Key=_key_of(sha), Body=bytes(bad))
        with pytest.raises(AnvilAPIError) as e:
            cb.get_object(bucket, "copy", range=f"bytes={2 * MIB}-{2 * MIB + 99}")
        assert e.value.code == "DataCorrupted", e.value
        ca.put_object(bucket, "heal", body)  # the same bytes again heal the body in the backend
        assert cb.get_object(bucket, "big") == body


def _leases(url: str, name: str) -> tuple[str, int, float]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT holder, fence, expires FROM leases WHERE name = %s", (name,)).fetchone()
    return (row[0], int(row[1]), float(row[2])) if row else ("", 0, 0.0)


def _sql(url: str, statement: str, params: tuple = ()) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement, params)


def _gc_through_b_under_the_gc_lease(cluster) -> None:
    """gc through node B over the shared backend: an old unreferenced body goes; one node A has just
    written (the age guard) and a referenced one stay; a running backup's hold keeps everything; while
    another node holds the `gc` lease gc is refused; paused past its lease, B's gc stops (StaleFence)."""
    a, b, url, store = cluster["a"], cluster["b"], cluster["url"], cluster["store"]
    cred = a.admin_credentials()
    with _client(a, cred) as ca, _client(b, cred) as cb:
        bucket = unique_bucket("gc")
        ca.create_bucket(bucket)
        old, ref, fresh = (os.urandom(100 * 1024) for _ in range(3))
        shas = {hashlib.sha256(body).hexdigest(): name for name, body in (("old", old), ("ref", ref),
                                                                          ("fresh", fresh))}
        sha_of = {name: sha for sha, name in shas.items()}
        written = time.monotonic()
        ca.put_object(bucket, "old", old)
        ca.delete_object(bucket, "old")
        ca.put_object(bucket, "ref", ref)
        # A backup running on some node (its hold, as ops.backup_storage writes it): no blob goes.
        _sql(url, "INSERT INTO holds(name, holder, seq, blobs, expires, updated) VALUES "
                  "('backup/test', 'another-node', 0, 'all', %s, %s)", (time.time() + 60, time.time()))
        report = cb.gc(grace_seconds=0)
        assert report["blob_count"] == 0 and report["held_kept"] >= 1, report
        assert [h["name"] for h in report["holds"]] == ["backup/test"], report
        _sql(url, "DELETE FROM holds WHERE name = 'backup/test'")
        grace = 1.5
        time.sleep(max(0.0, written + grace + 0.2 - time.monotonic()))
        ca.put_object(bucket, "fresh", fresh)  # just stored through A, its record gone again at once
        ca.delete_object(bucket, "fresh")
        report = cb.gc(grace_seconds=grace)
        removed = {shas.get(r["blob"], r["blob"]) for r in report["blobs_removed"]}
        assert "old" in removed and not removed & {"ref", "fresh"}, removed
        assert report["young_orphans_kept"] >= 1, report
        assert not _in_store(store, _key_of(sha_of["old"]))
        assert _in_store(store, _key_of(sha_of["fresh"])) and cb.get_object(bucket, "ref") == ref
        # Another node runs gc (holds its lease): refused, nothing done.
        _sql(url, "UPDATE leases SET holder = 'another-node', fence = fence + 1, expires = %s WHERE name = 'gc'",
             (time.time() + 60,))
        with pytest.raises(AnvilAPIError) as e:
            cb.gc(grace_seconds=0)
        assert e.value.code == "LeaseHeld" and "another-node" in str(e.value), e.value
        _sql(url, "UPDATE leases SET expires = 0 WHERE name = 'gc'")
        # Paused past its lease in the middle of a run: B's next batch of deletes is refused.
        orphans = [os.urandom(512) for _ in range(150)]
        keys = [_key_of(hashlib.sha256(o).hexdigest()) for o in orphans]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda kv: store.put_object(Bucket=BLOBS_BUCKET, Key=kv[0], Body=kv[1]),
                          zip(keys, orphans, strict=True)))
        fence_before = _leases(url, "gc")[1]
        outcome: list[BaseException | object] = []

        def run() -> None:
            try:
                outcome.append(cb.gc(grace_seconds=0))
            except BaseException as exc:  # noqa: BLE001 - examined below
                outcome.append(exc)

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        deadline = time.monotonic() + 20
        while not (f"/{b.pid}/" in (held := _leases(url, "gc"))[0] and held[1] > fence_before):
            assert time.monotonic() < deadline and not outcome, (held, outcome)
            time.sleep(0.002)
        os.kill(b.pid, signal.SIGSTOP)
        try:
            time.sleep(1.6)  # past the lease's time to live (1 s)
        finally:
            os.kill(b.pid, signal.SIGCONT)
        runner.join(30)
        assert outcome and isinstance(outcome[0], AnvilAPIError) and outcome[0].code == "StaleFence", outcome
        left = sum(_in_store(store, k) for k in keys)
        assert left > 0, "the paused gc deleted every orphan: the fence was never checked"
        assert "StaleFence" in b.log()
        # Any node collects once B's run is over: A takes the lease (a new fence) and finishes the job.
        report = ca.gc(grace_seconds=0)
        assert report["blob_count"] >= left and not any(_in_store(store, k) for k in keys), report
        assert ca.get_object(bucket, "ref") == ref


def _one_deployment_id_and_backups_through_either_node_chain(cluster) -> None:
    """The nodes started with FORMAT files of their own (run-cluster copies only `secrets/`); the
    record store's deployment id is the one both use, so a backup through B is a child of one
    through A (and its FORMAT file says the same)."""
    a, b = cluster["a"], cluster["b"]
    cred = a.admin_credentials()
    with _client(a, cred) as ca, _client(b, cred) as cb:
        dep = ca.health()["deployment_id"]
        assert cb.health()["deployment_id"] == dep
        for node in (a, b):
            assert json.loads((node.storage_path / "FORMAT").read_text())["deployment_id"] == dep
        bucket = unique_bucket("chain")
        ca.create_bucket(bucket)
        ca.put_object(bucket, "k", b"in both snapshots")
        first = ca.create_backup(cluster["repo"])
        cb.put_object(bucket, "k2", b"only in the second")
        second = cb.create_backup(cluster["repo"])
        assert first["deployment_id"] == second["deployment_id"] == dep
        assert second["parent"] == first["id"], (first, second)


def _archive_status(c: AnvilClient) -> dict:
    return c._json("GET", "/anvil/v1/admin/archive")


def _an_archive_on_a_holds_compaction_on_b_back(cluster) -> None:
    """Node A archives; node B compacts the journal with a zero retention window: the events after
    A's archived cursor stay (the archive's hold is in the record store), so A's archive has no gap.
    Archiving switched off gives the hold back, and B compacts past it."""
    a, b = cluster["a"], cluster["b"]
    cred = a.admin_credentials()
    with _client(a, cred) as ca, _client(b, cred) as cb:
        # A long interval: after its first shipment the cursor stays put while B writes.
        ca._json("POST", "/anvil/v1/admin/archive", json={"repo": cluster["repo"], "interval_seconds": 3600})
        deadline = time.monotonic() + 20
        while (st := _archive_status(ca))["archived_seq"] is None or st["lag_events"]:
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
        archived = st["archived_seq"]
        bucket = unique_bucket("hold")
        cb.create_bucket(bucket)
        for i in range(5):
            cb.put_object(bucket, f"k{i}", b"not archived yet")
        out = cb._json("POST", "/anvil/v1/admin/watch/compact", json={"retention_seconds": 0})
        assert out["base"] <= archived, (out, archived)  # only what A's archive holds went
        kept = cb.journal(after=archived, limit=3)
        assert kept and kept[0]["seq"] == archived + 1, kept
        flushed = ca._json("POST", "/anvil/v1/admin/archive/flush")
        assert flushed["ok"] and not flushed["gap"] and flushed["archived_seq"] > archived, flushed
        ca._json("DELETE", "/anvil/v1/admin/archive")  # switched off: the hold goes with it
        out = cb._json("POST", "/anvil/v1/admin/watch/compact", json={"retention_seconds": 0})
        assert out["base"] > archived, out
        assert cb.verify_journal()["ok"] is True


def _lifecycle_holder(url: str) -> tuple[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT holder, fence FROM leases WHERE name = 'lifecycle'").fetchone()
    return (row[0], int(row[1])) if row else ("", 0)


def _sessions(url: str) -> str:
    """What every session of the database is doing and which holds the journal lock (for a failure)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT a.pid, a.state, a.wait_event, now() - a.xact_start, l.granted, left(a.query, 80) "
            "FROM pg_stat_activity a LEFT JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'advisory' "
            "WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()").fetchall()
    return "\n".join(map(str, rows))


def _deletes(url: str, bucket: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT payload FROM journal WHERE kind = 'object.delete' ORDER BY seq")
            if json.loads(r[0]).get("bucket") == bucket]


def _a_node_paused_past_its_lease_cannot_complete_a_background_write(cluster) -> None:
    from tests.s3_helpers import s3_client

    a, b, url = cluster["a"], cluster["b"], cluster["url"]
    nodes = {a.pid: a, b.pid: b}
    holder, fence = _lifecycle_holder(url)
    paused = next(node for pid, node in nodes.items() if f"/{pid}/" in holder)
    other = b if paused is a else a
    cred = a.admin_credentials()
    c = _client(other, cred)
    bucket = unique_bucket("lease")
    c.create_bucket(bucket)
    # Enough that the holder's run is still deleting when it is paused (a cheaper write path once
    # made 200 finish before the pause could land).
    n = 600
    for i in range(n):
        c.put_object(bucket, f"old/{i:04d}", b"x")
    s3 = s3_client(a)  # any node; the credentials are in the first node's bootstrap folder
    # Every object is due at once ("day" = 10 ms): the holder's next run deletes them one by one.
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [
        {"ID": "all", "Filter": {"Prefix": "old/"}, "Status": "Enabled", "Expiration": {"Days": 1}}]})
    deadline = time.monotonic() + 20
    while not _deletes(url, bucket):
        assert time.monotonic() < deadline, "the lease holder never ran lifecycle"
        time.sleep(0.01)
    os.kill(paused.pid, signal.SIGSTOP)  # mid-run: its thread holds keys still to delete
    try:
        stopped_at = len(_deletes(url, bucket))
        deadline = time.monotonic() + 20
        while _lifecycle_holder(url)[0] == holder:
            assert time.monotonic() < deadline, f"the other node never took the lease over\n{_sessions(url)}"
            time.sleep(0.05)
        new_holder, new_fence = _lifecycle_holder(url)
        assert f"/{other.pid}/" in new_holder and new_fence > fence
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    assert stopped_at < n, "the run finished before the pause: nothing left in flight"
    # The paused node goes on where it stopped: its next delete carries the old fence and is refused,
    # or its lease keeper sees first that the lease is another node's and stops that work before the
    # next delete (which of the two threads runs first after SIGCONT is the scheduler's choice). Either
    # way it completes no write: every key is deleted exactly once, by the new holder (below).
    stopped = ("StaleFence", "held by another node now; this node stops that work")
    deadline = time.monotonic() + 30
    while not any(s in paused.log() for s in stopped) or len(_deletes(url, bucket)) < n:
        assert time.monotonic() < deadline, (len(_deletes(url, bucket)), paused.log()[-3000:])
        time.sleep(0.1)
    deletes = _deletes(url, bucket)
    assert sorted(json.loads(p)["key"] for p in deletes) == [f"old/{i:04d}" for i in range(n)]  # each once
    assert c.list_objects(bucket)["objects"] == []
    assert c.verify_journal()["ok"] is True
    c.close()


def _sigkill_under_load_loses_no_acknowledged_write(cluster) -> None:
    a, b = cluster["a"], cluster["b"]
    cred = a.admin_credentials()
    bucket = unique_bucket("kill")
    with _client(b, cred) as c:
        c.create_bucket(bucket)
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def load(node: Node, tag: str) -> None:
        with _client(node, cred) as c:
            i = 0
            while not stop.is_set():
                key = f"{tag}/{i:05d}"
                try:
                    c.put_object(bucket, key, key.encode())
                except Exception:  # noqa: BLE001 - the killed node: unacknowledged, may or may not exist
                    return
                with lock:
                    acked.append(key)
                i += 1

    threads = [threading.Thread(target=load, args=(node, f"{tag}{j}"))
               for node, tag in ((a, "a"), (b, "b")) for j in range(2)]
    for t in threads:
        t.start()
    # Mid-load: once both nodes have acknowledged writes (on a loaded machine the first ones, token
    # exchange included, can take longer than a fixed second), and a little more.
    deadline = time.monotonic() + 30
    try:
        while not (any(k.startswith("a") for k in acked) and any(k.startswith("b") for k in acked)):
            assert time.monotonic() < deadline, (len(acked), a.log()[-3000:], b.log()[-3000:])
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(a.pid, signal.SIGKILL)
        time.sleep(0.5)
    finally:
        stop.set()
    for t in threads:
        t.join(30)
    with _client(b, cred) as c:
        stored = {o["key"] for o in c.iter_objects(bucket)}
        missing = [k for k in acked if k not in stored]
        assert not missing, missing[:10]
        for key in acked[:: max(1, len(acked) // 20)]:
            assert c.get_object(bucket, key) == key.encode()
        assert c.verify_journal()["ok"] is True


def _run_cluster_stops_everything_on_ctrl_c(cluster) -> None:
    """`make run-cluster` stops on Ctrl-C (node A was SIGKILLed before; B drains and exits)."""
    proc = cluster["proc"]
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "cluster stopped" in rest, cluster["out"] + rest
    assert "node node-a exited (-9)" in rest
    for node in (cluster["a"], cluster["b"]):
        with pytest.raises(ProcessLookupError):
            os.kill(node.pid, 0)


def test_two_nodes_over_one_postgresql(cluster) -> None:
    """One test, so that one xdist worker starts one cluster, and the steps that end nodes come last:
    the watch across nodes, caches, lease fencing (SIGSTOP), SIGKILL under load, then Ctrl-C."""
    _watch_on_b_sees_a_writes_in_order_within_milliseconds(cluster)
    _disabled_app_and_new_binding_take_effect_on_the_other_node(cluster)
    _one_deployment_id_and_backups_through_either_node_chain(cluster)
    _a_large_body_through_a_is_read_verified_and_copied_through_b(cluster)
    _gc_through_b_under_the_gc_lease(cluster)
    _an_archive_on_a_holds_compaction_on_b_back(cluster)
    _a_node_paused_past_its_lease_cannot_complete_a_background_write(cluster)
    _sigkill_under_load_loses_no_acknowledged_write(cluster)
    _run_cluster_stops_everything_on_ctrl_c(cluster)
