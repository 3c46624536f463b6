"""PersonalDB end to end against a real server: groups, the commit path, certificates, replicas
(real SQLite session changesets only), catch-up, snapshots, and bad input."""

from __future__ import annotations

import concurrent.futures
import json
import uuid
from pathlib import Path

import pytest

from anvil.client import AnvilAPIError, AnvilClient
from anvil.personaldb import Replica, certs
from anvil.storage import sqlitefile as sf
from tests import helpers
from tests.helpers import AnvilServer

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines

SCHEMA = """
CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT NOT NULL, body TEXT NOT NULL, pinned INTEGER DEFAULT 0);
CREATE TABLE tags(note_id INTEGER NOT NULL, tag TEXT NOT NULL, PRIMARY KEY (note_id, tag));
"""


def gname(prefix: str = "g") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def group(client: AnvilClient) -> str:
    name = gname()
    client.pdb_create(name, SCHEMA)
    return name


def local_changeset(tmp_path: Path, sql: str, schema: str = SCHEMA, setup: str = "") -> bytes:
    return helpers.local_changeset(tmp_path, sql, schema, setup)


def replica(tmp_path: Path, client: AnvilClient, group: str, name: str, **kw) -> Replica:
    return Replica(tmp_path / f"{name}.sqlite", client, group, **kw)


def rows(r: Replica, table: str = "notes") -> list[tuple]:
    return r.query(f"SELECT * FROM {table} ORDER BY 1, 2")


# ------------------------------------------------------------------ groups


def test_create_list_show_and_bad_schema(client: AnvilClient) -> None:
    name = gname()
    g = client.pdb_create(name, SCHEMA)
    assert g["tables"] == ["notes", "tags"] and g["head_index"] == 0 and g["schema_sha256"] == certs.sha256_hex(
        SCHEMA.encode())
    assert g["genesis"] == certs.genesis_hash(name, g["schema_sha256"])
    assert name in [x["name"] for x in client.pdb_list()]
    shown = client.pdb_get(name)
    assert shown["schemas"][0]["sql"] == SCHEMA and set(shown["tables"]) == {"notes", "tags"}
    with pytest.raises(AnvilAPIError) as e:
        client.pdb_create(name, SCHEMA)
    assert e.value.code == "AlreadyExists"
    paths = client._http.get("/anvil/v1/openapi.json").json()["paths"]
    assert "post" in paths["/anvil/v1/pdb/groups/{group}/commits"] and "get" in paths["/anvil/v1/pdb/keys"]
    for bad in ("CREATE TABLE x(", "CREATE TABLE nopk(a TEXT)", "SELECT 1"):
        with pytest.raises(AnvilAPIError) as e:
            client.pdb_create(gname(), bad)
        assert e.value.code == "PersonalDbInvalidSchema", bad


# ------------------------------------------------------------------ the commit path and bad input


