"""Hostile inputs to the native API beyond plain objects (PersonalDB, authz, identity, indexes...).

Each test is a request that once got a 500, hung, or reached outside its subsystem. A refused request
answers a 4xx in the documented error shape and changes nothing. One server for the module.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import AnvilServer, unique_bucket

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
