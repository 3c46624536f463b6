"""S3 errors: one exception type, one table from Anvil's codes to S3's, one XML body."""

from __future__ import annotations

from starlette.responses import Response

from anvil.api.s3.xmlutil import element, xml_document, xml_safe
from anvil.errors import AnvilError


class S3Error(Exception):
    """An error with an S3 code, HTTP status and message; `fields` become extra XML elements."""

    def __init__(self, code: str, message: str, status: int = 400, *, headers: dict[str, str] | None = None,
                 fields: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.headers = headers or {}
        self.fields = fields or {}


# AnvilError code -> (S3 code, HTTP status). NotFound is resolved by what was not found.
ANVIL_TO_S3: dict[str, tuple[str, int]] = {
    "Unauthenticated": ("AccessDenied", 403),
    "PermissionDenied": ("AccessDenied", 403),
    "UnauthorizedReservedNamespace": ("AccessDenied", 403),
    "PreconditionFailed": ("PreconditionFailed", 412),
    "NotModified": ("NotModified", 304),
    "InvalidRange": ("InvalidRange", 416),
    "BadDigest": ("BadDigest", 400),
    "BucketNotEmpty": ("BucketNotEmpty", 409),
    "AlreadyExists": ("BucketAlreadyOwnedByYou", 409),
    "EntityTooSmall": ("EntityTooSmall", 400),
    "EntityTooLarge": ("EntityTooLarge", 400),
    "RequestTooLarge": ("MaxMessageLengthExceeded", 400),
    "RequestHeaderFieldsTooLarge": ("RequestHeaderSectionTooLarge", 400),
    "InvalidPart": ("InvalidPart", 400),
    "InvalidPartOrder": ("InvalidPartOrder", 400),
    "MethodNotAllowed": ("MethodNotAllowed", 405),
    "InvalidArgument": ("InvalidArgument", 400),
    "IdempotencyMismatch": ("InvalidRequest", 400),
    "RecoveryMode": ("ServiceUnavailable", 503),
    "StorageLocked": ("ServiceUnavailable", 503),
    # AWS defines no code for a full disk; one name across the native API and S3 (docs/storage.md).
    "StorageFull": ("StorageFull", 507),
    "IndexNotReady": ("ServiceUnavailable", 503),
    "BlobBackendUnavailable": ("ServiceUnavailable", 503),
    "StaleFence": ("OperationAborted", 409),
    "InvalidTokenScope": ("AccessDenied", 403),
    "InvalidCaveatHash": ("InvalidArgument", 400),
    "UnsupportedFormat": ("InternalError", 500),
    # Not an AWS code (S3 has none for "your stored bytes went bad"): a distinct one tells a client
    # this is not a transient InternalError and a retry will not help until the data is repaired.
    "DataCorrupted": ("DataCorrupted", 500),
    "Internal": ("InternalError", 500),
}

NOT_FOUND: dict[str, str] = {
    "bucket": "NoSuchBucket",
    "object": "NoSuchKey",
    "copy": "NoSuchKey",
    "version": "NoSuchVersion",
    "upload": "NoSuchUpload",
}

# Anvil's native headers on errors (delete markers) in their S3 spelling.
_HEADER_NAMES = {"x-anvil-delete-marker": "x-amz-delete-marker", "x-anvil-version-id": "x-amz-version-id"}


def from_anvil(err: AnvilError) -> S3Error:
    headers = {_HEADER_NAMES.get(k.lower(), k): val for k, val in err.headers.items()}
    if err.code == "NotFound":
        subject = err.message.split(" ", 1)[0].lower()
        return S3Error(NOT_FOUND.get(subject, "NoSuchKey"), err.message[:1].upper() + err.message[1:], 404,
                       headers=headers)
    if err.code == "UnauthorizedReservedNamespace":
        return S3Error("AccessDenied", f"UnauthorizedReservedNamespace: {err.message}", 403, headers=headers)
    if err.code == "InvalidArgument" and err.message.startswith("bucket name"):
        return S3Error("InvalidBucketName", err.message, 400, headers=headers)
    if err.code == "InvalidArgument" and "longer than" in err.message and "key" in err.message:
        return S3Error("KeyTooLongError", err.message, 400, headers=headers)
    if err.code == "InvalidArgument" and "metadata is larger" in err.message:
        return S3Error("MetadataTooLarge", err.message, 400, headers=headers)
    if err.code == "RecoveryMode":
        return S3Error("ServiceUnavailable", f"RecoveryMode: {err.message}", 503, headers=headers)
    code, status = ANVIL_TO_S3.get(err.code, ("InternalError", 500))
    return S3Error(code, err.message, status, headers=headers)


def reserved_namespace() -> S3Error:
    return S3Error("AccessDenied", "UnauthorizedReservedNamespace: keys under '_anvil/' are reserved for Anvil", 403)


def not_implemented(what: str) -> S3Error:
    return S3Error("NotImplemented", f"{what} is not implemented by Anvil", 501)


def error_response(err: S3Error, request_id: str, *, resource: str = "", head: bool = False) -> Response:
    headers = {"x-amz-request-id": request_id, "x-amz-id-2": request_id, **err.headers}
    if err.status == 304:
        return Response(status_code=304, headers=headers)
    if head:
        # HEAD responses have no body; the code travels in a header for debugging.
        return Response(status_code=err.status, headers={**headers, "x-amz-error-code": err.code})
    # Messages, fields and the resource may echo what the client sent: keep the document well-formed.
    parts = [element("Code", err.code), element("Message", xml_safe(err.message))]
    parts += [element(k, xml_safe(str(val))) for k, val in err.fields.items()]
    if resource:
        parts.append(element("Resource", xml_safe(resource)))
    parts.append(element("RequestId", request_id))
    body = xml_document("Error", "".join(parts), namespace=False)
    return Response(body, status_code=err.status, media_type="application/xml", headers=headers)
