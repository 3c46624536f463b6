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

definition document {
    relation folder: folder
    relation owner: user
    relation viewer: user | user with ip_allowlist
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
    bad = server.cli("bucket", "bind", b, "--resource-type", "document", "--read", "nope", "--write", "edit",
                     check=False)
    assert bad.returncode != 0 and b"InvalidArgument" in bad.stderr + bad.stdout
    # Watch sees the binding events (kind authz.*).
    admin.authz_write(["folder:marker#viewer@user:marker"])
    kinds = [e["kind"] for e in _until(admin.watch(kinds="authz.*", after=0, heartbeat=1),
                                       lambda e: "folder:marker" in json.dumps(e.get("updates")))]
    assert "authz.binding.put" in kinds and "authz.binding.delete" in kinds
    # A bucket deleted and made again starts unbound.
    admin.delete_bucket(b)
    admin.create_bucket(b)
    with pytest.raises(AnvilAPIError) as e:
        admin.authz_bucket_binding(b)
    assert e.value.code == "NotFound"
