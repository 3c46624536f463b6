"""Object access through relationships (docs/authz.md, "Object access") against a real server:
bucket bindings (API, SDK, CLI, errors), the object id encoding, enforcement over native and S3,
listings, watch and index search filtered per subject, the token exchange's `subject`, caveats
with request facts, and unbinding."""

from __future__ import annotations

import json

import pytest

from anvil.authz.binding import decode_key, encode_key, object_id
from anvil.client import AnvilAPIError, AnvilClient
from tests.helpers import AnvilServer, unique_bucket

SCHEMA = """
definition user {}

definition folder {
    relation parent: folder
    relation viewer: user
    permission view = viewer + parent->view
}

caveat ip_allowlist(client_ip ipaddress, allowed list<string>) {
    allowed.exists(cidr, client_ip.in_cidr(cidr))
}

caveat until_time(now timestamp, until timestamp) {
    now < until
}

definition document {
    relation folder: folder
    relation owner: user
    relation viewer: user | user with ip_allowlist | user with until_time
    permission view = viewer + owner + folder->view
    permission edit = owner
}
"""

BINDING = {"resource_type": "document", "read": "view", "write": "edit"}


@pytest.fixture(scope="module")
def admin(server: AnvilServer):
    with server.client() as c:
        c.authz_write_schema(SCHEMA)
        yield c


def _until(stream, last) -> list[dict]:
    """Events of a watch up to and including the first one `last` accepts."""
    out = []
    with stream:
        for ev in stream:
            out.append(ev)
            if last(ev):
                return out
    return out


@pytest.mark.parametrize("key", ["plain/report.pdf", "a b=c", "../etc/passwd", "é/ü 漢字.txt", "x|y+z", "=3D",
                                 "~!*'()"])
def test_object_id_encoding_is_reversible_and_in_spicedb_alphabet(key: str) -> None:
    enc = encode_key(key)
    assert decode_key(enc) == key
    assert all(c.isascii() and (c.isalnum() or c in "/_-.=") for c in enc), enc
    assert object_id("bkt", key) == f"bkt/{enc}"
    assert encode_key("plain/report.pdf") == "plain/report.pdf"
    assert encode_key("a b=c") == "a=20b=3Dc"


def test_binding_round_trip_errors_and_cli(admin: AnvilClient, server: AnvilServer) -> None:
    b = unique_bucket()
    admin.create_bucket(b)
    with pytest.raises(AnvilAPIError) as e:
        admin.authz_bucket_binding(b)
    assert e.value.code == "NotFound"
    res = admin.authz_bind_bucket(b, BINDING)
    assert res["binding"] == {**BINDING, "list": "view", "delete": "edit", "without_subject": "deny"}
    assert admin.authz_bucket_binding(b)["binding"]["list"] == "view"
    # Bad input: clear errors, nothing changed.
    for bad, needle in [({"resource_type": "folder", "read": "view", "write": "edit"}, "no permission or relation"),
                        ({"resource_type": "nodef", "read": "view", "write": "edit"}, "not a definition"),
                        ({"resource_type": "document", "read": "view"}, "'write'"),
                        ({**BINDING, "colour": "red"}, "unknown binding field"),
                        ({**BINDING, "without_subject": "maybe"}, "without_subject")]:
        with pytest.raises(AnvilAPIError) as e:
            admin.authz_bind_bucket(b, bad)
        assert e.value.code == "InvalidArgument" and needle in e.value.message, (bad, e.value.message)
    assert admin.authz_bucket_binding(b)["binding"]["write"] == "edit"
    # The schema cannot drop what a binding names.
    with pytest.raises(AnvilAPIError) as e:
        admin.authz_write_schema(SCHEMA.replace("    permission edit = owner\n", ""))
    assert e.value.code == "PreconditionFailed" and f"bucket {b}" in e.value.message and "edit" in e.value.message
    with pytest.raises(AnvilAPIError) as e:
        admin.authz_bind_bucket("no-such-bucket-zz", BINDING)
    assert e.value.code == "NotFound"
    # CLI
    out = server.cli("bucket", "binding", b, "--json")
    assert json.loads(out.stdout)["binding"]["read"] == "view"
    assert b"unbound" in server.cli("bucket", "unbind", b).stdout
    out = server.cli("bucket", "bind", b, "--resource-type", "document", "--read", "view", "--write", "edit",
                     "--list", "viewer")
    assert b"list=viewer" in out.stdout
    server.cli("bucket", "bind", b, "--resource-type", "document", "--read", "view", "--write", "edit",
               "--list", "viewer", "--artefact-type", "document", "--pull", "view", "--push", "edit")
    arte = json.loads(server.cli("bucket", "binding", b, "--json").stdout)["binding"]["artefacts"]
    assert arte["resource_type"] == "document" and arte["pull"] == "view" and arte["push"] == "edit"
    half = server.cli("bucket", "bind", b, "--resource-type", "document", "--read", "view", "--write", "edit",
                      "--pull", "view", check=False)
    assert half.returncode == 2 and b"go together" in half.stderr
    bad = server.cli("bucket", "bind", b, "--resource-type", "document", "--read", "nope", "--write", "edit",
                     check=False)
    assert bad.returncode != 0 and b"InvalidArgument" in bad.stderr + bad.stdout
    # Watch sees the binding events (kind authz.*).
    admin.authz_write(["folder:marker#viewer@user:marker"])
    kinds = [e["kind"] for e in _until(admin.watch(kinds="authz.*", after=0, heartbeat=1),
                                       lambda e: "folder:marker" in json.dumps(e.get("updates")))]
    assert "authz.binding.put" in kinds and "authz.binding.delete" in kinds
    assert any(e.get("binding", {}).get("list") == "viewer" for e in _until(
        admin.watch(kinds="authz.*", after=0, heartbeat=1), lambda e: "folder:marker" in json.dumps(e.get("updates"))))
    # A bucket deleted and made again starts unbound.
    admin.delete_bucket(b)
    admin.create_bucket(b)
    with pytest.raises(AnvilAPIError) as e:
        admin.authz_bucket_binding(b)
    assert e.value.code == "NotFound"


