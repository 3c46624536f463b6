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


COND = [_h("If-Match"), _h("If-None-Match"), _h("x-anvil-if-version-match")]

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
     "Take a consistent online backup: {repo, passphrase, s3_endpoint?, tag?} (admin)", [], True, False),
    ("get", "/anvil/v1/admin/recovery", "recoveryStatus", "Recovery mode, restore marker, last validation (admin)",
     [], False, False),
    ("post", "/anvil/v1/admin/recovery/validate", "recoveryValidate",
     "Run the restore validation sequence and write its report (admin)", [], False, False),
    ("post", "/anvil/v1/admin/recovery/resume", "recoveryResume",
     "Leave recovery mode after a passing validation, or {force: true, reason} (admin)", [], True, False),
]

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
                "200": {"description": "success"},
                "default": {"description": "error", "content": {"application/json": {"schema": ERROR}}},
            },
        }
        if json_body:
            op["requestBody"] = {"content": {"application/json": {"schema": {"type": "object"}}}}
        if streamed:
            op["requestBody"] = {"content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Anvil native API", "version": __version__},
        "paths": paths,
        "components": {"schemas": {"Error": ERROR}},
    }
