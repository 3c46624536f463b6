"""Findings seen by a tenant never name keys in Anvil's reserved namespace (`_anvil/`).

A real server; findings about the tenant's bucket are recorded while it is stopped (findings are
source records, fsck writes them the same way), then read back through
`GET /anvil/v1/admin/findings` by a tenant application holding `admin:read` on its tenant.
"""

from __future__ import annotations

import json
from pathlib import Path

from anvil.api_models import jsonable
from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.diagnostics import make_finding, record
from anvil.runtime import Anvil
from tests.helpers import AnvilServer


def test_tenant_findings_never_show_reserved_keys(tmp_path: Path) -> None:
    srv = AnvilServer(tmp_path / "data").start()
    try:
        with srv.client() as admin:
            admin.create_tenant("acme")
            app = admin.create_app("acme", "auditor", scopes=["admin:read|tenant:acme", "bucket:create|tenant:acme"])
        with srv.client(client_id=app["client_id"], client_secret=app["client_secret"]) as c:
            c.create_bucket("acme-data")
    finally:
        srv.stop()

    ref = {"tenant": "acme", "bucket": "acme-data", "version_id": "null"}
    a = Anvil(srv.storage_path)
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        reserved = [
            make_finding("objects", "error", "objects.blob_missing",
                         "blob ab12 is missing for acme-data/_anvil/consumers/state.json",
                         {"blob": "ab12", "references": [{**ref, "key": "_anvil/consumers/state.json"},
                                                         {**ref, "key": "visible.txt"}]}),
            make_finding("multipart", "warning", "multipart.part_blob_missing", "part 1 of an upload is missing",
                         {"tenant": "acme", "bucket": "acme-data", "key": "_anvil/index/part",
                          "labels": {"_anvil/index/part": ["acme-data/_anvil/index/part"]}},
                         identity={"tenant": "acme", "key": "_anvil/index/part"}),
        ]
        plain = make_finding("objects", "error", "objects.blob_missing", "blob cd34 is missing for acme-data/x.txt",
                             {"blob": "cd34", "references": [{**ref, "key": "x.txt"}]})
        for f in [*reserved, plain]:
            record(a.storage.catalog, f, actor=ctx.actor, request_id=ctx.request_id)
    finally:
        a.close()

    srv.start()
    try:
        with srv.client() as admin:  # the system admin sees everything as recorded
            everything = admin.list_findings()
            assert "_anvil/consumers/state.json" in json.dumps(everything, default=jsonable)
        with srv.client(client_id=app["client_id"], client_secret=app["client_secret"]) as c:
            seen = c.list_findings()
        by_id = {f["id"]: f for f in seen}
        assert set(by_id) == {f.id for f in [*reserved, plain]}  # still told something is wrong in its bucket
        assert "_anvil/" not in json.dumps(seen, default=jsonable)  # ... but never a reserved name, in any field
        first = by_id[reserved[0].id]
        assert first["detail"] == "objects.blob_missing: names in Anvil's reserved namespace are redacted"
        assert first["affected"]["references"][0]["key"] == "[redacted]"
        assert first["affected"]["references"][1]["key"] == "visible.txt"
        assert by_id[reserved[1].id]["affected"]["key"] == "[redacted]"
        assert by_id[plain.id]["detail"] == plain.detail and by_id[plain.id]["affected"] == plain.affected
    finally:
        srv.stop()
