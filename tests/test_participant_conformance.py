"""The conformance suite every recovery participant must pass.

A participant joins by being registered in `anvil.runtime.recovery_participants()`; nothing
here names one. Each is run through summary and validate on an empty and a populated store,
validate against a seeded corruption of its own state (the tables or files its description
says it owns), and rebuild: refused for source participants, reproducing the summary for
derived ones.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import apsw
import pytest

from anvil.context import DEV_PRINCIPAL, RequestContext
from anvil.diagnostics import make_finding, record
from anvil.runtime import Anvil, recovery_participants
from anvil.storage import BlobStore, BlobWriter, records
from anvil.storage.recovery import Participant, RebuildRefused, RecoveryContext, has_errors
from anvil.watch import make_scope

NAMES = [p.name for p in recovery_participants()]


def _participant(name: str) -> Participant:
    return next(p for p in recovery_participants() if p.name == name)


def _populate(root: Path, records: str | None = None) -> None:
    """A little of every kind of state: buckets, versions, a multipart part, an app, a consumer, a finding,
    an authz schema with relationships (one deleted). `records`: a PostgreSQL store (tests/test_pg_backup.py)."""
    a = Anvil(root, records=records)
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        a.objects.create_bucket(ctx, "conf-a", versioning="Enabled")
        # The last body spans chunks, so it has a chunk-digest sidecar (blob-digests participant).
        for i, body in enumerate((b"one", b"two" * 1000, b"three", b"four" * 600_000)):
            w = BlobWriter(a.storage.blobs)
            w.write(body)
            a.objects.put_object(ctx, "conf-a", f"docs/{i}", a.objects.store_body(w))
        # S3 tags and bucket settings are objects source records too.
        a.objects.set_object_tags(ctx, "conf-a", "docs/0", None, [["team", "core"]])
        a.objects.put_bucket_setting(ctx, "conf-a", "tagging", [["cost", "eng"]])
        up = a.objects.create_multipart(ctx, "conf-a", "big")
        w = BlobWriter(a.storage.blobs)
        w.write(b"part" * 100)
        a.objects.upload_part(ctx, "conf-a", up["upload_id"], 1, a.objects.store_body(w))
        a.identity.create_tenant(ctx, "acme")
        a.identity.create_app(ctx, "acme", "reader", ["object:read|bucket:*"])
        # Lifecycle state: a disabled app, a deleted one (tombstone), a revoked token.
        off = a.identity.create_app(ctx, "acme", "disabled", ["object:read|bucket:*"])
        a.identity.set_app_enabled(ctx, off["client_id"], False)
        gone = a.identity.create_app(ctx, "acme", "deleted", ["object:read|bucket:*"])
        a.identity.delete_app(ctx, gone["client_id"])
        a.identity.revoke_token(ctx, "0123456789abcdef0123456789abcdef")
        a.watch.create_consumer(ctx, "conf-consumer", make_scope(DEV_PRINCIPAL, bucket="conf-a"), 0)
        a.authz.write_schema(ctx, "definition user {}\ncaveat on_net(ip ipaddress) { ip.in_cidr('10.0.0.0/8') }\n"
                                  "definition doc {\n relation viewer: user | user with on_net\n"
                                  " permission view = viewer\n}")
        a.authz.write_relationships(ctx, [{"operation": "touch", "relationship": r} for r in (
            "doc:conf#viewer@user:amy", 'doc:conf#viewer@user:bob[on_net:{"ip":"10.1.1.1"}]',
            "doc:gone#viewer@user:amy")])
        a.authz.write_relationships(ctx, [{"operation": "delete", "relationship": "doc:gone#viewer@user:amy"},
                                          {"operation": "touch", "relationship": "doc:last#viewer@user:carl"}])
        # A bucket binding (object access through relationships, docs/authz.md).
        a.authz.put_binding(ctx, "conf-a", {"resource_type": "doc", "read": "view", "write": "viewer"})
        record(a.storage.catalog, make_finding("diagnostics", "warning", "conformance.seeded", "seeded", {}),
               actor=ctx.actor, request_id=ctx.request_id)
        _populate_artefacts(a, ctx)
        _populate_personaldb(a, ctx, root)
        # anvil.indexes: a definition (source) and its published generation (derived files).
        a.indexes.create(ctx, "conf-a", {"name": "conf-ix", "kind": "full-text", "selector": {"prefix": "docs/"},
                                         "fields": {"body": {"source": "body", "type": "text"}}})
        a.indexes.start()
        assert a.indexes.query(DEV_PRINCIPAL, "conf-a", "conf-ix",
                               {"text": "three", "min_cursor": a.storage.catalog.head()[0], "wait_ms": 10000})["hits"]
    finally:
        a.close()


def _populate_artefacts(a: Anvil, ctx: RequestContext) -> None:
    """artefacts: a signing key, a signed model with a safetensors component (tensor index), a tag."""
    import base64
    import hashlib
    import struct

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from anvil import artefact_format as mf

    a.objects.create_bucket(ctx, "conf-art")
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    weights = struct.pack("<Q", len(header)) + header + bytes(range(16))
    comps = []
    for path, body in (("model.safetensors", weights), ("config.json", b'{"hidden": 2}')):
        sha = hashlib.sha256(body).hexdigest()
        a.artefacts.store_component_bytes(ctx, "conf-art", body, sha)
        comps.append({"path": path, "size": len(body), "sha256": sha})
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    a.artefacts.add_key(ctx, ctx.tenant, "conf-key", base64.b64encode(pub).decode())
    m = mf.build_manifest("model", "conf-model", comps)
    a.artefacts.push(ctx, "conf-art", m, [mf.sign(m, key, "conf-key")], "v1")


def _populate_personaldb(a: Anvil, ctx: RequestContext, root: Path) -> None:
    """A PersonalDB group with two certified commits (real session changesets) and a snapshot."""
    from anvil.storage import sqlitefile

    schema = "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"
    g = a.personaldb.create_group(ctx, "conf-pdb", schema)
    db = sqlitefile.Database(root.parent / f"{root.name}-pdb-replica.sqlite")
    try:
        db.script(schema)
        head = (0, g["genesis"])
        for i in range(2):
            db.start_session()
            db.execute("INSERT INTO notes(id, body) VALUES (?, ?)", (i, f"note {i}"))
            e = a.personaldb.commit(ctx, "conf-pdb", db.take_changeset(), base_index=head[0], base_hash=head[1])
            db.stop_session()
            head = (e["index"], e["hash"])
    finally:
        db.close()
    a.personaldb.build_snapshot("conf-pdb")
    # Row permissions by relationship (the tenant's authz schema of _populate): a binding, backed up and
    # restored with the group; the projection's relation filter is decided by relationships too.
    a.personaldb.put_binding(ctx, "conf-pdb", {"resource_type": "doc", "update": "viewer"})
    a.authz.write_relationships(ctx, [{"operation": "touch", "relationship": "doc:n1#viewer@user:amy"}])
    a.personaldb.create_projection(ctx, "conf-proj", "conf-pdb", {"tables": [
        {"from": "notes", "to": "readable", "filter": {"relation": {
            "subject": "user:amy", "permission": "view", "resource": "doc:n{id}"}}}]})


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("conformance")
    Anvil(base / "empty").close()
    # Two storage paths for bodies: "populated" keeps its small bodies inline in catalog.db (the
    # default), "populated-files" (ANVIL_INLINE_MAX=0) keeps every body as a blob file.
    _populate(base / "populated")
    saved = os.environ.get("ANVIL_INLINE_MAX")
    os.environ["ANVIL_INLINE_MAX"] = "0"
    try:
        _populate(base / "populated-files")
    finally:
        if saved is None:
            del os.environ["ANVIL_INLINE_MAX"]
        else:
            os.environ["ANVIL_INLINE_MAX"] = saved
    _check_storage_paths(base / "populated", base / "populated-files")
    return {"empty": base / "empty", "populated": base / "populated", "populated-files": base / "populated-files"}


def _check_storage_paths(inlined: Path, files: Path) -> None:
    """The two populated stores really differ in where small bodies live, and in nothing a summary shows."""
    def inline_count(root: Path) -> int:
        conn = apsw.Connection(str(root / "catalog.db"))
        try:
            return conn.execute("SELECT count(*) FROM inline_blobs").fetchone()[0]
        finally:
            conn.close()

    assert inline_count(inlined) > 0 and inline_count(files) == 0
    with context(inlined) as a, context(files) as b:
        blobs = _participant("blobs")
        sa, sb = blobs.summary(a), blobs.summary(b)
    # Same bodies, same references: the digest, counts and bytes do not depend on the storage path.
    assert (sa["referenced"], sa["present"], sa["bytes"]) == (sb["referenced"], sb["present"], sb["bytes"])
    assert sa["present"] == sa["referenced"]


@contextmanager
def context(root: Path) -> Iterator[RecoveryContext]:
    """The store as restore validation sees it: the files as they are, opened by nothing else."""
    conn = records.open_readonly(root / "catalog.db")
    try:
        yield RecoveryContext(root, conn, BlobStore(root / "blobs" / "sha256", root / "tmp"), recovery_participants())
    finally:
        records.close(conn)


def _errors(found: list) -> list:
    return [f for f in found if f.severity == "error"]


@pytest.mark.parametrize("which", ["empty", "populated", "populated-files"])
@pytest.mark.parametrize("name", NAMES)
def test_summary_and_validate(stores: dict[str, Path], name: str, which: str) -> None:
    p = _participant(name)
    d = p.describe()
    assert d.name == name and d.kind in ("source", "derived")
    with context(stores[which]) as ctx:
        summary = p.summary(ctx)
        json.dumps(summary)  # it goes into the manifest as JSON
        assert _errors(p.validate(ctx)) == []
        assert _errors(p.validate(ctx, summary)) == []
        assert p.summary(ctx) == summary  # summarising changes nothing


def _corrupt(root: Path, p: Participant) -> str:
    """Damage the participant's own state: a row of the first non-empty table it owns, else
    the first file under the first path it owns (truncated to half)."""
    conn = apsw.Connection(str(root / "catalog.db"))
    try:
        for table in p.describe().tables:
            if conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]:
                conn.execute(f"DELETE FROM {table} WHERE rowid = (SELECT max(rowid) FROM {table})")
                return f"deleted a row of {table}"
    finally:
        conn.close()
    for owned in p.describe().owns:
        pattern = owned.split(" ")[0]
        target = root / pattern
        if "*" in pattern:  # e.g. blobs/sha256/*/*.chunks: only the files the pattern names
            files = sorted(f for f in root.glob(pattern) if f.is_file())
        else:
            files = [target] if target.is_file() else sorted(f for f in target.rglob("*") if f.is_file())
        if files:
            data = files[0].read_bytes()
            files[0].write_bytes(data[: len(data) // 2])
            return f"truncated {files[0].relative_to(root)}"
    raise AssertionError(f"{p.name} owns no table or file this suite can corrupt: {p.describe()}")


@pytest.mark.parametrize("which", ["populated", "populated-files"])
@pytest.mark.parametrize("name", NAMES)
def test_validate_finds_a_seeded_corruption(stores: dict[str, Path], tmp_path: Path, name: str, which: str) -> None:
    root = tmp_path / "store"
    shutil.copytree(stores[which], root)
    p = _participant(name)
    with context(root) as ctx:
        recorded = p.summary(ctx)
    what = _corrupt(root, p)
    with context(root) as ctx:
        found = p.validate(ctx, recorded)
    assert has_errors(found), f"{name}: validate saw nothing wrong after it {what}"


@pytest.mark.parametrize("name", NAMES)
def test_rebuild(stores: dict[str, Path], tmp_path: Path, name: str) -> None:
    p = _participant(name)
    root = tmp_path / "store"
    shutil.copytree(stores["populated"], root)
    with context(root) as ctx:
        before = p.summary(ctx)
        if p.kind == "source":
            with pytest.raises(RebuildRefused):
                p.rebuild(ctx)
        else:
            assert _errors(p.rebuild(ctx)) == []
            assert p.summary(ctx) == before
        assert p.summary(ctx) == before


def test_a_part_whose_upload_record_is_gone_is_kept_backed_up_and_reported(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """gc, fsck and backup share one blob-reference query: what gc keeps, a backup copies."""
    from anvil.backup import engine
    from anvil.backup.backends.local import LocalBackend
    from anvil.backup.repository import Repository
    from anvil.diagnostics import run_fsck

    monkeypatch.setenv("ANVIL_BACKUP_KDF", "test")
    root = tmp_path / "data"
    a = Anvil(root)
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        a.objects.create_bucket(ctx, "parts")
        up = a.objects.create_multipart(ctx, "parts", "big")
        w = BlobWriter(a.storage.blobs)
        w.write(b"lonely part" * 1000)
        part = a.objects.store_body(w)
        a.objects.upload_part(ctx, "parts", up["upload_id"], 1, part)
    finally:
        a.close()
    conn = apsw.Connection(str(root / "catalog.db"))
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("DELETE FROM multipart_uploads WHERE upload_id = ?", (up["upload_id"],))
    conn.close()
    a = Anvil(root)
    try:
        ctx = RequestContext(DEV_PRINCIPAL)
        gc = a.diagnostics.gc(ctx, grace=0)
        assert gc.blobs_removed == [] and a.storage.blobs.exists(part.sha256)  # kept (inline: it is small) ...
        repo = Repository.init(LocalBackend(tmp_path / "repo"), "pw")
        m = engine.create_snapshot(root, a.storage.layout.catalog_path, a.storage.blobs, a.storage.layout.tmp,
                                   a.storage.format.deployment_id, a.participants(), repo)
        assert part.sha256 in m["tree"]["blobs"]  # ... and backed up ...
        report = run_fsck(a.diagnostics.target(), a.participants(), record=False)
    finally:
        a.close()
    assert [f.invariant for f in report.findings] == ["multipart.part_without_upload"]  # ... and reported