# ------------------------------------------------------------------ enforcement (must show)

TENANT = "objacme"
APP_SCOPES = ["object:*|bucket:*", "bucket:*|bucket:*", "bucket:*|tenant:objacme", "authz:*|tenant:objacme",
              "index:*|bucket:*"]
AMY_KEYS = ["amy/notes.json", "amy/plan.json", "amy/é café.json"]
BOB_KEYS = ["bob/diary.json"]
SHARED = ["shared/report.json", "shared/sub/deep.json"]  # bob sees them through folder arrows


def _doc(key: str) -> bytes:
    return json.dumps({"title": f"secret {key}", "body": "common words everywhere"}).encode()


@pytest.fixture(scope="module")
def world(admin: AnvilClient, server: AnvilServer):
    """Tenant objacme: an application (holding authz:act), its bucket of documents bound to
    relationships, and clients acting for amy and bob."""
    admin.create_tenant(TENANT)
    app = admin.create_app(TENANT, "docs-backend", scopes=APP_SCOPES)
    cid, secret = app["client_id"], app["client_secret"]
    svc = AnvilClient(server.endpoint, client_id=cid, client_secret=secret)
    svc.authz_write_schema(SCHEMA)
    b = unique_bucket("bound")
    svc.create_bucket(b)
    svc.create_index(b, {"name": "docs", "kind": "full-text", "selector": {"prefix": ""},
                         "fields": {"title": {"source": "json:/title", "type": "text"},
                                    "body": {"source": "json:/body", "type": "text"}}})
    for key in AMY_KEYS + BOB_KEYS + SHARED + ["vpn.json", "timed.json"]:
        cursor = svc.put_object(b, key, _doc(key), content_type="application/json")
    svc.authz_write([f"document:{object_id(b, k)}#owner@user:amy" for k in AMY_KEYS]
                    + [f"document:{object_id(b, k)}#owner@user:bob" for k in BOB_KEYS]
                    + ["folder:shared#viewer@user:bob", "folder:sub#parent@folder:shared",
                       f"document:{object_id(b, SHARED[0])}#folder@folder:shared",
                       f"document:{object_id(b, SHARED[1])}#folder@folder:sub",
                       f'document:{object_id(b, "vpn.json")}#viewer@user:amy'
                       '[ip_allowlist:{"allowed":["127.0.0.2/32"]}]',
                       f'document:{object_id(b, "timed.json")}#viewer@user:carl'
                       '[until_time:{"until":"2100-01-01T00:00:00Z"}]',
                       f'document:{object_id(b, "timed.json")}#viewer@user:dan'
                       '[until_time:{"until":"2000-01-01T00:00:00Z"}]'])
    svc.authz_bind_bucket(b, BINDING)
    amy = AnvilClient(server.endpoint, client_id=cid, client_secret=secret, subject="user:amy")
    bob = AnvilClient(server.endpoint, client_id=cid, client_secret=secret, subject="user:bob")
    head = admin.health()["journal"]["seq"]
    yield {"bucket": b, "svc": svc, "amy": amy, "bob": bob, "cid": cid, "secret": secret, "head": head,
           "cursor": cursor}
    for c in (svc, amy, bob):
        c.close()


