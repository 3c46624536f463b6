"""S3 tags and bucket settings (tagging, lifecycle, cors) are source records of the objects participant:
journaled, in its summary (so backup records them and restore validation compares them), dropped with
their bucket, and restricted with it on a bucket-scoped restore. In-process, on a real store."""

from __future__ import annotations

import shutil
from pathlib import Path

import apsw

from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.objects.participant import ObjectsParticipant
from anvil.runtime import Anvil, recovery_participants
from anvil.storage import BlobStore, BlobWriter, records
from anvil.storage.recovery import RecoveryContext


def _summary_and_findings(root: Path, recorded: dict | None = None) -> tuple[dict, list]:
    conn = records.open_readonly(root / "catalog.db")
    try:
        ctx = RecoveryContext(root, conn, BlobStore(root / "blobs" / "sha256", root / "tmp"), recovery_participants())
        p = ObjectsParticipant()
        return p.summary(ctx), p.validate(ctx, recorded)
    finally:
        records.close(conn)


def test_tags_and_settings_are_journaled_summarised_and_validated(tmp_path: Path) -> None:
    root = tmp_path / "store"
    a = Anvil(root)
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        a.objects.create_bucket(ctx, "rec-a", versioning="Enabled")
        a.objects.create_bucket(ctx, "rec-b")
        w = BlobWriter(a.storage.blobs)
        w.write(b"body")
        put = a.objects.put_object(ctx, "rec-a", "k", a.objects.store_body(w))
        a.objects.set_object_tags(ctx, "rec-a", "k", None, [["team", "core"]])
        a.objects.put_bucket_setting(ctx, "rec-a", "lifecycle", {"rules": [{"id": "r", "status": "Enabled"}]})
        a.objects.put_bucket_setting(ctx, "rec-b", "cors", {"rules": []})
        journal = [r[0] for r in a.storage.catalog.reader().execute("SELECT kind FROM journal ORDER BY seq")]
        assert {"object.tagging", "bucket.lifecycle", "bucket.cors"} <= set(journal)
        # Deleting a bucket drops its settings (a bucket re-created under the name starts bare).
        a.objects.delete_bucket(ctx, "rec-b")
        a.objects.create_bucket(ctx, "rec-b")
        assert a.objects.bucket_setting("rec-b", "cors") is None
        assert a.objects.head_object("rec-a", "k").extra["tags"] == [["team", "core"]]
        assert put["version_id"]
    finally:
        a.close()
    recorded, findings = _summary_and_findings(root)
    assert recorded["tagged_versions"] == 1 and recorded["bucket_settings"] == 1
    assert not [f for f in findings if f.severity == "error"]
    # A copy whose tag or setting changed no longer matches the recorded summary.
    for sql in ("UPDATE versions SET extra = '{\"tags\": [[\"team\", \"other\"]]}'",
                "UPDATE bucket_settings SET document = '{}'"):
        copy = tmp_path / f"copy-{abs(hash(sql))}"
        shutil.copytree(root, copy)
        db = apsw.Connection(str(copy / "catalog.db"))
        db.execute(sql)
        db.close()
        _, found = _summary_and_findings(copy, recorded)
        assert any(f.invariant == "objects.summary_differs" for f in found), sql
    # A bucket-scoped restore keeps only the chosen buckets' settings.
    scoped = tmp_path / "scoped"
    shutil.copytree(root, scoped)
    db = apsw.Connection(str(scoped / "catalog.db"))
    ObjectsParticipant().restrict_to_buckets(db, {"rec-b"})
    assert list(db.execute("SELECT count(*) FROM bucket_settings"))[0][0] == 0
    db.close()


def test_tags_settings_and_acls_survive_backup_and_restore(tmp_path: Path, monkeypatch) -> None:
    """Issue 18: tags are source records "covered by backup": a snapshot of a store holding object and
    bucket tags, lifecycle and CORS documents and a public-read object restores them all, and restore
    validation passes."""
    from anvil.backup import engine
    from anvil.backup import mode as recovery
    from anvil.backup.backends.local import LocalBackend
    from anvil.backup.repository import Repository
    from anvil.backup.restore import restore
    from anvil.storage import Storage

    monkeypatch.setenv("ANVIL_BACKUP_KDF", "test")
    a = Anvil(tmp_path / "data")
    parts = recovery_participants()
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        a.objects.create_bucket(ctx, "bk-a")
        w = BlobWriter(a.storage.blobs)
        w.write(b"body")
        a.objects.put_object(ctx, "bk-a", "k", a.objects.store_body(w), extra={"tags": [["team", "core"]]})
        a.objects.set_object_public(ctx, "bk-a", "k", None, True)
        a.objects.put_bucket_setting(ctx, "bk-a", "tagging", [["cost", "eng"]])
        a.objects.put_bucket_setting(ctx, "bk-a", "lifecycle", {"rules": [{"id": "r", "status": "Enabled"}]})
        a.objects.put_bucket_setting(ctx, "bk-a", "cors", {"rules": [{"origins": ["*"]}]})
        repo = Repository.init(LocalBackend(tmp_path / "repo"), "pw")
        m = engine.create_snapshot(a.storage.root, a.storage.layout.catalog_path, a.storage.blobs, a.storage.layout.tmp,
                                   a.storage.format.deployment_id, parts, repo, escrow_secrets=True)
    finally:
        a.close()
    restore(repo, m, tmp_path / "restored", parts)
    storage = Storage(tmp_path / "restored")
    try:
        assert recovery.validate(storage, parts)["ok"]
    finally:
        storage.close()
    b = Anvil(tmp_path / "restored")
    try:
        obj = b.objects.head_object("bk-a", "k")
        assert obj.extra["tags"] == [["team", "core"]] and obj.extra["public"] is True
        assert b.objects.bucket_setting("bk-a", "tagging") == [["cost", "eng"]]
        assert b.objects.bucket_setting("bk-a", "lifecycle") == {"rules": [{"id": "r", "status": "Enabled"}]}
        assert b.objects.bucket_setting("bk-a", "cors") == {"rules": [{"origins": ["*"]}]}
    finally:
        b.close()