def test_commit_certificate_and_bad_input_changes_nothing(client: AnvilClient, group: str, tmp_path: Path) -> None:
    g = client.pdb_get(group)
    keys = {k["key_id"]: k["public"] for k in client.pdb_keys()}
    cs = local_changeset(tmp_path, "INSERT INTO notes(id, owner, body) VALUES (1, 'ann', 'hi')")
    e1 = client.pdb_commit(group, cs, base_index=0, base_hash=g["genesis"], idempotency_key="k1")
    body = certs.verify_entry(e1["certificate"], keys, group=group, prev_hash=g["genesis"], index=1, changeset=cs)
    assert body["hash"] == e1["hash"] and body["authz_revision"] == 0 and body["changeset_sha256"] == \
        certs.sha256_hex(cs)
    # Idempotent retry: the same commit, even though the base is no longer the head.
    again = client.pdb_commit(group, cs, base_index=0, base_hash=g["genesis"], idempotency_key="k1")
    assert again["index"] == 1 and again["hash"] == e1["hash"] and again["idempotent_replay"]
    head = (1, e1["hash"])

    def refused(code: str, data: bytes, base: tuple[int, str] = head, key: str | None = None) -> AnvilAPIError:
        with pytest.raises(AnvilAPIError) as err:
            client.pdb_commit(group, data, base_index=base[0], base_hash=base[1], idempotency_key=key)
        assert err.value.code == code, err.value
        assert (client.pdb_get(group)["head_index"], client.pdb_get(group)["head_hash"]) == head  # nothing changed
        return err.value

    cs2 = local_changeset(tmp_path, "INSERT INTO notes(id, owner, body) VALUES (2, 'bob', 'yo')")
    refused("PersonalDbInvalidChangeset", b"this is not a changeset")
    refused("PersonalDbInvalidChangeset", cs2[: len(cs2) // 2])
    other = local_changeset(tmp_path, "INSERT INTO secrets(id, v) VALUES (1, 'x')",
                            schema="CREATE TABLE secrets(id INTEGER PRIMARY KEY, v TEXT)")
    refused("PersonalDbUnknownTable", other)
    stale = refused("PersonalDbStaleBase", cs2, base=(0, g["genesis"]))
    assert stale.headers["x-anvil-pdb-head-index"] == "1" and e1["hash"] in stale.message
    refused("PersonalDbStaleBase", cs2, base=(1, "0" * 64))
    refused("IdempotencyMismatch", cs2, key="k1")
    wrong_cols = local_changeset(tmp_path, "INSERT INTO notes VALUES (3, 'x')",
                                 schema="CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT)")
    refused("PersonalDbInvalidChangeset", wrong_cols)


def test_oversized_changeset_is_refused(client: AnvilClient, tmp_path: Path) -> None:
    name = gname()
    g = client.pdb_create(name, SCHEMA, max_changeset=4096)
    cs = local_changeset(tmp_path, f"INSERT INTO notes(id, owner, body) VALUES (1, 'a', '{'x' * 8000}')")
    with pytest.raises(AnvilAPIError) as e:
        client.pdb_commit(name, cs, base_index=0, base_hash=g["genesis"])
    assert e.value.code == "EntityTooLarge"
    assert client.pdb_get(name)["head_index"] == 0


def test_one_denied_row_rejects_the_whole_changeset(server: AnvilServer, client: AnvilClient, tmp_path: Path) -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    client.create_tenant(tenant)
    app = client.create_app(tenant, "writer", scopes=[
        f"pdb:create|tenant:{tenant}", "pdb:read|pdb:*", "pdb:insert|pdb:*/notes/*",
        "pdb:update|pdb:*/notes/1"])
    with AnvilClient(server.endpoint, client_id=app["client_id"], client_secret=app["client_secret"]) as c:
        name = gname()
        g = c.pdb_create(name, SCHEMA)
        setup = "INSERT INTO notes(id, owner, body) VALUES (1, 'a', 'x'), (2, 'b', 'y')"
        first = local_changeset(tmp_path, setup)
        e = c.pdb_commit(name, first, base_index=0, base_hash=g["genesis"])
        # Row 1 may be updated, row 2 may not: a changeset touching both is refused whole.
        both = local_changeset(tmp_path, "UPDATE notes SET body = 'z'", setup=setup)
        with pytest.raises(AnvilAPIError) as err:
            c.pdb_commit(name, both, base_index=1, base_hash=e["hash"])
        assert err.value.code == "PermissionDenied"
        one = local_changeset(tmp_path, "UPDATE notes SET body = 'z' WHERE id = 1", setup=setup)
        assert c.pdb_commit(name, one, base_index=1, base_hash=e["hash"])["index"] == 2
        tag = local_changeset(tmp_path, "INSERT INTO tags VALUES (1, 't')")
        with pytest.raises(AnvilAPIError) as err:
            c.pdb_commit(name, tag, base_index=2, base_hash=c.pdb_get(name)["head_hash"])
        assert err.value.code == "PermissionDenied" and c.pdb_get(name)["head_index"] == 2
    # Another tenant's group is exactly a missing one.
    other = client.create_app(f"{tenant}", "reader", scopes=["pdb:read|pdb:*"])
    tenant2 = f"u{uuid.uuid4().hex[:8]}"
    client.create_tenant(tenant2)
    stranger = client.create_app(tenant2, "s", scopes=["pdb:read|pdb:*"])
    with AnvilClient(server.endpoint, client_id=stranger["client_id"], client_secret=stranger["client_secret"]) as s:
        with pytest.raises(AnvilAPIError) as err:
            s.pdb_get(name)
        assert err.value.code == "NotFound"
    del other


def test_concurrent_submit_race_exactly_one_wins(client: AnvilClient, group: str, tmp_path: Path) -> None:
    g = client.pdb_get(group)
    changesets = [local_changeset(tmp_path, f"INSERT INTO notes(id, owner, body) VALUES ({i}, 'w', 'r{i}')")
                  for i in range(8)]

    def submit(cs: bytes) -> str:
        try:
            client.pdb_commit(group, cs, base_index=0, base_hash=g["genesis"])
            return "won"
        except AnvilAPIError as e:
            return e.code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(submit, changesets))
    assert outcomes.count("won") == 1 and outcomes.count("PersonalDbStaleBase") == 7, outcomes
    assert client.pdb_get(group)["head_index"] == 1


# ------------------------------------------------------------------ replicas


def test_two_replicas_offline_edits_conflicting_and_not_converge(client: AnvilClient, group: str,
                                                                 tmp_path: Path) -> None:
    a = replica(tmp_path, client, group, "a")
    b = replica(tmp_path, client, group, "b")
    a.execute("INSERT INTO notes(id, owner, body) VALUES (1, 'ann', 'base')")
    a.sync()
    b.sync()
    assert rows(a) == rows(b)
    # Offline: both edit the same row (conflict) and different rows (no conflict).
    a.execute("UPDATE notes SET body = 'from a' WHERE id = 1")
    a.execute("INSERT INTO notes(id, owner, body) VALUES (2, 'ann', 'only a')")
    b.execute("UPDATE notes SET body = 'from b' WHERE id = 1")
    b.execute("INSERT INTO tags VALUES (1, 'b-tag')")
    assert a.pending() == 2 and b.pending() == 2
    sa = a.sync()
    sb = b.sync()  # stale: rebases over a's commits
    assert sa["submitted"] == 2 and sb["rebased"] >= 1 and sb["submitted"] >= 1
    a.sync()
    assert a.head == b.head and a.state_hash() == b.state_hash()
    assert rows(a) == rows(b) == [(1, "ann", "from b", 0), (2, "ann", "only a", 0)]  # local_wins: b was later
    assert rows(a, "tags") == [(1, "b-tag")]
    assert a.verify()["head_index"] == a.head[0] and b.verify()["head_index"] == b.head[0]
    for r in (a, b):
        r.close()


def test_three_replicas_and_a_replaced_policy(client: AnvilClient, group: str, tmp_path: Path) -> None:
    def remote_wins(kind: str, change: sf.RowChange) -> str:
        return "omit"

    reps = [replica(tmp_path, client, group, n, **({"policy": remote_wins} if n == "c" else {})) for n in "abc"]
    reps[0].execute("INSERT INTO notes(id, owner, body) VALUES (1, 'x', 'v0'), (2, 'y', 'v0')")
    for r in reps:
        r.sync()
    reps[0].execute("UPDATE notes SET body = 'a' WHERE id = 1")
    reps[1].execute("DELETE FROM notes WHERE id = 2")
    reps[2].execute("UPDATE notes SET body = 'c' WHERE id = 1")
    reps[2].execute("UPDATE notes SET body = 'c2' WHERE id = 2")  # the row b deletes
    reps[1].execute("INSERT INTO notes(id, owner, body) VALUES (3, 'b', 'new')")
    for r in reps:
        r.sync()
    for r in reps:
        r.sync()
    hashes = {r.state_hash() for r in reps}
    heads = {r.head for r in reps}
    assert len(hashes) == 1 and len(heads) == 1
    # c kept the remote value (its policy), and b's delete won over c's update of row 2.
    assert rows(reps[0]) == [(1, "x", "a", 0), (3, "b", "new", 0)]
    for r in reps:
        r.close()


def test_tampered_certificate_is_refused_by_the_replica(client: AnvilClient, group: str, tmp_path: Path) -> None:
    a = replica(tmp_path, client, group, "a")
    b = replica(tmp_path, client, group, "b")
    a.execute("INSERT INTO notes(id, owner, body) VALUES (1, 'a', 'x')")
    a.sync()

    class Tampering:
        def __getattr__(self, name):  # everything else goes to the real client
            return getattr(client, name)

        def pdb_catch_up(self, *args, **kw):
            page = client.pdb_catch_up(*args, **kw)
            for e in page["entries"]:
                e["certificate"]["body"]["time"] += 1
            return page

    b.client = Tampering()
    assert b.head[0] == 0
    with pytest.raises(certs.CertificateInvalid) as err:
        b.sync()
    assert err.value.code == "PersonalDbCertificateInvalid"
    assert b.head[0] == 0 and rows(b) == []  # nothing applied
    a.close()
    b.close()


def test_catch_up_paging_snapshots_and_compaction(client: AnvilClient, tmp_path: Path) -> None:
    name = gname()
    client.pdb_create(name, SCHEMA, snapshot_every=5)
    a = replica(tmp_path, client, name, "a")
    for i in range(12):
        a.execute("INSERT INTO notes(id, owner, body) VALUES (?, 'a', ?)", (i, f"n{i}"))
        a.sync()
    snaps = client.pdb_snapshots(name)
    deadline = 0
    while [s["index"] for s in snaps] != [5, 10] and deadline < 100:  # built in the background
        import time

        time.sleep(0.1)
        deadline += 1
        snaps = client.pdb_snapshots(name)
    assert [s["index"] for s in snaps] == [5, 10]
    page = client.pdb_catch_up(name, 0, client.pdb_get(name)["genesis"], limit=5)
    assert [e["index"] for e in page["entries"]] == [1, 2, 3, 4, 5] and page["more"]
    # A new device starts from the latest snapshot, then catches up.
    b = replica(tmp_path, client, name, "b")
    assert b.head == a.head and b.state_hash() == a.state_hash()
    res = certs.verify_group(client, name)
    assert res["head_index"] == 12 and res["snapshots_verified"] == [5, 10]
    # Compaction: a replica behind the snapshot is told snapshot_required, and recovers from it.
    old = replica(tmp_path, client, name, "old")
    client.pdb_compact(name)
    page = client.pdb_catch_up(name, 0, client.pdb_get(name)["genesis"])
    assert page["status"] == "snapshot_required" and page["reason"] == "compacted"
    assert page["snapshot"]["index"] == 10
    old.sync()
    assert old.head == a.head and old.state_hash() == a.state_hash()
    # A divergent base is refused the same way.
    page = client.pdb_catch_up(name, 3, "f" * 64)
    assert page["status"] == "snapshot_required" and page["reason"] == "divergent"
    for r in (a, b, old):
        r.close()


def test_schema_migration_reaches_replicas(client: AnvilClient, group: str, tmp_path: Path) -> None:
    a = replica(tmp_path, client, group, "a")
    b = replica(tmp_path, client, group, "b")
    a.execute("INSERT INTO notes(id, owner, body) VALUES (1, 'a', 'x')")
    a.sync()
    b.sync()
    m = client.pdb_migrate(group, "ALTER TABLE notes ADD COLUMN color TEXT")
    assert m["schema_version"] == 2 and m["kind"] == "migration"
    # b edits on schema 1 while offline: the server says it is behind, b pulls the migration, rebases.
    b.execute("UPDATE notes SET body = 'y' WHERE id = 1")
    b.sync()
    assert b.schema_version == 2
    a.sync()
    assert rows(a) == rows(b) == [(1, "a", "y", 0, None)]
    a.execute("UPDATE notes SET color = 'red' WHERE id = 1")
    a.sync()
    b.sync()
    assert rows(b) == [(1, "a", "y", 0, "red")] and a.state_hash() == b.state_hash()
    for r in (a, b):
        r.close()


def test_cli_create_ls_show_verify(server: AnvilServer, tmp_path: Path) -> None:
    name = gname()
    schema = tmp_path / "schema.sql"
    schema.write_text(SCHEMA)
    out = server.cli("pdb", "create", name, "--schema", str(schema), "--json")
    assert json.loads(out.stdout)["name"] == name
    assert name in server.cli("pdb", "ls").stdout.decode()
    assert json.loads(server.cli("pdb", "show", name, "--json").stdout)["head_index"] == 0
    with server.client() as c:
        r = replica(tmp_path, c, name, "r")
        r.execute("INSERT INTO notes(id, owner, body) VALUES (1, 'a', 'x')")
        r.sync()
        r.close()
    res = json.loads(server.cli("pdb", "verify", name, "--json").stdout)
    assert res["head_index"] == 1
    assert server.cli("pdb", "keys", "--json").returncode == 0


# ------------------------------------------------------------------ projections and watch


def _projection_rows(client: AnvilClient, name: str, index: int, tmp_path: Path, table: str) -> list[tuple]:
    import zstandard

    p = tmp_path / f"proj-{uuid.uuid4().hex[:6]}.sqlite"
    p.write_bytes(zstandard.ZstdDecompressor().decompress(client.pdb_projection_data(name, source_index=index)))
    db = sf.Database(p)
    try:
        return db.execute(f'SELECT * FROM "{table}" ORDER BY 1')
    finally:
        db.close()


def test_projection_with_relation_and_equality_filters(client: AnvilClient, group: str, tmp_path: Path) -> None:
    tenant = f"p{uuid.uuid4().hex[:8]}"
    client.create_tenant(tenant)
    # The audience: an app that may read notes 1 and 3 only (relationships are scopes until authz lands).
    viewer = client.create_app(tenant, "viewer", scopes=[f"pdb:read|pdb:{group}/notes/1",
                                                          f"pdb:read|pdb:{group}/notes/3"])
    a = replica(tmp_path, client, group, "a")
    a.execute("INSERT INTO notes(id, owner, body) VALUES (1, 'ann', 'one'), (2, 'bob', 'two'), (3, 'bob', 'three')")
    a.sync()
    spec = {"tables": [
        {"from": "notes", "to": "visible", "columns": {"id": "id", "body": "text"},
         "filter": {"relation": {"subject": viewer["client_id"], "permission": "pdb:read",
                                 "resource": f"pdb:{group}/notes/{{id}}"}}},
        {"from": "notes", "to": "bobs", "columns": {"id": "id", "owner": "owner"},
         "filter": {"equals": {"owner": "bob"}}}],
        "write_back": "deny"}
    name = gname("p")
    p = client.pdb_create_projection(name, group, spec)
    assert p["source_index"] == 1
    assert _projection_rows(client, name, 1, tmp_path, "visible") == [(1, "one"), (3, "three")]
    assert _projection_rows(client, name, 1, tmp_path, "bobs") == [(2, "bob"), (3, "bob")]
    # Incremental on each commit: an update moves a row out of one filter, a delete removes it.
    a.execute("UPDATE notes SET owner = 'ann', body = 'THREE' WHERE id = 3")
    a.execute("DELETE FROM notes WHERE id = 1")
    a.execute("INSERT INTO notes(id, owner, body) VALUES (4, 'bob', 'four')")
    a.sync()
    head = a.head[0]
    assert _projection_rows(client, name, head, tmp_path, "visible") == [(3, "THREE")]
    assert _projection_rows(client, name, head, tmp_path, "bobs") == [(2, "bob"), (4, "bob")]
    shown = client.pdb_projection(name)
    assert shown["source_index"] == head and shown["state_hash"]
    for bad, code in (({"tables": [{"from": "nope"}]}, "PersonalDbUnknownTable"),
                      ({"tables": [{"from": "notes", "columns": {"body": "b"}}]}, "InvalidArgument"),
                      ({"tables": [{"from": "notes"}], "write_back": {"columns": ["zzz"]}}, "InvalidArgument")):
        with pytest.raises(AnvilAPIError) as e:
            client.pdb_create_projection(gname("p"), group, bad)
        assert e.value.code == code
    a.close()


def test_commits_and_projection_updates_appear_in_watch(client: AnvilClient, group: str, tmp_path: Path) -> None:
    client.pdb_create_projection(gname("w"), group, {"tables": [{"from": "notes"}]})
    start = client.pdb_get(group)
    a = replica(tmp_path, client, group, "a")
    with client.watch(kinds="pdb.*", after=0) as stream:
        a.execute("INSERT INTO notes(id, owner, body) VALUES (1, 'a', 'x')")
        a.sync()
        seen: list[dict] = []
        for ev in stream:
            if ev.get("group") == group:
                seen.append(ev)
            if any(e["kind"] == "pdb.projection.update" and e.get("source_index") == start["head_index"] + 1
                   for e in seen):
                break
    kinds = [e["kind"] for e in seen]
    assert "pdb.group.create" in kinds and "pdb.commit" in kinds and "pdb.projection.update" in kinds
    commit = next(e for e in seen if e["kind"] == "pdb.commit")
    assert commit["index"] == 1 and commit["tables"] == ["notes"]
    a.close()


def test_chain_verification_detects_tampering(client: AnvilClient, group: str, tmp_path: Path) -> None:
    a = replica(tmp_path, client, group, "a")
    for i in range(4):
        a.execute("INSERT INTO notes(id, owner, body) VALUES (?, 'a', 'x')", (i,))
        a.sync()
    g = client.pdb_get(group)
    keys = {k["key_id"]: k["public"] for k in client.pdb_keys()}
    chain = [e["certificate"] for e in client.pdb_catch_up(group, 0, g["genesis"], certificates_only=True)["entries"]]
    assert certs.verify_chain(group, g["genesis"], chain, keys)["head_hash"] == g["head_hash"]
    edited = json.loads(json.dumps(chain))
    edited[2]["body"]["changeset_sha256"] = "0" * 64  # a rewritten entry: the signature breaks
    dropped = chain[:1] + chain[2:]  # a removed entry: the link breaks
    swapped = [chain[1], chain[0], *chain[2:]]  # reordered
    forged = json.loads(json.dumps(chain))
    forged[3]["body"]["key_id"] = "ed25519:0000000000000000"  # signed by nobody we know
    for bad in (edited, dropped, swapped, forged):
        with pytest.raises(certs.CertificateInvalid):
            certs.verify_chain(group, g["genesis"], bad, keys)
    with pytest.raises(certs.CertificateInvalid):
        certs.verify_chain(group, "1" * 64, chain, keys)  # another genesis
    with pytest.raises(certs.CertificateInvalid):  # a changeset that is not the certified one
        certs.verify_entry(chain[0], keys, group=group, prev_hash=g["genesis"], index=1, changeset=b"other")
    a.close()


def test_witness_key_rotation_keeps_old_certificates_verifiable(server: AnvilServer, client: AnvilClient,
                                                               group: str, tmp_path: Path) -> None:
    a = replica(tmp_path, client, group, "a")
    a.execute("INSERT INTO notes(id, owner, body) VALUES (1, 'a', 'before')")
    a.sync()
    before = {k["key_id"] for k in client.pdb_keys() if k["retired"] is None}
    rotated = client.pdb_rotate_key()
    assert rotated["key_id"] not in before
    keys = client.pdb_keys()
    assert {k["key_id"] for k in keys if k["retired"] is None} == {rotated["key_id"]}
    assert before <= {k["key_id"] for k in keys if k["retired"] is not None}  # history is kept
    a.execute("INSERT INTO notes(id, owner, body) VALUES (2, 'a', 'after')")
    a.sync()  # the replica learns the new key when it meets it
    res = certs.verify_group(client, group)
    chain = [e["certificate"]["body"]["key_id"] for e in client.pdb_catch_up(
        group, 0, client.pdb_get(group)["genesis"], certificates_only=True)["entries"]]
    assert res["head_index"] == 2 and chain[0] in before and chain[1] == rotated["key_id"]
    assert a.verify()["head_index"] == 2
    # The CLI rotates too; the replica follows, the old certificates keep verifying.
    out = json.loads(server.cli("pdb", "key", "rotate", "--json").stdout)
    assert out["key_id"] not in before | {rotated["key_id"]}
    listed = json.loads(server.cli("pdb", "keys", "--json").stdout)
    assert {k["key_id"] for k in listed if k["retired"] is None} == {out["key_id"]}
    assert rotated["key_id"] in {k["key_id"] for k in listed if k["retired"] is not None}
    a.execute("INSERT INTO notes(id, owner, body) VALUES (3, 'a', 'third key')")
    a.sync()
    assert certs.verify_group(client, group)["head_index"] == 3 and a.verify()["head_index"] == 3
    # Not an admin: refused.
    tenant = f"r{uuid.uuid4().hex[:8]}"
    client.create_tenant(tenant)
    app = client.create_app(tenant, "nokeys", scopes=["pdb:read|pdb:*"])
    with AnvilClient(server.endpoint, client_id=app["client_id"], client_secret=app["client_secret"]) as c:
        with pytest.raises(AnvilAPIError) as e:
            c.pdb_rotate_key()
        assert e.value.code == "PermissionDenied"
    a.close()


def test_projection_write_back_policy(client: AnvilClient, group: str, tmp_path: Path) -> None:
    import zstandard

    a = replica(tmp_path, client, group, "a")
    a.execute("INSERT INTO notes(id, owner, body) VALUES (1, 'bob', 'one'), (2, 'ann', 'two')")
    a.sync()
    spec = {"tables": [{"from": "notes", "to": "bobs", "columns": {"id": "id", "owner": "who", "body": "text"},
                        "filter": {"equals": {"owner": "bob"}}}]}
    ro, rw = gname("ro"), gname("rw")
    client.pdb_create_projection(ro, group, {**spec, "write_back": "deny"})
    client.pdb_create_projection(rw, group, {**spec, "write_back": {"columns": ["text"]}})

    def projected_changeset(name: str, sql: str) -> bytes:
        p = tmp_path / f"{name}-{uuid.uuid4().hex[:6]}.sqlite"
        p.write_bytes(zstandard.ZstdDecompressor().decompress(client.pdb_projection_data(name, source_index=1)))
        db = sf.Database(p)
        try:
            db.start_session()
            db.script(sql)
            return db.take_changeset()
        finally:
            db.close()

    def refused(name: str, sql: str, code: str = "PermissionDenied") -> None:
        with pytest.raises(AnvilAPIError) as e:
            client.pdb_write_back(name, projected_changeset(name, sql))
        assert e.value.code == code
        assert client.pdb_get(group)["head_index"] == 1  # nothing changed

    refused(ro, "UPDATE bobs SET text = 'x' WHERE id = 1")
    refused(rw, "UPDATE bobs SET who = 'eve' WHERE id = 1")  # not a write-back column
    refused(rw, "INSERT INTO bobs VALUES (9, 'bob', 'new')")
    refused(rw, "DELETE FROM bobs WHERE id = 1")
    entry = client.pdb_write_back(rw, projected_changeset(rw, "UPDATE bobs SET text = 'edited' WHERE id = 1"))
    assert entry["index"] == 2
    a.sync()
    assert rows(a) == [(1, "bob", "edited", 0), (2, "ann", "two", 0)]
    a.close()


def test_batch_commit_chains_entries_in_one_request_all_or_nothing(server: AnvilServer, client: AnvilClient,
                                                                     group: str, tmp_path: Path) -> None:
    """`commits/batch`: each changeset is its own certified entry chained on the one before, all in one
    transaction; any refusal writes none; a retry returns the same entries. A replica with many pending
    changesets syncs through it, and another replica converges."""
    g = client.pdb_get(group)
    keys = {k["key_id"]: k["public"] for k in client.pdb_keys()}
    sets = [local_changeset(tmp_path, f"INSERT INTO notes(id, owner, body) VALUES ({i}, 'b', 'n{i}')")
            for i in range(1, 6)]
    items = [(cs, f"bk{i}") for i, cs in enumerate(sets)]
    entries = client.pdb_commit_batch(group, items, base_index=0, base_hash=g["genesis"])
    prev = g["genesis"]
    for i, (e, cs) in enumerate(zip(entries, sets, strict=True), start=1):
        body = certs.verify_entry(e["certificate"], keys, group=group, prev_hash=prev, index=i, changeset=cs)
        prev = body["hash"]
    head = (5, prev)
    assert (client.pdb_get(group)["head_index"], client.pdb_get(group)["head_hash"]) == head
    # A retry after a lost answer: the same entries, nothing appended.
    again = client.pdb_commit_batch(group, items, base_index=0, base_hash=g["genesis"])
    assert [e["hash"] for e in again] == [e["hash"] for e in entries] and all(e["idempotent_replay"] for e in again)

    def refused(code: str, batch: list, base: tuple[int, str] = head) -> None:
        before = len(client._json("GET", "/anvil/v1/admin/journal", params={"after": 0, "limit": 100000})["events"])
        with pytest.raises(AnvilAPIError) as err:
            client.pdb_commit_batch(group, batch, base_index=base[0], base_hash=base[1])
        assert err.value.code == code, err.value
        assert (client.pdb_get(group)["head_index"], client.pdb_get(group)["head_hash"]) == head
        after = client._json("GET", "/anvil/v1/admin/journal", params={"after": 0, "limit": 100000})["events"]
        assert [e["kind"] for e in after[before:]] == [], "a refused batch wrote something"

    good = local_changeset(tmp_path, "INSERT INTO notes(id, owner, body) VALUES (10, 'b', 'ok')")
    other = local_changeset(tmp_path, "INSERT INTO secrets(id, v) VALUES (1, 'x')",
                            schema="CREATE TABLE secrets(id INTEGER PRIMARY KEY, v TEXT)")
    refused("PersonalDbUnknownTable", [(good, None), (other, None)])  # the second is bad: neither lands
    refused("PersonalDbInvalidChangeset", [(good, None), (b"not a changeset", None)])
    refused("PersonalDbStaleBase", [(good, None)], base=(4, entries[3]["hash"]))
    refused("IdempotencyMismatch", [(good, "bk0")])
    with pytest.raises(AnvilAPIError) as err:
        client._json("POST", f"/anvil/v1/pdb/groups/{group}/commits/batch",
                     json={"base_index": 5, "base_hash": head[1], "changesets": []})
    assert err.value.code == "InvalidArgument"
    with pytest.raises(AnvilAPIError) as err:
        client._json("POST", f"/anvil/v1/pdb/groups/{group}/commits/batch",
                     json={"base_index": 5, "base_hash": head[1], "changesets": [{"changeset": "%%%"}]})
    assert err.value.code == "PersonalDbInvalidChangeset"

    # A replica offline with many local transactions sends them as batches, each its own entry.
    a = replica(tmp_path, client, group, "a")
    for i in range(100, 400):
        a.execute("INSERT INTO notes(id, owner, body) VALUES (?, 'a', ?)", (i, f"offline {i}"))
    assert a.pending() == 300
    res = a.sync()
    assert res["submitted"] == 300 and a.head[0] == 305 and a.pending() == 0
    assert a.verify()["head_index"] == 305
    b = replica(tmp_path, client, group, "b")
    assert b.head == a.head and b.state_hash() == a.state_hash()
    assert certs.verify_group(client, group)["head_index"] == 305
    for r in (a, b):
        r.close()


def test_projection_subscribers_follow_changes_like_group_replicas(client: AnvilClient, group: str,
                                                                    tmp_path: Path) -> None:
    """A ProjectionReplica starts from the projection's file, then applies the changeset each source
    entry made to the projection; a head the change log does not know makes it load the file again."""
    from anvil.personaldb import ProjectionReplica

    a = replica(tmp_path, client, group, "a")
    a.execute("INSERT INTO notes(id, owner, body) VALUES (1, 'bob', 'one'), (2, 'ann', 'two')")
    a.sync()
    name = gname("sub")
    client.pdb_create_projection(name, group, {"tables": [
        {"from": "notes", "to": "bobs", "columns": {"id": "id", "body": "text"},
         "filter": {"equals": {"owner": "bob"}}}]})
    p = ProjectionReplica(tmp_path / "bobs.sqlite", client, name)
    assert p.query("SELECT * FROM bobs ORDER BY id") == [(1, "one")] and p.head[0] == 1 and p.reloads == 1

    # Commits of every kind: into the filter, out of it, a delete, one the projection does not show.
    a.execute("INSERT INTO notes(id, owner, body) VALUES (3, 'bob', 'three')")
    a.sync()
    a.execute("UPDATE notes SET owner = 'ann' WHERE id = 1")
    a.sync()
    a.execute("UPDATE notes SET body = 'TWO' WHERE id = 2")
    a.sync()
    a.execute("INSERT INTO tags VALUES (3, 'x')")
    a.execute("DELETE FROM notes WHERE id = 3")
    a.execute("INSERT INTO notes(id, owner, body) VALUES (4, 'bob', 'four')")
    a.sync()
    head = a.head
    client.pdb_projection_data(name, source_index=head[0])  # waits until the projector has applied them
    res = p.sync()
    assert res["applied"] == head[0] - 1 and res["reloaded"] == 0 and tuple(res["head"]) == head
    assert p.query("SELECT * FROM bobs ORDER BY id") == [(4, "four")]
    assert p.verify()["matches"] is True
    first = client.pdb_catch_up(group, 0, client.pdb_get(group)["genesis"], certificates_only=True)["entries"][0]
    changes = client.pdb_projection_changes(name, 1, first["hash"])
    assert changes["status"] == "ok" and [e["source_index"] for e in changes["entries"]] == list(range(2, head[0] + 1))

    # A head the change log does not know (as after a projection rebuild): the file is loaded again.
    p.db.execute("UPDATE _anvil_projection SET v = ? WHERE k = 'source_hash'", ("0" * 64,))
    res = p.sync()
    assert res["reloaded"] == 1 and tuple(res["head"]) == head and p.verify()["matches"] is True
    assert client.pdb_projection_changes(name, 1, "0" * 64)["status"] == "snapshot_required"
    for bad in ({"after_index": -1, "after_hash": "0" * 64}, {"after_index": 1, "after_hash": "xyz"}):
        with pytest.raises(AnvilAPIError) as e:
            client._json("GET", f"/anvil/v1/pdb/projections/{name}/changes", params=bad)
        assert e.value.code == "InvalidArgument"
    with pytest.raises(AnvilAPIError) as e:
        client.pdb_projection_changes(gname("none"), 1, "0" * 64)
    assert e.value.code == "NotFound"
    p.close()
    a.close()
