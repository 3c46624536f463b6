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
import json
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
from tests.test_participant_conformance import _populate

ENV = {"ANVIL_BACKUP_KDF": "test", "ANVIL_BACKUP_PASSPHRASE": "pg backup passphrase"}
# Source participants whose summaries must be equal on the live PostgreSQL store and on the restore.
COMPARED = ("objects", "identity", "authz", "personaldb", "artefacts", "watch", "diagnostics", "journal")


@pytest.fixture(scope="module")
def world(postgres, migrated_template, tmp_path_factory: pytest.TempPathFactory):
    """Two nodes over one PostgreSQL store holding a little of every subsystem's state; node A archives
    the journal into the repository."""
    base = tmp_path_factory.mktemp("pg-backup")
    url = postgres.new_database(template=migrated_template)
    _populate(base / "a", records=url)
    repo = _init_repo(base / "repo")
    cli = Cli(ENV)
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


def _init_repo(path: Path) -> str:
    """`anvil backup init`, in this process (cheap test key derivation)."""
    import os

    from anvil.backup.backends import open_backend
    from anvil.backup.repository import Repository

    saved = os.environ.get("ANVIL_BACKUP_KDF")
    os.environ["ANVIL_BACKUP_KDF"] = "test"
    try:
        Repository.init(open_backend(f"file://{path}"), ENV["ANVIL_BACKUP_PASSPHRASE"])
    finally:  # as it was: other modules of this worker set it for their own repositories
        if saved is None:
            del os.environ["ANVIL_BACKUP_KDF"]
        else:
            os.environ["ANVIL_BACKUP_KDF"] = saved
    return f"file://{path}"


def _open(repo: str) -> Any:
    from anvil.backup import ops

    return ops.open_repo(repo, passphrase=ENV["ANVIL_BACKUP_PASSPHRASE"])


def _migrate(url: str) -> None:
    """`anvil admin migrate --records URL`, in this process (the CLI itself is tested in test_pg_records)."""
    from anvil.backup.pgcapture import migrations
    from anvil.storage.pg import apply_all

    apply_all(url, migrations(recovery_participants()))


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


