"""Diagnostics through a running server: admin API, SDK and CLI (fsck, gc, repair, findings)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from anvil.client import AnvilAPIError, AnvilClient
from tests.helpers import AnvilServer

# The embedded catalog and PostgreSQL (tests/conftest.py `engine`).
pytestmark = pytest.mark.both_engines


@pytest.fixture(scope="module", autouse=True)
def _blob_files():
    """These tests damage, delete or age blob *files*: small bodies are kept as files here
    (ANVIL_INLINE_MAX=0). Inline bodies get the same checks in tests/test_inline.py."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANVIL_INLINE_MAX", "0")
        yield


def orphan(server: AnvilServer, body: bytes, *, age: float = 0) -> Path:
    h = hashlib.sha256(body).hexdigest()
    p = server.storage_path / "blobs" / "sha256" / h[:2] / h
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(body)
    if age:
        t = time.time() - age
        os.utime(p, (t, t))
    return p


def journal_kinds(client: AnvilClient) -> list[str]:
    return [e["kind"] for e in client.journal(after=0, limit=1000)]


def test_online_fsck_on_a_clean_server(server: AnvilServer, client: AnvilClient, bucket: str) -> None:
    client.put_object(bucket, "a", b"alpha")
    report = client.fsck(deep=True)
    assert report["ok"] is True and report["mode"] == "online" and report["deep"] is True
    assert [f for f in report["findings"] if f["severity"] == "error"] == []
    proc = server.cli("fsck", "--json")
    assert json.loads(proc.stdout)["ok"] is True


def test_offline_fsck_is_refused_while_the_server_runs(server: AnvilServer, engine: str) -> None:
    proc = server.cli("fsck", "--storage-path", str(server.storage_path), check=False)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    if engine == "postgresql":
        # Offline tools read catalog.db only (docs/scale-out.md): refused before anything is opened.
        assert "no catalog.db" in err and "Traceback" not in err
        return
    assert "StorageLocked" in err and "in use" in err and "--endpoint" in err


def test_findings_recorded_listed_filtered_and_resolved(server: AnvilServer, client: AnvilClient) -> None:
    p = orphan(server, b"api orphan " + os.urandom(8))
    report = client.fsck()
    mine = [f for f in report["findings"] if f["affected"].get("blob") == p.name]
    assert len(mine) == 1 and mine[0]["invariant"] == "blobs.orphan"
    fid = mine[0]["id"]
    assert "diagnostics.finding" in journal_kinds(client)

    listed = client.list_findings(severity="warning", unresolved=True)
    assert fid in [f["id"] for f in listed]
    assert fid not in [f["id"] for f in client.list_findings(severity="error")]
    assert fid not in [f["id"] for f in client.list_findings(subsystem="objects")]
    proc = server.cli("findings", "ls", "--unresolved", "--json")
    assert fid in [f["id"] for f in json.loads(proc.stdout)]
    proc = server.cli("findings", "ls")
    assert b"blobs.orphan" in proc.stdout

    resolved = client.resolve_finding(fid, "checked by hand")
    assert resolved["resolved_at"] is not None and resolved["resolution"] == "checked by hand"
    with pytest.raises(AnvilAPIError) as e:
        client.resolve_finding(fid, "again")
    assert e.value.code == "PreconditionFailed"
    with pytest.raises(AnvilAPIError) as e:
        client.resolve_finding("no-such-finding", "x")
    assert e.value.code == "NotFound"
    p.unlink()


def test_fsck_resolves_what_it_no_longer_sees(server: AnvilServer, client: AnvilClient) -> None:
    p = orphan(server, b"transient orphan " + os.urandom(8))
    first = client.fsck()
    fid = next(f["id"] for f in first["findings"] if f["affected"].get("blob") == p.name)
    p.unlink()
    second = client.fsck()
    assert fid in second["resolved"]
    assert fid not in [f["id"] for f in client.list_findings(unresolved=True)]


