"""PersonalDB and relationship authorisation driven as a hostile or buggy client would, through the SDK
against one real server: each test is the regression test of a bug found that way (docs/personaldb.md,
docs/authz.md). Refusals must be clear 4xx answers that change nothing; a certificate must vouch only
for what it signs."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import zstandard

from anvil.client import AnvilAPIError, AnvilClient
from anvil.personaldb import certs
from anvil.storage import sqlitefile as sf
from tests.helpers import AnvilServer, local_changeset

pytestmark = pytest.mark.timeout(120)

# The key is declared (id, owner) but the columns are (owner, id): a changeset lists key values in
# column order, the table's key names them in declared order.
KEYED = "CREATE TABLE docs(owner TEXT NOT NULL, id TEXT NOT NULL, body TEXT, PRIMARY KEY (id, owner));"
ITEMS = "CREATE TABLE items(id INTEGER PRIMARY KEY, body TEXT);"
NOTE_AUTHZ = """
definition user {}
definition note {
    relation owner: user
    permission edit = owner
}
"""


@pytest.fixture(scope="module")
def world(server: AnvilServer):
    """A tenant whose application may use PersonalDB and authz, acting for nobody or for amy; and a
    reader application of the same tenant that holds only `pdb:read`."""
    tenant = f"adv{uuid.uuid4().hex[:8]}"
    with server.client() as admin:
        admin.create_tenant(tenant)
        app = admin.create_app(tenant, "backend", scopes=[f"pdb:create|tenant:{tenant}", "pdb:*|pdb:*",
                                                          f"authz:*|tenant:{tenant}"])
        reader = admin.create_app(tenant, "reader", scopes=["pdb:read|pdb:*"])
    cid, secret = app["client_id"], app["client_secret"]
    out = {"svc": AnvilClient(server.endpoint, client_id=cid, client_secret=secret),
           "amy": AnvilClient(server.endpoint, client_id=cid, client_secret=secret, subject="user:amy"),
           "reader": AnvilClient(server.endpoint, client_id=reader["client_id"],
                                 client_secret=reader["client_secret"])}
    out["svc"].authz_write_schema(NOTE_AUTHZ)
    yield out
    for c in out.values():
        c.close()


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"




def _refused(fn: Any, code: str) -> AnvilAPIError:
    with pytest.raises(AnvilAPIError) as e:
        fn()
    assert e.value.code == code, e.value
    assert 400 <= e.value.status < 500
    return e.value


# ------------------------------------------------------------------ PersonalDB


def test_binding_placeholders_take_key_values_in_the_keys_declared_order(world, tmp_path: Path) -> None:
    """`{id}` of a row binding is the `id` column's value. It was the first key value in column order
    (here `owner`), so amy, owner of note:amy, could insert and edit any row by naming herself owner."""
    svc, amy = world["svc"], world["amy"]
    g = _name("key")
    genesis = svc.pdb_create(g, KEYED)["genesis"]
    svc.pdb_bind(g, {"resource_type": "note", "resource": "{id}", "update": "edit"})
    svc.authz_write(["note:amy#owner@user:amy"])
    theirs = local_changeset(tmp_path, schema=KEYED, sql="INSERT INTO docs VALUES ('amy', 'secret', 'x')")
    err = _refused(lambda: amy.pdb_commit(g, theirs, base_index=0, base_hash=genesis), "PermissionDenied")
    assert "note:secret" in err.message
    assert svc.pdb_get(g)["head_index"] == 0
    # The row whose id she owns goes through, whoever its owner column names.
    e = amy.pdb_commit(g, local_changeset(tmp_path, schema=KEYED, sql="INSERT INTO docs VALUES ('bob', 'amy', 'x')"),
                       base_index=0, base_hash=genesis)
    assert e["index"] == 1


def test_projection_updates_rows_of_a_key_declared_out_of_column_order(world, tmp_path: Path) -> None:
    """A projection re-reads the rows a commit touched by their key; with key values in column order it
    looked up the wrong row, so inserted rows never appeared (and deleted ones never went)."""
    svc = world["svc"]
    g, p = _name("kp"), _name("kp")
    genesis = svc.pdb_create(g, KEYED)["genesis"]
    e = svc.pdb_commit(g, local_changeset(tmp_path, schema=KEYED, sql="INSERT INTO docs VALUES ('ann', 'd1', 'one')"),
                       base_index=0, base_hash=genesis)
    svc.pdb_create_projection(p, g, {"tables": [{"from": "docs"}]})
    e = svc.pdb_commit(g, local_changeset(tmp_path, schema=KEYED, sql="INSERT INTO docs VALUES ('bob', 'd2', 'two')"),
                       base_index=e["index"], base_hash=e["hash"])
    path = tmp_path / "proj.sqlite"
    path.write_bytes(zstandard.ZstdDecompressor().decompress(svc.pdb_projection_data(p, source_index=e["index"])))
    db = sf.Database(path)
    try:
        assert db.execute("SELECT owner, id, body FROM docs ORDER BY id") == [("ann", "d1", "one"),
                                                                               ("bob", "d2", "two")]
    finally:
        db.close()


def test_changesets_that_change_no_row_or_misstate_their_tables_are_refused(world, tmp_path: Path) -> None:
    """A bare table header parses as a changeset of no row change: no permission was asked, so a reader
    (`pdb:read` only) appended certified entries with it. A header whose key columns are not the table's
    (SQLite skips its changes) or that names a table twice with another column count was certified too."""
    svc, reader = world["svc"], world["reader"]
    g = _name("hdr")
    genesis = svc.pdb_create(g, ITEMS)["genesis"]
    header = b"T\x02\x01\x00items\x00"
    good = local_changeset(tmp_path, schema=ITEMS, sql="INSERT INTO items VALUES (1, 'a')")
    assert good.startswith(header)
    for data in (header,                                                   # no row change
                 b"T\x02\x00\x01items\x00" + good[len(header):],          # `body` flagged as the key
                 good + b"T\x01\x01items\x00\x12\x00\x01" + (5).to_bytes(8, "big")):  # items again, 1 column
        for who in (reader, svc):
            _refused(lambda who=who, data=data: who.pdb_commit(g, data, base_index=0, base_hash=genesis),
                     "PersonalDbInvalidChangeset")
    assert svc.pdb_get(g)["head_index"] == 0
    # The reader still may not write a real row; the application may.
    _refused(lambda: reader.pdb_commit(g, good, base_index=0, base_hash=genesis), "PermissionDenied")
    assert svc.pdb_commit(g, good, base_index=0, base_hash=genesis)["index"] == 1


def test_indexes_past_sqlite_integers_are_refused_not_internal_errors(world, tmp_path: Path) -> None:
    svc = world["svc"]
    g = _name("big")
    genesis = svc.pdb_create(g, ITEMS)["genesis"]
    huge = 2**70
    _refused(lambda: svc.pdb_catch_up(g, huge, genesis), "InvalidArgument")
    _refused(lambda: svc.pdb_snapshot_data(g, huge), "NotFound")
    p = _name("big")
    svc.pdb_create_projection(p, g, {"tables": [{"from": "items"}]})
    _refused(lambda: svc.pdb_projection_changes(p, huge, genesis), "InvalidArgument")


class _RecordsLie:
    """An SDK client whose group description states its snapshot at another entry than its certificate
    signs (a server, or anything between, that the offline verifier must not believe)."""

    def __init__(self, inner: AnvilClient, move_to: dict[str, Any]):
        self.inner, self.move_to = inner, move_to

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def pdb_get(self, group: str) -> Any:
        info = dict(self.inner.pdb_get(group))
        info["snapshots"] = [{**dict(s), **self.move_to} for s in info["snapshots"]]
        return info


def test_verify_group_links_snapshots_by_what_their_certificates_sign(world, tmp_path: Path) -> None:
    svc = world["svc"]
    g = _name("snap")
    head = (0, svc.pdb_create(g, ITEMS)["genesis"])
    hashes = {}
    for i in range(1, 4):
        e = svc.pdb_commit(g, local_changeset(tmp_path, schema=ITEMS, sql=f"INSERT INTO items VALUES ({i}, 'x')"),
                           base_index=head[0], base_hash=head[1])
        head = hashes[i] = (e["index"], e["hash"])
        if i == 2:
            svc.pdb_build_snapshot(g)
    assert certs.verify_group(svc, g)["snapshots_verified"] == [2]
    # The genuine certificate of snapshot 2 does not vouch for a record naming entry 3 (nor entry 9).
    with pytest.raises(certs.CertificateInvalid):
        certs.verify_group(_RecordsLie(svc, {"index": 3, "hash": hashes[3][1]}), g)
    with pytest.raises(certs.CertificateInvalid):
        certs.verify_group(_RecordsLie(svc, {"index": 9}), g)


# ------------------------------------------------------------------ relationship authorisation


@pytest.fixture
def authz(server: AnvilServer):
    """A tenant of its own (each test writes its own schema) and its application."""
    tenant = f"adz{uuid.uuid4().hex[:8]}"
    with server.client() as admin:
        admin.create_tenant(tenant)
        app = admin.create_app(tenant, "authz", scopes=[f"authz:*|tenant:{tenant}"])
    with AnvilClient(server.endpoint, client_id=app["client_id"], client_secret=app["client_secret"]) as c:
        yield c


CAVEATED = """
definition user {}
caveat ratio(total int, parts int) { (total + parts) / parts > 1 }
definition doc {
    relation viewer: user with ratio
    permission view = viewer
}
"""


def test_caveat_arithmetic_failures_and_out_of_range_ints_are_invalid_argument(authz: AnvilClient) -> None:
    """CEL's division by zero and 64-bit overflow escaped as internal errors (500)."""
    authz.authz_write_schema(CAVEATED)
    authz.authz_write(['doc:d#viewer@user:amy[ratio:{"total":10}]'])
    assert authz.authz_check("doc:d", "view", "user:amy", context={"parts": 2})["permissionship"] == "has_permission"
    assert authz.authz_check("doc:d", "view", "user:amy")["missing_context"] == ["parts"]
    for parts in (0, 2**63 - 10):
        err = _refused(lambda parts=parts: authz.authz_check("doc:d", "view", "user:amy", context={"parts": parts}),
                       "InvalidArgument")
        assert "caveat ratio failed to evaluate" in err.message
    err = _refused(lambda: authz.authz_check("doc:d", "view", "user:amy", context={"parts": 2**64}),
                   "InvalidArgument")
    assert "64-bit integer" in err.message


