"""The typed native API: one set of models validates bodies, describes the API and types the SDK.

- the served document is valid OpenAPI 3.1, lists `servers`, and every operation has tags, a
  success response with a schema (JSON model or declared binary/text), error responses with the
  error model, and a typed request body for the core areas;
- a malformed body keeps its error code and says which field is wrong;
- the response checker (tests/openapi_check.py) catches an answer that breaks the document;
- /anvil/v1/docs serves Swagger UI from the package, referring to nothing off the server;
- the SDK answers models that also read as the dicts it used to return, and the CLI's --json prints them.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from openapi_spec_validator import validate

from anvil import api_models as m
from anvil.api.openapi import REQUESTS, RESPONSES
from anvil.client import AnvilAPIError, AnvilClient
from tests.helpers import AnvilServer, unique_bucket
from tests.openapi_check import ResponseChecker

CORE_TAGS = {"buckets", "objects", "uploads", "identity", "watch", "backup", "journal", "health"}


@pytest.fixture(scope="module")
def doc(server: AnvilServer) -> dict:
    return httpx.get(server.endpoint + "/anvil/v1/openapi.json").json()


def _ops(doc: dict):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield path, method, op


def test_document_is_valid_and_typed(server: AnvilServer, doc: dict) -> None:
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    assert doc["servers"][0]["url"] == server.endpoint
    schemas = doc["components"]["schemas"]
    assert {"ErrorBody", "ObjectList", "Bucket", "ObjectWritten"} <= set(schemas)
    assert set(schemas["ErrorDetail"]["properties"]) == {"code", "message", "request_id"}
    ids = [op["operationId"] for _, _, op in _ops(doc)]
    assert len(ids) == len(set(ids)) and all(re.fullmatch(r"[a-z][A-Za-z0-9]+", i) for i in ids)
    for path, method, op in _ops(doc):
        where = f"{method.upper()} {path}"
        assert op["tags"] and op["tags"] != ["other"] or path.startswith("/anvil/v1/docs") or path.endswith(
            "openapi.json"), where
        success = [s for s in op["responses"] if s.startswith("2")]
        assert success, where
        for status in success:
            content = op["responses"][status]["content"]
            for media, body in content.items():
                assert "$ref" in body["schema"] or body["schema"]["type"] == "string" or "$ref" in body["schema"].get(
                    "items", {}), (where, media)
        assert op["responses"]["default"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorBody"}, where
        assert "x-request-id" in op["responses"][success[0]]["headers"], where
        if op["tags"][0] in CORE_TAGS:
            if "requestBody" in op and "application/json" in op["requestBody"]["content"]:
                assert "$ref" in op["requestBody"]["content"]["application/json"]["schema"], where
            json_ok = op["responses"][success[0]]["content"].get("application/json")
            if json_ok is not None:
                assert json_ok["schema"]["$ref"] != "#/components/schemas/Document", where
    ops = {op["operationId"]: op for _, _, op in _ops(doc)}
    get_object = ops["getObject"]["responses"]
    assert {"ETag", "x-anvil-version-id", "x-anvil-meta-*", "Content-Length"} <= set(get_object["200"]["headers"])
    assert "Content-Range" in get_object["206"]["headers"]
    assert "x-anvil-meta-" in ops["putObject"]["description"]
    assert "412" in ops["putObject"]["responses"] and "404" in ops["getBucket"]["responses"]
    assert {p["name"] for p in ops["listObjects"]["parameters"]} >= {"prefix", "delimiter", "token", "limit"}
    assert schemas["ObjectList"]["required"] == ["objects", "common_prefixes", "truncated", "next_token"]
    # Every model the server validates or answers with is a component the document names.
    assert {mdl.__name__ for mdl in [*REQUESTS.values(), *RESPONSES.values()]} <= set(schemas)


# Operations whose JSON request body deliberately names no field, with the reason.
UNTYPED_REQUESTS = {
    "pdbRotateKey": "rotating the witness key takes no parameter (a body, if sent, must be a JSON object)",
}
# Operations whose 2xx JSON answer deliberately names no field, with the reason (none today).
UNTYPED_RESPONSES: dict[str, str] = {}


def _named_fields(doc: dict, schema: dict) -> set[str]:
    """The field names a generated client gets from a body schema (a model, or an array of one)."""
    if schema.get("type") == "array":
        schema = schema["items"]
    if "$ref" not in schema:
        return set()
    return set(doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]].get("properties", {}))


def test_no_operation_has_a_generic_json_body(doc: dict) -> None:
    """Every JSON request body and every 2xx JSON answer is a model with named fields (not
    `additionalProperties` alone), but for the deliberate exceptions listed above."""
    generic_requests, generic_responses, counted = [], [], [0, 0]
    for path, method, op in _ops(doc):
        op_id = op["operationId"]
        body = op.get("requestBody", {}).get("content", {}).get("application/json")
        if body is not None:
            counted[0] += 1
            if not _named_fields(doc, body["schema"]) and op_id not in UNTYPED_REQUESTS:
                generic_requests.append(f"{method.upper()} {path} ({op_id})")
        for status, resp in op["responses"].items():
            json_ok = resp.get("content", {}).get("application/json") if status.startswith("2") else None
            if json_ok is not None:
                counted[1] += 1
                if not _named_fields(doc, json_ok["schema"]) and op_id not in UNTYPED_RESPONSES:
                    generic_responses.append(f"{method.upper()} {path} {status} ({op_id})")
    assert not generic_requests, f"request bodies without a model: {generic_requests}"
    assert not generic_responses, f"JSON answers without a model: {generic_responses}"
    assert counted[0] >= 44 and counted[1] >= 100, counted  # the document has not lost its bodies
    assert "Document" not in doc["components"]["schemas"]  # the placeholder model is gone
    ops = {op["operationId"] for _, _, op in _ops(doc)}
    assert set(UNTYPED_REQUESTS) | set(UNTYPED_RESPONSES) <= ops  # no stale exception
    # Answers keep `additionalProperties: true` (a newer server may add a field); nested ones are models too.
    schemas = doc["components"]["schemas"]
    for name in ("CheckResult", "IndexResults", "PdbGroup", "ArtefactDescription", "FsckReport", "Finding"):
        assert schemas[name]["additionalProperties"] is True, name
    assert schemas["IndexResults"]["properties"]["hits"]["items"] == {"$ref": "#/components/schemas/IndexHit"}
    assert schemas["BulkCheckResults"]["properties"]["results"]["items"] == {
        "$ref": "#/components/schemas/BulkCheckItem"}
    assert "permissionship" in schemas["BulkCheckItem"]["properties"]


def test_malformed_bodies_keep_their_code_and_name_the_field(client: AnvilClient, bucket: str) -> None:
    def error(method: str, path: str, body: object) -> dict:
        with pytest.raises(AnvilAPIError) as e:
            client._json(method, path, json=body)
        assert e.value.status == 400 and e.value.code == "InvalidArgument"
        return e.value

    up = client.create_upload(bucket, "k")
    err = error("POST", f"/anvil/v1/buckets/{bucket}/uploads/{up}/complete", {"parts": [{"part_number": 1,
                                                                                             "etag": 7}]})
    assert "parts[0].etag" in err.message
    err = error("POST", f"/anvil/v1/buckets/{bucket}/copy", {"source_key": "a"})
    assert err.message == "'key' is required"
    err = error("PUT", f"/anvil/v1/buckets/{bucket}/versioning", {"status": True})
    assert "'status'" in err.message
    err = error("POST", "/anvil/v1/admin/watch/compact", {"retention_seconds": -1})
    assert "retention_seconds" in err.message
    assert client.list_uploads(bucket)[0].upload_id == up  # nothing changed


def test_the_response_checker_catches_a_broken_answer(doc: dict) -> None:
    checker = ResponseChecker(doc)
    good = {"buckets": [{"name": "b", "tenant": "t", "created": 1.0, "versioning": "Enabled", "public": False}]}
    assert checker.check("GET", "/anvil/v1/buckets", 200, "application/json", json.dumps(good).encode()) == []
    bad = {"buckets": [{"name": "b", "tenant": "t", "created": "yesterday", "versioning": "Enabled"}]}
    problems = checker.check("GET", "/anvil/v1/buckets", 200, "application/json", json.dumps(bad).encode())
    assert any("buckets/0/created" in p for p in problems) and any("'public'" in p for p in problems)
    assert checker.check("PUT", "/anvil/v1/buckets/x", 418, "application/json", b"{}")
    err = {"error": {"code": "NotFound", "message": "bucket not found", "request_id": "r"}}
    assert checker.check("GET", "/anvil/v1/buckets/x", 404, "application/json", json.dumps(err).encode()) == []
    assert checker.check("GET", "/anvil/v1/buckets/x", 404, "application/json", b'{"error": "NotFound"}')
    # An object's bytes are opaque, whatever content type it was stored with.
    assert checker.check("GET", "/anvil/v1/buckets/x/object", 200, "application/json", b"[1]") == []


def test_docs_ui_is_served_from_the_package(server: AnvilServer) -> None:
    page = httpx.get(server.endpoint + "/anvil/v1/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = re.findall(r'(?:src|href|url)\s*[:=]\s*"([^"]+)"', page.text)
    assert refs and all(r.startswith("/anvil/v1/") for r in refs), refs
    assert "validatorUrl: null" in page.text  # no badge fetched from a public validator
    for ref in refs:
        asset = httpx.get(server.endpoint + ref)
        assert asset.status_code == 200 and asset.content, ref
    js = httpx.get(server.endpoint + "/anvil/v1/docs/swagger-ui-bundle.js")
    assert "SwaggerUIBundle" in js.text and js.headers["content-type"].startswith("text/javascript")
    assert "Apache License" in httpx.get(server.endpoint + "/anvil/v1/docs/LICENSE").text
    missing = httpx.get(server.endpoint + "/anvil/v1/docs/..%2Fdocs.py")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NotFound"


def test_sdk_answers_models_that_read_like_the_old_dicts(server: AnvilServer, client: AnvilClient) -> None:
    name = unique_bucket("typed")
    created = client.create_bucket(name, versioning="Enabled")
    assert isinstance(created, m.BucketCreated) and created.versioning == "Enabled"
    assert created["name"] == name and created.get("nope", 5) == 5 and "public" in created
    written = client.put_object(name, "a/b", b"hello", metadata={"k": "v é"})
    assert isinstance(written, m.ObjectWritten) and written.size == 5 and written["etag"] == written.etag
    head = client.head_object(name, "a/b")
    assert isinstance(head, m.ObjectHead) and head.metadata == {"k": "v é"} and head["version_id"] == written.version_id
    page = client.list_objects(name, prefix="a/")
    assert isinstance(page, m.ObjectList) and isinstance(page.objects[0], m.ObjectInfo)
    assert page["objects"][0]["metadata"] == {"k": "v é"} and page.next_token is None
    # Equal to the dict the server sent, and printed as that JSON.
    raw = client._http.get(f"/anvil/v1/buckets/{name}/objects", params={"prefix": "a/"}).json()
    assert page == raw and page.to_dict() == raw and dict(page) == {k: page[k] for k in raw}
    assert sorted(page) == sorted(raw)
    assert [b for b in client.list_buckets() if b.name == name][0] == client.get_bucket(name)
    assert isinstance(client.whoami(), m.WhoAmI)
    out = server.cli("bucket", "ls", "--json")
    assert name in [b["name"] for b in json.loads(out.stdout)]