def test_bad_filters_are_refused(client: AnvilClient) -> None:
    for params in ({"severity": "fatal"}, {"limit": 0}):
        with pytest.raises(AnvilAPIError) as e:
            client.list_findings(**params)
        assert e.value.status == 400 and e.value.code == "InvalidArgument"
    resp = client._http.get("/anvil/v1/admin/findings", params={"unresolved": "maybe"})
    assert resp.status_code == 400
    resp = client._http.post("/anvil/v1/admin/fsck", json={"deep": "yes"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "InvalidArgument"


def test_gc_through_the_api(server: AnvilServer, client: AnvilClient, bucket: str) -> None:
    old = orphan(server, b"old api orphan " + os.urandom(8), age=7200)
    young = orphan(server, b"young api orphan " + os.urandom(8))
    res = client.put_object(bucket, "kept", b"referenced and old " + os.urandom(8))
    ref = server.storage_path / "blobs" / "sha256" / res["sha256"][:2] / res["sha256"]
    t = time.time() - 7200
    os.utime(ref, (t, t))
    upload_id = client.create_upload(bucket, "abandoned")
    client.upload_part(bucket, upload_id, 1, b"a part")

    for bad in ({"grace_seconds": -1}, {"upload_expiry_seconds": "soon"}):
        r = client._http.post("/anvil/v1/admin/gc", json=bad)
        assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidArgument"
    assert old.exists()  # the refused calls changed nothing

    dry = client.gc(dry_run=True, upload_expiry_seconds=0)
    assert old.name in [b["blob"] for b in dry["blobs_removed"]] and old.exists()
    assert client.list_uploads(bucket) != []

    report = client.gc(upload_expiry_seconds=0)
    removed = [b["blob"] for b in report["blobs_removed"]]
    assert old.name in removed and not old.exists()
    assert young.exists() and ref.exists() and young.name not in removed
    assert upload_id in [u["upload_id"] for u in report["uploads_expired"]]
    assert client.list_uploads(bucket) == []
    assert "multipart.abort" in journal_kinds(client)
    f = report["finding"]
    assert f["invariant"] == "gc.removed" and f["severity"] == "info" and f["resolved_at"] is not None
    assert f["id"] in [x["id"] for x in client.list_findings(subsystem="diagnostics")]
    assert client.get_object(bucket, "kept").startswith(b"referenced and old")
    young.unlink()


def test_repair_records_a_finding_per_run(server: AnvilServer, client: AnvilClient) -> None:
    before = len(client.list_findings(subsystem="diagnostics"))
    with pytest.raises(AnvilAPIError) as e:
        client.repair(["no-such-family"])
    assert e.value.code == "InvalidArgument"
    assert len(client.list_findings(subsystem="diagnostics")) == before  # refused: nothing recorded
    report = client.repair()
    # The derived families registered: the chunk digests of large blobs, the artefacts' tensor index,
    # PersonalDB projections and anvil.indexes' generations (sorted by name).
    assert report["families"] == ["blob-digests", "indexes", "projections", "tensors"] and report["ok"] is True
    assert {f["invariant"] for f in report["findings"]} == {"repair.rebuilt"}
    proc = server.cli("repair", "--json")
    assert json.loads(proc.stdout)["findings"][0]["invariant"] == "repair.rebuilt"
    # One finding per family per run, two runs.
    assert len(client.list_findings(subsystem="diagnostics")) == before + 2 * len(report["families"])


def test_repair_with_no_derived_family_records_that(tmp_path) -> None:
    from anvil.context import DEV_PRINCIPAL, RequestContext
    from anvil.diagnostics.repair import run_repair
    from anvil.runtime import Anvil, recovery_participants

    a = Anvil(tmp_path / "data")
    try:
        sources = [p for p in recovery_participants() if p.kind == "source"]
        report = run_repair(a.storage, sources, RequestContext(DEV_PRINCIPAL))
        assert report["families"] == [] and report["ok"] is True
        assert [f["invariant"] for f in report["findings"]] == ["repair.nothing_registered"]
    finally:
        a.close()


def test_admin_routes_are_in_the_openapi_document(client: AnvilClient) -> None:
    paths = client._http.get("/anvil/v1/openapi.json").json()["paths"]
    for p in ("/anvil/v1/admin/findings", "/anvil/v1/admin/fsck", "/anvil/v1/admin/gc", "/anvil/v1/admin/repair"):
        assert p in paths


def test_online_fsck_beside_concurrent_writes_reports_no_errors(server: AnvilServer, client: AnvilClient,
                                                                 bucket: str) -> None:
    import threading

    written: list[str] = []

    def writer() -> None:
        with server.client() as c:
            for i in range(300):
                c.put_object(bucket, f"w/{i}", os.urandom(64))
                written.append(f"w/{i}")

    t = threading.Thread(target=writer)
    t.start()
    reports = []
    try:
        while len(written) < 10 and t.is_alive():
            time.sleep(0.01)
        while t.is_alive() and len(reports) < 20:
            reports.append(client.fsck(deep=True))
    finally:
        t.join()
    assert len(written) == 300 and reports
    for r in reports:
        assert [f for f in r["findings"] if f["severity"] == "error"] == [], r["findings"]
    assert client.fsck(deep=True)["ok"] is True
