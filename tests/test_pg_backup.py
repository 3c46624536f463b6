"""Backup and recovery of a PostgreSQL-backed deployment (issue 21 item 4, docs/scale-out.md).

Against a real PostgreSQL (tests/pg.py) and real `anvil serve --records` nodes: a snapshot is one
exported REPEATABLE READ snapshot copied into a catalog file of the embedded schema, so it restores
into an embedded store (validation passes, summaries equal the live store's, the drill passes) and
into an empty PostgreSQL store that a node then serves; a non-empty store is refused and left as it
was; writes racing the snapshot are wholly in it or wholly out; the journal is archived from
PostgreSQL and a point-in-time restore replays it.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from anvil.runtime import recovery_participants
from anvil.storage import records
from anvil.storage.blobs import BlobStore
from anvil.storage.pg import PgCatalog
from anvil.storage.recovery import RecoveryContext
from tests.helpers import AnvilServer, Cli, unique_bucket
from tests.pg import migrate
from tests.test_participant_conformance import _populate

ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "pg backup passphrase"}
# Source participants whose summaries must be equal on the live PostgreSQL store and on the restore.
COMPARED = ("objects", "identity", "authz", "personaldb", "artefacts", "watch", "diagnostics", "journal")


@pytest.fixture(scope="module")
def world(postgres, tmp_path_factory: pytest.TempPathFactory):
    """Two nodes over one PostgreSQL store holding a little of every subsystem's state; node A archives
    the journal into the repository."""
    base = tmp_path_factory.mktemp("pg-backup")
    url = postgres.new_database()
    migrate(url)
    _populate(base / "a", records=url)
    repo = f"file://{base / 'repo'}"
    cli = Cli(ENV)
    proc = cli.run("backup", "init", "--repo", repo)
    assert proc.returncode == 0, proc.stderr
    # One deployment: the nodes share secrets/ (tokens, sealed secrets) and FORMAT (the deployment id).
    (base / "b").mkdir()
    shutil.copytree(base / "a" / "secrets", base / "b" / "secrets")
    shutil.copy(base / "a" / "FORMAT", base / "b" / "FORMAT")
    env = {**ENV, "ANVIL_RECORDS_URL": url}
    a = AnvilServer(base / "a", env=env, extra_args=["--archive-repo", repo, "--archive-interval", "1s"])
    b = AnvilServer(base / "b", env=env)
    try:
        a.start()
        b.start()
        cred = a.admin_credentials()
        creds = {"ANVIL_CLIENT_ID": cred["client_id"], "ANVIL_CLIENT_SECRET": cred["client_secret"]}
        yield {"base": base, "url": url, "repo": repo, "cli": cli, "a": a, "b": b, "creds": creds,
               "postgres": postgres}
    finally:
        a.stop()
        b.stop()


def _client(world: dict[str, Any], node: AnvilServer) -> Any:
    """A client of any node, as the first admin (bootstrapped through node A; valid on every node)."""
    creds = world["creds"]
    return node.client(client_id=creds["ANVIL_CLIENT_ID"], client_secret=creds["ANVIL_CLIENT_SECRET"])


def _summaries(root: Path, conn: Any) -> dict[str, Any]:
    parts = recovery_participants()
    ctx = RecoveryContext(root, conn, BlobStore(root / "blobs" / "sha256", root / "tmp"), parts)
    return {p.name: p.summary(ctx) for p in parts if p.name in COMPARED}


def _live_summaries(world: dict[str, Any]) -> dict[str, Any]:
    cat = PgCatalog(world["url"])
    try:
        return _summaries(world["base"] / "a", cat.reader())
    finally:
        cat.close()


def _restored_summaries(root: Path) -> dict[str, Any]:
    conn = records.open_readonly(root / "catalog.db")
    try:
        return _summaries(root, conn)
    finally:
        records.close(conn)


def _journal(url: str) -> list[tuple[int, str, str]]:
    with psycopg.connect(url) as conn:
        return [(int(s), k, h) for s, k, h in conn.execute("SELECT seq, kind, hash FROM journal ORDER BY seq")]


def test_a_node_backs_up_postgresql_restored_embedded_equal_and_the_drill_passes(world) -> None:
    cli, repo, creds = world["cli"], world["repo"], world["creds"]
    snap = cli.json("backup", "create", "--repo", repo, "--endpoint", world["a"].endpoint, creds=creds)
    assert snap["problems"] == []
    manifest = cli.json("backup", "inspect", "--repo", repo, snap["id"])
    assert "pg_export_snapshot" in manifest["consistency"]["method"]
    assert manifest["config"]["records"].startswith("postgresql://")
    live = _live_summaries(world)  # nothing writes between the snapshot and here

    target = world["base"] / "embedded"
    cli.json("restore", "--repo", repo, "--snapshot", snap["id"], "--target", str(target))
    report = cli.json("recovery", "validate", "--storage-path", str(target))
    assert report["ok"], report["needs_operator"]
    restored = _restored_summaries(target)
    for name in COMPARED:
        assert restored[name] == live[name], name
        recorded = dict(manifest["participants"][name]["summary"])
        recorded.pop("escrowed", None)  # what this snapshot escrowed (a backup policy, not state)
        assert recorded == {k: v for k, v in live[name].items() if k != "escrowed"}, name
    assert restored["objects"] and restored["personaldb"] and restored["authz"]

    # The drill restores into a temporary embedded store; an operator's ANVIL_RECORDS_URL (here the live
    # store's) must not reach its server: the live journal gets no recovery.resume event.
    head_before = _journal(world["url"])[-1][0]
    drill = cli.run("drill", "--repo", repo, "--snapshot", snap["id"], "--report-dir",
                    str(world["base"] / "drill"), "--json", creds={**creds, "ANVIL_RECORDS_URL": world["url"]})
    assert drill.returncode == 0, drill.stdout[-3000:] + drill.stderr[-2000:]
    assert not [e for e in _journal(world["url"]) if e[0] > head_before and e[1] == "recovery.resume"]


def test_the_journal_is_archived_from_postgresql_and_replayed_to_a_point(world) -> None:
    """Node A archives; writes through node B reach the archive through the shared journal."""
    cli, creds = world["cli"], world["creds"]
    bucket = unique_bucket("arch")
    with _client(world, world["b"]) as c:
        c.create_bucket(bucket)
        for i in range(5):
            c.put_object(bucket, f"k{i}", f"body {i}".encode())
    status = cli.json("backup", "status", "--endpoint", world["a"].endpoint, "--flush", creds=creds)["server"]
    head = _journal(world["url"])[-1][0]
    assert status["archived_seq"] >= head and not status["last_error"]
    target = world["base"] / "pitr"
    res = cli.json("restore", "--repo", world["repo"], "--to-seq", str(head), "--target", str(target))
    assert res["point_in_time"]["head_seq"] == head and res["point_in_time"]["events_replayed"] >= 6
    report = cli.json("recovery", "validate", "--storage-path", str(target))
    assert report["ok"], report["needs_operator"]
    conn = records.open_readonly(target / "catalog.db")
    try:
        keys = [r[0] for r in conn.execute("SELECT key FROM versions WHERE bucket = ? ORDER BY key", (bucket,))]
    finally:
        records.close(conn)
    assert keys == [f"k{i}" for i in range(5)]


def test_writes_racing_the_snapshot_are_wholly_in_or_wholly_out(world) -> None:
    """Writers on both nodes keep writing while node B takes the snapshot: the restored records are
    exactly those of the journal events up to S, and the chain hash at S is the live one."""
    from anvil.backup import ops
    from anvil.backup.restore import restore

    bucket = unique_bucket("race")
    with world["a"].client() as c:
        c.create_bucket(bucket)
    stop = threading.Event()
    acks: list[float] = []

    def writer(node: AnvilServer, tag: str) -> None:
        with _client(world, node) as wc:
            n = 0
            while not stop.is_set():
                wc.put_object(bucket, f"{tag}/{n:05d}", f"{tag} {n}".encode() * 20)  # inline bodies
                acks.append(time.time())
                n += 1

    threads = [threading.Thread(target=writer, args=(node, tag), daemon=True)
               for node, tag in ((world["a"], "a"), (world["b"], "b"))]
    for t in threads:
        t.start()

    def wait_ack_after(moment: float) -> None:
        deadline = time.monotonic() + 20
        while not any(t > moment for t in list(acks)) and time.monotonic() < deadline:
            time.sleep(0.01)

    try:
        wait_ack_after(0)
        with _client(world, world["b"]) as c:
            snap = c.create_backup(world["repo"])
        wait_ack_after(time.time())
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    repo = ops.open_repo(world["repo"], passphrase=ENV["ANVIL_BACKUP_PASSPHRASE"])
    manifest = repo.resolve_snapshot(snap["id"])
    s, chain = manifest["consistency"]["journal_seq"], manifest["consistency"]["journal_hash"]
    live = _journal(world["url"])
    assert dict((seq, h) for seq, _, h in live)[s] == chain
    assert any(seq > s for seq, kind, _ in live if kind == "object.put")  # the race really happened
    # Node B holds no body files of node A (blobs are per node until the S3 backend): such blobs are
    # named as problems, nothing else is.
    for p in manifest["problems"]:
        sha = p.split()[1]
        assert "missing from STORAGE_PATH" in p and (world["base"] / "a" / "blobs" / "sha256" / sha[:2] / sha).exists()

    target = world["base"] / "race"
    restore(repo, manifest, target, recovery_participants())
    conn = records.open_readonly(target / "catalog.db")
    try:
        restored = {(k, v, int(seq)) for k, v, seq in conn.execute(
            "SELECT key, version_id, seq FROM versions WHERE bucket = ?", (bucket,))}
        assert records_head(conn) == (s, chain)
    finally:
        records.close(conn)
    with psycopg.connect(world["url"]) as pg:
        in_live = {(k, v, int(seq)) for k, v, seq in pg.execute(
            "SELECT key, version_id, seq FROM versions WHERE bucket = %s AND seq <= %s", (bucket, s))}
        later = pg.execute("SELECT count(*) FROM versions WHERE bucket = %s AND seq > %s", (bucket, s)).fetchone()[0]
    assert restored == in_live and len(restored) > 0 and later > 0


def records_head(conn: Any) -> tuple[int, str]:
    from anvil.storage import journal

    return journal.head(conn)


def test_an_embedded_backup_restores_into_postgresql_and_a_node_serves_it(world) -> None:
    cli, postgres = world["cli"], world["postgres"]
    base = world["base"]
    emb = AnvilServer(base / "emb", env=ENV).start()
    try:
        cred = emb.admin_credentials()
        creds = {"ANVIL_CLIENT_ID": cred["client_id"], "ANVIL_CLIENT_SECRET": cred["client_secret"]}
        big = hashlib.sha256(b"x").digest() * 4096  # 128 KiB: a blob file, not an inline body
        with emb.client() as c:
            c.create_bucket("keep", versioning="Enabled")
            c.put_object("keep", "small", b"small body")
            c.put_object("keep", "big", big)
        repo = f"file://{base / 'emb-repo'}"
        assert cli.run("backup", "init", "--repo", repo).returncode == 0
        snap = cli.json("backup", "create", "--repo", repo, "--endpoint", emb.endpoint, creds=creds)
    finally:
        emb.stop()

    # A store that already holds records is refused with a clear code, and nothing changes anywhere.
    before = _journal(world["url"])
    refused = cli.run("restore", "--repo", repo, "--target", str(base / "refused"), "--records", world["url"])
    assert refused.returncode == 1 and "RecordStoreNotEmpty" in refused.stderr, refused.stderr
    assert not (base / "refused").exists() and _journal(world["url"]) == before
    unmigrated = postgres.new_database()
    refused = cli.run("restore", "--repo", repo, "--target", str(base / "refused"), "--records", unmigrated)
    assert refused.returncode == 1 and "anvil admin migrate" in refused.stderr, refused.stderr
    assert not (base / "refused").exists()

    url = postgres.new_database()
    migrate(url)
    node = base / "restored-node"
    res = cli.json("restore", "--repo", repo, "--snapshot", snap["id"], "--target", str(node), "--records", url)
    assert res["ok"] and res["records_loaded"]["journal_seq"] == snap["journal_seq"]
    assert not (node / "catalog.db").exists()  # the records live in PostgreSQL only
    # Validation runs on the target engine (and refuses to run on a catalog.db that is not there).
    assert "give --records URL" in cli.run("recovery", "validate", "--storage-path", str(node)).stderr
    report = cli.json("recovery", "validate", "--storage-path", str(node), "--records", url)
    assert report["ok"], report["needs_operator"]

    srv = AnvilServer(node, env={**ENV, "ANVIL_RECORDS_URL": url}).start()
    try:
        with srv.client(client_id=cred["client_id"], client_secret=cred["client_secret"]) as c:  # the old token works
            assert c.health()["recovery_mode"]
            assert c.get_object("keep", "small") == b"small body"
            assert c.get_object("keep", "big") == big
            c.recovery_validate()
            c.recovery_resume()
            c.put_object("keep", "after", b"written on PostgreSQL")
            assert c.get_object("keep", "after") == b"written on PostgreSQL"
            assert c.verify_journal()["ok"]
    finally:
        srv.stop()
