"""PersonalDB decided by relationships (docs/personaldb.md, "Row permissions by relationship"), against a
real server with real SQLite session changesets: a group's row binding (API, SDK, CLI, schema guard),
rows allowed and denied per subject, one denied row refusing the whole changeset, the deciding authz
revision in certificates, and projections filtered by relationships for two subjects."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import zstandard

from anvil.client import AnvilAPIError, AnvilClient
from anvil.personaldb import certs
from anvil.personaldb.rowauth import id_value
from anvil.storage import sqlitefile as sf
from tests.helpers import AnvilServer, local_changeset

AUTHZ = """
definition user {}

definition note {
    relation owner: user
    relation editor: user
    relation viewer: user
    permission edit = owner + editor
    permission view = viewer + edit
    permission remove = owner
}
"""
SCHEMA = """
CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE tags(note_id INTEGER NOT NULL, tag TEXT NOT NULL, PRIMARY KEY (note_id, tag));
"""
BINDING = {"resource_type": "note", "resource": "{table}/{pk}", "insert": "edit", "update": "edit",
           "delete": "remove"}


@pytest.fixture(scope="module")
def world(server: AnvilServer):
    """A tenant with an authz schema; its application (acting for amy, bob, or nobody)."""
    tenant = f"rel{uuid.uuid4().hex[:8]}"
    with server.client() as admin:
        admin.create_tenant(tenant)
        app = admin.create_app(tenant, "notes-backend", scopes=[
            f"pdb:create|tenant:{tenant}", "pdb:*|pdb:*", f"authz:*|tenant:{tenant}"])
    cid, secret = app["client_id"], app["client_secret"]
    svc = AnvilClient(server.endpoint, client_id=cid, client_secret=secret)
    svc.authz_write_schema(AUTHZ)
    amy = AnvilClient(server.endpoint, client_id=cid, client_secret=secret, subject="user:amy")
    bob = AnvilClient(server.endpoint, client_id=cid, client_secret=secret, subject="user:bob")
    yield {"tenant": tenant, "svc": svc, "amy": amy, "bob": bob}
    for c in (svc, amy, bob):
        c.close()


def changeset(tmp_path: Path, sql: str, setup: str = "") -> bytes:
    return local_changeset(tmp_path, sql, SCHEMA, setup)


def _refused(fn, code: str = "PermissionDenied") -> AnvilAPIError:
    with pytest.raises(AnvilAPIError) as e:
        fn()
    assert e.value.code == code, e.value
    return e.value


def test_binding_round_trip_errors_schema_guard_and_cli(world, server: AnvilServer) -> None:
    svc = world["svc"]
    g = f"b-{uuid.uuid4().hex[:8]}"
    svc.pdb_create(g, SCHEMA)
    _refused(lambda: svc.pdb_binding(g), "NotFound")
    for bad in ({**BINDING, "resource_type": "nope"}, {**BINDING, "delete": "nothing"},
                {**BINDING, "resource": "{owner}"}, {**BINDING, "resource": "{table}"}, {"resource_type": "note"},
                {**BINDING, "extra": 1}, {**BINDING, "without_subject": "maybe"}):
        _refused(lambda bad=bad: svc.pdb_bind(g, bad), "InvalidArgument")
    res = svc.pdb_bind(g, {"resource_type": "note", "update": "edit"})
    assert res["binding"] == {"resource_type": "note", "resource": "{table}/{pk}", "insert": "edit",
                              "update": "edit", "delete": "edit", "without_subject": "deny"}
    # A schema change that drops a permission a binding names is refused, naming the group.
    svc.pdb_bind(g, BINDING)
    err = _refused(lambda: svc.authz_write_schema(AUTHZ.replace("    permission remove = owner\n", "")),
                   "PreconditionFailed")
    assert g in err.message
    # The CLI: bind (replacing), show, unbind.
    out = server.cli("pdb", "bind", g, "--resource-type", "note", "--update", "edit", "--delete", "remove",
                     "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["binding"]["delete"] == "remove"
    shown = server.cli("pdb", "binding", g).stdout.decode()
    assert "note:{table}/{pk}" in shown and "delete=remove" in shown
    assert server.cli("pdb", "unbind", g).returncode == 0
    _refused(lambda: svc.pdb_binding(g), "NotFound")
    # Unbound, the schema change goes through (and is put back).
    svc.authz_write_schema(AUTHZ.replace("    permission remove = owner\n", ""))
    svc.authz_write_schema(AUTHZ)


def test_rows_decided_by_relationships_whole_changeset_and_certificate_revision(world, tmp_path: Path) -> None:
    svc, amy, bob = world["svc"], world["amy"], world["bob"]
    g = f"r-{uuid.uuid4().hex[:8]}"
    genesis = svc.pdb_create(g, SCHEMA)["genesis"]
    svc.pdb_bind(g, BINDING)
    written = svc.authz_write(["note:notes/1#owner@user:amy", "note:notes/2#owner@user:bob",
                               "note:notes/3#editor@user:amy", "note:tags/1/x#owner@user:amy"])
    rev = written["revision"]
    head = (0, genesis)

    def commit(c: AnvilClient, cs: bytes) -> dict:
        nonlocal head
        e = c.pdb_commit(g, cs, base_index=head[0], base_hash=head[1])
        head = (e["index"], e["hash"])
        return e

    rows = "INSERT INTO notes VALUES (1, 'amy', 'a'), (3, 'amy', 'c')"
    e = commit(amy, changeset(tmp_path, rows + "; INSERT INTO tags VALUES (1, 'x')"))
    # The certificate names the authz revision that decided (a real zedtoken position).
    assert e["certificate"]["body"]["authz_revision"] == rev > 0
    # Row 2 is bob's: amy's insert of it is refused, and with it the whole changeset (row 4 too).
    err = _refused(lambda: amy.pdb_commit(g, changeset(tmp_path, "INSERT INTO notes VALUES (4, 'a', 'd'), "
                                                                 "(2, 'amy', 'b')"),
                                          base_index=head[0], base_hash=head[1]))
    assert "notes" in err.message and "(2)" in err.message and "note:notes/2" in err.message
    assert bob.pdb_get(g)["head_index"] == head[0]
    # amy may edit row 3 (editor) but not delete it (remove = owner); row 1 she owns.
    setup = rows
    _refused(lambda: amy.pdb_commit(g, changeset(tmp_path, "DELETE FROM notes WHERE id = 3", setup),
                                    base_index=head[0], base_hash=head[1]))
    commit(amy, changeset(tmp_path, "UPDATE notes SET body = 'C' WHERE id = 3", setup))
    commit(amy, changeset(tmp_path, "DELETE FROM notes WHERE id = 1", setup))
    # bob: his own row yes, amy's no; a token acting for nobody is refused (without_subject: deny).
    commit(bob, changeset(tmp_path, "INSERT INTO notes VALUES (2, 'bob', 'b')"))
    _refused(lambda: bob.pdb_commit(g, changeset(tmp_path, "UPDATE notes SET body = 'x' WHERE id = 3", setup),
                                    base_index=head[0], base_hash=head[1]))
    _refused(lambda: svc.pdb_commit(g, changeset(tmp_path, "INSERT INTO notes VALUES (9, 'x', 'y')"),
                                    base_index=head[0], base_hash=head[1]))
    # A relationship written later decides the next commit, at its revision.
    later = svc.authz_write(["note:notes/9#owner@user:bob"])["revision"]
    e = commit(bob, changeset(tmp_path, "INSERT INTO notes VALUES (9, 'bob', 'nine')"))
    assert e["certificate"]["body"]["authz_revision"] == later
    # The chain still verifies offline, revisions included.
    log = svc.pdb_catch_up(g, 0, genesis, certificates_only=True)
    keys = {k["key_id"]: k["public"] for k in svc.pdb_keys()}
    res = certs.verify_chain(g, genesis, [x["certificate"] for x in log["entries"]], keys)
    assert (res["head_index"], res["head_hash"]) == head == (5, head[1])
    assert [x["certificate"]["body"]["authz_revision"] for x in log["entries"]] == [rev] * 4 + [later]
    # without_subject: scopes lets the application's own token through on its scopes.
    svc.pdb_bind(g, {**BINDING, "without_subject": "scopes"})
    e = commit(svc, changeset(tmp_path, "INSERT INTO notes VALUES (10, 'svc', 'ten')"))
    assert e["certificate"]["body"]["authz_revision"] == 0  # scopes alone decided


def _rows(client: AnvilClient, name: str, index: int, tmp_path: Path) -> list[int]:
    p = tmp_path / f"proj-{uuid.uuid4().hex[:6]}.sqlite"
    p.write_bytes(zstandard.ZstdDecompressor().decompress(client.pdb_projection_data(name, source_index=index)))
    db = sf.Database(p)
    try:
        return [r[0] for r in db.execute('SELECT id FROM "visible" ORDER BY 1')]
    finally:
        db.close()


def _wait_revision(client: AnvilClient, name: str, rev: int) -> dict:
    deadline = time.monotonic() + 20
    while True:
        p = client.pdb_projection(name)
        if (p["authz_revision"] or 0) >= rev or time.monotonic() > deadline:
            return p
        time.sleep(0.05)


def test_projection_filtered_by_relationships_for_two_subjects(world, tmp_path: Path) -> None:
    svc = world["svc"]
    g = f"p-{uuid.uuid4().hex[:8]}"
    genesis = svc.pdb_create(g, SCHEMA)["genesis"]
    key = "a/b"  # a text key: ids are written as row bindings write them
    assert id_value(key) == "a=2Fb"
    e = svc.pdb_commit(g, changeset(tmp_path, "INSERT INTO notes VALUES (11, 'x', '1'), (12, 'x', '2'), "
                                              "(13, 'x', '3'), (14, 'x', '4')"), base_index=0, base_hash=genesis)
    rev = svc.authz_write(["note:p11#viewer@user:amy", "note:p12#owner@user:bob", "note:p13#viewer@user:amy",
                           "note:p13#editor@user:bob"])["revision"]
    names = {}
    for who in ("amy", "bob"):
        names[who] = f"{g}-{who}"
        p = svc.pdb_create_projection(names[who], g, {"tables": [
            {"from": "notes", "to": "visible", "columns": {"id": "id", "body": "body"},
             "filter": {"relation": {"subject": f"user:{who}", "permission": "view", "resource": "note:p{id}"}}}]})
        assert p["relation_filters"] == "relationships" and p["authz_revision"] == rev
    assert _rows(svc, names["amy"], 1, tmp_path) == [11, 13]
    assert _rows(svc, names["bob"], 1, tmp_path) == [12, 13]
    # A relationship change alters who sees a row: the projections are rebuilt at the new revision.
    rev2 = svc.authz_write([{"operation": "delete", "relationship": "note:p13#viewer@user:amy"},
                            {"operation": "touch", "relationship": "note:p14#viewer@user:amy"}])["revision"]
    assert _wait_revision(svc, names["amy"], rev2)["authz_revision"] == rev2
    assert _rows(svc, names["amy"], 1, tmp_path) == [11, 14]
    assert _rows(svc, names["bob"], 1, tmp_path) == [12, 13]
    # Incremental on a source commit, decided by relationships too.
    svc.authz_write(["note:p15#owner@user:bob"])
    e = svc.pdb_commit(g, changeset(tmp_path, "INSERT INTO notes VALUES (15, 'x', '5'), (16, 'x', '6')"),
                       base_index=e["index"], base_hash=e["hash"])
    assert _rows(svc, names["bob"], 2, tmp_path) == [12, 13, 15]
    assert _rows(svc, names["amy"], 2, tmp_path) == [11, 14]


def test_a_binding_its_schema_lost_fails_closed_and_validation_says_so(tmp_path: Path) -> None:
    """A restored store can hold a binding its schema no longer supports (the live guard never saw the
    change): every row of the group is refused, and validation reports `personaldb.binding_invalid`."""
    from anvil.context import Principal, RequestContext
    from anvil.runtime import Anvil, recovery_participants
    from anvil.storage import BlobStore, records
    from anvil.storage.recovery import RecoveryContext

    a = Anvil(tmp_path / "data")
    try:
        admin = RequestContext(Principal(tenant="t1", subject="app", admin=True, scopes=("*",)))
        a.authz.write_schema(admin, AUTHZ)
        g = a.personaldb.create_group(admin, "lost", SCHEMA)
        a.personaldb.put_binding(admin, "lost", BINDING)

        def drop_edit(txn):  # as an older backup's schema would be: no `edit`
            text = AUTHZ.replace("    permission edit = owner + editor\n", "").replace("viewer + edit", "viewer")
            txn.conn.execute("INSERT INTO authz_schemas(tenant, revision, text, digest, written) VALUES (?,?,?,?,?)",
                             ("t1", txn.next_seq, text, "x", txn.now))
            txn.conn.execute("INSERT INTO authz_revisions(tenant, revision, kind) VALUES (?,?,?)",
                             ("t1", txn.next_seq, "schema"))
            txn.emit("t1", "test.schema", "authz/schema", {})
        a.storage.catalog.mutate(drop_edit, actor="test", request_id="t")
        a.authz._latest.clear()
        amy = RequestContext(Principal(tenant="t1", subject="app", scopes=("pdb:*|pdb:*",), acting_for="user:amy"))
        with pytest.raises(Exception) as e:
            a.personaldb.commit(amy, "lost", changeset(tmp_path, "INSERT INTO notes VALUES (1, 'a', 'b')"),
                                base_index=0, base_hash=g["genesis"])
        assert getattr(e.value, "code", "") == "PermissionDenied" and "cannot decide" in str(e.value.message)
    finally:
        a.close()
    conn = records.open_readonly(tmp_path / "data" / "catalog.db")
    try:
        ctx = RecoveryContext(tmp_path / "data", conn, BlobStore(tmp_path / "data" / "blobs" / "sha256",
                                                                  tmp_path / "data" / "tmp"), recovery_participants())
        p = next(p for p in recovery_participants() if p.name == "personaldb")
        bad = [f for f in p.validate(ctx) if f.severity == "error"]
        assert [f.invariant for f in bad] == ["personaldb.binding_invalid"] and "edit" in bad[0].message
    finally:
        records.close(conn)
