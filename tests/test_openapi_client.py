"""A client generated from the served OpenAPI document by a maintained generator, used against a real server.

`openapi-python-client` (PyPI) runs offline on the document fetched from the server; the generated
package is imported and makes real calls: token exchange, bucket creation, an object with user
metadata put and read back, listing, and a typed error.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from anvil.client import AnvilClient
from tests.helpers import AnvilServer, unique_bucket

GENERATOR = Path(sys.executable).parent / "openapi-python-client"


@pytest.fixture(scope="module")
def generated(server: AnvilServer, tmp_path_factory: pytest.TempPathFactory):
    if shutil.which(str(GENERATOR)) is None:
        pytest.fail(f"{GENERATOR} is missing: pip install -e '.[dev]'")
    work = tmp_path_factory.mktemp("generated")
    doc = httpx.get(server.endpoint + "/anvil/v1/openapi.json").json()
    (work / "openapi.json").write_text(json.dumps(doc))
    env = {**os.environ, "PATH": f"{GENERATOR.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [str(GENERATOR), "generate", "--path", str(work / "openapi.json"), "--meta", "none",
         "--output-path", str(work / "anvil_generated")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sys.path.insert(0, str(work))
    try:
        yield importlib.import_module("anvil_generated")
    finally:
        sys.path.remove(str(work))
        for name in [n for n in sys.modules if n == "anvil_generated" or n.startswith("anvil_generated.")]:
            del sys.modules[name]


def test_generated_client_makes_real_calls(server: AnvilServer, generated) -> None:
    from anvil_generated import AuthenticatedClient, Client
    from anvil_generated.api.buckets import create_bucket, get_bucket
    from anvil_generated.api.identity import token, whoami
    from anvil_generated.api.objects import get_object, list_objects, put_object
    from anvil_generated.models import (
        Bucket,
        BucketCreated,
        CreateBucketRequest,
        ErrorBody,
        ObjectList,
        ObjectWritten,
        Token,
        TokenRequest,
        WhoAmI,
    )
    from anvil_generated.types import File

    cred = server.admin_credentials()
    with Client(base_url=server.endpoint) as anonymous:
        tok = token.sync(client=anonymous, body=TokenRequest(client_id=cred["client_id"],
                                                             client_secret=cred["client_secret"]))
    assert isinstance(tok, Token) and tok.token_type.lower() == "bearer"
    client = AuthenticatedClient(base_url=server.endpoint, token=tok.access_token)

    me = whoami.sync(client=client)
    assert isinstance(me, WhoAmI) and me.admin and me.jti == tok.jti

    name = unique_bucket("gen")
    created = create_bucket.sync_detailed(name, client=client, body=CreateBucketRequest(versioning="Enabled"))
    assert created.status_code == 201 and isinstance(created.parsed, BucketCreated)
    assert created.parsed.name == name and created.parsed.versioning == "Enabled"
    got = get_bucket.sync(name, client=client)
    assert isinstance(got, Bucket) and got.versioning == "Enabled"

    # User metadata is a family of headers (x-anvil-meta-NAME): sent as the client's extra headers.
    with_meta = client.with_headers({"x-anvil-meta-colour": "blue%20green", "content-type": "text/plain"})
    written = put_object.sync(name, client=with_meta, key="docs/a.txt", body=File(payload=b"hello generated"))
    assert isinstance(written, ObjectWritten) and written.size == len(b"hello generated")

    read = get_object.sync_detailed(name, client=client, key="docs/a.txt")
    assert read.status_code == 200 and read.content == b"hello generated"
    assert read.headers["x-anvil-meta-colour"] == "blue%20green"
    assert read.headers["x-anvil-version-id"] == written.version_id
    assert read.headers["etag"].strip('"') == written.etag

    listing = list_objects.sync(name, client=client, prefix="docs/")
    assert isinstance(listing, ObjectList) and not listing.truncated
    assert [(o.key, o.size, o.metadata.to_dict()) for o in listing.objects] == [
        ("docs/a.txt", 15, {"colour": "blue green"})]

    missing = get_bucket.sync_detailed(unique_bucket("none"), client=client)
    assert missing.status_code == 404 and isinstance(missing.parsed, ErrorBody)
    assert missing.parsed.error.code == "NotFound" and missing.parsed.error.request_id == missing.headers[
        "x-request-id"]


def test_generated_client_calls_authz_indexes_and_personaldb(server: AnvilServer, client: AnvilClient,
                                                             generated) -> None:
    """One call in each area typed last: an authz check, an index search and a PersonalDB group, each
    answered as the generated model with named fields (set up through the SDK, read through the client)."""
    from anvil_generated import AuthenticatedClient, Client
    from anvil_generated.api.authz import check_permission
    from anvil_generated.api.identity import token
    from anvil_generated.api.indexes import query_index
    from anvil_generated.api.personaldb import pdb_get_group
    from anvil_generated.models import (
        CheckRequest,
        CheckResult,
        IndexQueryRequest,
        IndexResults,
        PdbGroup,
        TokenRequest,
    )

    cred = server.admin_credentials()
    with Client(base_url=server.endpoint) as anonymous:
        tok = token.sync(client=anonymous, body=TokenRequest(client_id=cred["client_id"],
                                                             client_secret=cred["client_secret"]))
    api = AuthenticatedClient(base_url=server.endpoint, token=tok.access_token)

    tenant = unique_bucket("gent")  # a tenant of its own: the schema is the tenant's
    client.create_tenant(tenant)
    client.authz_write_schema("definition user {}\ndefinition document {\n  relation viewer: user\n"
                              "  permission view = viewer\n}", tenant=tenant)
    client.authz_write(["document:spec#viewer@user:amy"], tenant=tenant)
    for subject, expected in (("user:amy", "has_permission"), ("user:bob", "no_permission")):
        res = check_permission.sync(client=api, body=CheckRequest(
            resource="document:spec", permission="view", subject=subject, tenant=tenant,
            consistency="fully_consistent"))
        assert isinstance(res, CheckResult) and res.permissionship == expected and res.checked_at.startswith("z1.")

    bucket = unique_bucket("genix")
    client.create_bucket(bucket)
    client.create_index(bucket, {"name": "docs", "kind": "full-text",
                                 "fields": {"title": {"source": "json:/title", "type": "text"}}})
    cursor = 0
    for key, title in (("a.json", "running dogs"), ("b.json", "sleeping cats")):
        cursor = client.put_object(bucket, key, json.dumps({"title": title}).encode(),
                                   content_type="application/json").cursor
    found = query_index.sync(bucket, "docs", client=api, body=IndexQueryRequest(text="dogs", min_cursor=cursor))
    assert isinstance(found, IndexResults) and found.count == 1 and found.cursor >= cursor
    assert [(h.key, h.fields["title"]) for h in found.hits] == [("a.json", "running dogs")]

    group = unique_bucket("gdb")
    client.pdb_create(group, "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT NOT NULL);")
    got = pdb_get_group.sync(group, client=api)
    assert isinstance(got, PdbGroup) and got.name == group and got.head_index == 0 and got.schema_version == 1
    assert got.head_hash == got.genesis and len(got.schemas) == 1
