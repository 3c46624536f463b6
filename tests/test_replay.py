"""Replay is complete: the whole journal, replayed onto an empty store, rebuilds every participant.

A property test over random workloads against a real server: buckets (versioned, unversioned,
suspended, public), puts, copies, deletes of keys and of versions, delete markers, multipart
uploads (completed, re-uploaded parts, aborted), identity changes (tenants, applications,
grants, revocations, disable/enable, rotation, deletion, token revocation, key rotation),
watch consumers (create, checkpoint, delete), journal compaction, diagnostics findings
(fsck, resolve), S3 additions (object tags and ACLs, bucket tagging/cors/lifecycle settings,
lifecycle expirations and aborts), authorisation (schemas, relationship batches, deletes by filter), artefacts and
PersonalDB (a group, commits, a projection, a migration, a snapshot, a compaction, a witness key
rotation). The server is stopped, its journal replayed onto an empty catalog through the
participants' `Replayer` capability, and every participant's summary, and every row of every
replayed table, must equal the live store's.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import apsw
import pytest

from anvil.client import AnvilAPIError
from anvil.personaldb import Replica
from anvil.runtime import recovery_participants
from anvil.storage import journal, records
from anvil.storage import sqlitefile as sf
from anvil.storage.blobs import BlobStore
from anvil.storage.recovery import RecoveryContext, Replayer, UnreplayableEvent, replay_into
from tests.helpers import AnvilServer
from tests.s3_helpers import s3_client

# Not rebuilt by replay, by design: migration timestamps.
# inline_blobs: small bodies kept in catalog.db (storage.inline); like blob files, their bytes are in
# no event, so a replay brings the records back and the bodies come from the blob store.
# deployment: each store's own id (a replay builds another store); holds: what archiving and running
# backups keep from compaction and gc (storage.holds), coordination like the leases, in no event.
NOT_REPLAYED = {"schema_migrations", "inline_blobs", "deployment", "holds"}

# The live server's lifecycle clock: a "day" of 0.2 s, checked every 0.1 s (`_workload_s3`).
LIFECYCLE_ENV = {"ANVIL_LIFECYCLE_DAY_SECONDS": "0.2", "ANVIL_LIFECYCLE_INTERVAL_SECONDS": "0.1"}


def run_workload(srv: AnvilServer, rng: random.Random, ops: int) -> list[dict]:
    """Random mutations; returns the journal events read just before each compaction (they are
    archived before compaction may drop them, as the continuous archive does)."""
    archived: list[dict] = []
    refused: list[str] = []
    c = srv.client()
    buckets: list[str] = []
    keys: dict[str, list[str]] = {}
    uploads: list[tuple[str, str, str]] = []
    apps: list[str] = []
    tenants = ["system"]
    consumers: list[str] = []

    def body() -> bytes:
        return os.urandom(rng.choice([0, 1, 10, 100, 5000]))

    def some(xs: list):
        return rng.choice(xs) if xs else None

    def new_bucket() -> None:
        name = f"r-{uuid.uuid4().hex[:10]}"
        c.create_bucket(name, versioning=rng.choice(["Enabled", None]) or None)
        buckets.append(name)
        keys[name] = []

    new_bucket()
    _workload_s3(srv, c, rng, buckets, keys)
    # Every operation once first (so each seed covers every kind), then a random mix.
    plan = ["put", "consumer", "checkpoint", "mp_create", "mp_part", "mp_complete", "tenant", "app", "grant",
            "delete", "fsck", "idem", "idem"]
    seen: collections.Counter = collections.Counter()
    for i in range(ops + len(plan)):
        op = plan[i] if i < len(plan) else rng.choices(
            ["bucket", "put", "put", "put", "copy", "delete", "delete_version", "versioning", "public",
             "mp_create", "mp_part", "mp_complete", "mp_abort", "tenant", "app", "grant", "revoke", "disable",
             "rotate", "delete_app", "revoke_token", "consumer", "checkpoint", "delete_consumer", "compact",
             "delete_bucket", "fsck", "key_rotate"],
            weights=[2, 10, 10, 10, 3, 5, 4, 1, 1, 2, 3, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 2, 1, 1, 1, 1, 1])[0]
        seen[op] += 1
        b = some(buckets)
        try:
            if op == "bucket" or b is None:
                new_bucket()
            elif op == "put":
                key = rng.choice(keys[b]) if keys[b] and rng.random() < 0.5 else f"k/{rng.randrange(20)}"
                c.put_object(b, key, body(), metadata={"n": str(rng.randrange(9))} if rng.random() < 0.3 else None,
                             content_type=rng.choice([None, "text/plain"]))
                keys[b].append(key)
            elif op == "idem":
                # Keyed requests and their retries: the idempotency record is journaled and replayed.
                key, idem = f"i/{rng.randrange(5)}", f"idem-{rng.randrange(10**9)}"
                data = body()
                first = c.put_object(b, key, data, idempotency_key=idem)
                assert c.put_object(b, key, data, idempotency_key=idem)["version_id"] == first["version_id"]
                keys[b].append(key)
                c.delete_object(b, key, idempotency_key=idem + "-d")
            elif op == "copy" and keys[b]:
                c.copy_object(b, f"c/{rng.randrange(5)}", source_key=rng.choice(keys[b]))
            elif op == "delete" and keys[b]:
                c.delete_object(b, rng.choice(keys[b]))
            elif op == "delete_version" and keys[b]:
                key = rng.choice(keys[b])
                versions = [v for v in c.list_versions(b, prefix=key)["versions"] if v["key"] == key]
                if versions:
                    c.delete_object(b, key, version_id=rng.choice(versions)["version_id"])
            elif op == "versioning":
                c.set_versioning(b, rng.choice(["Enabled", "Suspended"]))
            elif op == "public":
                c.set_public_access(b, rng.random() < 0.5)
            elif op == "mp_create":
                key = f"mp/{rng.randrange(5)}"
                uploads.append((b, key, c.create_upload(b, key, metadata={"m": "1"})))
            elif op == "mp_part" and uploads:
                ub, _, uid = rng.choice(uploads)
                c.upload_part(ub, uid, rng.choice([1, 2]), body())
            elif op == "mp_complete" and uploads:
                ub, key, uid = uploads.pop(rng.randrange(len(uploads)))
                part = c.upload_part(ub, uid, 1, body())
                c.complete_upload(ub, uid, [(1, part["etag"])])
                keys[ub].append(key)
            elif op == "mp_abort" and uploads:
                ub, _, uid = uploads.pop(rng.randrange(len(uploads)))
                c.abort_upload(ub, uid)
            elif op == "tenant":
                name = f"t-{uuid.uuid4().hex[:8]}"
                c.create_tenant(name)
                tenants.append(name)
            elif op == "app":
                t = rng.choice(tenants)
                app = c.create_app(t, f"a{rng.randrange(1000)}", scopes=[f"bucket:read|tenant:{t}"]
                                   if t != "system" else ["admin:read|system"])
                apps.append(app["client_id"])
            elif op == "grant" and apps:
                c.grant(rng.choice(apps), ["object:read|bucket:*"])
            elif op == "revoke" and apps:
                c.revoke(rng.choice(apps), ["object:read|bucket:*"])
            elif op == "disable" and apps:
                (c.disable_app if rng.random() < 0.6 else c.enable_app)(rng.choice(apps))
            elif op == "rotate" and apps:
                c.rotate_app_secret(rng.choice(apps))
            elif op == "delete_app" and apps:
                c.delete_app(apps.pop(rng.randrange(len(apps))))
            elif op == "revoke_token":
                c.revoke_token(uuid.uuid4().hex)
            elif op == "consumer":
                name = f"c{rng.randrange(1000)}"
                c.create_consumer(name, bucket=rng.choice([None, b]), after=0 if rng.random() < 0.5 else None)
                consumers.append(name)
            elif op == "checkpoint" and consumers:
                name = rng.choice(consumers)
                cur = c.get_consumer(name)["cursor"]
                head = c.health()["journal"]["seq"]
                c.checkpoint(name, rng.randint(cur, head))
            elif op == "delete_consumer" and consumers:
                c.delete_consumer(consumers.pop(rng.randrange(len(consumers))))
            elif op == "compact":
                archived.extend(_all_events(c, archived))
                c.compact_journal(0)
            elif op == "delete_bucket" and not keys[b] and not any(u[0] == b for u in uploads):
                c.delete_bucket(b)
                buckets.remove(b)
            elif op == "fsck":
                data = os.urandom(64)
                sha = hashlib.sha256(data).hexdigest()
                orphan = srv.storage_path / "blobs" / "sha256" / sha[:2] / sha
                orphan.parent.mkdir(parents=True, exist_ok=True)
                orphan.write_bytes(data)
                found = c.fsck()["findings"]
                open_ones = [f for f in c.list_findings(limit=1000) if not f.get("resolved_at")]
                if open_ones and rng.random() < 0.5:
                    c.resolve_finding(rng.choice(open_ones)["id"], "seen by the replay test")
                assert found is not None
            elif op == "key_rotate":
                c.rotate_secret_key()
        except AnvilAPIError as e:
            # Random workloads make conflicting requests (a version already gone, a bucket not
            # empty); refused ones change nothing, which is part of what replay must match.
            assert e.status in (400, 404, 409, 410, 412), e
            refused.append(f"{op}: {e.code}: {e.message}")
    _workload_authz(c, rng, tenants, refused)
    _workload_authz_bindings(c, rng, refused)
    _workload_artefacts(c, rng, buckets)
    _workload_personaldb(c, rng, srv.storage_path.parent / "pdb-replicas")
    _workload_indexes(c, rng, buckets)
    archived.extend(_all_events(c, archived))
    c.close()
    print("operations:", dict(seen), "refused:", *refused, sep="\n  ")
    return archived


# -- anvil.authz ---------------------------------------------------------------------------------

AUTHZ_SCHEMA = """
use expiration
definition user {}
definition group {
    relation member: user | group#member
}
caveat tier_ok(tier string, limit int) {
    tier == "gold" && limit > 0
}
definition document {
    relation viewer: user | user:* | user with expiration | user with tier_ok | group#member
    relation owner: user
    permission view = viewer + owner
}
"""


def _workload_authz(c, rng: random.Random, tenants: list[str], refused: list[str]) -> None:
    """anvil.authz: schema writes (one refused for orphaning relationships), relationship batches
    (create, touch that changes a row or nothing, delete, caveats, wildcards, expirations with
    sub-microsecond instants, an expired one re-created), deletes by filter (partial too), and
    refused writes (an existing create, a failed precondition)."""

    def refusal(what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except AnvilAPIError as e:
            assert e.status in (400, 409, 412), e
            refused.append(f"authz {what}: {e.code}: {e.message}")
        else:
            raise AssertionError(f"authz {what} was accepted")

    chosen = rng.sample(tenants, min(2, len(tenants)))
    for t in chosen:
        tenant = None if t == "system" else t
        c.authz_write_schema(AUTHZ_SCHEMA, tenant=tenant)
        soon = time.time() + rng.uniform(0.01, 0.05)
        n = rng.randrange(3)
        c.authz_write([
            f"document:d{n}#viewer@user:amy", "document:d1#owner@user:bob", "document:d2#viewer@group:eng#member",
            "group:eng#member@user:carl", f"document:d{n}#viewer@user:*",
            'document:d3#viewer@user:dan[tier_ok:{"tier":"gold"}]',
            {"operation": "touch", "relationship": "document:d3#viewer@user:eve", "expires_at": soon},
            "document:d4#viewer@user:fay[expiration:2100-01-01T00:00:00Z]"], tenant=tenant)
        c.authz_write([
            {"operation": "touch", "relationship": f"document:d{n}#viewer@user:amy"},  # unchanged
            {"operation": "touch", "relationship": 'document:d3#viewer@user:dan[tier_ok:{"limit":3,"tier":"silver"}]'},
            {"operation": "touch", "relationship": "document:d4#viewer@user:fay",
             "expires_at": time.time() + 3600 + rng.random()},
            {"operation": "delete", "relationship": "document:d1#owner@user:bob"},
            {"operation": "delete", "relationship": "document:d9#owner@user:zed"},  # nothing to delete
            {"operation": "create", "relationship": f"document:d{rng.randrange(5, 9)}#owner@user:gus"}],
            tenant=tenant)
        refusal("create of an existing relationship", c.authz_write,
                [{"operation": "create", "relationship": "group:eng#member@user:carl"}], tenant=tenant)
        refusal("failed precondition", c.authz_write, ["document:d5#viewer@user:hal"], tenant=tenant,
                preconditions=[{"operation": "must_not_match", "filter": {"resource_type": "group"}}])
        refusal("orphaning schema", c.authz_write_schema, AUTHZ_SCHEMA.replace(" | group#member\n    relation owner",
                                                                              "\n    relation owner"),
                tenant=tenant)
        time.sleep(max(0.0, soon - time.time()) + 0.01)
        c.authz_write([{"operation": "create", "relationship": "document:d3#viewer@user:eve"}],  # expired: no block
                      tenant=tenant)
        c.authz_delete({"resource_type": "document", "relation": "viewer"}, limit=rng.choice([1, 2]),
                       allow_partial=True, tenant=tenant)
        c.authz_delete({"resource_type": "group", "resource_id": "eng"}, tenant=tenant)
        c.authz_delete({"resource_type": "document", "resource_id": "nothing"}, tenant=tenant)  # deletes none
        c.authz_write_schema(AUTHZ_SCHEMA.replace("permission view = viewer + owner",
                                                  "permission view = viewer + owner\n    permission edit = owner"),
                             tenant=tenant)


def _workload_authz_bindings(c, rng: random.Random, refused: list[str]) -> None:
    """Bucket bindings (authz.binding.put / .delete): bind, rebind with other permissions, unbind, a
    refused bind (a permission the schema lacks), and a binding left in place over a bucket that is
    deleted and made again (the new bucket is unbound: the row stays, stale)."""
    c.authz_write_schema(AUTHZ_SCHEMA.replace("permission view = viewer + owner",
                                              "permission view = viewer + owner\n    permission edit = owner"))
    names = [f"bound-{rng.randrange(10**6)}-{i}" for i in range(3)]
    for name in names:
        c.create_bucket(name)
    c.authz_bind_bucket(names[0], {"resource_type": "document", "read": "view", "write": "edit"})
    c.authz_bind_bucket(names[1], {"resource_type": "document", "read": "view", "write": "owner", "list": "viewer",
                                   "without_subject": "scopes"})
    c.authz_bind_bucket(names[1], {"resource_type": "document", "read": "viewer", "write": "edit"})
    c.authz_bind_bucket(names[2], {"resource_type": "document", "read": "view", "write": "edit"})
    c.authz_unbind_bucket(names[2])
    try:
        c.authz_bind_bucket(names[2], {"resource_type": "document", "read": "nope", "write": "edit"})
        raise AssertionError("a binding to a missing permission was accepted")
    except AnvilAPIError as e:
        assert e.code == "InvalidArgument", e
        refused.append(f"authz bind: {e.code}: {e.message}")
    c.delete_bucket(names[0])
    c.create_bucket(names[0])


# -- artefacts (anvil.artefacts: events artefact.*) ------------------------------------------


def _workload_artefacts(c, rng: random.Random, buckets: list[str]) -> None:
    """Signing keys, component uploads (one uploaded again), pushes (with and without a tag, a delta),
    a signature added to an existing manifest, tags moved and a key-policy-only tag, and a push the
    tag's policy refuses (which writes nothing). Artefacts have no delete: signatures and tags are
    their updates."""
    import base64
    import tempfile

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pub = base64.b64encode(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw)).decode()
    kid = f"k-{uuid.uuid4().hex[:8]}"
    c.add_signing_key(kid, pub)
    bucket = rng.choice(buckets) if buckets and rng.random() < 0.7 else None
    if bucket is None:
        bucket = f"a-{uuid.uuid4().hex[:10]}"
        c.create_bucket(bucket)
    with tempfile.TemporaryDirectory() as tmp:
        def files(n: int) -> list[dict]:
            out = []
            for i in range(n):
                data = os.urandom(rng.choice([1, 100, 3000])) if i else b'{"shared": true}'
                local = Path(tmp) / uuid.uuid4().hex
                local.write_bytes(data)
                out.append({"path": f"f{i}.bin" if i else "config.json", "size": len(data),
                            "sha256": hashlib.sha256(data).hexdigest(), "local": str(local)})
            return out

        name, seed = f"m{rng.randrange(100)}", rng.randrange(9)
        first = files(rng.choice([1, 2, 3]))
        plain = c.artefact_push("model", bucket, name, first, metadata={"seed": seed})
        signed = c.artefact_push("model", bucket, name, files(2), tag="v1", signing_key=key, key_id=kid)
        # The same manifest again, now signed: its signature is added (artefact.sign).
        again = c.artefact_push("model", bucket, name, first, metadata={"seed": seed}, signing_key=key, key_id=kid)
        assert again["id"] == plain["id"] and not again["created"]
        c.tag_artefact(bucket, name, "prod", signed["id"], require_key=kid)
        with pytest.raises(AnvilAPIError) as e:
            c.artefact_push("model", bucket, name, files(1), tag="prod")
        assert e.value.code == "SignatureInvalid"
        c.tag_artefact(bucket, name, "v1", plain["id"])  # moved
        c.tag_artefact(bucket, name, "next", None, require_key=kid)  # a policy, pointing nowhere yet
        # A delta over v1, and a component uploaded again (its record refreshed).
        c.artefact_push("model", bucket, name, files(2), base="v1", tag=rng.choice(["v2", "v1"]))
        c._raw_put_file(c._a(bucket, name) + f"/components/{first[0]['sha256']}", first[0]["local"],
                        first[0]["size"])
        for _ in range(rng.randrange(3)):
            c.artefact_push("model", bucket, f"s{rng.randrange(100)}", files(1), tag=rng.choice([None, "latest"]))


# -- anvil.personaldb -------------------------------------------------------------------------

PDB_SCHEMA = "CREATE TABLE notes(id INTEGER PRIMARY KEY, owner TEXT NOT NULL, body TEXT NOT NULL);"
PDB_MIGRATION = "ALTER TABLE notes ADD COLUMN pinned INTEGER DEFAULT 0;"


# -- anvil.indexes ---------------------------------------------------------------------------

def _workload_indexes(c, rng: random.Random, buckets: list[str]) -> None:
    """Index definitions (source rows of a derived participant): create, update, disable, enable,
    and a drop of a second one."""
    bucket = rng.choice(buckets)
    fields = {"body": {"source": "body", "type": "text"}}
    keep = c.create_index(bucket, {"name": f"ix{rng.randrange(100)}", "kind": "full-text",
                                   "selector": {"prefix": ""}, "fields": fields})
    c.update_index(bucket, keep["name"], {"name": keep["name"], "kind": "full-text",
                                          "selector": {"prefix": "a"}, "fields": fields})
    c.disable_index(bucket, keep["name"])
    c.enable_index(bucket, keep["name"])
    gone = c.create_index(bucket, {"name": "ix-gone", "kind": "metadata", "selector": {"prefix": ""},
                                   "fields": {"k": {"source": "key", "type": "keyword"}}})
    c.drop_index(bucket, gone["name"])
    # A bucket deleted while it has an index definition and a component upload no manifest names:
    # the definition goes with it (index.drop) and so does the upload (artefact.uploads_drop).
    doomed = f"ixd-{uuid.uuid4().hex[:10]}"
    c.create_bucket(doomed)
    c.create_index(doomed, {"name": "ix-doomed", "kind": "metadata", "selector": {"prefix": ""},
                            "fields": {"k": {"source": "key", "type": "keyword"}}})
    import tempfile

    data = os.urandom(64)
    local = Path(tempfile.mkdtemp()) / "component"
    local.write_bytes(data)
    c._raw_put_file(c._a(doomed, "m") + f"/components/{hashlib.sha256(data).hexdigest()}", str(local), len(data))
    c.delete_bucket(doomed)


def _workload_personaldb(c, rng: random.Random, scratch: Path) -> None:
    """A group through a replica (SDK): inserts, an update, a delete, a projection (so commits emit
    `pdb.projection.update`), a migration, an idempotent retry, a refused stale base, a snapshot,
    a compaction and a witness key rotation. Every `pdb.*` kind, a few operations per run."""
    scratch.mkdir(parents=True, exist_ok=True)
    group = f"g-{uuid.uuid4().hex[:10]}"
    c.pdb_create(group, PDB_SCHEMA)
    # Row bindings (pdb.binding.put / .delete), over the schema _workload_authz_bindings left: bind,
    # rebind, unbind, bind again (left in place; the admin acting for no subject commits on scopes).
    c.pdb_bind(group, {"resource_type": "document", "update": "edit"})
    c.pdb_bind(group, {"resource_type": "document", "update": "owner", "delete": "edit", "without_subject": "scopes"})
    c.pdb_unbind(group)
    c.pdb_bind(group, {"resource_type": "document", "resource": "{group}/{table}/{id}", "update": "edit"})
    r = Replica(scratch / f"{group}.sqlite", c, group)
    try:
        n = rng.randint(2, 4)
        for i in range(1, n + 1):
            r.execute("INSERT INTO notes(id, owner, body) VALUES (?, ?, ?)", (i, rng.choice(["ann", "bob"]), f"n{i}"))
        r.sync()
        c.pdb_create_projection(f"p-{uuid.uuid4().hex[:8]}", group,
                                {"tables": [{"from": "notes", "to": "bobs", "columns": {"id": "id", "body": "body"},
                                             "filter": {"equals": {"owner": "bob"}}}], "write_back": "deny"})
        r.execute("UPDATE notes SET body = ?, owner = 'bob' WHERE id = 1", (f"u{rng.randrange(99)}",))
        r.execute("DELETE FROM notes WHERE id = ?", (rng.randint(2, n),))
        r.sync()
        c.pdb_rotate_key()
        c.pdb_migrate(group, PDB_MIGRATION)
        r.sync()
        r.execute("UPDATE notes SET pinned = 1 WHERE id = 1")
        r.sync()
        # An idempotent retry writes nothing new; a stale base is refused and changes nothing.
        index, h = r.head
        db = sf.Database(scratch / f"{group}-cs.sqlite")
        try:
            db.script(PDB_SCHEMA + PDB_MIGRATION)
            db.start_session()
            db.execute("INSERT INTO notes(id, owner, body) VALUES (100, 'ann', 'x')")
            cs = db.take_changeset()
        finally:
            db.close()
        key = uuid.uuid4().hex
        for _ in range(2):
            c.pdb_commit(group, cs, base_index=index, base_hash=h, schema_version=r.schema_version,
                         idempotency_key=key)
        with pytest.raises(AnvilAPIError) as stale:
            c.pdb_commit(group, cs, base_index=index, base_hash=h, schema_version=r.schema_version)
        assert stale.value.code == "PersonalDbStaleBase"
        c.pdb_build_snapshot(group)
        c.pdb_compact(group)
        r.execute("DELETE FROM notes WHERE id = 1")
        r.sync()
    finally:
        r.close()


def _workload_s3(srv: AnvilServer, c, rng: random.Random, buckets: list[str], keys: dict[str, list[str]]) -> None:
    """The S3 additions to objects, through the S3 gateway: object tags and ACLs (at PUT, copy and
    multipart creation, then set, replaced and removed), bucket tagging/cors/lifecycle settings (set,
    replaced, removed, and dropped with a deleted bucket, whose upload the delete aborts), and the
    lifecycle worker's expiration, delete-marker removal, noncurrent removal and upload abort.

    The worker's actions are waited for, then its configuration removed and two more runs waited
    for, so no lifecycle event can land after the workload reads the journal. The bucket then joins
    the random workload's pool (copies of its tagged objects carry their tags)."""
    s3 = s3_client(srv)
    b, gone = f"s3-{uuid.uuid4().hex[:10]}", f"s3-{uuid.uuid4().hex[:10]}"
    tag = lambda: f"v{rng.randrange(100)}"  # noqa: E731
    s3.create_bucket(Bucket=b)
    s3.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=b, Key="t/a", Body=b"a", Tagging=f"team={tag()}&x=1", ACL="public-read")
    s3.put_object(Bucket=b, Key="t/b", Body=b"b")
    s3.put_object_tagging(Bucket=b, Key="t/b", Tagging={"TagSet": [{"Key": "k", "Value": tag()}]})
    s3.put_object_tagging(Bucket=b, Key="t/a", Tagging={"TagSet": [{"Key": "team", "Value": tag()}]})
    s3.delete_object_tagging(Bucket=b, Key="t/b")
    s3.put_object_acl(Bucket=b, Key="t/b", ACL="public-read")
    s3.put_object_acl(Bucket=b, Key="t/a", ACL="private")
    s3.copy_object(Bucket=b, Key="t/c", CopySource={"Bucket": b, "Key": "t/a"}, ACL="public-read",
                   TaggingDirective="REPLACE", Tagging=f"copied={tag()}")
    up = s3.create_multipart_upload(Bucket=b, Key="t/m", Tagging="mp=1", ACL="public-read")["UploadId"]
    part = s3.upload_part(Bucket=b, Key="t/m", UploadId=up, PartNumber=1, Body=b"m")
    s3.complete_multipart_upload(Bucket=b, Key="t/m", UploadId=up,
                                 MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
    cors = {"CORSRules": [{"AllowedMethods": ["GET"], "AllowedOrigins": [f"https://{tag()}.example"]}]}
    for bucket in (b, gone):
        if bucket == gone:
            s3.create_bucket(Bucket=gone)
            s3.create_multipart_upload(Bucket=gone, Key="pending")
        s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": [{"Key": "owner", "Value": tag()}]})
        s3.put_bucket_cors(Bucket=bucket, CORSConfiguration=cors)
    s3.put_bucket_tagging(Bucket=b, Tagging={"TagSet": [{"Key": "owner", "Value": "replaced"}]})
    s3.delete_bucket_cors(Bucket=b)
    s3.delete_bucket(Bucket=gone)  # aborts its upload, drops its settings
    # Lifecycle: what falls due at once (a past date, a lone delete marker) or within a "day".
    s3.put_object(Bucket=b, Key="exp/a", Body=b"e")
    s3.put_object(Bucket=b, Key="nc/a", Body=b"1")
    s3.put_object(Bucket=b, Key="nc/a", Body=b"2")
    only = s3.put_object(Bucket=b, Key="dm/a", Body=b"d")["VersionId"]
    s3.delete_object(Bucket=b, Key="dm/a")
    s3.delete_object(Bucket=b, Key="dm/a", VersionId=only)
    s3.create_multipart_upload(Bucket=b, Key="up/stale")
    rules = [
        {"ID": "exp", "Filter": {"Prefix": "exp/"}, "Status": "Enabled",
         "Expiration": {"Date": datetime(2020, 1, 1, tzinfo=UTC)}},
        {"ID": "dm", "Filter": {"Prefix": "dm/"}, "Status": "Enabled",
         "Expiration": {"ExpiredObjectDeleteMarker": True}},
        {"ID": "nc", "Filter": {"Prefix": "nc/"}, "Status": "Enabled",
         "NoncurrentVersionExpiration": {"NoncurrentDays": 1}},
        {"ID": "up", "Filter": {"Prefix": "up/"}, "Status": "Enabled",
         "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}},
    ]
    s3.put_bucket_lifecycle_configuration(Bucket=b, LifecycleConfiguration={"Rules": rules[:1]})
    s3.put_bucket_lifecycle_configuration(Bucket=b, LifecycleConfiguration={"Rules": rules})

    def status() -> dict:
        return c._http.get("/anvil/v1/admin/lifecycle/status").json()

    def wait(done) -> dict:
        deadline = time.monotonic() + 15
        while not done(st := status()):
            assert time.monotonic() < deadline, st
            time.sleep(0.05)
        return st

    wait(lambda st: min(st["expired"], st["delete_markers_removed"], st["noncurrent_removed"],
                        st["uploads_aborted"]) >= 1)
    s3.delete_bucket_lifecycle(Bucket=b)
    runs = status()["runs"]
    wait(lambda st: st["runs"] >= runs + 2)
    s3.close()
    buckets.append(b)
    keys[b] = ["t/a", "t/b", "t/c", "t/m", "exp/a", "nc/a"]


def _all_events(c, have: list[dict]) -> list[dict]:
    after = have[-1]["seq"] if have else 0
    out: list[dict] = []
    while True:
        page = c.journal(after=after, limit=1000)
        if not page:
            return out
        out.extend(page)
        after = page[-1]["seq"]


def _tables(conn) -> dict[str, list]:
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return {n: sorted(map(repr, conn.execute(f"SELECT * FROM {n}").fetchall()))
            for n in names if n not in NOT_REPLAYED and not n.startswith("sqlite_")}


def _summaries(root: Path, catalog: Path, blobs: BlobStore) -> dict[str, dict]:
    conn = records.open_readonly(catalog)
    try:
        parts = recovery_participants()
        ctx = RecoveryContext(root, conn, blobs, parts)
        return {p.name: p.summary(ctx) for p in parts}
    finally:
        records.close(conn)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_replaying_the_whole_journal_rebuilds_every_participant(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    srv = AnvilServer(tmp_path / "live", env=LIFECYCLE_ENV).start()
    try:
        events = run_workload(srv, rng, ops=120)
    finally:
        srv.stop()
    live_root = srv.storage_path
    live_catalog = live_root / "catalog.db"
    kinds = {e["kind"] for e in events}
    # The workload exercised what the property is about.
    assert {"object.put", "object.delete", "multipart.create", "multipart.part", "identity.app.create",
            "watch.consumer.create", "watch.checkpoint", "diagnostics.finding",
            "authz.schema.write", "authz.relationships.write", "authz.relationships.delete",
            "authz.binding.put", "authz.binding.delete"} <= kinds, kinds
    assert {"artefact.upload", "artefact.key_add", "artefact.push", "artefact.sign", "artefact.tag"} <= kinds, kinds
    assert {"pdb.group.create", "pdb.commit", "pdb.migrate", "pdb.snapshot", "pdb.compact",
            "pdb.projection.create", "pdb.projection.update", "pdb.keys", "pdb.binding.put",
            "pdb.binding.delete"} <= kinds, kinds
    assert {"index.create", "index.update", "index.disable", "index.enable", "index.drop"} <= kinds, kinds
    assert "idempotency.record" in kinds, kinds
    assert {"object.tagging", "object.acl", "bucket.tagging", "bucket.lifecycle", "bucket.cors",
            "multipart.abort"} <= kinds, kinds
    lifecycle = {(e["kind"], e["scope"].split("/", 1)[1]) for e in events
                 if e["actor"].endswith("/system-lifecycle")}
    assert {("object.delete", "exp/a"), ("object.delete", "dm/a"), ("object.delete", "nc/a"),
            ("multipart.abort", "up/stale")} <= lifecycle, lifecycle
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))

    replayed = tmp_path / "replayed" / "catalog.db"
    replayed.parent.mkdir()
    n = replay_into(replayed, (journal.event_from_dict(e) for e in events), recovery_participants())
    assert n == len(events)

    blobs = BlobStore(live_root / "blobs" / "sha256", live_root / "tmp")
    live = _summaries(live_root, live_catalog, blobs)
    again = _summaries(live_root, replayed, blobs)
    for name in live:
        assert again[name] == live[name], f"participant {name}: replayed summary differs"
    a, b = apsw.Connection(str(live_catalog)), apsw.Connection(str(replayed))
    try:
        live_rows, replayed_rows = _tables(a), _tables(b)
    finally:
        a.close()
        b.close()
    assert set(live_rows) == set(replayed_rows)
    for table in live_rows:
        assert replayed_rows[table] == live_rows[table], f"table {table} differs after replay"


def test_every_journaled_kind_has_a_replayer_and_unknown_kinds_are_refused(tmp_path: Path) -> None:
    parts = recovery_participants()
    owners = [prefix for p in parts if isinstance(p, Replayer) for prefix in p.replays]
    for kind in ("bucket.create", "object.put", "multipart.part", "identity.app.create", "watch.compact",
                 "diagnostics.finding", "recovery.resume", "pdb.commit", "pdb.keys"):
        assert any(kind.startswith(o) for o in owners), kind
    ev = journal.Event(1, 1.0, "system", "nobody.knows", "x", "a", "r", {}, journal.GENESIS_HASH, "")
    payload = journal.canonical_payload({})
    ev = journal.Event(1, 1.0, "system", "nobody.knows", "x", "a", "r", {}, journal.GENESIS_HASH,
                       journal.event_hash(journal.GENESIS_HASH, 1, 1.0, "system", "nobody.knows", "x", "a", "r",
                                          payload))
    with pytest.raises(UnreplayableEvent, match="nobody.knows"):
        replay_into(tmp_path / "catalog.db", [ev], parts)


def test_a_gap_or_an_altered_event_stops_replay_where_it_is(tmp_path: Path) -> None:
    def make(seq: int, prev: str, payload: dict) -> journal.Event:
        h = journal.event_hash(prev, seq, float(seq), "system", "recovery.resume", "recovery", "a", "r",
                               journal.canonical_payload(payload))
        return journal.Event(seq, float(seq), "system", "recovery.resume", "recovery", "a", "r", payload, prev, h)

    e1 = make(1, journal.GENESIS_HASH, {})
    e2 = make(2, e1.hash, {"n": 2})
    e3 = make(3, e2.hash, {"n": 3})
    altered = journal.Event(*[*e2.to_dict().values()][:7], {"n": 99}, e2.prev_hash, e2.hash)
    with pytest.raises(journal.ReplayRefused, match="altered"):
        replay_into(tmp_path / "a.db", [e1, altered, e3], recovery_participants())
    conn = records.open_readonly(tmp_path / "a.db")
    assert journal.head(conn) == (1, e1.hash)  # the good prefix committed, nothing after it
    records.close(conn)
    with pytest.raises(journal.ReplayRefused, match="does not follow"):
        replay_into(tmp_path / "b.db", [e1, e3], recovery_participants())