def _chain(term: str, n: int) -> str:
    return " + ".join([term] * n)


def test_operator_chains_are_bounded_when_the_schema_is_written(authz: AnvilClient) -> None:
    """A permission of some hundreds of operators made the schema parser recurse past the interpreter's
    limit: the write answered 500."""
    head = "definition user {}\ndefinition doc {\n    relation viewer: user\n    permission view = "
    for n in (150, 2000):
        err = _refused(lambda n=n: authz.authz_write_schema(head + _chain("viewer", n) + "\n}\n"), "InvalidArgument")
        assert "100 operators deep" in err.message
    authz.authz_write_schema(head + _chain("viewer", 100) + "\n}\n")


def test_evaluation_past_the_interpreters_stack_is_max_depth_exceeded(authz: AnvilClient) -> None:
    """Nested data under a long (but allowed) operator chain: each level of the folder tree costs a frame
    per operator, so a check ran out of Python stack well before the 50-level bound and answered 500."""
    authz.authz_write_schema("definition user {}\ndefinition folder {\n    relation parent: folder\n"
                             "    relation viewer: user\n    permission view = parent->view + "
                             + _chain("viewer", 99) + "\n}\n")
    authz.authz_write([f"folder:f{i}#parent@folder:f{i + 1}" for i in range(30)])
    err = _refused(lambda: authz.authz_check("folder:f0", "view", "user:amy"), "MaxDepthExceeded")
    assert "nested too deeply" in err.message
    assert authz.authz_check("folder:f29", "view", "user:amy")["permissionship"] == "no_permission"


def test_expand_of_a_diamond_lattice_is_bounded(authz: AnvilClient) -> None:
    """Expand shows every path; groups that each include both groups of the next level double it per
    level. Seventeen levels of two groups (68 relationships) held a worker and gigabytes of memory."""
    authz.authz_write_schema("definition user {}\ndefinition group {\n    relation member: user | group#member\n}\n")
    levels = 17
    rels = [f"group:l{i}{a}#member@group:l{i + 1}{b}#member" for i in range(levels) for a in "ab" for b in "ab"]
    authz.authz_write(rels + [f"group:l{levels}a#member@user:amy"])
    err = _refused(lambda: authz.authz_expand("group:l0a", "member"), "InvalidArgument")
    assert "more than 100000" in err.message
    assert authz.authz_check("group:l0a", "member", "user:amy")["permissionship"] == "has_permission"
    assert authz.authz_expand(f"group:l{levels - 3}a", "member")["tree"]
