"""The error vocabulary shared by every subsystem.

Subsystems raise `AnvilError` with one of the codes below; the API layer turns it into
the JSON error body (native API) or S3 XML (gateway). Messages must never echo names the
caller may not see, so raisers keep them generic where authorisation is involved.
"""

from __future__ import annotations

HTTP_STATUS: dict[str, int] = {
    "Unauthenticated": 401,
    "PermissionDenied": 403,
    "UnauthorizedReservedNamespace": 403,
    "PreconditionFailed": 412,
    "NotModified": 304,
    "InvalidCaveatHash": 400,
    "IndexNotReady": 503,
    "InvalidTokenScope": 400,
    "StaleFence": 409,
    # Work run on request under a lease (gc on a scaled deployment) while another node holds it.
    "LeaseHeld": 409,
    "NotFound": 404,
    "AlreadyExists": 409,
    "InvalidArgument": 400,
    "IdempotencyMismatch": 422,
    "RecoveryMode": 503,
    "CursorExpired": 410,
    "InvalidRange": 416,
    "BadDigest": 400,
    "BucketNotEmpty": 409,
    "EntityTooSmall": 400,
    "EntityTooLarge": 400,
    "RequestTooLarge": 413,
    "RequestHeaderFieldsTooLarge": 431,
    "InvalidPart": 400,
    "InvalidPartOrder": 400,
    "MethodNotAllowed": 405,
    "StorageLocked": 409,
    # `anvil restore --records URL`: the PostgreSQL store to restore into already holds records.
    "RecordStoreNotEmpty": 409,
    "StorageFull": 507,
    "UnsupportedFormat": 500,
    "DataCorrupted": 500,
    # anvil.indexes: a query on a disabled index.
    "IndexDisabled": 409,
    "Internal": 500,
    "MaxDepthExceeded": 422,
    # artefacts: a manifest signature that is missing where required, or does not verify.
    "SignatureInvalid": 403,
    # PersonalDB (docs/personaldb.md)
    "PersonalDbStaleBase": 409,
    "PersonalDbSchemaMismatch": 409,
    "PersonalDbInvalidChangeset": 400,
    "PersonalDbUnknownTable": 400,
    "PersonalDbInvalidSchema": 400,
    "PersonalDbCertificateInvalid": 422,
    # A remote blob backend (anvil serve --blobs s3://...) cannot be reached: nothing was recorded.
    "BlobBackendUnavailable": 503,
}


class AnvilError(Exception):
    """A failure with a stable code, an HTTP status and a message safe to show the caller."""

    def __init__(self, code: str, message: str, *, headers: dict[str, str] | None = None):
        if code not in HTTP_STATUS:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}

    @property
    def status(self) -> int:
        return HTTP_STATUS[self.code]

    def to_dict(self, request_id: str | None = None) -> dict:
        return {"error": {"code": self.code, "message": self.message, "request_id": request_id}}


def not_found(what: str = "resource") -> AnvilError:
    return AnvilError("NotFound", f"{what} not found")


def invalid(message: str) -> AnvilError:
    return AnvilError("InvalidArgument", message)
