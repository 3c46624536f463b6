"""Findings as records: tenant redaction, the recovery-participant summary/validate, repair families."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import apsw
import pytest

from anvil.context import DEV_PRINCIPAL, Principal, RequestContext
from anvil.diagnostics import (
    make_finding,
    record,
    redact_for,
    run_fsck,
    run_repair,
    summary,
    validate,
)
from anvil.diagnostics.findings import REDACTED, list_findings, resolve
from anvil.errors import AnvilError
from anvil.runtime import Anvil, recovery_participants
from anvil.storage.recovery import Finding, Participant, RecoveryContext

ACME = Principal(tenant="acme", subject="alice", admin=False, scopes=("*",))


def ref(tenant: str, bucket: str, key: str) -> dict[str, Any]:
    return {"tenant": tenant, "bucket": bucket, "key": key, "version_id": "null"}


@pytest.fixture
def anvil(tmp_path: Path):
    a = Anvil(tmp_path / "data")
    yield a
    a.close()


def test_redaction_scopes_findings_to_the_principals_tenant() -> None:
    own = make_finding("objects", "error", "objects.blob_missing", "blob b1 missing for acme-photos/cat",
                       {"blob": "b1", "references": [ref("acme", "acme-photos", "cat")]})
    shared = make_finding("objects", "error", "objects.blob_missing", "blob b2 used by acme-photos/x and globex/y",
                          {"blob": "b2", "references": [ref("acme", "acme-photos", "x"), ref("globex", "gx", "y")]})
    other = make_finding("multipart", "error", "multipart.bucket_missing", "upload for globex-private",
                         {"tenant": "globex", "bucket": "globex-private", "key": "k", "upload_id": "u"})
    system = make_finding("storage", "error", "journal.chain", "journal event 5", {"seq": 5})
    everything = [own, shared, other, system]

    assert [d["id"] for d in redact_for(DEV_PRINCIPAL, everything)] == [f.id for f in everything]
    assert redact_for(DEV_PRINCIPAL, [shared])[0]["affected"] == shared.affected

    seen = redact_for(ACME, everything)
    assert [d["id"] for d in seen] == [own.id, shared.id]
    assert seen[0]["affected"] == own.affected and seen[0]["detail"] == own.detail
    refs = seen[1]["affected"]["references"]
    assert refs[0] == ref("acme", "acme-photos", "x")
    assert refs[1] == {k: REDACTED for k in ("tenant", "bucket", "key", "version_id")}
    text = json.dumps(seen)
    assert "globex" not in text and "gx" not in text
    assert shared.affected["references"][1]["tenant"] == "globex"  # the record itself is untouched


def test_record_list_resolve_and_bad_input(anvil: Anvil) -> None:
    cat = anvil.storage.catalog
    f = record(cat, make_finding("storage", "warning", "blobs.orphan", "orphan", {"blob": "ab"}),
               actor="t/x", request_id="r1")
    conn = cat.reader()
    assert [x.id for x in list_findings(conn, unresolved=True)] == [f.id]
    assert list_findings(conn, severity="error") == []
    with pytest.raises(AnvilError):
        list_findings(conn, severity="bad")
    with pytest.raises(AnvilError):
        make_finding("storage", "fatal", "x", "y", {})
    with pytest.raises(AnvilError) as e:
        resolve(cat, f.id, "  ", actor="t/x", request_id="r2")
    assert e.value.code == "InvalidArgument"
    done = resolve(cat, f.id, "fixed", actor="t/x", request_id="r3")
    assert done.resolved_at is not None and list_findings(conn, unresolved=True) == []
    events = [(r[0], r[1]) for r in conn.execute("SELECT kind, request_id FROM journal WHERE kind LIKE 'diag%'")]
    assert events == [("diagnostics.finding", "r1"), ("diagnostics.resolve", "r3")]


def test_summary_and_validate_detect_changes(anvil: Anvil) -> None:
    cat = anvil.storage.catalog
    for sev in ("error", "warning", "warning"):
        record(cat, make_finding("storage", sev, "x." + sev, "d", {"n": sev}), actor="t/x", request_id="r")
    s = summary(cat.reader())
    assert s["count"] == 3 and s["unresolved"] == 3 and s["by_severity"] == {"error": 1, "warning": 2, "info": 0}
    assert validate(cat.reader(), s) == []
    # Tamper with a record behind the mutation path (as a bad restore might).
    w = apsw.Connection(str(cat.path))
    try:
        w.execute("UPDATE findings SET affected = 'not json' WHERE severity = 'error'")
    finally:
        w.close()
    problems = validate(cat.reader(), s)
    assert sorted(p.invariant for p in problems) == ["findings.affected", "findings.summary"]
    assert summary(cat.reader())["digest"] != s["digest"]


def test_repair_rebuilds_a_derived_participant_and_fsck_checks_its_manifest(anvil: Anvil) -> None:
    ctx = RequestContext(DEV_PRINCIPAL)
    anvil.objects.create_bucket(ctx, "src")

    class BucketList(Participant):
        """A real derived structure: the list of bucket names, with a manifest like every family's."""

        name = "bucket-list"
        kind = "derived"

        def rebuild(self, rctx: RecoveryContext) -> list[Finding]:
            head = anvil.storage.catalog.head()[0]
            gen = rctx.root / "derived" / self.name / f"gen-{head}"
            gen.mkdir(parents=True)
            body = json.dumps([b.name for b in anvil.objects.list_buckets()]).encode()
            (gen / "buckets.json").write_bytes(body)
            manifest = {"cursor": head, "files": [
                {"path": "buckets.json", "sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}]}
            (gen / "MANIFEST.json").write_text(json.dumps(manifest))
            return [self.finding("info", gen.name, "rebuilt")]

    class Broken(Participant):
        name = "broken"
        kind = "derived"

        def rebuild(self, rctx: RecoveryContext) -> list[Finding]:
            raise RuntimeError("source unreadable")

    parts = [*recovery_participants(), BucketList(), Broken()]
    with pytest.raises(AnvilError):
        run_repair(anvil.storage, parts, ctx, ["bucket-list", "nope"])
    with pytest.raises(AnvilError):
        run_repair(anvil.storage, parts, ctx, ["objects"])  # a source participant is no family
    report = run_repair(anvil.storage, parts, ctx, ["bucket-list"])
    assert report["ok"] is True
    assert [f["invariant"] for f in report["findings"]] == ["repair.rebuilt"]
    failed = run_repair(anvil.storage, parts, ctx, ["broken"])
    assert failed["ok"] is False and failed["findings"][0]["invariant"] == "repair.failed"
    assert failed["findings"][0]["operator_action_required"] is True

    target = anvil.diagnostics.target()
    clean = run_fsck(target, recovery_participants(), deep=True, record=False)
    assert clean.findings == [] and clean.checks["derived"] == {"manifests": 1, "files": 1}
    seg = next((anvil.storage.layout.derived / "bucket-list").glob("gen-*/buckets.json"))
    seg.write_bytes(b'["tampered"]')
    damaged = run_fsck(target, recovery_participants(), deep=True, record=False)
    assert [f.invariant for f in damaged.findings] == ["derived.file_size"]