def _code(fn) -> str:
    with pytest.raises(AnvilAPIError) as e:
        fn()
    return e.value.code


def _keys(c: AnvilClient, b: str, **kw) -> list[str]:
    return [o["key"] for o in c.iter_objects(b, **kw) if "key" in o]


def test_native_get_list_and_search_show_each_user_only_theirs(world) -> None:
    b, amy, bob, svc = world["bucket"], world["amy"], world["bob"], world["svc"]
    assert amy.whoami()["acting_for"] == "user:amy"
    for k in AMY_KEYS:
        assert amy.get_object(b, k) == _doc(k)
    for k in BOB_KEYS + SHARED:
        assert bob.get_object(b, k) == _doc(k)  # SHARED through folder and parent-folder arrows
        e = _code(lambda k=k: amy.get_object(b, k))
        assert e == "PermissionDenied"
    assert _code(lambda: bob.get_object(b, AMY_KEYS[0])) == "PermissionDenied"
    # The application itself acts for no subject: refused on a bound bucket.
    assert _code(lambda: svc.get_object(b, AMY_KEYS[0])) == "PermissionDenied"
    # Listings: only the keys the subject may list; paging by one still yields each exactly once.
    assert _keys(amy, b) == sorted(AMY_KEYS)
    assert _keys(amy, b, page_size=1) == sorted(AMY_KEYS)
    assert _keys(bob, b) == sorted(BOB_KEYS + SHARED)
    top = amy.list_objects(b, delimiter="/")
    assert top["common_prefixes"] == ["amy/"] and top["objects"] == []
    assert sorted(bob.list_objects(b, delimiter="/")["common_prefixes"]) == ["bob/", "shared/"]
    assert {v["key"] for v in amy.list_versions(b)["versions"]} == set(AMY_KEYS)
    # Search hits: only readable documents.
    hits = {h["key"] for h in amy.search(b, "docs", text="common", min_cursor=world["head"])["hits"]}
    assert hits == set(AMY_KEYS)
    hits = {h["key"] for h in bob.search(b, "docs", text="secret", min_cursor=world["head"])["hits"]}
    assert hits == set(BOB_KEYS + SHARED)
    # Writes need `edit` (owner): amy may overwrite hers, not bob's, nor create an unrelated key.
    amy.put_object(b, AMY_KEYS[0], _doc(AMY_KEYS[0]), content_type="application/json")
    assert _code(lambda: amy.put_object(b, BOB_KEYS[0], b"x")) == "PermissionDenied"
    assert _code(lambda: amy.put_object(b, "amy/new.json", b"x")) == "PermissionDenied"
    assert _code(lambda: amy.delete_object(b, BOB_KEYS[0])) == "PermissionDenied"
    assert _code(lambda: amy.copy_object(b, "amy/copy.json", source_key=BOB_KEYS[0])) == "PermissionDenied"
    assert _code(lambda: bob.get_object(b, AMY_KEYS[0])) == "PermissionDenied"


def test_caveated_relationship_allows_only_from_the_allowed_address(world, server: AnvilServer) -> None:
    import httpx

    from anvil.client import exchange_token

    b = world["bucket"]
    token = exchange_token(server.endpoint, world["cid"], world["secret"], subject="user:amy")["access_token"]
    url = f"{server.endpoint}/anvil/v1/buckets/{b}/object"
    headers = {"authorization": f"Bearer {token}"}
    # From 127.0.0.1 (the default source address): the allow-list (127.0.0.2/32) refuses.
    r = httpx.get(url, params={"key": "vpn.json"}, headers=headers)
    assert r.status_code == 403 and r.json()["error"]["code"] == "PermissionDenied"
    # From 127.0.0.2: allowed.
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as c:
        r = c.get(url, params={"key": "vpn.json"}, headers=headers)
        assert r.status_code == 200 and r.content == _doc("vpn.json")
        listed = c.get(f"{server.endpoint}/anvil/v1/buckets/{b}/objects", headers=headers).json()
        assert "vpn.json" in [o["key"] for o in listed["objects"]]
    assert "vpn.json" not in _keys(world["amy"], b)


