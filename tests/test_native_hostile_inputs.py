"""Hostile inputs to the native API beyond plain objects (PersonalDB, authz, identity, indexes...).

Each test is a request that once got a 500, hung, or reached outside its subsystem. A refused request
answers a 4xx in the documented error shape and changes nothing. One server for the module.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import AnvilServer, local_changeset, unique_bucket

pytestmark = pytest.mark.timeout(120)

PDB_SCHEMA = "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT);"


@pytest.fixture(scope="module")
def headers(server: AnvilServer) -> dict[str, str]:
    return {**server.auth_headers(), "content-type": "application/json"}


def _error(resp: httpx.Response, status: int = 400, code: str = "InvalidArgument") -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["request_id"] == resp.headers["x-request-id"]
    return body["error"]


def _no_tracebacks(server: AnvilServer) -> None:
    log = server.log()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]


def _group(server: AnvilServer, headers: dict[str, str], name: str | None = None) -> dict:
    name = name or "hg-" + unique_bucket()[-10:]
    resp = httpx.post(server.endpoint + "/anvil/v1/pdb/groups", json={"name": name, "schema": PDB_SCHEMA},
                      headers=headers)
    assert resp.status_code == 201, resp.text
    return resp.json()


# -- JSON text that is not Unicode ---------------------------------------------------------------
# "\ud800" is valid JSON syntax but no character: json.loads made a lone surrogate, which no UTF-8
# encoder takes (SQLite, the journal, the argon2 hash), so each of these failed deep in its service
# with UnicodeEncodeError: 500 Internal.

LONE = "\\ud800"


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/anvil/v1/auth/token", '{"client_id": "x", "client_secret": "%s"}'),
    ("POST", "/anvil/v1/admin/apps", '{"tenant": "%s", "name": "x"}'),
    ("PUT", "/anvil/v1/authz/schema", '{"schema": "definition user {} %s"}'),
    ("POST", "/anvil/v1/pdb/groups", '{"name": "hg-lone", "schema": "CREATE TABLE t(id INTEGER PRIMARY KEY, %s);"}'),
    ("POST", "/anvil/v1/buckets/{bucket}/uploads", '{"key": "k", "content_type": "text/%s"}'),
    ("POST", "/anvil/v1/buckets/{bucket}/copy", '{"key": "k", "source_key": "s", "source_bucket": "%s"}'),
])
def test_unpaired_surrogate_escape_is_invalid_argument(server, headers, client, bucket, method, path, body):
    url = server.endpoint + path.format(bucket=bucket)
    _error(httpx.request(method, url, content=(body % LONE).encode(), headers=headers))
    # Nothing was made: no upload, no group, no schema.
    assert client.list_uploads(bucket) == []
    assert httpx.get(server.endpoint + "/anvil/v1/pdb/groups/hg-lone", headers=headers).status_code == 404
    assert "definition user" not in httpx.get(server.endpoint + "/anvil/v1/authz/schema", headers=headers).text
    _no_tracebacks(server)


def test_surrogate_pairs_and_escaped_backslashes_still_decode(server, headers, client, bucket):
    # A pair is one character (U+1F600); "\\ud800" is a backslash and text: both are fine.
    raw = '{"key": "smile-\\ud83d\\ude00-\\\\ud800"}'
    resp = httpx.post(f"{server.endpoint}/anvil/v1/buckets/{bucket}/uploads", content=raw.encode(), headers=headers)
    assert resp.status_code == 201, resp.text
    assert resp.json()["key"] == "smile-\U0001F600-\\ud800"


# -- PersonalDB ----------------------------------------------------------------------------------


def test_pdb_batch_deeply_nested_json_is_invalid_argument(server, headers):
    # The batch route decoded its (larger) body itself, without the RecursionError guard: 500.
    group = _group(server, headers)
    resp = httpx.post(f"{server.endpoint}/anvil/v1/pdb/groups/{group['name']}/commits/batch",
                      content=b"[" * 100_000 + b"]" * 100_000, headers=headers, timeout=30)
    _error(resp)
    after = httpx.get(f"{server.endpoint}/anvil/v1/pdb/groups/{group['name']}", headers=headers).json()
    assert after["head_index"] == 0
    _no_tracebacks(server)


BIG = str(1 << 64)


def test_pdb_indexes_beyond_64_bits(server, headers):
    # A log or snapshot index over SQLite's integers raised OverflowError in the query: 500.
    group = _group(server, headers)
    name, head = group["name"], group["head_hash"]
    resp = httpx.post(f"{server.endpoint}/anvil/v1/pdb/projections", headers=headers,
                      json={"name": "hp-" + name[3:], "source": name, "spec": {"tables": [{"from": "notes"}]}})
    assert resp.status_code == 201, resp.text
    projection = resp.json()["name"]
    h = {"authorization": headers["authorization"]}
    _error(httpx.get(f"{server.endpoint}/anvil/v1/pdb/groups/{name}/log",
                     params={"after_index": BIG, "after_hash": head}, headers=h))
    _error(httpx.get(f"{server.endpoint}/anvil/v1/pdb/projections/{projection}/changes",
                     params={"after_index": BIG, "after_hash": head}, headers=h))
    _error(httpx.get(f"{server.endpoint}/anvil/v1/pdb/groups/{name}/snapshots/{BIG}/data", headers=h),
           404, "NotFound")
    _error(httpx.post(f"{server.endpoint}/anvil/v1/pdb/groups/{name}/commits", content=b"x",
                      headers={**h, "x-anvil-pdb-base-index": BIG, "x-anvil-pdb-base-hash": head}))
    # The largest index is still a question with an answer (not on the chain).
    ok = httpx.get(f"{server.endpoint}/anvil/v1/pdb/groups/{name}/log",
                   params={"after_index": str((1 << 63) - 1), "after_hash": head}, headers=h)
    assert ok.status_code == 200 and ok.json()["status"] == "snapshot_required", ok.text
    _no_tracebacks(server)


@pytest.mark.parametrize("sql", [
    "ATTACH DATABASE '{path}' AS e; CREATE TABLE e.t(id INTEGER PRIMARY KEY); CREATE TABLE t(id INTEGER PRIMARY KEY);",
    "CREATE TABLE t(id INTEGER PRIMARY KEY); VACUUM INTO '{path}';",
])
def test_pdb_schema_cannot_write_other_files(server, headers, tmp_path: Path, sql):
    # The schema ran in the server's SQLite as given: ATTACH (or VACUUM INTO) created or rewrote any
    # SQLite file the server may write.
    target = tmp_path / "outside.db"
    name = "hx-" + unique_bucket()[-10:]
    resp = httpx.post(server.endpoint + "/anvil/v1/pdb/groups", headers=headers,
                      json={"name": name, "schema": sql.format(path=target)})
    _error(resp, 400, "PersonalDbInvalidSchema")
    assert not target.exists()
    assert httpx.get(f"{server.endpoint}/anvil/v1/pdb/groups/{name}", headers=headers).status_code == 404
    # ... nor through a migration of an existing group.
    group = _group(server, headers)
    resp = httpx.post(f"{server.endpoint}/anvil/v1/pdb/groups/{group['name']}/migrations", headers=headers,
                      json={"sql": f"ATTACH '{target}' AS e; CREATE TABLE e.t(id INTEGER PRIMARY KEY);"})
    _error(resp, 400, "PersonalDbInvalidSchema")
    assert not target.exists()
    after = httpx.get(f"{server.endpoint}/anvil/v1/pdb/groups/{group['name']}", headers=headers).json()
    assert after["schema_version"] == 1 and after["head_index"] == 0


ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c;"


def test_pdb_schema_that_never_finishes_is_refused(server, headers):
    # Validation ran the SQL without a bound: the request never answered and a core stayed busy.
    name = "hl-" + unique_bucket()[-10:]
    start = time.monotonic()
    resp = httpx.post(server.endpoint + "/anvil/v1/pdb/groups", headers=headers, timeout=30,
                      json={"name": name, "schema": PDB_SCHEMA + ENDLESS})
    _error(resp, 400, "PersonalDbInvalidSchema")
    group = _group(server, headers)
    resp = httpx.post(f"{server.endpoint}/anvil/v1/pdb/groups/{group['name']}/migrations", headers=headers,
                      timeout=30, json={"sql": ENDLESS})
    _error(resp, 400, "PersonalDbInvalidSchema")
    assert time.monotonic() - start < 20
    assert httpx.get(f"{server.endpoint}/anvil/v1/pdb/groups/{name}", headers=headers).status_code == 404
    assert httpx.get(f"{server.endpoint}/anvil/v1/pdb/groups/{group['name']}",
                     headers=headers).json()["schema_version"] == 1


def test_pdb_schema_with_seed_rows_still_opens(server, headers):
    # The bound leaves room for real schemas, seed rows included.
    seed = ("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
            "SELECT x + 1 FROM c LIMIT 5000) INSERT INTO t SELECT x, 'seed' FROM c;")
    resp = httpx.post(server.endpoint + "/anvil/v1/pdb/groups", headers=headers,
                      json={"name": "hs-" + unique_bucket()[-10:], "schema": seed})
    assert resp.status_code == 201, resp.text
    assert json.loads(resp.text)["schema_version"] == 1


# -- tokens and cursors handed back by the client ---------------------------------------------------
# Each decoder took the token's JSON with json.loads: deep nesting raised RecursionError (no ValueError),
# a "\ud800" key failed in SQLite, {"o": Infinity} made int() raise OverflowError. All were 500s.


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize("token", [_b64(DEEP), _b64('{"k": "\\ud800"}')])
def test_tampered_listing_token(server, headers, bucket, token):
    resp = httpx.get(f"{server.endpoint}/anvil/v1/buckets/{bucket}/objects", params={"token": token},
                     headers=headers)
    _error(resp)
    _no_tracebacks(server)


@pytest.fixture(scope="module")
def indexed(server: AnvilServer, headers: dict[str, str]) -> str:
    """A bucket with a full-text index over json:/title of keys under docs/."""
    name = unique_bucket()
    assert httpx.put(f"{server.endpoint}/anvil/v1/buckets/{name}", json={}, headers=headers).status_code == 201
    resp = httpx.post(f"{server.endpoint}/anvil/v1/buckets/{name}/indexes", headers=headers, json={
        "name": "ix", "kind": "full-text", "selector": {"prefix": "docs/"},
        "fields": {"title": {"source": "json:/title", "type": "text"}}})
    assert resp.status_code == 201, resp.text
    return name


@pytest.mark.parametrize("token", [_b64(DEEP), _b64('{"o": Infinity, "f": "x"}')])
def test_tampered_index_page_token(server, headers, indexed, token):
    resp = httpx.post(f"{server.endpoint}/anvil/v1/buckets/{indexed}/indexes/ix/query", headers=headers,
                      json={"text": "x", "page_token": token})
    _error(resp)
    _no_tracebacks(server)


def test_object_with_unpaired_surrogate_does_not_stop_its_index(server, headers, indexed):
    # The body decoded to a lone surrogate that tantivy refused: the builder retried that batch for
    # ever, and nothing written to the bucket afterwards was ever searchable again.
    put = f"{server.endpoint}/anvil/v1/buckets/{indexed}/object"
    h = {**headers, "content-type": "application/json"}
    resp = httpx.put(put, params={"key": "docs/bad.json"}, content=b'{"title": "bad \\ud800 one"}', headers=h)
    assert resp.status_code == 200, resp.text  # the write itself is fine: it is the object's content
    resp = httpx.put(put, params={"key": "docs/good.json"}, content=b'{"title": "searchable"}', headers=h)
    cursor = resp.json()["cursor"]
    resp = httpx.post(f"{server.endpoint}/anvil/v1/buckets/{indexed}/indexes/ix/query", headers=headers, timeout=30,
                      json={"text": "searchable", "min_cursor": cursor, "wait_ms": 10_000})
    assert resp.status_code == 200, resp.text
    assert [h["key"] for h in resp.json()["hits"]] == ["docs/good.json"]
    status = httpx.get(f"{server.endpoint}/anvil/v1/buckets/{indexed}/indexes/ix", headers=headers).json()["status"]
    assert status["error"] is None
    assert {(d["key"], d["code"]) for d in status["diagnostics"]} == {("docs/bad.json", "index.json_invalid")}


# -- authz ------------------------------------------------------------------------------------------

AUTHZ_SCHEMA = """
definition user {}
definition document {
    relation viewer: user | user with allowlist
    permission view = viewer
}
caveat allowlist(allowed list<string>, name string) {
    name in allowed
}
"""


@pytest.fixture(scope="module")
def authz_tenant(server: AnvilServer, headers: dict[str, str]) -> None:
    resp = httpx.put(f"{server.endpoint}/anvil/v1/authz/schema", json={"schema": AUTHZ_SCHEMA}, headers=headers)
    assert resp.status_code == 200, resp.text
    resp = httpx.post(f"{server.endpoint}/anvil/v1/authz/relationships/write", headers=headers,
                      json={"updates": [{"operation": "touch", "relationship": "document:a#viewer@user:amy"},
                                        {"operation": "touch", "relationship": "document:b#viewer@user:amy"}]})
    assert resp.status_code == 200, resp.text


def _relationships(server: AnvilServer, headers: dict[str, str]) -> list[str]:
    resp = httpx.post(f"{server.endpoint}/anvil/v1/authz/relationships/read", headers=headers,
                      json={"filter": {"resource_type": "document"}})
    assert resp.status_code == 200, resp.text
    return [r["relationship"] for r in resp.json()["relationships"]]


@pytest.mark.parametrize("context", ['{"allowed": ' + "[" * 5000 + "]" * 5000 + "}", '{"name": "\\ud800"}'])
def test_caveat_context_in_relationship_text(server, headers, authz_tenant, context):
    # The caveat context inside the text form was decoded by its own raw_decode, unguarded.
    before = _relationships(server, headers)
    rel = f"document:c#viewer@user:bob[allowlist:{context}]"
    resp = httpx.post(f"{server.endpoint}/anvil/v1/authz/relationships/write", headers=headers,
                      json={"updates": [{"operation": "create", "relationship": rel}]})
    _error(resp)
    assert _relationships(server, headers) == before
    _no_tracebacks(server)


def test_tampered_relationship_cursor(server, headers, authz_tenant):
    url = f"{server.endpoint}/anvil/v1/authz/relationships/read"
    page = httpx.post(url, headers=headers, json={"filter": {"resource_type": "document"}, "limit": 1}).json()
    token = json.loads(base64.urlsafe_b64decode(page["cursor"] + "=" * (-len(page["cursor"]) % 4)))[0]
    forged = json.dumps([token, ["document", "a", "viewer", "user", "PLACE", ""]]).replace("PLACE", "\\ud800")
    for cursor in (_b64(DEEP), _b64(forged)):
        resp = httpx.post(url, headers=headers, json={"filter": {"resource_type": "document"}, "cursor": cursor})
        _error(resp)
    _no_tracebacks(server)


def test_consistency_query_nested_deeply(server, headers, authz_tenant):
    resp = httpx.get(f"{server.endpoint}/anvil/v1/authz/schema", headers=headers,
                     params={"consistency": '{"a": ' + "[" * 1500 + "]" * 1500 + "}"})
    _error(resp)
    _no_tracebacks(server)


@pytest.mark.parametrize("terms", [480, 3000])
def test_schema_with_deeply_chained_operators_is_refused(server, headers, terms):
    # `viewer + viewer + ...` nests one level per operator: ~500 made the parser's transformer (and,
    # below that, every expand of the written schema) recurse past the stack: 500 Internal.
    tenant = "hd-" + unique_bucket()[-8:]
    assert httpx.post(f"{server.endpoint}/anvil/v1/admin/tenants", json={"name": tenant},
                      headers=headers).status_code == 201
    schema = ("definition user {}\ndefinition doc {\n relation viewer: user\n permission view = "
              + " + ".join(["viewer"] * terms) + "\n}\n")
    resp = httpx.put(f"{server.endpoint}/anvil/v1/authz/schema", params={"tenant": tenant}, content=schema.encode(),
                     headers={**headers, "content-type": "text/plain"})
    assert "nests more than 100 operators deep" in _error(resp)["message"]
    resp = httpx.get(f"{server.endpoint}/anvil/v1/authz/schema", params={"tenant": tenant}, headers=headers)
    assert resp.status_code == 404, resp.text  # nothing was written
    _no_tracebacks(server)


# -- artefacts --------------------------------------------------------------------------------------


def test_git_upload_pack_with_a_body_that_is_not_gzip(server, headers, client, bucket, tmp_path):
    # zlib.error escaped the handler: 500 Internal.
    (tmp_path / "config.json").write_text("{}")
    pushed = client.push_model(bucket, "m1", tmp_path)
    url = f"{server.endpoint}/anvil/v1/buckets/{bucket}/artefacts/m1/{pushed.id}/git/git-upload-pack"
    resp = httpx.post(url, content=b"not gzip at all", headers={
        "authorization": headers["authorization"], "content-encoding": "gzip",
        "content-type": "application/x-git-upload-pack-request"})
    _error(resp)
    _no_tracebacks(server)


@pytest.mark.parametrize("tables", [
    [{"from": "notes", "to": "sqlite_master"}],
    [{"from": "notes", "to": "SQLite_x"}],
    [{"from": "notes", "to": "aa", "columns": {"id": "id"}}, {"from": "notes", "to": "AA"}],
    [{"from": "notes", "columns": {"id": "id", "body": "ID"}}],
])
def test_pdb_projection_names_sqlite_would_refuse(server, headers, tables):
    # SQLite reserves sqlite_* and compares names in any case. The projection was recorded, then its
    # file could not be built: 500, and the broken projection stayed (every rebuild of the group failed).
    group = _group(server, headers)
    name = "hq-" + group["name"][3:]
    resp = httpx.post(f"{server.endpoint}/anvil/v1/pdb/projections", headers=headers,
                      json={"name": name, "source": group["name"], "spec": {"tables": tables}})
    _error(resp)
    assert httpx.get(f"{server.endpoint}/anvil/v1/pdb/projections/{name}", headers=headers).status_code == 404
    _no_tracebacks(server)


# -- objects ----------------------------------------------------------------------------------------


def test_content_type_a_header_cannot_carry(server, headers, client, bucket):
    # A content type from a JSON body was stored as given; GET and HEAD of the object then failed to
    # encode it as a header (latin-1): 500 on every read, for good.
    client.put_object(bucket, "src", b"data")
    cyrillic = "t\u0435xt/plain"
    resp = httpx.post(f"{server.endpoint}/anvil/v1/buckets/{bucket}/copy", headers=headers, json={
        "key": "dst", "source_key": "src", "metadata_directive": "REPLACE", "content_type": cyrillic})
    _error(resp)
    resp = httpx.post(f"{server.endpoint}/anvil/v1/buckets/{bucket}/uploads", headers=headers,
                      json={"key": "up", "content_type": cyrillic})
    _error(resp)
    assert [o["key"] for o in client.list_objects(bucket).objects] == ["src"]
    assert client.list_uploads(bucket) == []
    # latin-1 is still what it was (a header may carry it).
    resp = httpx.post(f"{server.endpoint}/anvil/v1/buckets/{bucket}/copy", headers=headers, json={
        "key": "dst", "source_key": "src", "metadata_directive": "REPLACE", "content_type": "text/caf\u00e9"})
    assert resp.status_code == 200, resp.text
    _no_tracebacks(server)




def _commit(server: AnvilServer, headers: dict[str, str], group: str, data: bytes) -> httpx.Response:
    g = httpx.get(f"{server.endpoint}/anvil/v1/pdb/groups/{group}", headers=headers).json()
    return httpx.post(f"{server.endpoint}/anvil/v1/pdb/groups/{group}/commits", content=data, headers={
        "authorization": headers["authorization"], "x-anvil-pdb-base-index": str(g["head_index"]),
        "x-anvil-pdb-base-hash": g["head_hash"]})


def test_pdb_changeset_with_text_that_is_not_utf8(server, headers, tmp_path):
    # apsw raised UnicodeDecodeError (no apsw.Error) while the changeset was parsed: 500.
    group = _group(server, headers)["name"]
    good = local_changeset(tmp_path, schema=PDB_SCHEMA, sql="INSERT INTO notes(id, body) VALUES (1, 'hello')")
    assert b"hello" in good
    _error(_commit(server, headers, group, good.replace(b"hello", b"\xff\xfe\xfd\xfc\xfb")), 400,
           "PersonalDbInvalidChangeset")
    assert httpx.get(f"{server.endpoint}/anvil/v1/pdb/groups/{group}", headers=headers).json()["head_index"] == 0
    _no_tracebacks(server)


def test_pdb_changeset_whose_primary_key_is_not_the_schemas(server, headers, tmp_path):
    # The changeset flags both columns as the key: it was certified, then every projection of the
    # group failed on it (a lookup with two values for a one-column key) and stopped following.
    group = _group(server, headers)["name"]
    projection = "hk-" + group[3:]
    assert httpx.post(f"{server.endpoint}/anvil/v1/pdb/projections", headers=headers, json={
        "name": projection, "source": group, "spec": {"tables": [{"from": "notes"}]}}).status_code == 201
    good = local_changeset(tmp_path, schema=PDB_SCHEMA, sql="INSERT INTO notes(id, body) VALUES (1, 'hello')")
    header = b"T\x02\x01\x00notes\x00"  # table, 2 columns, PK flags (id), name
    assert header in good
    _error(_commit(server, headers, group, good.replace(header, b"T\x02\x01\x01notes\x00")), 400,
           "PersonalDbInvalidChangeset")
    resp = _commit(server, headers, group, good)
    assert resp.status_code == 201, resp.text
    url = f"{server.endpoint}/anvil/v1/pdb/projections/{projection}"
    deadline = time.monotonic() + 20
    while httpx.get(url, headers=headers).json()["source_index"] != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(url, headers=headers).json()["source_index"] == 1
    _no_tracebacks(server)
    assert "projection of" not in server.log()
