"""The authz routes, SDK and CLI against a real server: schema, relationships, questions,
consistency tokens, scopes, tenant isolation and watch streaming of `authz.*` events."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest

from anvil.client import AnvilAPIError, AnvilClient
from tests.helpers import AnvilServer

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines

SCHEMA = """
/** SpiceDB style, with a caveat */
definition user {}

definition group {
    relation member: user | group#member
}

definition folder {
    relation parent: folder
    relation viewer: user | group#member
    permission view = viewer + parent->view
}

caveat ip_allowlist(user_ip ipaddress, allowed list<string>) {
    allowed.exists(cidr, user_ip.in_cidr(cidr))
}

definition document {
    relation folder: folder
    relation viewer: user | user:* | user with ip_allowlist
    relation banned: user
    permission view = (viewer + folder->view) - banned
}
"""

RELS = [
    "group:eng#member@user:amy",
    "folder:root#viewer@group:eng#member",
    "folder:docs#parent@folder:root",
    "document:spec#folder@folder:docs",
    "document:memo#viewer@user:bob",
    'document:vpn#viewer@user:carl[ip_allowlist:{"allowed":["10.0.0.0/8"]}]',
    "document:public#viewer@user:*",
    "document:public#banned@user:mallory",
]


@pytest.fixture(scope="module")
def admin(server: AnvilServer):
    with server.client() as c:
        c.authz_write_schema(SCHEMA)
        c.authz_write(RELS, operation="touch")
        yield c


def _app(client: AnvilClient, server: AnvilServer, tenant: str, scopes: list[str]) -> AnvilClient:
    try:
        client.create_tenant(tenant)
    except AnvilAPIError as e:
        assert e.code == "AlreadyExists"
    app = client.create_app(tenant, f"app-{len(scopes)}", scopes=scopes)
    return AnvilClient(server.endpoint, client_id=app["client_id"], client_secret=app["client_secret"])


def test_schema_round_trip_and_errors(admin: AnvilClient, server: AnvilServer) -> None:
    assert admin.authz_read_schema()["schema"] == SCHEMA
    with pytest.raises(AnvilAPIError) as e:
        admin.authz_write_schema("definition user {}\ndefinition doc {\n  relation viewer: person\n}")
    assert e.value.status == 400 and e.value.code == "InvalidArgument"
    assert "line 3, column 20" in e.value.message and "unknown definition 'person'" in e.value.message
    # JSON bodies work too; a schema that would orphan relationships is refused with 412.
    r = httpx.put(server.endpoint + "/anvil/v1/authz/schema", headers=server.auth_headers(),
                  json={"schema": "definition user {}"})
    assert r.status_code == 412 and r.json()["error"]["code"] == "PreconditionFailed"
    assert admin.authz_read_schema()["schema"] == SCHEMA


def test_questions(admin: AnvilClient) -> None:
    check = lambda s, r="document:spec", **kw: admin.authz_check(r, "view", s, **kw)["permissionship"]  # noqa: E731
    assert check("user:amy") == "has_permission"
    assert check("user:bob") == "no_permission"
    assert check("user:bob", "document:memo") == "has_permission"
    res = admin.authz_check("document:vpn", "view", "user:carl")
    assert res["permissionship"] == "conditional" and res["missing_context"] == ["user_ip"]
    assert check("user:carl", "document:vpn", context={"user_ip": "10.2.3.4"}) == "has_permission"
    assert check("user:carl", "document:vpn", context={"user_ip": "11.2.3.4"}) == "no_permission"
    assert check("user:anyone", "document:public") == "has_permission"
    assert check("user:mallory", "document:public") == "no_permission"
    bulk = admin.authz_bulk_check([
        {"resource": "document:spec", "permission": "view", "subject": "user:amy"},
        {"resource": "document:vpn", "permission": "view", "subject": "user:carl", "context": {"user_ip": "10.0.0.1"}},
        {"resource": "document:spec", "permission": "view", "subject": "user:zed"},
    ])
    assert [r["permissionship"] for r in bulk["results"]] == ["has_permission", "has_permission", "no_permission"]
    found = admin.authz_lookup_resources("document", "view", "user:amy")["resources"]
    assert [r["resource_id"] for r in found] == ["public", "spec"]
    subjects = admin.authz_lookup_subjects("document:public", "view", "user")["subjects"]
    assert subjects == [{"subject": "user:*", "permissionship": "has_permission", "excluded": ["user:mallory"]}]
    tree = admin.authz_expand("document:spec", "view")["tree"]
    assert "group:eng#member" in json.dumps(tree.to_dict())
    with pytest.raises(AnvilAPIError) as e:
        admin.authz_check("document:spec", "edit", "user:amy")
    assert e.value.code == "InvalidArgument" and "no permission or relation 'edit'" in e.value.message
    with pytest.raises(AnvilAPIError) as e:
        admin.authz_check("document:vpn", "view", "user:carl", context={"user_ip": "localhost"})
    assert e.value.code == "InvalidArgument" and "user_ip" in e.value.message


def test_writes_tokens_and_bad_input(admin: AnvilClient) -> None:
    w = admin.authz_write(["document:tok#viewer@user:tina"], operation="create")
    d = admin.authz_write(["document:tok#viewer@user:tina"], operation="delete")
    exact = lambda t: admin.authz_check("document:tok", "view", "user:tina",  # noqa: E731
                                        consistency={"at_exact_snapshot": t})["permissionship"]
    assert exact(w["written_at"]) == "has_permission" and exact(d["written_at"]) == "no_permission"
    rev = int(d["written_at"].split(".")[1])
    future = d["written_at"].replace(f"z1.{rev}.", f"z1.{rev + 10_000}.")
    with pytest.raises(AnvilAPIError) as e:
        admin.authz_check("document:tok", "view", "user:tina", consistency={"at_least_as_fresh": future})
    assert e.value.status == 400 and "cannot be honoured" in e.value.message
    with pytest.raises(AnvilAPIError) as e:
        admin.authz_write(["document:tok#viewer@user:tina", "document:tok#viewr@user:tina"])
    assert e.value.code == "InvalidArgument" and e.value.message.startswith("updates[1]:")
    with pytest.raises(AnvilAPIError) as e:
        admin.authz_write(["document:tok#viewer@user:ok"], preconditions=[
            {"operation": "must_match", "filter": {"resource_type": "document", "resource_id": "tok"}}])
    assert e.value.status == 412
    assert list(admin.authz_iter({"resource_type": "document", "resource_id": "tok"})) == []
    with pytest.raises(AnvilAPIError) as e:
        admin.authz_write([f"document:many#viewer@user:u{i}" for i in range(1001)])
    assert "at most 1000" in e.value.message
    rows = list(admin.authz_iter({"resource_type": "document"}, page=2))
    assert len(rows) == 5 and rows == sorted(rows, key=lambda r: r["relationship"])
    gone = admin.authz_delete({"resource_type": "document", "resource_id": "memo"})
    assert gone["deleted"] == 1
    admin.authz_write(["document:memo#viewer@user:bob"])


def test_scopes_and_tenants(admin: AnvilClient, server: AnvilServer) -> None:
    writer = _app(admin, server, "authz-acme", ["authz:read|tenant:authz-acme", "authz:write|tenant:authz-acme"])
    reader = _app(admin, server, "authz-acme", ["authz:read|tenant:authz-acme"])
    other = _app(admin, server, "authz-other", ["authz:read|tenant:authz-other"])
    nothing = _app(admin, server, "authz-acme", ["bucket:list|tenant:authz-acme"])
    with writer, reader, other, nothing:
        writer.authz_write_schema(SCHEMA)
        writer.authz_write(["document:a#viewer@user:amy"])
        assert reader.authz_check("document:a", "view", "user:amy")["permissionship"] == "has_permission"
        with pytest.raises(AnvilAPIError) as e:
            reader.authz_write(["document:a#viewer@user:bob"])
        assert e.value.status == 403
        with pytest.raises(AnvilAPIError) as e:
            nothing.authz_check("document:a", "view", "user:amy")
        assert e.value.status == 403
        with pytest.raises(AnvilAPIError) as e:
            other.authz_check("document:a", "view", "user:amy", tenant="authz-acme")
        assert e.value.status == 403
        with pytest.raises(AnvilAPIError) as e:
            other.authz_check("document:a", "view", "user:amy")
        assert e.value.status == 404  # authz-other has no schema; acme's is not theirs
        # The admin sees the system tenant's data unless it names a tenant.
        assert admin.authz_check("document:a", "view", "user:amy", tenant="authz-acme")["permissionship"] == \
            "has_permission"
        assert admin.authz_check("document:a", "view", "user:amy")["permissionship"] == "no_permission"
    with pytest.raises(AnvilAPIError) as e:
        AnvilClient(server.endpoint).authz_check("document:a", "view", "user:amy")
    assert e.value.status == 401


def test_relationship_changes_stream_through_watch(admin: AnvilClient) -> None:
    start = admin.authz_write(["document:w1#viewer@user:wanda"])["revision"] - 1
    got: list[dict] = []
    done = threading.Event()

    def run() -> None:
        with admin.watch(kinds="authz.*", after=start, heartbeat=1) as stream:
            for ev in stream:
                got.append(ev)
                if len(got) == 3:
                    done.set()
                    return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    admin.authz_write(["document:w2#viewer@user:wanda"], operation="create")
    admin.authz_delete({"resource_type": "document", "subject_id": "wanda"})
    assert done.wait(20), got
    assert [e["kind"] for e in got] == ["authz.relationships.write", "authz.relationships.write",
                                        "authz.relationships.delete"]
    assert got[0]["updates"] == [{"operation": "touch", "relationship": "document:w1#viewer@user:wanda"}]
    assert sorted(u["relationship"] for u in got[2]["updates"]) == ["document:w1#viewer@user:wanda",
                                                                     "document:w2#viewer@user:wanda"]
    # Resumable by cursor: reading again after the first event yields the rest, in order.
    with admin.watch(kinds="authz.*", after=got[0]["seq"], heartbeat=1) as stream:
        again = [next(stream), next(stream)]
    assert [e["seq"] for e in again] == [got[1]["seq"], got[2]["seq"]]


def test_cli(admin: AnvilClient, server: AnvilServer, tmp_path: Path) -> None:
    f = tmp_path / "schema.zed"
    f.write_text(SCHEMA + "\ndefinition extra {}\n")
    out = server.cli("authz", "schema", "write", str(f)).stdout.decode()
    assert "schema written" in out and "token z1." in out
    assert "definition extra {}" in server.cli("authz", "schema", "read").stdout.decode()
    server.cli("authz", "rel", "write", "document:cli#viewer@user:cleo", "document:cli2#viewer@user:cleo")
    rels = tmp_path / "rels.txt"
    rels.write_text("# comment\ndocument:cli3#viewer@user:cleo\n")
    server.cli("authz", "rel", "write", "--file", str(rels), "--operation", "create")
    assert server.cli("authz", "check", "document:cli", "view", "user:cleo").stdout.decode().strip() == "true"
    no = server.cli("authz", "check", "document:cli", "view", "user:zed", "--error-on-no-permission", check=False)
    assert no.returncode == 2 and no.stdout.decode().strip() == "false"
    caveated = server.cli("authz", "check", "document:vpn", "view", "user:carl").stdout.decode()
    assert "caveated (missing context: user_ip)" in caveated
    ok = server.cli("authz", "check", "document:vpn", "view", "user:carl", "--caveat-context",
                    '{"user_ip": "10.1.1.1"}', "--consistency-full").stdout.decode()
    assert ok.strip() == "true"
    assert server.cli("authz", "lookup-resources", "document", "view", "user:cleo").stdout.decode().split() == [
        "document:cli", "document:cli2", "document:cli3", "document:public"]
    assert "user:* - [user:mallory]" in server.cli("authz", "lookup-subjects", "document:public", "view",
                                                   "user").stdout.decode()
    tree = server.cli("authz", "expand", "view", "document:spec").stdout.decode()
    assert "folder:root#viewer" in tree and "group:eng#member" in tree
    listed = server.cli("authz", "rel", "read", "document", "viewer", "user:cleo").stdout.decode().split()
    assert listed == ["document:cli#viewer@user:cleo", "document:cli2#viewer@user:cleo",
                      "document:cli3#viewer@user:cleo"]
    assert "3 relationship(s) deleted" in server.cli("authz", "rel", "delete", "document", "viewer",
                                                     "user:cleo").stdout.decode()
    bad = server.cli("authz", "rel", "write", "document:x#viewer@nobody", check=False)
    assert bad.returncode == 1 and "malformed relationship at character" in bad.stderr.decode()
    as_json = json.loads(server.cli("authz", "check", "document:cli", "view", "user:cleo", "--json").stdout)
    assert as_json["permissionship"] == "no_permission" and as_json["checked_at"].startswith("z1.")


def test_authz_routes_are_in_openapi(server: AnvilServer) -> None:
    from anvil.api.authz import AUTHZ_ROUTES

    doc = httpx.get(f"{server.endpoint}/anvil/v1/openapi.json").json()
    for route in AUTHZ_ROUTES:
        for method in route.methods - {"HEAD"}:
            assert method.lower() in doc["paths"].get(route.path, {}), (method, route.path)
    assert "text/plain" in doc["paths"]["/anvil/v1/authz/schema"]["put"]["requestBody"]["content"]