def test_time_window_caveat_gets_the_server_clock_as_now(world, server: AnvilServer) -> None:
    b = world["bucket"]
    with AnvilClient(server.endpoint, client_id=world["cid"], client_secret=world["secret"],
                     subject="user:carl") as carl, \
            AnvilClient(server.endpoint, client_id=world["cid"], client_secret=world["secret"],
                        subject="user:dan") as dan:
        assert carl.get_object(b, "timed.json") == _doc("timed.json")
        assert _keys(carl, b) == ["timed.json"]
        assert _code(lambda: dan.get_object(b, "timed.json")) == "PermissionDenied"
        assert _keys(dan, b) == []


def test_s3_get_list_and_writes_use_the_session_token_subject(world, server: AnvilServer) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    from anvil.client import exchange_token

    b = world["bucket"]

    def s3_for(subject: str):
        tok = exchange_token(server.endpoint, world["cid"], world["secret"], subject=subject)["access_token"]
        return boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                            aws_access_key_id=world["cid"], aws_secret_access_key=world["secret"],
                            aws_session_token=tok,
                            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1, "mode": "standard"}))

    amy, bob = s3_for("user:amy"), s3_for("user:bob")

    def denied(fn) -> None:
        with pytest.raises(ClientError) as e:
            fn()
        assert e.value.response["Error"]["Code"] in ("AccessDenied", "403"), e.value.response

    assert amy.get_object(Bucket=b, Key=AMY_KEYS[2])["Body"].read() == _doc(AMY_KEYS[2])
    assert amy.head_object(Bucket=b, Key=AMY_KEYS[0])["ContentLength"] == len(_doc(AMY_KEYS[0]))
    denied(lambda: amy.get_object(Bucket=b, Key=BOB_KEYS[0]))
    denied(lambda: amy.head_object(Bucket=b, Key=SHARED[0]))
    assert bob.get_object(Bucket=b, Key=SHARED[1])["Body"].read() == _doc(SHARED[1])
    denied(lambda: bob.get_object(Bucket=b, Key=AMY_KEYS[0]))
    assert sorted(o["Key"] for o in amy.list_objects_v2(Bucket=b)["Contents"]) == sorted(AMY_KEYS)
    assert sorted(o["Key"] for o in bob.list_objects(Bucket=b)["Contents"]) == sorted(BOB_KEYS + SHARED)
    pages = amy.get_paginator("list_objects_v2").paginate(Bucket=b, PaginationConfig={"PageSize": 1})
    assert sorted(o["Key"] for p in pages for o in p.get("Contents", [])) == sorted(AMY_KEYS)
    assert {v["Key"] for v in amy.list_object_versions(Bucket=b).get("Versions", [])} == set(AMY_KEYS)
    assert [p["Prefix"] for p in amy.list_objects_v2(Bucket=b, Delimiter="/")["CommonPrefixes"]] == ["amy/"]
    denied(lambda: amy.put_object(Bucket=b, Key=BOB_KEYS[0], Body=b"x"))
    denied(lambda: amy.delete_object(Bucket=b, Key=BOB_KEYS[0]))
    denied(lambda: amy.copy_object(Bucket=b, Key=AMY_KEYS[0], CopySource={"Bucket": b, "Key": BOB_KEYS[0]}))
    denied(lambda: amy.create_multipart_upload(Bucket=b, Key=BOB_KEYS[0]))
    amy.put_object(Bucket=b, Key=AMY_KEYS[1], Body=_doc(AMY_KEYS[1]), ContentType="application/json")
    # Presigned URLs carry the session token in the query: the subject decides there too.
    import httpx

    assert httpx.get(amy.generate_presigned_url("get_object", Params={"Bucket": b, "Key": AMY_KEYS[0]})
                     ).status_code == 200
    assert httpx.get(amy.generate_presigned_url("get_object", Params={"Bucket": b, "Key": BOB_KEYS[0]})
                     ).status_code == 403
    # A session token of another application (or a forged one) is refused.
    with pytest.raises(ClientError) as e:
        boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                     aws_access_key_id=world["cid"], aws_secret_access_key=world["secret"],
                     aws_session_token="not-a-token",
                     config=Config(signature_version="s3v4", s3={"addressing_style": "path"})
                     ).get_object(Bucket=b, Key=AMY_KEYS[0])
    assert e.value.response["Error"]["Code"] == "InvalidToken"


