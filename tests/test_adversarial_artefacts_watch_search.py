"""Adversarial input to artefacts, watch streams and search through the public HTTP API, against one
real server: what a careless or malicious publisher, watcher or searcher sends is refused with a clear
4xx in the documented error format and changes nothing (regressions of an adversarial sweep)."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import httpx
import pytest

from anvil.client import AnvilClient
from tests.helpers import AnvilServer, unique_bucket

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def http(server: AnvilServer):
    with httpx.Client(base_url=server.endpoint, headers=server.auth_headers(), timeout=60) as c:
        yield c


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _head(client: AnvilClient) -> int:
    return client.health()["journal"]["seq"]


def _error(resp: httpx.Response, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["request_id"], err
    return err["message"]


def _manifest(name: str, comps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"format": "anvil.artefact", "schema": 1, "kind": "model", "name": name, "components": comps,
            "metadata": {}, **extra}


def _upload(http: httpx.Client, bucket: str, name: str, data: bytes) -> dict[str, Any]:
    r = http.put(f"/anvil/v1/buckets/{bucket}/artefacts/{name}/components/{_sha(data)}", content=data)
    assert r.status_code == 201, r.text
    return {"size": len(data), "sha256": _sha(data)}


def _push(http: httpx.Client, bucket: str, name: str, manifest: dict[str, Any]) -> httpx.Response:
    return http.post(f"/anvil/v1/buckets/{bucket}/artefacts/{name}", json={"manifest": manifest})


# ------------------------------------------------------------------ artefacts


def test_a_delta_cannot_take_another_artefacts_files_as_its_base(client: AnvilClient, http: httpx.Client) -> None:
    """Push and pull are granted per artefact name: a base of another name made that artefact's files
    this one's, readable by whoever may pull this name."""
    bucket = unique_bucket("adv")
    client.create_bucket(bucket)
    secret = _upload(http, bucket, "b", b"b's weights")
    mine = _upload(http, bucket, "a", b"a's config")
    other = _push(http, bucket, "b", _manifest("b", [{"path": "secret.bin", **secret}]))
    assert other.status_code == 201, other.text
    before = _head(client)
    r = _push(http, bucket, "a", _manifest("a", [{"path": "config.json", **mine}], base=other.json()["id"],
                                           removed=[]))
    assert "base artefact does not exist" in _error(r, 404, "NotFound")
    assert _head(client) == before
    assert http.get(f"/anvil/v1/buckets/{bucket}/artefacts/a").json()["artefacts"] == []


@pytest.mark.parametrize("paths, fragment", [
    (["x", "x/y"], "is a file"),
    (["Model.bin", "model.bin"], "differ only by case"),
    (["caf\u00e9.txt", "cafe\u0301.txt"], "Unicode normalisation"),
    (["a\nb"], "control characters"),
    (["C:/Windows/x.dll"], "':'"),
    (["x.txt:stream"], "':'"),
])
def test_component_paths_a_pull_cannot_write_are_refused(client: AnvilClient, http: httpx.Client,
                                                         paths: list[str], fragment: str) -> None:
    bucket = unique_bucket("adv")
    client.create_bucket(bucket)
    comp = _upload(http, bucket, "m", b"bytes")
    before = _head(client)
    r = _push(http, bucket, "m", _manifest("m", [{"path": p, **comp} for p in paths]))
    assert fragment in _error(r, 400, "InvalidArgument")
    assert _head(client) == before


def test_a_delta_cannot_put_a_file_under_a_file_of_its_base(client: AnvilClient, http: httpx.Client) -> None:
    bucket = unique_bucket("adv")
    client.create_bucket(bucket)
    comp = _upload(http, bucket, "m", b"bytes")
    base = _push(http, bucket, "m", _manifest("m", [{"path": "weights", **comp}]))
    assert base.status_code == 201, base.text
    before = _head(client)
    r = _push(http, bucket, "m", _manifest("m", [{"path": "WEIGHTS/extra", **comp}], base=base.json()["id"],
                                           removed=[]))
    assert "is a file" in _error(r, 400, "InvalidArgument")
    assert _head(client) == before


