"""Artefacts of a bucket bound to relationships (docs/authz.md, "Object access"; docs/artefacts.md)
against a real server: the binding's `artefacts` part (API, errors, schema guard), pull / push / tag /
verify / list decided for the token's subject over the SDK, huggingface_hub and plain HTTP, the
default mapping through the object part, and an unbound bucket left to scopes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from safetensors.numpy import save_file

from anvil.authz.binding import object_id
from anvil.client import AnvilAPIError, AnvilClient
from tests.helpers import AnvilServer, unique_bucket

SCHEMA = """
definition user {}

definition document {
    relation owner: user
    relation viewer: user
    permission view = viewer + owner
    permission edit = owner
}

definition model {
    relation owner: user
    relation reader: user
    permission view = reader + owner
    permission edit = owner
}
"""

TENANT = "artacme"
APP_SCOPES = ["artefact:*|bucket:*", "object:*|bucket:*", "bucket:*|bucket:*", "bucket:*|tenant:artacme",
              "authz:*|tenant:artacme"]
ARTS = {"resource_type": "model", "pull": "view", "push": "edit"}
BINDING = {"resource_type": "document", "read": "view", "write": "edit", "artefacts": ARTS}


def _model(d: Path, seed: int) -> Path:
    import numpy as np

    d.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.full((4, 4), seed, dtype=np.float32)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"seed": seed}))
    return d


def _code(fn) -> str:
    with pytest.raises(AnvilAPIError) as e:
        fn()
    return e.value.code


@pytest.fixture(scope="module")
def world(server: AnvilServer, tmp_path_factory: pytest.TempPathFactory):
    """Tenant artacme: an application holding authz:act, a bucket with models `a` and `b` bound with an
    artefacts part (amy reads `a`), a second bucket bound without one, an unbound third."""
    tmp = tmp_path_factory.mktemp("artauthz")
    with server.client() as admin:
        admin.create_tenant(TENANT)
        app = admin.create_app(TENANT, "models-backend", scopes=APP_SCOPES)
    cid, secret = app["client_id"], app["client_secret"]
    svc = AnvilClient(server.endpoint, client_id=cid, client_secret=secret)
    svc.authz_write_schema(SCHEMA)
    bound, implied, free = unique_bucket("artb"), unique_bucket("arti"), unique_bucket("artf")
    ids = {}
    for b in (bound, implied, free):
        svc.create_bucket(b)
        for n, seed in (("a", 1), ("b", 2)):
            ids[b, n] = svc.push_model(b, n, _model(tmp / f"{b}-{n}", seed), tag="v1")["id"]
    svc.authz_write([f"model:{object_id(bound, 'a')}#reader@user:amy",
                     f"document:{object_id(implied, 'a')}#viewer@user:amy"])
    svc.authz_bind_bucket(bound, BINDING)
    svc.authz_bind_bucket(implied, {"resource_type": "document", "read": "view", "write": "edit"})
    amy = AnvilClient(server.endpoint, client_id=cid, client_secret=secret, subject="user:amy")
    yield {"bound": bound, "implied": implied, "free": free, "svc": svc, "amy": amy, "ids": ids, "tmp": tmp,
           "cid": cid, "secret": secret}
    svc.close()
    amy.close()


def test_binding_artefacts_part_round_trip_and_errors(world) -> None:
    svc, b = world["svc"], world["bound"]
    got = svc.authz_bucket_binding(b)["binding"]
    assert got["artefacts"] == {**ARTS, "tag": "edit", "verify": "view"}
    # Bindings without the part keep their exact JSON (no `artefacts` key).
    assert "artefacts" not in svc.authz_bucket_binding(world["implied"])["binding"]
    for bad, needle in [({**BINDING, "artefacts": {**ARTS, "resource_type": "nodef"}}, "artefacts.resource_type"),
                        ({**BINDING, "artefacts": {**ARTS, "pull": "nope"}}, "artefacts.pull"),
                        ({**BINDING, "artefacts": {"resource_type": "model", "pull": "view"}}, "artefacts.push"),
                        ({**BINDING, "artefacts": {**ARTS, "colour": "red"}}, "unknown artefacts field"),
                        ({**BINDING, "artefacts": "model"}, "artefacts is a JSON object")]:
        with pytest.raises(AnvilAPIError) as e:
            svc.authz_bind_bucket(b, bad)
        assert e.value.code == "InvalidArgument" and needle in e.value.message, (bad, e.value.message)
    assert svc.authz_bucket_binding(b)["binding"] == got  # nothing changed
    # The schema cannot drop what the artefacts part names.
    with pytest.raises(AnvilAPIError) as e:
        svc.authz_write_schema("".join(SCHEMA.rsplit("    permission edit = owner\n", 1)))  # model's edit
    assert e.value.code == "PreconditionFailed" and f"bucket {b} binds artefact operations" in e.value.message


def test_amy_pulls_a_but_not_b_and_cannot_push(world, server: AnvilServer) -> None:
    b, amy, svc, ids, tmp = world["bound"], world["amy"], world["svc"], world["ids"], world["tmp"]
    # Pull: manifest, files, tensors, verify, per-name listing.
    assert amy.artefact_describe(b, "a", "v1")["id"] == ids[b, "a"]
    assert amy.pull_artefact(b, "a", "v1", tmp / "amy-a")["files"] == 2
    assert [t["name"] for t in amy.list_tensors(b, "a", "v1")] == ["w"]
    assert amy.get_tensor(b, "a", "v1", "w")[1] == "F32"
    assert amy.verify_artefact(b, "a", "v1")["ok"] is True
    assert amy.list_artefacts(b, "a")["name"] == "a"
    for fn in (lambda: amy.artefact_describe(b, "b", "v1"), lambda: amy.list_tensors(b, "b", "v1"),
               lambda: amy.get_tensor(b, "b", "v1", "w"), lambda: amy.verify_artefact(b, "b", "v1"),
               lambda: amy.list_artefacts(b, "b"), lambda: amy.pull_artefact(b, "b", "v1", tmp / "amy-b")):
        assert _code(fn) == "PermissionDenied"
    # The listing shows only `a`.
    assert {x["name"] for x in amy.list_artefacts(b)} == {"a"}
    # Push and tag need edit (owner): refused, nothing written.
    assert _code(lambda: amy.push_model(b, "a", _model(tmp / "a2", 3), tag="v2")) == "PermissionDenied"
    assert _code(lambda: amy.tag_artefact(b, "a", "latest", ids[b, "a"])) == "PermissionDenied"
    with server.client() as admin:  # an admin acting for no subject is exempt, as from tenant isolation
        assert [t["tag"] for t in admin.list_artefacts(b, "a")["tags"]] == ["v1"]
    # Plain HTTP: a component, a file, the HF-compatible and git endpoints.
    token = amy._http.auth.token()  # type: ignore[union-attr]
    h = {"authorization": f"Bearer {token}"}
    base = f"{server.endpoint}/anvil/v1/buckets/{b}/artefacts"
    assert httpx.get(f"{base}/a/v1/files/config.json", headers=h).status_code == 200
    assert httpx.get(f"{base}/b/v1/files/config.json", headers=h).status_code == 403
    assert httpx.get(f"{base}/b/v1/git/ref", headers=h).status_code == 403
    assert httpx.get(f"{server.endpoint}/anvil/v1/hf/api/models/{b}/b", headers=h).status_code == 403
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = server.endpoint + "/anvil/v1/hf"
    got = hf_hub_download(f"{b}/a", "config.json", revision="v1", endpoint=endpoint, token=token,
                          cache_dir=str(tmp / "hf-a"))
    assert json.loads(Path(got).read_text()) == {"seed": 1}
    with pytest.raises((HfHubHTTPError, OSError)):
        hf_hub_download(f"{b}/b", "config.json", revision="v1", endpoint=endpoint, token=token,
                        cache_dir=str(tmp / "hf-b"))
    # The application acts for no subject: refused (the binding says without_subject deny), lists nothing.
    assert _code(lambda: svc.artefact_describe(b, "a", "v1")) == "PermissionDenied"
    assert svc.list_artefacts(b) == []
    # Made owner of `a`, amy may push and tag it.
    svc.authz_write([f"model:{object_id(b, 'a')}#owner@user:amy"])
    res = amy.push_model(b, "a", _model(tmp / "a3", 4), tag="v2")
    assert res["tag"]["id"] == res["id"] and amy.artefact_describe(b, "a", "v2")["id"] == res["id"]
    assert _code(lambda: amy.push_model(b, "b", _model(tmp / "b3", 5))) == "PermissionDenied"


def test_without_artefacts_part_the_object_part_decides(world) -> None:
    b, amy = world["implied"], world["amy"]
    assert amy.artefact_describe(b, "a", "v1")["id"] == world["ids"][b, "a"]  # document#view -> pull
    assert _code(lambda: amy.artefact_describe(b, "b", "v1")) == "PermissionDenied"
    assert {x["name"] for x in amy.list_artefacts(b)} == {"a"}
    assert _code(lambda: amy.tag_artefact(b, "a", "x", world["ids"][b, "a"])) == "PermissionDenied"  # edit


def test_unbound_bucket_is_left_to_scopes(world) -> None:
    b, amy, ids = world["free"], world["amy"], world["ids"]
    assert {x["name"] for x in amy.list_artefacts(b)} == {"a", "b"}
    assert amy.artefact_describe(b, "b", "v1")["id"] == ids[b, "b"]
    assert amy.tag_artefact(b, "b", "latest", ids[b, "b"])["id"] == ids[b, "b"]


def test_binding_json_is_backward_compatible_and_replays_exactly() -> None:
    from anvil.authz.binding import binding_from_json, parse_binding

    old = parse_binding({"resource_type": "document", "read": "view", "write": "edit"})
    # The canonical text of a binding without the part is what it was before the part existed.
    assert old.canonical() == ('{"delete":"edit","list":"view","read":"view","resource_type":"document",'
                               '"without_subject":"deny","write":"edit"}')
    assert old.for_artefacts().permission("pull") == "view" and old.for_artefacts().permission("tag") == "edit"
    new = parse_binding(BINDING)
    assert binding_from_json(new.canonical()) == new  # what the journal replays
    assert new.for_artefacts().resource_type == "model" and new.for_artefacts().permission("verify") == "view"
