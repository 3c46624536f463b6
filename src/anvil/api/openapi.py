"""The OpenAPI document for the native API, built from one table of operations."""

from __future__ import annotations

from typing import Any

from anvil import __version__

KEY = {"name": "key", "in": "query", "required": True, "schema": {"type": "string"},
       "description": "object key (opaque UTF-8, at most 1024 bytes)"}
VERSION = {"name": "version_id", "in": "query", "required": False, "schema": {"type": "string"}}
IDEM = {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}}


def _q(name: str, typ: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": typ}}


def _h(name: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "schema": {"type": "string"}}


COND = [_h("If-Match"), _h("If-None-Match"), _h("x-anvil-if-version-match"), _h("x-anvil-if-version-none-match")]

# (method, path, operationId, summary, parameters, has JSON body, streamed body)
OPERATIONS: list[tuple[str, str, str, str, list[dict[str, Any]], bool, bool]] = [
    ("get", "/anvil/health/live", "live", "Liveness", [], False, False),
    ("get", "/anvil/health/ready", "ready", "Readiness: journal head, recovery mode", [], False, False),
    ("get", "/anvil/v1/buckets", "listBuckets", "List buckets", [], False, False),
    ("put", "/anvil/v1/buckets/{bucket}", "createBucket", "Create a bucket", [IDEM], True, False),
    ("get", "/anvil/v1/buckets/{bucket}", "getBucket", "Get a bucket", [], False, False),
    ("delete", "/anvil/v1/buckets/{bucket}", "deleteBucket", "Delete an empty bucket", [IDEM], False, False),
    ("put", "/anvil/v1/buckets/{bucket}/versioning", "putVersioning", "Set versioning (Enabled|Suspended)",
     [IDEM], True, False),
    ("get", "/anvil/v1/buckets/{bucket}/objects", "listObjects", "List objects",
     [_q("prefix"), _q("delimiter"), _q("start_after"), _q("limit", "integer"), _q("token")], False, False),
    ("get", "/anvil/v1/buckets/{bucket}/versions", "listVersions", "List object versions",
     [_q("prefix"), _q("delimiter"), _q("key_marker"), _q("version_marker"), _q("limit", "integer")],
     False, False),
    ("put", "/anvil/v1/buckets/{bucket}/object", "putObject", "Put an object (streamed body)",
     [KEY, IDEM, _h("Content-Type"), _h("Content-MD5"), _h("x-anvil-checksum-sha256"), *COND], False, True),
    ("get", "/anvil/v1/buckets/{bucket}/object", "getObject", "Get an object or a byte range (HEAD too)",
     [KEY, VERSION, _h("Range"), *COND], False, False),
    ("delete", "/anvil/v1/buckets/{bucket}/object", "deleteObject", "Delete an object or a version",
     [KEY, VERSION, IDEM, *COND], False, False),
    ("post", "/anvil/v1/buckets/{bucket}/copy", "copyObject", "Copy an object", [IDEM, *COND], True, False),
    ("post", "/anvil/v1/buckets/{bucket}/uploads", "createUpload", "Initiate a multipart upload", [IDEM],
     True, False),
    ("get", "/anvil/v1/buckets/{bucket}/uploads", "listUploads", "List multipart uploads", [_q("prefix")],
     False, False),
    ("put", "/anvil/v1/buckets/{bucket}/uploads/{upload_id}/parts/{part_number}", "uploadPart",
     "Upload a part (streamed body)", [IDEM, _h("Content-MD5"), _h("x-anvil-checksum-sha256")], False, True),
    ("get", "/anvil/v1/buckets/{bucket}/uploads/{upload_id}/parts", "listParts", "List uploaded parts", [],
     False, False),
    ("post", "/anvil/v1/buckets/{bucket}/uploads/{upload_id}/complete", "completeUpload",
     "Complete a multipart upload", [IDEM, *COND], True, False),
    ("delete", "/anvil/v1/buckets/{bucket}/uploads/{upload_id}", "abortUpload", "Abort a multipart upload",
     [IDEM], False, False),
    ("get", "/anvil/v1/admin/journal", "journalEvents", "Read journal events (admin)",
     [_q("after", "integer"), _q("limit", "integer")], False, False),
    ("get", "/anvil/v1/admin/journal/verify", "journalVerify", "Verify the journal hash chain (admin)", [],
     False, False),
    ("post", "/anvil/v1/admin/backup", "createBackup",
     "Take a consistent online backup: {repo, passphrase, s3_endpoint?, tag?, escrow_secrets?, incremental?} (admin)",
     [], True, False),
    ("get", "/anvil/v1/admin/archive", "archiveStatus",
     "Continuous archiving: archived cursor, lag (events, seconds), last error (admin)", [], False, False),
    ("post", "/anvil/v1/admin/archive", "archiveStart",
     "Start continuous archiving: {repo, passphrase?, interval_seconds?, s3_endpoint?} (admin)", [], True, False),
    ("delete", "/anvil/v1/admin/archive", "archiveStop", "Stop continuous archiving (admin)", [], False, False),
    ("post", "/anvil/v1/admin/archive/flush", "archiveFlush", "Ship every unarchived event now (admin)", [],
     False, False),
    ("get", "/anvil/v1/admin/recovery", "recoveryStatus", "Recovery mode, restore marker, last validation (admin)",
     [], False, False),
    ("post", "/anvil/v1/admin/recovery/validate", "recoveryValidate",
     "Run the restore validation sequence and write its report (admin)", [], False, False),
    ("post", "/anvil/v1/admin/recovery/resume", "recoveryResume",
     "Leave recovery mode after a passing validation, or {force: true, reason} (admin)", [], True, False),
    ("get", "/anvil/v1/watch", "watch", "Watch journal events as Server-Sent Events (resume: Last-Event-ID)",
     [_q("bucket"), _q("prefix"), _q("kinds"), _q("after", "integer"), _q("tenant"), _q("consumer"),
      _q("heartbeat", "number"), _h("Last-Event-ID")], False, False),
    ("get", "/anvil/v1/watch/consumers", "listConsumers", "List durable watch consumers with lag", [], False, False),
    ("post", "/anvil/v1/watch/consumers", "createConsumer", "Create a durable watch consumer", [], True, False),
    ("get", "/anvil/v1/watch/consumers/{name}", "getConsumer", "Get a consumer and its lag", [], False, False),
    ("delete", "/anvil/v1/watch/consumers/{name}", "deleteConsumer", "Delete a consumer", [], False, False),
    ("post", "/anvil/v1/watch/consumers/{name}/checkpoint", "checkpointConsumer",
     "Move a consumer's cursor forward", [], True, False),
    ("post", "/anvil/v1/admin/watch/compact", "compactJournal", "Compact the journal under retention (admin)", [],
     True, False),
    ("get", "/anvil/v1/admin/watch/status", "watchStatus", "Journal head, base and consumer cursors (admin)", [],
     False, False),
    ("get", "/anvil/v1/admin/lifecycle/status", "lifecycleStatus",
     "What the S3 lifecycle worker has done: runs, expirations, removals, aborts (admin)", [], False, False),
]

# Identity: token exchange and administration.
OPERATIONS += [
    ("post", "/anvil/v1/auth/token", "token",
     "Exchange client credentials for a bearer token {client_id, client_secret, scopes?, expires_in?}",
     [], True, False),
    ("get", "/anvil/v1/auth/whoami", "whoami", "The caller's tenant, subject and scopes", [], False, False),
    ("post", "/anvil/v1/admin/tenants", "createTenant", "Create a tenant (admin)", [], True, False),
    ("get", "/anvil/v1/admin/tenants", "listTenants", "List tenants (admin)", [], False, False),
    ("post", "/anvil/v1/admin/apps", "createApp", "Create an application; its secret is returned once", [],
     True, False),
    ("get", "/anvil/v1/admin/apps", "listApps", "List applications", [_q("tenant")], False, False),
    ("post", "/anvil/v1/admin/apps/{client_id}/rotate-secret", "rotateAppSecret",
     "Rotate an application's secret; the new one is returned once", [], False, False),
    ("post", "/anvil/v1/admin/apps/{client_id}/disable", "disableApp",
     "Disable an application: its tokens and SigV4 requests are refused from the next request", [], False, False),
    ("post", "/anvil/v1/admin/apps/{client_id}/enable", "enableApp", "Enable a disabled application again", [],
     False, False),
    ("delete", "/anvil/v1/admin/apps/{client_id}", "deleteApp",
     "Delete an application and its grants (its client id is never reused)", [], False, False),
    ("post", "/anvil/v1/admin/tokens/revoke", "revokeToken",
     "Revoke one token by its jti {jti, client_id?}: refused from its next request", [], True, False),
    ("get", "/anvil/v1/admin/apps/{client_id}/policies", "listPolicies", "An application's granted scopes", [],
     False, False),
    ("post", "/anvil/v1/admin/apps/{client_id}/policies/grant", "grantPolicy",
     "Grant scopes (bounded by the caller's own)", [], True, False),
    ("post", "/anvil/v1/admin/apps/{client_id}/policies/revoke", "revokePolicy", "Revoke scopes", [], True, False),
    ("put", "/anvil/v1/buckets/{bucket}/public-access", "putPublicAccess",
     "Allow or stop anonymous GET/HEAD/LIST {public: bool}", [], True, False),
    ("get", "/anvil/v1/admin/audit", "audit", "Recent denied requests (admin)", [_q("limit", "integer")],
     False, False),
    ("post", "/anvil/v1/admin/secret-key/rotate", "rotateSecretKey",
     "Re-encrypt secret envelopes under the active key {dry_run?}", [], True, False),
    ("get", "/anvil/v1/admin/identity/summary", "identitySummary", "Identity counts and key ids (admin)", [],
     False, False),
    ("get", "/anvil/v1/admin/identity/validate", "identityValidate", "Check every envelope decrypts (admin)", [],
     False, False),
    ("get", "/anvil/v1/admin/findings", "listFindings", "List diagnostic findings (admin; tenants see their own)",
     [_q("subsystem"), _q("severity"), _q("unresolved", "boolean"), _q("limit", "integer")], False, False),
    ("post", "/anvil/v1/admin/findings/{finding_id}/resolve", "resolveFinding", "Resolve a finding (admin)", [],
     True, False),
    ("post", "/anvil/v1/admin/fsck", "fsck", "Run fsck on the live store (admin; body: {deep})", [], True, False),
    ("post", "/anvil/v1/admin/gc", "gc", "Garbage-collect orphan blobs and expired uploads (admin)", [], True,
     False),
    ("post", "/anvil/v1/admin/repair", "repair", "Rebuild derived families from source records (admin)", [], True,
     False),
    ("post", "/anvil/v1/admin/repair/blobs", "healBlobs",
     "Restore missing or quarantined blobs from a backup: {repo, passphrase, s3_endpoint?, snapshot?} (admin)", [],
     True, False),
    # anvil.indexes (docs/indexes.md)
    ("get", "/anvil/v1/buckets/{bucket}/indexes", "listIndexes", "List a bucket's indexes with status", [],
     False, False),
    ("post", "/anvil/v1/buckets/{bucket}/indexes", "createIndex", "Create an index from its definition", [],
     True, False),
    ("get", "/anvil/v1/buckets/{bucket}/indexes/{name}", "getIndex",
     "An index definition and status (generation, cursor, lag, documents, diagnostics)", [], False, False),
    ("put", "/anvil/v1/buckets/{bucket}/indexes/{name}", "updateIndex", "Replace a definition (version + 1)", [],
     True, False),
    ("delete", "/anvil/v1/buckets/{bucket}/indexes/{name}", "dropIndex", "Drop an index", [], False, False),
    ("post", "/anvil/v1/buckets/{bucket}/indexes/{name}/disable", "disableIndex", "Disable an index", [], False,
     False),
    ("post", "/anvil/v1/buckets/{bucket}/indexes/{name}/enable", "enableIndex", "Enable an index (rebuilt)", [],
     False, False),
    ("post", "/anvil/v1/buckets/{bucket}/indexes/{name}/rebuild", "rebuildIndex",
     "Rebuild an index from the bucket's objects", [], False, False),
    ("post", "/anvil/v1/buckets/{bucket}/indexes/{name}/query", "queryIndex",
     "Query: text, vector, filter, sort, limit, page_token, min_cursor, hybrid", [], True, False),
]

# Relationship-based authorisation (docs/authz.md): bodies may name `tenant` (admins) and `consistency`.
OPERATIONS += [
    ("put", "/anvil/v1/authz/schema", "writeAuthzSchema",
     "Write the tenant's SpiceDB schema (text body, or JSON {schema}); refused if it would orphan relationships",
     [_q("tenant")], False, False),
    ("get", "/anvil/v1/authz/schema", "readAuthzSchema", "Read the tenant's schema", [_q("tenant"), _q("consistency")],
     False, False),
    ("post", "/anvil/v1/authz/relationships/write", "writeRelationships",
     "Apply {updates: [{operation: create|touch|delete, relationship}], preconditions?} as one batch", [],
     True, False),
    ("post", "/anvil/v1/authz/relationships/read", "readRelationships",
     "Read relationships {filter, limit?, cursor?, consistency?}", [], True, False),
    ("post", "/anvil/v1/authz/relationships/delete", "deleteRelationships",
     "Delete relationships by {filter, preconditions?, limit?, allow_partial?}", [], True, False),
    ("post", "/anvil/v1/authz/check", "checkPermission",
     "Check {resource, permission, subject, context?, consistency?}", [], True, False),
    ("post", "/anvil/v1/authz/check/bulk", "bulkCheckPermission", "Check many {items, context?, consistency?}",
     [], True, False),
    ("post", "/anvil/v1/authz/lookup-resources", "lookupResources",
     "Resources of {resource_type} where {subject} has {permission}", [], True, False),
    ("post", "/anvil/v1/authz/lookup-subjects", "lookupSubjects",
     "Subjects of {subject_type} with {permission} on {resource} (wildcards with exclusions)", [], True, False),
    ("post", "/anvil/v1/authz/expand", "expandPermission", "The tree of {permission} on {resource}", [],
     True, False),
]

# Bucket bindings: object operations decided by relationships (docs/authz.md, "Object access").
OPERATIONS += [
    ("put", "/anvil/v1/buckets/{bucket}/authz-binding", "bindBucket",
     "Bind object operations to permissions {resource_type, read, write, list?, delete?, without_subject?}", [],
     True, False),
    ("get", "/anvil/v1/buckets/{bucket}/authz-binding", "getBucketBinding", "The bucket's binding", [], False, False),
    ("delete", "/anvil/v1/buckets/{bucket}/authz-binding", "unbindBucket", "Remove the bucket's binding", [], False,
     False),
]

# Artefacts (docs/artefacts.md): manifests, components, tags, tensors, git reads, signing keys, Hub reads.
_A = "/anvil/v1/buckets/{bucket}/artefacts"
OPERATIONS += [
    ("get", _A, "listArtefacts", "List a bucket's artefacts", [], False, False),
    ("get", _A + "/{name}", "listArtefactName", "An artefact name's artefacts and tags", [], False, False),
    ("post", _A + "/{name}", "pushArtefact",
     "Record a manifest {manifest, signatures?, tag?} (201 new, 200 already recorded)", [], True, False),
    ("post", _A + "/{name}/components/missing", "missingComponents",
     "Which of {sha256s} this bucket does not hold", [], True, False),
    ("put", _A + "/{name}/components/{sha256}", "putComponent", "Upload a component (verified by its SHA-256)",
     [], False, True),
    ("get", _A + "/{name}/components/{sha256}", "getComponent", "A component's bytes (Range)", [], False, False),
    ("put", _A + "/{name}/tags/{tag}", "putArtefactTag", "Move a tag {id, require_key?}", [], True, False),
    ("get", _A + "/{name}/{ref}", "describeArtefact", "Manifest, signatures and effective files", [], False,
     False),
    ("get", _A + "/{name}/{ref}/files/{path}", "getArtefactFile", "One file by path (Range)", [], False, False),
    ("post", _A + "/{name}/{ref}/verify", "verifyArtefact", "Re-hash components, check signatures and tensors",
     [], False, False),
    ("get", _A + "/{name}/{ref}/tensors", "listTensors", "The tensor index", [], False, False),
    ("get", _A + "/{name}/{ref}/tensors/{tensor}", "getTensor", "One tensor's bytes (x-anvil-dtype, x-anvil-shape)",
     [], False, False),
    ("get", _A + "/{name}/{ref}/git/ref", "gitResolve", "Resolve a ref of a source artefact", [_q("name")],
     False, False),
    ("get", _A + "/{name}/{ref}/git/tree/{commit}", "gitTree", "List a tree at a commit", [_q("path")], False,
     False),
    ("get", _A + "/{name}/{ref}/git/blob/{commit}", "gitBlob", "A file's bytes at a commit", [_q("path")], False,
     False),
    ("get", _A + "/{name}/{ref}/git/info/refs", "gitInfoRefs", "git smart HTTP ref discovery (read-only clone)",
     [_q("service")], False, False),
    ("post", _A + "/{name}/{ref}/git/git-upload-pack", "gitUploadPack", "git smart HTTP upload-pack (clone, fetch)",
     [], False, True),
    ("post", "/anvil/v1/artefact-keys", "addSigningKey", "Register an Ed25519 key {key_id, public_key, tenant?}",
     [], True, False),
    ("get", "/anvil/v1/artefact-keys", "listSigningKeys", "A tenant's signing keys", [_q("tenant")], False, False),
    ("get", "/anvil/v1/hf/api/models/{bucket}/{name}", "hfInfo",
     "Hugging Face Hub-compatible repository info (revision main)", [], False, False),
    ("get", "/anvil/v1/hf/api/models/{bucket}/{name}/revision/{revision}", "hfRevision",
     "Hugging Face Hub-compatible revision info", [], False, False),
    ("get", "/anvil/v1/hf/api/models/{bucket}/{name}/tree/{revision}", "hfTree",
     "Hugging Face Hub-compatible file tree", [_q("recursive", "boolean")], False, False),
    ("get", "/anvil/v1/hf/api/models/{bucket}/{name}/tree/{revision}/{path}", "hfTreePath",
     "Hugging Face Hub-compatible file tree under a folder", [_q("recursive", "boolean")], False, False),
    ("get", "/anvil/v1/hf/{bucket}/{name}/resolve/{revision}/{path}", "hfResolve",
     "Hugging Face Hub-compatible file download (X-Repo-Commit, ETag, Range)", [], False, False),
]

# PersonalDB (docs/personaldb.md).
_PG = "/anvil/v1/pdb/groups/{group}"
_PDB_COMMIT = [_h("x-anvil-pdb-base-index"), _h("x-anvil-pdb-base-hash"), _h("x-anvil-pdb-schema-version"), IDEM]
OPERATIONS += [
    ("post", "/anvil/v1/pdb/groups", "pdbCreateGroup", "Create a group {name, schema, snapshot_every?, max_changeset?}",
     [], True, False),
    ("get", "/anvil/v1/pdb/groups", "pdbListGroups", "List groups", [], False, False),
    ("get", _PG, "pdbGetGroup", "A group: head, genesis, schemas, tables, snapshots", [], False, False),
    ("post", _PG + "/migrations", "pdbMigrate", "A new schema version {sql}, as a certified log entry", [], True,
     False),
    ("post", _PG + "/commits", "pdbCommit",
     "Submit a session changeset (raw body) against its base; PersonalDbStaleBase states the head", _PDB_COMMIT,
     False, True),
    ("post", _PG + "/commits/batch", "pdbCommitBatch",
     "Submit a replica's changesets in order {base_index, base_hash, schema_version?, changesets: [{changeset "
     "(base64), idempotency_key?}]}: one certified entry each, all in one transaction", [], True, False),
    ("get", _PG + "/log", "pdbCatchUp", "Entries after (index, hash) with certificates, or snapshot_required",
     [_q("after_index", "integer"), _q("after_hash"), _q("limit", "integer"), _q("certificates_only", "boolean")],
     False, False),
    ("get", _PG + "/snapshots", "pdbListSnapshots", "Snapshots with their certificates", [], False, False),
    ("post", _PG + "/snapshots", "pdbBuildSnapshot", "Build a snapshot of the head now", [], False, False),
    ("get", _PG + "/snapshots/{index}/data", "pdbSnapshotData", "A snapshot's zstd-compressed SQLite file", [],
     False, False),
    ("post", _PG + "/compact", "pdbCompact", "Drop changesets covered by the latest snapshot", [], False, False),
    ("get", "/anvil/v1/pdb/keys", "pdbKeys", "The witness's Ed25519 public keys with rotation history", [], False,
     False),
    ("post", "/anvil/v1/admin/pdb/keys/rotate", "pdbRotateKey", "Rotate the witness key (admin)", [], True, False),
    ("post", "/anvil/v1/pdb/projections", "pdbCreateProjection", "Create a projection {name, source, spec}", [],
     True, False),
    ("get", "/anvil/v1/pdb/projections/{name}", "pdbGetProjection", "A projection: spec, source index, state hash",
     [], False, False),
    ("get", "/anvil/v1/pdb/projections/{name}/data", "pdbProjectionData",
     "The projection's zstd-compressed SQLite file", [_q("source_index", "integer")], False, False),
    ("get", "/anvil/v1/pdb/projections/{name}/changes", "pdbProjectionChanges",
     "The projection's changesets after source entry (after_index, after_hash), or snapshot_required",
     [_q("after_index", "integer"), _q("after_hash"), _q("limit", "integer")], False, False),
    ("post", "/anvil/v1/pdb/projections/{name}/writeback", "pdbWriteBack",
     "Send a projection-side changeset back to the source, under the write-back policy", [], False, True),
]

# Operations that need no bearer token (anonymous reads of public buckets are decided per bucket).
PUBLIC = frozenset({"live", "ready", "token", "pdbKeys"})
# Operations whose success status is not 200.
SUCCESS = {"createBucket": "201", "createUpload": "201", "createTenant": "201", "createApp": "201",
           "createConsumer": "201", "createBackup": "201",
           "pdbCreateGroup": "201", "pdbMigrate": "201", "pdbCommit": "201", "pdbBuildSnapshot": "201",
           "pdbCreateProjection": "201", "pdbWriteBack": "201",
           "createIndex": "201"}

ERROR = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}, "request_id": {"type": "string"}}}},
}


def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path, op_id, summary, params, json_body, streamed in OPERATIONS:
        path_params = [
            {"name": seg[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
            for seg in path.split("/") if seg.startswith("{")
        ]
        op: dict[str, Any] = {
            "operationId": op_id,
            "summary": summary,
            "parameters": path_params + params,
            "responses": {
                SUCCESS.get(op_id, "200"): {"description": "success"},
                "default": {"description": "error", "content": {"application/json": {"schema": ERROR}}},
            },
        }
        if op_id == "getObject":
            op["responses"]["206"] = {"description": "partial content (Range)"}
            op["responses"]["304"] = {"description": "not modified (If-None-Match)"}
        if op_id in PUBLIC:
            op["security"] = []
        if json_body:
            op["requestBody"] = {"content": {"application/json": {"schema": {"type": "object"}}}}
        if op_id == "writeAuthzSchema":
            op["requestBody"] = {"content": {"text/plain": {"schema": {"type": "string"}},
                                             "application/json": {"schema": {"type": "object"}}}}
        if streamed:
            op["requestBody"] = {"content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Anvil native API", "version": __version__},
        "paths": paths,
        "components": {"schemas": {"Error": ERROR},
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
        "security": [{"bearer": []}],
    }
