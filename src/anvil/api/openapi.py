"""The OpenAPI document for the native API, built from one table of operations."""

from __future__ import annotations

import functools
import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from anvil import __version__
from anvil import api_models as m

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
    ("get", "/anvil/metrics", "metrics", "Prometheus metrics (scope metrics:read, or public when configured)", [],
     False, False),
    ("get", "/anvil/v1/openapi.json", "getOpenApi", "This OpenAPI document", [], False, False),
    ("get", "/anvil/v1/docs", "getApiDocs", "Interactive docs (Swagger UI, served from the package)", [], False,
     False),
    ("get", "/anvil/v1/docs/{asset}", "getApiDocsAsset", "A file of the interactive docs (script, style sheet)", [],
     False, False),
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
    ("get", "/anvil/v1/watch", "watchEvents", "Watch journal events as Server-Sent Events (resume: Last-Event-ID)",
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
    ("get", "/anvil/v1/admin/audit", "listAuditEntries", "Recent denied requests (admin)", [_q("limit", "integer")],
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
    ("post", "/anvil/v1/admin/fsck", "runFsck", "Run fsck on the live store (admin; body: {deep})", [], True, False),
    ("post", "/anvil/v1/admin/gc", "collectGarbage", "Garbage-collect orphan blobs and expired uploads (admin)", [],
     True, False),
    ("post", "/anvil/v1/admin/repair", "repairDerived", "Rebuild derived families from source records (admin)", [],
     True, False),
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
     "Bind object operations to permissions {resource_type, read, write, list?, delete?, without_subject?, "
     "artefacts?: {resource_type, pull, push, tag?, verify?}}", [],
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

# PersonalDB row bindings: row changes decided by relationships (docs/personaldb.md).
OPERATIONS += [
    ("put", _PG + "/authz-binding", "pdbBind",
     "Bind row changes to permissions {resource_type, resource?, insert?, update, delete?, without_subject?}", [],
     True, False),
    ("get", _PG + "/authz-binding", "pdbGetBinding", "The group's row binding", [], False, False),
    ("delete", _PG + "/authz-binding", "pdbUnbind", "Remove the group's row binding", [], False, False),
]

# Operations that need no bearer token (anonymous reads of public buckets are decided per bucket).
PUBLIC = frozenset({"live", "ready", "token", "pdbKeys", "getOpenApi", "getApiDocs", "getApiDocsAsset"})

# Operations whose success status is not 200.
SUCCESS = {"createBucket": "201", "createUpload": "201", "createTenant": "201", "createApp": "201",
           "createConsumer": "201", "createBackup": "201",
           "pdbCreateGroup": "201", "pdbMigrate": "201", "pdbCommit": "201", "pdbCommitBatch": "201",
           "pdbBuildSnapshot": "201",
           "pdbCreateProjection": "201", "pdbWriteBack": "201",
           "createIndex": "201", "archiveStart": "201",
           "putComponent": "201", "pushArtefact": "201", "addSigningKey": "201"}

# ------------------------------------------------------------------ typed bodies (anvil.api_models)
# The request and response models of each operation. Every JSON body and answer has one
# (tests/test_openapi.py counts them): a new operation declares its models in api_models.py and
# lists them here, and its SDK method returns the response model (docs/api.md, "Typing a new route").

REQUESTS: dict[str, type[m.RequestModel]] = {
    "createBucket": m.CreateBucketRequest,
    "putVersioning": m.VersioningRequest,
    "copyObject": m.CopyObjectRequest,
    "createUpload": m.CreateUploadRequest,
    "completeUpload": m.CompleteUploadRequest,
    "createBackup": m.CreateBackupRequest,
    "archiveStart": m.ArchiveRequest,
    "recoveryResume": m.ResumeRequest,
    "healBlobs": m.HealBlobsRequest,
    "createConsumer": m.CreateConsumerRequest,
    "checkpointConsumer": m.CheckpointRequest,
    "compactJournal": m.CompactRequest,
    "token": m.TokenRequest,
    "createTenant": m.CreateTenantRequest,
    "createApp": m.CreateAppRequest,
    "revokeToken": m.RevokeTokenRequest,
    "grantPolicy": m.ScopesRequest,
    "revokePolicy": m.ScopesRequest,
    "putPublicAccess": m.PublicAccessRequest,
    "rotateSecretKey": m.RotateKeysRequest,
    # authz
    "writeAuthzSchema": m.AuthzSchemaRequest,
    "writeRelationships": m.WriteRelationshipsRequest,
    "readRelationships": m.RelationshipFilterRequest,
    "deleteRelationships": m.DeleteRelationshipsRequest,
    "checkPermission": m.CheckRequest,
    "bulkCheckPermission": m.BulkCheckRequest,
    "lookupResources": m.LookupResourcesRequest,
    "lookupSubjects": m.LookupSubjectsRequest,
    "expandPermission": m.ExpandRequest,
    "bindBucket": m.BindingRequest,
    "pdbBind": m.PdbBindingRequest,
    # artefacts
    "pushArtefact": m.PushArtefactRequest,
    "missingComponents": m.MissingComponentsRequest,
    "putArtefactTag": m.TagRequest,
    "addSigningKey": m.AddSigningKeyRequest,
    # PersonalDB
    "pdbCreateGroup": m.PdbCreateGroupRequest,
    "pdbMigrate": m.PdbMigrateRequest,
    "pdbCommitBatch": m.PdbCommitBatchRequest,
    "pdbRotateKey": m.EmptyRequest,
    "pdbCreateProjection": m.PdbCreateProjectionRequest,
    # indexes
    "createIndex": m.IndexDefinitionRequest,
    "updateIndex": m.IndexDefinitionRequest,
    "queryIndex": m.IndexQueryRequest,
    # diagnostics
    "resolveFinding": m.ResolveFindingRequest,
    "runFsck": m.FsckRequest,
    "collectGarbage": m.GcRequest,
    "repairDerived": m.RepairRequest,
}

RESPONSES: dict[str, type[m.AnvilModel]] = {
    "live": m.Live,
    "ready": m.Ready,
    "listBuckets": m.BucketList,
    "createBucket": m.BucketCreated,
    "getBucket": m.Bucket,
    "deleteBucket": m.BucketDeleted,
    "putVersioning": m.VersioningSet,
    "putPublicAccess": m.PublicAccessSet,
    "listObjects": m.ObjectList,
    "listVersions": m.VersionList,
    "putObject": m.ObjectWritten,
    "deleteObject": m.ObjectDeleted,
    "copyObject": m.ObjectWritten,
    "createUpload": m.UploadCreated,
    "listUploads": m.UploadList,
    "uploadPart": m.PartUploaded,
    "listParts": m.PartList,
    "completeUpload": m.ObjectWritten,
    "abortUpload": m.UploadAborted,
    "journalEvents": m.JournalEvents,
    "journalVerify": m.JournalVerified,
    "createBackup": m.Backup,
    "archiveStatus": m.ArchiveStatus,
    "archiveStart": m.ArchiveStatus,
    "archiveStop": m.ArchiveStatus,
    "archiveFlush": m.ArchiveStatus,
    "recoveryStatus": m.RecoveryStatus,
    "healBlobs": m.HealReport,
    "recoveryValidate": m.ValidationReport,
    "recoveryResume": m.Resumed,
    "listConsumers": m.ConsumerList,
    "createConsumer": m.Consumer,
    "getConsumer": m.ConsumerStatus,
    "deleteConsumer": m.ConsumerDeleted,
    "checkpointConsumer": m.ConsumerStatus,
    "compactJournal": m.Compacted,
    "watchStatus": m.WatchStatus,
    "token": m.Token,
    "whoami": m.WhoAmI,
    "createTenant": m.TenantCreated,
    "listTenants": m.TenantList,
    "createApp": m.AppCreated,
    "listApps": m.AppList,
    "rotateAppSecret": m.SecretRotated,
    "disableApp": m.AppStatus,
    "enableApp": m.AppStatus,
    "deleteApp": m.AppDeleted,
    "revokeToken": m.TokenRevoked,
    "listPolicies": m.Policies,
    "grantPolicy": m.PolicyChanged,
    "revokePolicy": m.PolicyChanged,
    "listAuditEntries": m.AuditList,
    "identitySummary": m.IdentitySummary,
    "rotateSecretKey": m.KeyRotation,
    "identityValidate": m.IdentityValidation,
    "getOpenApi": m.OpenApiDocument,
    "lifecycleStatus": m.LifecycleStatus,
    # authz
    "writeAuthzSchema": m.AuthzSchemaWritten,
    "readAuthzSchema": m.AuthzSchema,
    "writeRelationships": m.RelationshipsWritten,
    "readRelationships": m.RelationshipPage,
    "deleteRelationships": m.RelationshipsDeleted,
    "checkPermission": m.CheckResult,
    "bulkCheckPermission": m.BulkCheckResults,
    "lookupResources": m.ResourceLookup,
    "lookupSubjects": m.SubjectLookup,
    "expandPermission": m.Expansion,
    "bindBucket": m.BucketBinding,
    "pdbBind": m.PdbGroupBinding,
    "pdbGetBinding": m.PdbGroupBinding,
    "pdbUnbind": m.PdbUnbound,
    "getBucketBinding": m.BucketBinding,
    "unbindBucket": m.BucketUnbound,
    # artefacts
    "listArtefacts": m.ArtefactList,
    "listArtefactName": m.ArtefactName,
    "pushArtefact": m.ArtefactPushed,
    "missingComponents": m.MissingComponents,
    "putComponent": m.ComponentStored,
    "putArtefactTag": m.TagMoved,
    "describeArtefact": m.ArtefactDescription,
    "verifyArtefact": m.ArtefactVerified,
    "listTensors": m.TensorList,
    "gitResolve": m.GitRef,
    "gitTree": m.GitTree,
    "addSigningKey": m.SigningKeyAdded,
    "listSigningKeys": m.SigningKeyList,
    "hfInfo": m.HfModelInfo,
    "hfRevision": m.HfModelInfo,
    # PersonalDB
    "pdbCreateGroup": m.PdbGroup,
    "pdbListGroups": m.PdbGroupList,
    "pdbGetGroup": m.PdbGroup,
    "pdbMigrate": m.PdbEntry,
    "pdbCommit": m.PdbEntry,
    "pdbCommitBatch": m.PdbEntries,
    "pdbCatchUp": m.PdbCatchUp,
    "pdbListSnapshots": m.PdbSnapshotList,
    "pdbBuildSnapshot": m.PdbSnapshot,
    "pdbCompact": m.PdbCompacted,
    "pdbKeys": m.PdbKeyList,
    "pdbRotateKey": m.PdbKeyRotated,
    "pdbCreateProjection": m.PdbProjection,
    "pdbGetProjection": m.PdbProjection,
    "pdbProjectionChanges": m.PdbProjectionChanges,
    "pdbWriteBack": m.PdbEntry,
    # indexes
    "listIndexes": m.IndexList,
    "createIndex": m.Index,
    "getIndex": m.Index,
    "updateIndex": m.Index,
    "dropIndex": m.Index,
    "disableIndex": m.Index,
    "enableIndex": m.Index,
    "rebuildIndex": m.IndexRebuilt,
    "queryIndex": m.IndexResults,
    # diagnostics
    "listFindings": m.FindingList,
    "resolveFinding": m.Finding,
    "runFsck": m.FsckReport,
    "collectGarbage": m.GcReport,
    "repairDerived": m.RepairReport,
}

# JSON answers that are arrays (of a model): the Hub's file tree is a list, as huggingface_hub reads it.
ARRAYS: dict[str, type[m.AnvilModel]] = {"hfTree": m.HfTreeEntry, "hfTreePath": m.HfTreeEntry}

# Answers that are not JSON: media type of the success body.
RAW = {
    "getObject": "application/octet-stream", "watchEvents": "text/event-stream", "getApiDocs": "text/html",
    "getApiDocsAsset": "application/octet-stream",
    "getComponent": "application/octet-stream", "getArtefactFile": "application/octet-stream",
    "getTensor": "application/octet-stream", "gitBlob": "*/*",
    "gitInfoRefs": "application/x-git-upload-pack-advertisement",
    "gitUploadPack": "application/x-git-upload-pack-result", "hfResolve": "*/*",
    "pdbSnapshotData": "application/zstd", "pdbProjectionData": "application/zstd",
    "metrics": "text/plain",
}
# Operations that also answer 200 beside their 201 (already recorded: nothing new was created).
ALSO_200 = frozenset({"pushArtefact", "addSigningKey", "pdbCommit", "pdbCommitBatch"})
# Byte answers that honour Range (206 with Content-Range).
RANGED = frozenset({"getObject", "getComponent", "getArtefactFile", "hfResolve"})

_STR = {"type": "string"}
_INT = {"type": "integer"}


def _header(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "schema": schema or _STR}


REQUEST_ID = _header("the request id (also in error bodies); quote it when reporting a problem")
# Object description headers of GET/HEAD (the SDK reads them into `ObjectHead`).
OBJECT_HEADERS = {
    "ETag": _header("quoted ETag (MD5 of the body, or of the parts' MD5s with -N)"),
    "x-anvil-version-id": _header("the version served"),
    "Last-Modified": _header("HTTP date of the version"),
    "Content-Type": _header("the stored content type"),
    "Content-Length": _header("bytes in this answer", _INT),
    "Accept-Ranges": _header("always `bytes`"),
    "x-anvil-sha256": _header("hex SHA-256 of the whole object, when known"),
    "x-anvil-parts-count": _header("parts of a multipart object", _INT),
    "x-anvil-meta-*": _header("one header per user metadata entry: x-anvil-meta-NAME: percent-encoded UTF-8"),
}
WRITE_HEADERS = {"ETag": _header("quoted ETag of the new version or part")}
# User metadata travels in a family of headers, which OpenAPI cannot name as one parameter: the
# operations that take or give it say so in their description (and GET lists it among its headers).
META = ("User metadata: one header per entry, `x-anvil-meta-NAME: VALUE`, the value percent-encoded UTF-8 "
        "(at most 2 KiB in all); GET and HEAD answer the same headers.")
DESCRIPTIONS = {
    "putObject": "The body is the object's bytes (streamed). " + META,
    "getObject": "The object's bytes, described by its headers (ETag, x-anvil-version-id, x-anvil-meta-*). "
                 "HEAD answers the headers alone. " + META,
    "listObjects": "Paging: answer `next_token` while `truncated`; send it back as `token`.",
    "listVersions": "Paging: send `next_key_marker` and `next_version_marker` back as `key_marker` and "
                    "`version_marker` while `truncated`.",
    "watchEvents": "Server-Sent Events: each event's `id:` is its journal seq, its `data:` a WatchEvent; "
                   "reconnect with `Last-Event-ID` to resume where the stream broke.",
}
PAGING = {
    "limit": "page size, 1 to 1000 (default 1000)",
    "token": "listObjects: the previous page's `next_token` (opaque)",
    "start_after": "list keys after this one",
    "key_marker": "listVersions: the previous page's `next_key_marker`",
    "version_marker": "listVersions: the previous page's `next_version_marker`",
    "after": "a journal seq: answer what comes after it",
}
# Error statuses each operation may answer besides `default`, by what it does.
_COMMON_ERRORS = {"400": "invalid argument", "401": "no or bad bearer token", "403": "permission denied",
                  "404": "not found"}
_WRITE_ERRORS = {"409": "conflict (already exists, not empty, stale fence)", "503": "recovery mode"}
_COND_ERRORS = {"412": "a precondition (If-Match, x-anvil-if-version-match, ...) failed"}

TAGS = [
    ("health", "/anvil/health"), ("docs", "/anvil/v1/docs"), ("docs", "/anvil/v1/openapi.json"),
    ("buckets", "/anvil/v1/buckets/{bucket}/versioning"),
    ("identity", "/anvil/v1/auth"), ("identity", "/anvil/v1/admin/tenants"), ("identity", "/anvil/v1/admin/apps"),
    ("identity", "/anvil/v1/admin/tokens"), ("identity", "/anvil/v1/admin/audit"),
    ("identity", "/anvil/v1/admin/secret-key"), ("identity", "/anvil/v1/admin/identity"),
    ("identity", "/anvil/v1/buckets/{bucket}/public-access"),
    ("backup", "/anvil/v1/admin/backup"), ("backup", "/anvil/v1/admin/archive"),
    ("backup", "/anvil/v1/admin/recovery"), ("backup", "/anvil/v1/admin/repair/blobs"),
    ("watch", "/anvil/v1/watch"), ("watch", "/anvil/v1/admin/watch"), ("journal", "/anvil/v1/admin/journal"),
    ("diagnostics", "/anvil/v1/admin/findings"), ("diagnostics", "/anvil/v1/admin/fsck"),
    ("diagnostics", "/anvil/v1/admin/gc"), ("diagnostics", "/anvil/v1/admin/repair"),
    ("lifecycle", "/anvil/v1/admin/lifecycle"), ("authz", "/anvil/v1/authz"),
    ("authz", "/anvil/v1/buckets/{bucket}/authz-binding"), ("metrics", "/anvil/metrics"),
    ("artefacts", "/anvil/v1/buckets/{bucket}/artefacts"), ("artefacts", "/anvil/v1/artefact-keys"),
    ("artefacts", "/anvil/v1/hf"), ("personaldb", "/anvil/v1/pdb"), ("personaldb", "/anvil/v1/admin/pdb"),
    ("indexes", "/anvil/v1/buckets/{bucket}/indexes"), ("uploads", "/anvil/v1/buckets/{bucket}/uploads"),
    ("objects", "/anvil/v1/buckets/{bucket}/"), ("buckets", "/anvil/v1/buckets"),
]


def _tag(path: str) -> str:
    for tag, prefix in TAGS:
        if path == prefix or path.startswith(prefix.rstrip("/") + "/") or (prefix.endswith("/")
                                                                          and path.startswith(prefix)):
            return tag
    return "other"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _schemas() -> dict[str, Any]:
    _, defs = models_json_schema([(model, "validation") for model in m.iter_models()],
                                 ref_template="#/components/schemas/{model}")
    return defs["$defs"]


def _parameter(param: dict[str, Any]) -> dict[str, Any]:
    param = dict(param)
    if param["in"] == "query" and param["name"] in PAGING:
        param.setdefault("description", PAGING[param["name"]])
    if param["name"] == "limit":
        param["schema"] = {"type": "integer", "minimum": 1, "maximum": 1000}
    return param


def _responses(op_id: str, method: str, params: list[dict[str, Any]]) -> dict[str, Any]:
    success = SUCCESS.get(op_id, "200")
    headers: dict[str, Any] = {"x-request-id": REQUEST_ID}
    if op_id in ("putObject", "copyObject", "completeUpload", "uploadPart"):
        headers.update(WRITE_HEADERS)
    if op_id in ("token", "createApp", "rotateAppSecret"):
        headers["Cache-Control"] = _header("no-store: the answer holds a secret")
    ok: dict[str, Any] = {"description": "success", "headers": headers}
    if op_id in RESPONSES:
        ok["content"] = {"application/json": {"schema": _ref(RESPONSES[op_id])}}
    elif op_id in ARRAYS:
        ok["content"] = {"application/json": {"schema": {"type": "array", "items": _ref(ARRAYS[op_id])}}}
    elif op_id in RAW:
        ok["content"] = {RAW[op_id]: {"schema": {"type": "string"} if RAW[op_id].startswith("text/")
                                      else {"type": "string", "format": "binary"}}}
    else:
        # Not typed yet (a new route): an object whose fields are not described. The pattern for
        # typing it is in docs/api.md; tests/test_openapi.py refuses a document with one.
        ok["content"] = {"application/json": {"schema": {"type": "object", "additionalProperties": True}}}
    if op_id == "getObject":
        ok["headers"] = {**headers, **OBJECT_HEADERS}
        ok["description"] = "the object's bytes (HEAD: the headers only)"
    responses: dict[str, Any] = {success: ok}
    if op_id in ALSO_200:
        responses["200"] = {**ok, "description": "already recorded"}
    if op_id in RANGED:
        responses["206"] = {**ok, "description": "partial content (Range)",
                            "headers": {**ok["headers"], "Content-Range": _header("bytes START-END/SIZE")}}
    if op_id == "getObject":
        responses["304"] = {"description": "not modified (If-None-Match)", "headers": {"x-request-id": REQUEST_ID}}
    errors = dict(_COMMON_ERRORS)
    if method in ("put", "post", "delete"):
        errors.update(_WRITE_ERRORS)
    if any(p["name"] in ("If-Match", "x-anvil-if-version-match") for p in params):
        errors.update(_COND_ERRORS)
    error_content = {"application/json": {"schema": _ref(m.ErrorBody)}}
    for status in errors:
        responses[status] = {"$ref": f"#/components/responses/Error{status}"}
    responses["default"] = {"description": "any other error", "headers": {"x-request-id": REQUEST_ID},
                            "content": error_content}
    return responses


def _error_responses() -> dict[str, Any]:
    every = {**_COMMON_ERRORS, **_WRITE_ERRORS, **_COND_ERRORS}
    return {f"Error{status}": {"description": why, "headers": {"x-request-id": REQUEST_ID},
                               "content": {"application/json": {"schema": _ref(m.ErrorBody)}}}
            for status, why in every.items()}


def document(server_url: str | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document; `server_url` (the URL it was asked at) is listed first in `servers`."""
    paths: dict[str, dict[str, Any]] = {}
    for method, path, op_id, summary, params, json_body, streamed in OPERATIONS:
        path_params = [
            {"name": seg[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
            for seg in path.split("/") if seg.startswith("{")
        ]
        all_params = [_parameter(p) for p in path_params + params]
        op: dict[str, Any] = {
            "operationId": op_id,
            "summary": summary,
            **({"description": DESCRIPTIONS[op_id]} if op_id in DESCRIPTIONS else {}),
            "tags": [_tag(path)],
            "parameters": all_params,
            "responses": _responses(op_id, method, all_params),
        }
        if op_id in PUBLIC:
            op["security"] = []
        if json_body:
            model = REQUESTS.get(op_id)
            schema = _ref(model) if model is not None else {"type": "object", "additionalProperties": True}
            # Bodies that may be omitted (all fields optional) are not required.
            required = model is None or any(f.is_required() for f in model.model_fields.values()) or (
                model.model_json_schema().get("required") is not None)
            op["requestBody"] = {"required": required, "content": {"application/json": {"schema": schema}}}
        if op_id == "writeAuthzSchema":
            op["requestBody"] = {"required": True, "content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/json": {"schema": _ref(REQUESTS[op_id])}}}
        if streamed:
            op["requestBody"] = {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}}
        paths.setdefault(path, {})[method] = op
    servers = [{"url": server_url.rstrip("/"), "description": "this server"}] if server_url else []
    servers.append({"url": "http://127.0.0.1:9000", "description": "`make run` default"})
    return {
        "openapi": "3.1.0",
        "info": {"title": "Anvil native API", "version": __version__,
                 "description": "The native JSON API of Anvil (S3 is served on the same port). "
                                "Interactive docs: /anvil/v1/docs. See docs/api.md."},
        "servers": servers,
        "paths": paths,
        "components": {"schemas": _schemas(),
                       "responses": _error_responses(),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
        "security": [{"bearer": []}],
    }


@functools.lru_cache(maxsize=8)
def document_bytes(server_url: str) -> bytes:
    """The document as served (built once per URL it is asked at: it never changes while running)."""
    return json.dumps(document(server_url)).encode()