def _tables(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows (schema_migrations aside: each store records when it applied them)."""
    conn = records.open_readonly(path)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")]
        return {n: sorted(conn.execute(f'SELECT * FROM "{n}"'), key=repr) for n in names if n != "schema_migrations"}
    finally:
        records.close(conn)


def _journal(url: str) -> list[tuple[int, str, str]]:
    with psycopg.connect(url) as conn:
        return [(int(s), k, h) for s, k, h in conn.execute("SELECT seq, kind, hash FROM journal ORDER BY seq")]


def test_a_node_backs_up_postgresql_restored_embedded_equal_and_the_drill_passes(world) -> None:
    cli, repo, creds = world["cli"], world["repo"], world["creds"]
    snap = cli.json("backup", "create", "--repo", repo, "--endpoint", world["a"].endpoint, creds=creds)
    assert snap["problems"] == []
    manifest = _open(repo).load_snapshot(snap["id"])
    assert "pg_export_snapshot" in manifest["consistency"]["method"]
    assert manifest["config"]["records"].startswith("postgresql://")
    live = _live_summaries(world)  # nothing writes between the snapshot and here

    from anvil.backup.restore import restore

    target = world["base"] / "embedded"
    restore(_open(repo), manifest, target, recovery_participants())
    restored = _restored_summaries(target)
    for name in COMPARED:
        assert restored[name] == live[name], name
        recorded = dict(manifest["participants"][name]["summary"])
        recorded.pop("escrowed", None)  # what this snapshot escrowed (a backup policy, not state)
        assert recorded == {k: v for k, v in live[name].items() if k != "escrowed"}, name
    assert restored["objects"] and restored["personaldb"] and restored["authz"]

    # The drill restores into a temporary embedded store, validates it and proves it through a server.
    # An operator's ANVIL_RECORDS_URL (here the live store's) must not reach that server: the live
    # journal gets no recovery.resume event.
    head_before = _journal(world["url"])[-1][0]
    drill = cli.run("drill", "--repo", repo, "--snapshot", snap["id"], "--report-dir", str(world["base"] / "drill"),
                    creds={**creds, "ANVIL_RECORDS_URL": world["url"]})
    assert drill.returncode == 0, drill.stdout[-3000:] + drill.stderr[-2000:]
    assert not [e for e in _journal(world["url"]) if e[0] > head_before and e[1] == "recovery.resume"]


def test_the_journal_is_archived_from_postgresql_and_replayed_to_a_point(world) -> None:
    """Node A archives; writes through node B reach the archive through the shared journal."""
    cli, creds = world["cli"], world["creds"]
    # A base snapshot to roll forward from (xdist may run this test before, or without, the others).
    cli.json("backup", "create", "--repo", world["repo"], "--endpoint", world["a"].endpoint, creds=creds)
    bucket = unique_bucket("arch")
    with _client(world, world["b"]) as c:
        c.create_bucket(bucket)
        for i in range(5):
            c.put_object(bucket, f"k{i}", f"body {i}".encode())
    status = cli.json("backup", "status", "--endpoint", world["a"].endpoint, "--flush", creds=creds)["server"]
    head = _journal(world["url"])[-1][0]
    assert status["archived_seq"] >= head and not status["last_error"]
    from anvil.backup import ops
    from anvil.backup.pitr import restore_to_point

    target = world["base"] / "pitr"
    res = restore_to_point(_open(world["repo"]), target, recovery_participants(), to_seq=head)
    assert res["point_in_time"]["head_seq"] == head and res["point_in_time"]["events_replayed"] >= 6
    report = ops.validate_path(target, recovery_participants())
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
    repo = _open(world["repo"])
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
    from anvil.backup import ops
    from anvil.backup.errors import BackupError
    from anvil.backup.pgcapture import restore_into_records
    from anvil.errors import AnvilError
    from anvil.runtime import Anvil

    cli, postgres, base = world["cli"], world["postgres"], world["base"]
    emb = base / "emb"
    big = hashlib.sha256(b"x").digest() * 4096  # 128 KiB: a blob file, not an inline body
    a = Anvil(emb)
    try:
        from anvil.context import DEV_PRINCIPAL, RequestContext
        from anvil.storage.blobs import BlobWriter

        ctx = RequestContext(DEV_PRINCIPAL)
        a.objects.create_bucket(ctx, "keep", versioning="Enabled")
        for key, body in (("small", b"small body"), ("big", big)):
            w = BlobWriter(a.storage.blobs)
            w.write(body)
            a.objects.put_object(ctx, "keep", key, a.objects.store_body(w))
        repo = _init_repo(base / "emb-repo")
        snap = ops.backup_storage(a.storage, a.participants(), _open(repo))
    finally:
        a.close()
    cred = json.loads((emb / "bootstrap" / "first-admin.json").read_text())

    # A store that already holds records is refused with a clear code, and nothing changes anywhere.
    before = _journal(world["url"])
    refused = cli.run("restore", "--repo", repo, "--target", str(base / "refused"), "--records", world["url"])
    assert refused.returncode == 1 and "RecordStoreNotEmpty" in refused.stderr, refused.stderr
    assert not (base / "refused").exists() and _journal(world["url"]) == before
    unmigrated = postgres.new_database()
    with pytest.raises(AnvilError, match="anvil admin migrate"):
        restore_into_records(unmigrated, base / "refused", recovery_participants(), lambda: pytest.fail("ran"))
    assert not (base / "refused").exists()

    url = postgres.new_database()
    _migrate(url)
    node = base / "restored-node"
    res = cli.json("restore", "--repo", repo, "--snapshot", snap["id"], "--target", str(node), "--records", url)
    assert res["ok"] and res["records_loaded"]["journal_seq"] == snap["consistency"]["journal_seq"]
    assert not (node / "catalog.db").exists()  # the records live in PostgreSQL only
    # Both directions are exact: the store exported again equals the snapshot's catalog, table by table.
    from anvil.backup.pgcapture import migrations
    from anvil.backup.restore import restore
    from anvil.storage.pgsnapshot import export_catalog

    restore(_open(repo), _open(repo).load_snapshot(snap["id"]), base / "emb-again", recovery_participants())
    export_catalog(url, base / "exported.db", migrations(recovery_participants()))
    assert _tables(base / "exported.db") == _tables(base / "emb-again" / "catalog.db")
    # Validation runs on the target engine (and refuses to run on a catalog.db that is not there).
    with pytest.raises(BackupError, match="give --records URL"):
        ops.validate_path(node, recovery_participants())
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