def test_manifest_schema_true_is_not_schema_1(client: AnvilClient, http: httpx.Client) -> None:
    bucket = unique_bucket("adv")
    client.create_bucket(bucket)
    comp = _upload(http, bucket, "m", b"bytes")
    r = _push(http, bucket, "m", {**_manifest("m", [{"path": "f", **comp}]), "schema": True})
    assert "schema 1" in _error(r, 400, "InvalidArgument")


@pytest.mark.parametrize("ref", ["refs/heads/has space", "../escape", "refs/heads/x\x7f", "main", "refs/heads/a..b"])
def test_source_refs_git_cannot_hold_are_refused(client: AnvilClient, http: httpx.Client, ref: str) -> None:
    """Such a ref was stored, and every `git clone` of the artefact then failed with a 500."""
    bucket = unique_bucket("adv")
    client.create_bucket(bucket)
    before = _head(client)
    r = _push(http, bucket, "src", _manifest("src", [], kind="source", refs={ref: "a" * 40}))
    assert "not a valid git ref name" in _error(r, 400, "InvalidArgument")
    assert _head(client) == before


def _safetensors(header: dict[str, Any] | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("blob, fragment", [
    # two names for the same bytes
    (_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   "v": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "overlap"),
    # a gap before the tensor, and bytes after it: room for a payload no index shows
    (_safetensors({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "gap"),
    (_safetensors({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 64), "cover 4 of"),
    # JSON true is not a dimension
    (_safetensors({"w": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, b"\0" * 8), "malformed"),
    # nested past the parser's stack: was a 500
    (_safetensors(b"[" * 100_000 + b"]" * 100_000, b""), "not valid JSON"),
], ids=["overlap", "gap", "trailing", "bool-dim", "deep-json"])
def test_lying_safetensors_headers_refuse_the_push(client: AnvilClient, http: httpx.Client, blob: bytes,
                                                  fragment: str) -> None:
    bucket = unique_bucket("adv")
    client.create_bucket(bucket)
    comp = _upload(http, bucket, "m", blob)
    before = _head(client)
    r = _push(http, bucket, "m", _manifest("m", [{"path": "model.safetensors", **comp}]))
    assert fragment in _error(r, 400, "InvalidArgument")
    assert _head(client) == before


# ------------------------------------------------------------------ watch


def test_a_consumer_of_an_absent_bucket_is_not_found_even_for_an_admin(client: AnvilClient,
                                                                         http: httpx.Client) -> None:
    """A watch of an absent bucket is NotFound; an admin could still create a consumer of one, which no
    `?consumer=` watch could then open."""
    before = _head(client)
    r = http.post("/anvil/v1/watch/consumers", json={"name": "ghost", "bucket": unique_bucket("absent")})
    _error(r, 404, "NotFound")
    assert _head(client) == before
    assert all(c["name"] != "ghost" for c in client.list_consumers())


# ------------------------------------------------------------------ search


VEC_DEF = {"name": "vec", "kind": "hybrid",
           "fields": {"title": {"source": "json:/title", "type": "text"},
                      "team": {"source": "metadata:team", "type": "keyword"},
                      "emb": {"source": "json:/emb", "type": "vector", "dimension": 3}}}


def test_vectors_beyond_float32_are_refused_in_queries_and_diagnosed_in_documents(
        client: AnvilClient, http: httpx.Client) -> None:
    """1e39 is finite as a double but inf as the float32 the index searches: such a query found nothing
    and such a document was silently never found."""
    bucket = unique_bucket("adv")
    client.create_bucket(bucket)
    client.create_index(bucket, VEC_DEF)
    ct = "application/json"
    client.put_object(bucket, "ok", json.dumps({"title": "fine", "emb": [1, 0, 0]}).encode(), content_type=ct)
    last = client.put_object(bucket, "huge", json.dumps({"title": "huge", "emb": [1e39, 0, 0]}).encode(),
                             content_type=ct)["cursor"]
    res = client.search(bucket, "vec", vector=[1, 0, 0], min_cursor=last, limit=10)
    assert [h["key"] for h in res["hits"]] == ["ok"]
    diags = client.get_index(bucket, "vec")["status"]["diagnostics"]
    assert {(d["key"], d["field"], d["code"]) for d in diags} == {("huge", "emb", "index.field_type")}
    for vector in ([1e39, 0, 0], [0, -3.5e38, 0]):
        r = http.post(f"/anvil/v1/buckets/{bucket}/indexes/vec/query", json={"vector": vector})
        assert "float32" in _error(r, 400, "InvalidArgument")


def test_json_nested_too_deeply_is_json_invalid_and_the_other_fields_stay(client: AnvilClient) -> None:
    """A body nested past the parser's stack failed the whole document (`index.body_unreadable`, every
    field lost); it is invalid JSON like any other, and the metadata field is still indexed."""
    bucket = unique_bucket("adv")
    client.create_bucket(bucket)
    client.create_index(bucket, VEC_DEF)
    deep = b'{"title": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    last = client.put_object(bucket, "deep", deep, content_type="application/json",
                             metadata={"team": "core"})["cursor"]
    res = client.search(bucket, "vec", filter={"field": "team", "op": "eq", "value": "core"}, min_cursor=last)
    assert [h["key"] for h in res["hits"]] == ["deep"]
    diags = client.get_index(bucket, "vec")["status"]["diagnostics"]
    assert {(d["key"], d["code"]) for d in diags} == {("deep", "index.json_invalid")}


def test_index_write_alone_cannot_define_an_index_that_shows_unreadable_objects(
        server: AnvilServer, client: AnvilClient) -> None:
    """A principal with index:write but no object:read defined a `public` full-text index over the
    bodies and read every object through it, even anonymously."""
    tenant = f"t{unique_bucket('x')[-8:]}"
    client.create_tenant(tenant)
    bucket = unique_bucket("adv")
    owner = client.create_app(tenant, "owner", scopes=[f"bucket:create|tenant:{tenant}", "bucket:*|bucket:*",
                                                       "object:*|bucket:*"])
    with server.client(client_id=owner["client_id"], client_secret=owner["client_secret"]) as oc:
        oc.create_bucket(bucket)
        oc.put_object(bucket, "secret/plan", b"top secret plans", content_type="text/plain")
    body_def = {"kind": "full-text", "fields": {"body": {"source": "body", "type": "text"}}}
    indexer = client.create_app(tenant, "indexer", scopes=[f"index:*|bucket:{bucket}",
                                                           f"object:read|bucket:{bucket}/pub/*"])
    with server.client(client_id=indexer["client_id"], client_secret=indexer["client_secret"]) as ic:
        h = ic._bearer()
        url = f"{server.endpoint}/anvil/v1/buckets/{bucket}/indexes"
        before = _head(client)
        for auth in ("public", "index_only"):
            r = httpx.post(url, json={**body_def, "name": f"leak-{auth.replace('_', '-')}", "authorization": auth},
                           headers=h)
            assert "object:read" in _error(r, 403, "PermissionDenied")
        assert _head(client) == before and ic.list_indexes(bucket) == []
        # Over what it may read, it may: and what is inherit_object may not be turned public.
        r = httpx.post(url, json={**body_def, "name": "pub", "authorization": "public",
                                  "selector": {"prefix": "pub/"}}, headers=h)
        assert r.status_code == 201, r.text
        r = httpx.post(url, json={**body_def, "name": "mine"}, headers=h)
        assert r.status_code == 201, r.text
        r = httpx.put(url + "/mine", json={**body_def, "authorization": "public"}, headers=h)
        _error(r, 403, "PermissionDenied")
        assert ic.get_index(bucket, "mine")["definition"]["authorization"] == "inherit_object"
