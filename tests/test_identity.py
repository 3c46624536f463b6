"""Identity end to end on a real server: tokens, scopes, tenant isolation, escalation, public buckets, audit."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
import uuid

import httpx
import jwt
import pytest

from anvil.client import AnvilAPIError, AnvilClient, exchange_token
from tests.helpers import AnvilServer, unique_bucket

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines

FULL_TENANT = ["bucket:create|tenant:{t}", "bucket:list|tenant:{t}", "bucket:*|bucket:*", "object:*|bucket:*"]


def new_tenant(admin: AnvilClient, prefix: str = "t") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin.create_tenant(name)
    return name


def new_app(admin: AnvilClient, tenant: str, scopes: list[str]) -> dict:
    return admin.create_app(tenant, f"app-{uuid.uuid4().hex[:6]}", scopes=[s.format(t=tenant) for s in scopes])


def app_client(server: AnvilServer, app: dict) -> AnvilClient:
    return server.client(client_id=app["client_id"], client_secret=app["client_secret"])


def head(client: AnvilClient) -> int:
    return client.health()["journal"]["seq"]


def api_error(fn, *args, **kwargs) -> AnvilAPIError:
    with pytest.raises(AnvilAPIError) as e:
        fn(*args, **kwargs)
    return e.value


@pytest.fixture(scope="module")
def admin(server: AnvilServer):
    with server.client() as c:
        yield c


def test_bootstrap_credential_is_private_and_admin(server: AnvilServer, admin: AnvilClient) -> None:
    path = server.storage_path / "bootstrap" / "first-admin.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cred = json.loads(path.read_text())
    assert cred["tenant"] == "system" and cred["endpoint"].startswith("http://127.0.0.1:")
    me = admin.whoami()
    jti, expires_at = me.pop("jti"), me.pop("expires_at")  # what `anvil admin token revoke` takes
    assert me == {"tenant": "system", "subject": cred["client_id"], "admin": True, "scopes": ["*"]}
    assert len(jti) == 32 and expires_at > time.time()
    assert "system" in [t["tenant"] for t in admin.list_tenants()]


def test_token_exchange_claims(server: AnvilServer, admin: AnvilClient) -> None:
    tenant = new_tenant(admin)
    app = new_app(admin, tenant, ["object:read|bucket:*"])
    res = exchange_token(server.endpoint, app["client_id"], app["client_secret"])
    assert res["token_type"] == "Bearer" and res["tenant"] == tenant and res["scopes"] == ["object:read|bucket:*"]
    claims = jwt.decode(res["access_token"], options={"verify_signature": False})
    assert claims["tenant"] == tenant and claims["sub"] == app["client_id"]
    assert claims["exp"] - claims["iat"] in (900, 901) and len(claims["jti"]) == 32
    assert jwt.get_unverified_header(res["access_token"])["alg"] == "HS256"
    with AnvilClient(server.endpoint, token=res["access_token"]) as c:
        assert c.whoami()["tenant"] == tenant


def test_wrong_secret_and_unknown_app_look_the_same(server: AnvilServer, admin: AnvilClient) -> None:
    tenant = new_tenant(admin)
    app = new_app(admin, tenant, ["object:read|bucket:*"])
    before = head(admin)
    wrong = api_error(exchange_token, server.endpoint, app["client_id"], "not-the-secret")
    unknown = api_error(exchange_token, server.endpoint, "ANAAAAAAAAAAAAAAAAAA", app["client_secret"])
    assert (wrong.status, wrong.code, wrong.message) == (401, "Unauthenticated", "invalid client credentials")
    assert (unknown.status, unknown.code, unknown.message) == (wrong.status, wrong.code, wrong.message)
    bad = api_error(exchange_token, server.endpoint, app["client_id"], app["client_secret"], expires_in=99999)
    assert bad.code == "InvalidArgument"
    assert head(admin) == before
    paths = [e["path"] for e in admin.audit(limit=50) if e["code"] == "Unauthenticated"]
    assert "/anvil/v1/auth/token" in paths


def test_expired_token_and_replay(server: AnvilServer, admin: AnvilClient) -> None:
    tenant = new_tenant(admin)
    app = new_app(admin, tenant, FULL_TENANT)
    # exp is whole seconds rounded up: a 2 s token is valid for at least 2 s and less than 3 s.
    res = exchange_token(server.endpoint, app["client_id"], app["client_secret"], expires_in=2)
    assert res["expires_in"] == 2
    hdr = {"authorization": f"Bearer {res['access_token']}"}
    assert httpx.get(server.endpoint + "/anvil/v1/buckets", headers=hdr).status_code == 200
    time.sleep(3.1)
    before = head(admin)
    for _ in range(2):
        r = httpx.put(server.endpoint + f"/anvil/v1/buckets/{unique_bucket()}", headers=hdr, json={})
        assert r.status_code == 401 and r.json()["error"]["message"] == "token expired"
    assert head(admin) == before
    # The SDK refreshes by itself.
    with app_client(server, app) as c:
        c.create_bucket(unique_bucket())


def _forge(server: AnvilServer, claims: dict, alg: str, key: bytes | None) -> str:
    return jwt.encode(claims, key, algorithm=alg)


def test_tampered_none_and_wrong_algorithm_tokens(server: AnvilServer, admin: AnvilClient) -> None:
    tenant = new_tenant(admin)
    app = new_app(admin, tenant, ["object:read|bucket:*"])
    res = exchange_token(server.endpoint, app["client_id"], app["client_secret"])
    claims = jwt.decode(res["access_token"], options={"verify_signature": False})
    escalated = {**claims, "tenant": "system", "scopes": ["*"]}
    secret = (server.storage_path / "secrets" / "jwt_secret").read_bytes().strip()
    h, _, sig = res["access_token"].split(".")
    body = base64.urlsafe_b64encode(json.dumps(escalated).encode()).rstrip(b"=").decode()
    tokens = {
        "tampered": f"{h}.{body}.{sig}",
        "alg none": jwt.encode(escalated, None, algorithm="none"),
        "HS512 with the real secret": jwt.encode(escalated, secret, algorithm="HS512"),
        "HS256 with another secret": jwt.encode(escalated, os.urandom(32), algorithm="HS256"),
        "garbage": "not.a.jwt",
        "oversized": res["access_token"] + "A" * 9000,
    }
    before = head(admin)
    for what, tok in tokens.items():
        r = httpx.put(server.endpoint + f"/anvil/v1/buckets/{unique_bucket()}",
                      headers={"authorization": f"Bearer {tok}"}, json={})
        assert r.status_code == 401, what
        assert r.json()["error"]["code"] == "Unauthenticated", what
    r = httpx.get(server.endpoint + "/anvil/v1/buckets", headers={"authorization": "Basic abc"})
    assert r.status_code == 401
    assert head(admin) == before


def test_scope_intersection(server: AnvilServer, admin: AnvilClient) -> None:
    tenant = new_tenant(admin)
    granted = ["object:read|bucket:docs/*", "object:write|bucket:uploads/*"]
    app = new_app(admin, tenant, granted)
    ex = lambda scopes: exchange_token(server.endpoint, app["client_id"], app["client_secret"], scopes=scopes)  # noqa: E731
    assert ex(None)["scopes"] == granted
    assert ex(["*"])["scopes"] == granted
    assert ex(["object:*|bucket:*"])["scopes"] == granted
    assert ex(["object:read|bucket:docs/a/*"])["scopes"] == ["object:read|bucket:docs/a/*"]
    assert api_error(ex, ["object:delete|bucket:docs/*"]).code == "PermissionDenied"
    assert api_error(ex, ["object:read"]).code == "InvalidTokenScope"
    empty = new_app(admin, tenant, [])
    e = api_error(exchange_token, server.endpoint, empty["client_id"], empty["client_secret"])
    assert (e.status, e.code) == (403, "PermissionDenied")


def test_wildcard_envelopes(server: AnvilServer, admin: AnvilClient) -> None:
    tenant = new_tenant(admin)
    owner = new_app(admin, tenant, FULL_TENANT)
    b = unique_bucket()
    with app_client(server, owner) as oc:
        oc.create_bucket(b)
        oc.put_object(b, "documents/a.txt", b"doc")
        oc.put_object(b, "private/a.txt", b"secret")
    scoped = new_app(admin, tenant, [f"object:read|bucket:{b}/documents/*",
                                     f"object:write|bucket:{b}/uploads/tenants/acme/*"])
    with app_client(server, scoped) as c:
        assert c.get_object(b, "documents/a.txt") == b"doc"
        assert api_error(c.get_object, b, "private/a.txt").code == "PermissionDenied"
        c.put_object(b, "uploads/tenants/acme/f", b"ok")
        assert api_error(c.put_object, b, "uploads/tenants/other/f", b"no").code == "PermissionDenied"
        assert api_error(c.delete_object, b, "documents/a.txt").code == "PermissionDenied"
        assert api_error(c.list_objects, b).code == "PermissionDenied"


def _same_as_missing(err: AnvilAPIError, missing: AnvilAPIError, name: str) -> None:
    assert (err.status, err.code, err.message) == (missing.status, missing.code, missing.message)
    assert name not in err.message


def test_cross_tenant_isolation_on_every_object_route(server: AnvilServer, admin: AnvilClient) -> None:
    ta, tb = new_tenant(admin, "a"), new_tenant(admin, "b")
    a, b = new_app(admin, ta, FULL_TENANT), new_app(admin, tb, FULL_TENANT)
    secret_bucket = unique_bucket("sec")
    missing = unique_bucket("nope")
    with app_client(server, a) as ac, app_client(server, b) as bc:
        ac.create_bucket(secret_bucket)
        ac.put_object(secret_bucket, "k", b"tenant a data")
        up = ac.create_upload(secret_bucket, "mp")
        own = unique_bucket("own")
        bc.create_bucket(own)
        bc.put_object(own, "src", b"b data")
        before = head(admin)
        assert secret_bucket not in [x["name"] for x in bc.list_buckets()]
        assert own in [x["name"] for x in bc.list_buckets()]
        routes = {
            "get_bucket": lambda n: bc.get_bucket(n),
            "delete_bucket": lambda n: bc.delete_bucket(n),
            "versioning": lambda n: bc.set_versioning(n, "Enabled"),
            "list_objects": lambda n: bc.list_objects(n),
            "list_versions": lambda n: bc.list_versions(n),
            "put_object": lambda n: bc.put_object(n, "k", b"overwrite"),
            "get_object": lambda n: bc.get_object(n, "k"),
            "delete_object": lambda n: bc.delete_object(n, "k"),
            "copy_from": lambda n: bc.copy_object(own, "stolen", source_bucket=n, source_key="k"),
            "copy_into": lambda n: bc.copy_object(n, "planted", source_bucket=own, source_key="src"),
            "create_upload": lambda n: bc.create_upload(n, "x"),
            "list_uploads": lambda n: bc.list_uploads(n),
            "public_access": lambda n: bc.set_public_access(n, True),
        }
        for what, call in routes.items():
            err, miss = api_error(call, secret_bucket), api_error(call, missing)
            assert err.status == 404, what
            _same_as_missing(err, miss, secret_bucket)
        # HEAD carries no body: status and error code must match a missing bucket's.
        e1, e2 = api_error(bc.head_object, secret_bucket, "k"), api_error(bc.head_object, missing, "k")
        assert (e1.status, e1.code) == (e2.status, e2.code) == (404, "NotFound")
        # Multipart by upload id: the id alone gives nothing away either.
        for call in (lambda: bc.upload_part(secret_bucket, up, 1, b"x"),
                     lambda: bc.list_parts(secret_bucket, up),
                     lambda: bc.complete_upload(secret_bucket, up, [(1, "x")]),
                     lambda: bc.abort_upload(secret_bucket, up)):
            assert api_error(call).status == 404
        assert head(admin) == before
        assert ac.get_object(secret_bucket, "k") == b"tenant a data"
        assert [u["upload_id"] for u in ac.list_uploads(secret_bucket)] == [up]
    denials = [e for e in admin.audit(limit=200) if e["actor"] == f"{tb}/{b['client_id']}"]
    assert any(e["code"] == "NotFound" for e in denials)


def test_escalation_attempts(server: AnvilServer, admin: AnvilClient) -> None:
    tenant, other = new_tenant(admin), new_tenant(admin)
    boss = new_app(admin, tenant, ["policy:grant|tenant:{t}", "policy:read|tenant:{t}", "app:read|tenant:{t}",
                                   "object:read|bucket:*"])
    worker = new_app(admin, tenant, [])
    outsider = new_app(admin, other, [])
    before = head(admin)
    with app_client(server, boss) as c:
        e = api_error(c.create_tenant, "evil")
        assert (e.status, e.code) == (403, "PermissionDenied")
        assert api_error(c.grant, worker["client_id"], ["object:write|bucket:*"]).code == "PermissionDenied"
        assert api_error(c.grant, worker["client_id"], ["*"]).code == "PermissionDenied"
        assert api_error(c.grant, worker["client_id"], [f"policy:grant|tenant:{other}"]).code == "PermissionDenied"
        assert api_error(c.grant, outsider["client_id"], ["object:read|bucket:*"]).code == "NotFound"
        assert api_error(c.create_app, tenant, "sneaky", scopes=["object:read|bucket:*"]).code == "PermissionDenied"
        assert api_error(c.list_tenants).code == "PermissionDenied"
        assert api_error(c.audit).code == "PermissionDenied"
        assert api_error(c.rotate_secret_key).code == "PermissionDenied"
        assert api_error(c.rotate_app_secret, outsider["client_id"]).code == "NotFound"
        assert api_error(c.policies, outsider["client_id"]).code == "NotFound"
        assert api_error(c.grant, worker["client_id"], ["bogus"]).code == "InvalidTokenScope"
        assert head(admin) == before
        # Within bounds it works: a narrower scope it holds, on its own tenant.
        res = c.grant(worker["client_id"], ["object:read|bucket:docs/*"])
        assert res["scopes"] == ["object:read|bucket:docs/*"]
        assert c.policies(worker["client_id"])["scopes"] == ["object:read|bucket:docs/*"]
        assert {a["tenant"] for a in c.list_apps()} == {tenant}
        assert api_error(c.list_apps, other).code == "PermissionDenied"
        c.revoke(worker["client_id"], ["object:read|bucket:docs/*"])
        assert c.policies(worker["client_id"])["scopes"] == []
    kinds = [ev["kind"] for ev in admin.journal(after=before, limit=100)]
    assert kinds == ["identity.policy.grant", "identity.policy.revoke"]
    actors = {ev["actor"] for ev in admin.journal(after=before, limit=100)}
    assert actors == {f"{tenant}/{boss['client_id']}"}


def test_unknown_tenants_and_apps(server: AnvilServer, admin: AnvilClient) -> None:
    before = head(admin)
    assert api_error(admin.create_app, "no-such-tenant", "x").code == "NotFound"
    assert api_error(admin.rotate_app_secret, "ANAAAAAAAAAAAAAAAAAA").code == "NotFound"
    assert api_error(admin.grant, "ANAAAAAAAAAAAAAAAAAA", ["object:read|bucket:*"]).code == "NotFound"
    assert api_error(admin.policies, "ANAAAAAAAAAAAAAAAAAA").code == "NotFound"
    assert api_error(admin.create_tenant, "Bad_Name").code == "InvalidArgument"
    assert api_error(admin.create_tenant, "system").code == "AlreadyExists"
    assert api_error(admin.create_app, "system", "bad name!").code == "InvalidArgument"
    assert head(admin) == before


def test_secret_rotation(server: AnvilServer, admin: AnvilClient) -> None:
    tenant = new_tenant(admin)
    app = new_app(admin, tenant, ["object:read|bucket:*"])
    rotated = admin.rotate_app_secret(app["client_id"])
    assert rotated["secret_version"] == 2 and rotated["client_secret"] != app["client_secret"]
    assert api_error(exchange_token, server.endpoint, app["client_id"], app["client_secret"]).code == "Unauthenticated"
    assert exchange_token(server.endpoint, app["client_id"], rotated["client_secret"])["tenant"] == tenant
    ev = admin.journal(after=head(admin) - 1, limit=1)[0]
    assert ev["kind"] == "identity.app.rotate" and ev["payload"]["client_id"] == app["client_id"]
    assert rotated["client_secret"] not in json.dumps(ev.to_dict())


def test_public_buckets(server: AnvilServer, admin: AnvilClient) -> None:
    tenant = new_tenant(admin)
    owner = new_app(admin, tenant, [*FULL_TENANT, "policy:grant|tenant:{t}"])
    plain = new_app(admin, tenant, FULL_TENANT)
    b = unique_bucket("pub")
    anon = httpx.Client(base_url=server.endpoint)
    url = f"/anvil/v1/buckets/{b}/object"
    with app_client(server, owner) as oc, app_client(server, plain) as pc:
        oc.create_bucket(b)
        oc.put_object(b, "hello.txt", b"hi")
        assert anon.get(url, params={"key": "hello.txt"}).status_code == 401
        assert api_error(pc.set_public_access, b, True).code == "PermissionDenied"
        oc.set_public_access(b, True)
        assert anon.get(url, params={"key": "hello.txt"}).content == b"hi"
        assert anon.head(url, params={"key": "hello.txt"}).status_code == 200
        assert anon.get(f"/anvil/v1/buckets/{b}/objects").json()["objects"][0]["key"] == "hello.txt"
        for method in ("PUT", "DELETE"):
            assert anon.request(method, url, params={"key": "hello.txt"}, content=b"x").status_code == 401
        assert anon.put(f"/anvil/v1/buckets/{b}/public-access", json={"public": False}).status_code == 401
        assert anon.get("/anvil/v1/buckets").status_code == 401
        # Another tenant's application may read a public bucket too, but never write it.
        other = new_app(admin, new_tenant(admin), FULL_TENANT)
        with app_client(server, other) as xc:
            assert xc.get_object(b, "hello.txt") == b"hi"
            assert api_error(xc.put_object, b, "hello.txt", b"no").status == 404
            assert b not in [x["name"] for x in xc.list_buckets()]
        admin.set_public_access(b, False)
        assert anon.get(url, params={"key": "hello.txt"}).status_code == 401
    anon.close()
    last = admin.journal(after=head(admin) - 1, limit=1)[0]
    assert (last["kind"], last["payload"]["public"], last["actor"]) == ("bucket.public", False, admin.whoami()["tenant"]
                                                                        + "/" + admin.client_id)


def test_audit_is_admin_only_and_bounded(server: AnvilServer, admin: AnvilClient) -> None:
    for _ in range(3):
        httpx.get(server.endpoint + "/anvil/v1/admin/journal")
    entries = admin.audit(limit=3)
    assert len(entries) == 3 and all(e["code"] == "Unauthenticated" for e in entries)
    assert all(e["path"] == "/anvil/v1/admin/journal" and e["request_id"] for e in entries)
    assert len(admin.audit(limit=5000)) <= 1000


def test_identity_routes_are_in_openapi(admin: AnvilClient) -> None:
    from anvil.api.identity import IDENTITY_ROUTES

    doc = admin._http.get("/anvil/v1/openapi.json").json()
    for route in IDENTITY_ROUTES:
        for method in route.methods - {"HEAD"}:
            assert method.lower() in doc["paths"][route.path], (method, route.path)
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_raw_http_helper_headers(server: AnvilServer) -> None:
    r = httpx.get(server.endpoint + "/anvil/v1/buckets", headers=server.auth_headers())
    assert r.status_code == 200
    assert httpx.get(server.endpoint + "/anvil/v1/buckets").status_code == 401