def test_watch_events_are_filtered_per_subject(world) -> None:
    b, amy, bob, svc = world["bucket"], world["amy"], world["bob"], world["svc"]
    start = svc.health()["journal"]["seq"]
    bob.put_object(b, BOB_KEYS[0], _doc(BOB_KEYS[0]), content_type="application/json")
    bob.put_object(b, BOB_KEYS[0], _doc(BOB_KEYS[0]), content_type="application/json")
    amy.put_object(b, AMY_KEYS[1], _doc(AMY_KEYS[1]), content_type="application/json")
    seen = _until(amy.watch(b, after=start, heartbeat=1), lambda e: e.get("key") == AMY_KEYS[1])
    assert [e["key"] for e in seen] == [AMY_KEYS[1]]
    seen = _until(bob.watch(b, after=start, heartbeat=1), lambda e: e.get("key") == BOB_KEYS[0])
    assert seen and all(e["key"] == BOB_KEYS[0] for e in seen)


def test_token_exchange_subject_needs_the_scope_and_valid_text(world, admin: AnvilClient,
                                                               server: AnvilServer) -> None:
    from anvil.client import exchange_token

    plain = admin.create_app(TENANT, "no-act", scopes=["object:*|bucket:*", "authz:read|tenant:objacme"])
    with pytest.raises(AnvilAPIError) as e:
        exchange_token(server.endpoint, plain["client_id"], plain["client_secret"], subject="user:amy")
    assert e.value.code == "PermissionDenied" and "authz:act" in e.value.message
    for bad in ["amy", "user:*", "user:amy#member", "User:amy", "user:a b", ""]:
        with pytest.raises(AnvilAPIError) as e:
            exchange_token(server.endpoint, world["cid"], world["secret"], subject=bad)
        assert e.value.code == "InvalidArgument" and "subject" in e.value.message, bad
    # Without subject the exchange is as before.
    assert "subject" not in exchange_token(server.endpoint, plain["client_id"], plain["client_secret"])
    out = server.cli("auth", "token", "--subject", "user:bob", "--client-id", world["cid"], "--client-secret",
                     world["secret"], "--json")
    assert json.loads(out.stdout)["subject"] == "user:bob"


def test_unbinding_restores_scope_behaviour(world) -> None:
    b, amy, svc = world["bucket"], world["amy"], world["svc"]
    assert _code(lambda: amy.get_object(b, BOB_KEYS[0])) == "PermissionDenied"
    svc.authz_unbind_bucket(b)
    try:
        assert amy.get_object(b, BOB_KEYS[0]) == _doc(BOB_KEYS[0])  # its scopes allow it again
        assert svc.get_object(b, AMY_KEYS[0]) == _doc(AMY_KEYS[0])
        assert set(_keys(amy, b)) >= set(AMY_KEYS + BOB_KEYS + SHARED)
    finally:
        svc.authz_bind_bucket(b, BINDING)
    assert _code(lambda: amy.get_object(b, BOB_KEYS[0])) == "PermissionDenied"


def test_per_key_listing_shows_a_common_prefix_only_over_an_allowed_key():
    """The per-key fallback (a lookup too large to hold) must not leak the names of folders whose
    keys the subject may not see."""
    from anvil.api.access import CheckedKeys

    keys = {"a/1": False, "a/2": False, "b/1": False, "b/2": True}
    walked: list[str] = []

    def under(prefix: str):
        for k in sorted(keys):
            if k.startswith(prefix):
                walked.append(k)
                yield k

    kf = CheckedKeys(lambda k: keys[k], under)
    assert not kf.any_under("a/")
    assert kf.any_under("b/")
    assert kf.allows("b/2") and not kf.allows("b/1")
    assert walked == ["a/1", "a/2", "b/1", "b/2"]  # stops at the first allowed key
