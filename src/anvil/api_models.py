"""Request and response models of the native API, declared once.

The same classes
- validate request JSON bodies on the server (`parse_body`),
- generate the OpenAPI document's schemas (`anvil.api.openapi`),
- are what the SDK (`anvil.client.AnvilClient`) returns.

Response models allow extra fields: a newer server may add a field without breaking an older SDK,
and the document says so (`additionalProperties`). They also read like the dicts the SDK used to
return (`result["etag"]`, `result.get("sha256")`, `"x" in result`, `dict(result)`, `== {...}`), so
code written against the dicts keeps working; `to_dict()` gives the JSON exactly as the server sent it.

This module imports nothing but pydantic, and sits outside the layers (beside anvil.client): the SDK
uses it, and the SDK is imported from low layers too (participants' smoke checks, backup drills).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# ------------------------------------------------------------------ bases

_MISSING: Any = object()


class AnvilModel(BaseModel):
    """A response model: attribute access, and the read side of a dict over the fields the server sent."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def _present(self) -> list[str]:
        # The keys of the JSON object this model was read from: declared fields that were given,
        # then the extra ones. A field left at its default was not in the answer, so it is no key.
        sent = self.model_fields_set
        keys = [name for name in type(self).model_fields if name in sent]
        keys += list(self.__pydantic_extra__ or ())
        return keys

    def __getitem__(self, key: str) -> Any:
        if key in self._present():
            return getattr(self, key)
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)
        if key in type(self).model_fields:
            self.__pydantic_fields_set__.add(key)

    def __contains__(self, key: object) -> bool:
        return key in self._present()

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def keys(self) -> list[str]:
        return self._present()

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self._present()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self._present()]

    def __len__(self) -> int:
        return len(self._present())

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        # A dict iterates over its keys (pydantic's own __iter__ gives (name, value) pairs).
        return iter(self._present())

    # The mutating side that callers of the old dicts used: `pop` and `setdefault` and `update`.
    def pop(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self:
            if default is _MISSING:
                raise KeyError(key)
            return default
        value = getattr(self, key)
        extra = self.__pydantic_extra__
        if extra is not None and key in extra:
            del extra[key]
        else:
            self.__pydantic_fields_set__.discard(key)  # no longer "sent": not a key any more
        return value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, other: Mapping[str, Any] = (), **kwargs: Any) -> None:
        for key, value in {**dict(other), **kwargs}.items():
            self[key] = value

    def to_dict(self) -> dict[str, Any]:
        """The JSON object as the server sent it (nested models as dicts)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def __eq__(self, other: object) -> bool:
        # As dicts compare: the keys sent and their values (a popped key is gone on both sides).
        if isinstance(other, AnvilModel):
            return self.model_dump(exclude_unset=True) == other.model_dump(exclude_unset=True)
        if isinstance(other, Mapping):
            return self.model_dump(exclude_unset=True) == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def jsonable(value: Any) -> Any:
    """`json.dumps(..., default=jsonable)`: SDK results (models, lists of models) as plain JSON."""
    if isinstance(value, AnvilModel):
        return value.to_dict()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


class RequestModel(BaseModel):
    """A request body: strict types (no "1" for 1, no 1 for true), unknown fields ignored as before."""

    model_config = ConfigDict(strict=True, extra="ignore")


class BodyError(ValueError):
    """A request body that does not fit its model; `message` names the field."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


M = TypeVar("M", bound=RequestModel)


def parse_body(model: type[M], body: dict[str, Any]) -> M:
    """Validate a decoded JSON object against `model`; BodyError names the first bad field."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = _where(tuple(first["loc"]))
        if first["type"] == "missing":
            raise BodyError(f"'{where}' is required") from None
        raise BodyError(f"'{where}': {first['msg']}") from None


# ------------------------------------------------------------------ errors and health


class ErrorDetail(AnvilModel):
    code: str = Field(description="a stable error code (docs/errors: one of anvil.errors.HTTP_STATUS)")
    message: str = Field(description="what went wrong, safe to show the caller")
    request_id: str | None = Field(description="the request id, also in the x-request-id header")


class ErrorBody(AnvilModel):
    """Every native API error (HEAD answers carry the code in x-anvil-error-code instead)."""

    error: ErrorDetail


class Live(AnvilModel):
    status: str


class JournalHead(AnvilModel):
    seq: int
    hash: str


class ReadyBackup(AnvilModel):
    last: dict[str, Any] | None = None
    schedule: dict[str, Any] | None = None
    archive: dict[str, Any] = Field(description="continuous archiving: enabled, cursor, lag, last error")
    running: dict[str, Any] | None = Field(None, description="a backup the server is taking: bytes done and total")


class Ready(AnvilModel):
    status: str
    recovery_mode: bool
    journal: JournalHead
    deployment_id: str
    backup: ReadyBackup


# ------------------------------------------------------------------ buckets


class Bucket(AnvilModel):
    name: str
    tenant: str
    created: float = Field(description="seconds since the epoch")
    versioning: str = Field(description="Unversioned, Enabled or Suspended")
    public: bool = Field(description="anonymous GET/HEAD/LIST allowed")


class BucketCreated(Bucket):
    idempotent_replay: bool = Field(False, description="true when an Idempotency-Key replayed the first answer")


class BucketList(AnvilModel):
    buckets: list[Bucket]


class BucketDeleted(AnvilModel):
    bucket: str
    deleted: bool
    idempotent_replay: bool = False


class VersioningSet(AnvilModel):
    bucket: str
    versioning: str
    idempotent_replay: bool = False


class PublicAccessSet(AnvilModel):
    bucket: str
    public: bool


class CreateBucketRequest(RequestModel):
    versioning: str | None = Field(None, description="Enabled, Suspended, or Unversioned (the default)")


class VersioningRequest(RequestModel):
    status: str = Field(description="Enabled or Suspended")


class PublicAccessRequest(RequestModel):
    public: bool


# ------------------------------------------------------------------ objects


class ObjectInfo(AnvilModel):
    bucket: str
    key: str
    version_id: str
    is_latest: bool
    delete_marker: bool
    size: int
    etag: str
    sha256: str | None
    content_type: str
    metadata: dict[str, str] = Field(description="user metadata (x-anvil-meta-* on GET/HEAD/PUT)")
    last_modified: float = Field(description="seconds since the epoch")
    parts_count: int | None


class ObjectList(AnvilModel):
    """One page of a listing; pass `next_token` as `token` for the next while `truncated`."""

    objects: list[ObjectInfo]
    common_prefixes: list[str]
    truncated: bool
    next_token: str | None


class VersionList(AnvilModel):
    """One page of versions; pass next_key_marker/next_version_marker as key_marker/version_marker."""

    versions: list[ObjectInfo]
    common_prefixes: list[str]
    truncated: bool
    next_key_marker: str | None
    next_version_marker: str | None


class ObjectWritten(AnvilModel):
    """A put, copy or completed multipart upload: the new version."""

    bucket: str
    key: str
    version_id: str
    etag: str
    size: int
    sha256: str | None
    cursor: int = Field(description="the journal seq of the write (watch from here)")
    idempotent_replay: bool = False


class ObjectDeleted(AnvilModel):
    bucket: str
    key: str
    version_id: str | None = Field(description="the version removed, or the delete marker created")
    delete_marker: bool
    cursor: int | None = Field(None, description="the journal seq of the delete (absent: nothing was there)")
    idempotent_replay: bool = False


class ObjectHead(AnvilModel):
    """What GET/HEAD answer in headers (ETag, x-anvil-version-id, x-anvil-meta-*, ...), read by the SDK."""

    etag: str
    version_id: str | None
    size: int
    content_type: str | None
    last_modified: str | None = Field(description="an HTTP date")
    sha256: str | None
    metadata: dict[str, str]
    parts_count: int | None
    content_range: str | None
    status: int | None = None


class CopyObjectRequest(RequestModel):
    key: str = Field(description="the destination key")
    source_key: str
    source_bucket: str | None = Field(None, description="default: the bucket in the path")
    source_version_id: str | None = None
    metadata_directive: str | None = Field(None, description="COPY (default) or REPLACE")
    content_type: str | None = None
    metadata: dict[str, Any] | None = Field(None, description="with REPLACE: the new user metadata")
    source_if_match: str | None = None
    source_if_none_match: str | None = None
    source_if_version_match: str | None = None


# ------------------------------------------------------------------ multipart


class CreateUploadRequest(RequestModel):
    key: str
    content_type: str | None = None
    metadata: dict[str, Any] | None = None


class UploadCreated(AnvilModel):
    bucket: str
    key: str
    upload_id: str
    idempotent_replay: bool = False


class PartUploaded(AnvilModel):
    upload_id: str
    part_number: int
    etag: str
    size: int
    idempotent_replay: bool = False


class Part(AnvilModel):
    part_number: int
    etag: str
    size: int
    last_modified: float
    sha256: str | None = None
    checksums: dict[str, Any] | None = None


class PartList(AnvilModel):
    upload_id: str
    key: str
    parts: list[Part]


class Upload(AnvilModel):
    upload_id: str
    key: str
    created: float


class UploadList(AnvilModel):
    uploads: list[Upload]


class CompletedPart(RequestModel):
    part_number: int
    etag: str


class CompleteUploadRequest(RequestModel):
    parts: list[CompletedPart]


class UploadAborted(AnvilModel):
    upload_id: str
    aborted: bool


# ------------------------------------------------------------------ journal


class JournalEvent(AnvilModel):
    seq: int
    ts: float
    kind: str
    tenant: str | None
    actor: str | None
    scope: str | None
    request_id: str | None
    payload: dict[str, Any]
    prev_hash: str
    hash: str


class JournalEvents(AnvilModel):
    events: list[JournalEvent]


class JournalProblem(AnvilModel):
    seq: int
    problem: str


class JournalVerified(AnvilModel):
    checked: int
    ok: bool
    problems: list[JournalProblem]


# ------------------------------------------------------------------ identity


class TokenRequest(RequestModel):
    client_id: str
    client_secret: str
    scopes: list[str] | str | None = Field(None, description="narrow the token to these (default: all granted)")
    scope: list[str] | str | None = Field(None, description="OAuth2 spelling of `scopes` (space-separated)")
    expires_in: int | None = Field(None, description="seconds")
    subject: str | None = Field(None, description="act for this end user, e.g. `user:amy` (needs `authz:act`)")


class Token(AnvilModel):
    access_token: str
    token_type: str
    expires_in: int
    expires_at: int
    tenant: str
    scopes: list[str]
    jti: str


class WhoAmI(AnvilModel):
    tenant: str
    subject: str
    admin: bool
    scopes: list[str]
    jti: str | None = Field(None, description="with a bearer token: what `token revoke` takes")
    acting_for: str | None = Field(None, description="the end user a token acts for (token exchange `subject`)")
    expires_at: int | None = None


class CreateTenantRequest(RequestModel):
    name: str


class TenantCreated(AnvilModel):
    tenant: str
    created: float


class Tenant(AnvilModel):
    tenant: str
    created: float
    apps: int


class TenantList(AnvilModel):
    tenants: list[Tenant]


class CreateAppRequest(RequestModel):
    tenant: str
    name: str
    scopes: list[str] | None = None


class AppCreated(AnvilModel):
    """A new application; `client_secret` is shown this once."""

    client_id: str
    client_secret: str
    tenant: str
    name: str
    scopes: list[str]
    created: float


class App(AnvilModel):
    client_id: str
    tenant: str
    name: str
    scopes: list[str]
    status: str
    created: float
    rotated: float | None = None
    secret_version: int | None = None
    key_id: str | None = None


class AppList(AnvilModel):
    apps: list[App]


class SecretRotated(AnvilModel):
    client_id: str
    client_secret: str
    secret_version: int
    tenant: str


class AppStatus(AnvilModel):
    client_id: str
    tenant: str
    status: str
    changed: bool


class AppDeleted(AnvilModel):
    client_id: str
    tenant: str
    name: str
    deleted: float
    scopes_removed: list[str]


class RevokeTokenRequest(RequestModel):
    jti: str
    client_id: str | None = None


class TokenRevoked(AnvilModel):
    jti: str
    client_id: str | None
    expires: float
    changed: bool


class ScopesRequest(RequestModel):
    scopes: list[str]


class Policies(AnvilModel):
    client_id: str
    tenant: str
    scopes: list[str]


class PolicyChanged(Policies):
    changed: list[str]


class AuditEntry(AnvilModel):
    seq: int
    ts: float
    request_id: str
    method: str
    path: str
    code: str
    actor: str | None
    client: str | None


class AuditList(AnvilModel):
    entries: list[AuditEntry]


class RotateKeysRequest(RequestModel):
    dry_run: bool = False


class KeyRotation(AnvilModel):
    """Secret envelopes re-sealed under the active key (dry run: which would be)."""

    active_key_id: str
    dry_run: bool
    unreadable: list[dict[str, Any]] = Field(description="{client_id, problem} of envelopes no key opens")
    unchanged: int
    changed: list[str] | None = Field(None, description="client ids re-sealed (not on a dry run)")
    would_change: list[str] | None = Field(None, description="dry run: client ids that would be re-sealed")


class IdentitySummary(AnvilModel):
    tenants: int
    apps: int
    configured_key_ids: list[str]
    active_key_id: str


class IdentityValidation(AnvilModel):
    ok: bool
    findings: list[dict[str, Any]]


# ------------------------------------------------------------------ watch


class WatchEvent(AnvilModel):
    """One change event (`data:` of the SSE stream; its `id:` is the seq)."""

    seq: int
    kind: str


class CreateConsumerRequest(RequestModel):
    name: str
    bucket: str | None = None
    prefix: str | None = None
    kinds: list[str] | str | None = Field(None, description="event kinds (a list, or comma-separated)")
    after: int | str | None = Field(None, description="start after this seq (default: the head)")


class Consumer(AnvilModel):
    name: str
    tenant: str
    bucket: str | None
    prefix: str
    kinds: list[str]
    cursor: int
    created: float
    updated: float
    created_by: str | None = None


class ConsumerStatus(Consumer):
    head: int
    lag: int = Field(description="events between the cursor and the head")
    age_seconds: float
    expired: bool


class ConsumerList(AnvilModel):
    consumers: list[ConsumerStatus]


class ConsumerDeleted(AnvilModel):
    name: str
    deleted: bool


class CheckpointRequest(RequestModel):
    cursor: int | str = Field(description="a journal seq (decimal digits accepted as a string)")


class CompactRequest(RequestModel):
    retention_seconds: float | None = Field(None, ge=0)


class Compacted(AnvilModel):
    base: int
    deleted: int
    retention_seconds: float | None


class WatchStatus(AnvilModel):
    head_seq: int
    head_hash: str
    base_seq: int
    base_hash: str
    events: int
    consumers: dict[str, Any]
    consumer_count: int
    watchers: int
    retention_seconds: float | None


# ------------------------------------------------------------------ backup and recovery (admin)


class CreateBackupRequest(RequestModel):
    repo: str = Field(min_length=1, description="a path, file://, s3:// or anvil:// repository URL")
    passphrase: str | None = Field(None, min_length=1, description="default: the server's ANVIL_BACKUP_PASSPHRASE")
    s3_endpoint: str | None = Field(None, min_length=1)
    tag: str | None = Field(None, min_length=1)
    escrow_secrets: bool | None = Field(None, description="absent: the server's policy")
    incremental: bool = False


class HealBlobsRequest(RequestModel):
    repo: str = Field(min_length=1, description="the backup repository to restore blobs from")
    passphrase: str | None = Field(None, min_length=1)
    s3_endpoint: str | None = Field(None, min_length=1)
    snapshot: str | None = Field(None, min_length=1, description="default: the newest snapshots first")


class HealReport(AnvilModel):
    """Blobs restored from a backup, those no snapshot holds, and the findings closed."""

    repository: str
    snapshot: str | None
    missing: int
    healed_count: int
    healed: list[dict[str, Any]]
    unrecoverable: list[dict[str, Any]]
    findings_resolved: list[Any]


class Backup(AnvilModel):
    id: str
    kind: str
    time: float
    journal_seq: int
    deployment_id: str
    tag: str | None
    parent: str | None
    base: str | None = None
    logical_bytes: int
    new_bytes: int
    secrets_escrowed: bool
    escrow_policy: str
    problems: list[Any]
    stats: dict[str, Any]


class ArchiveRequest(RequestModel):
    repo: str = Field(min_length=1)
    passphrase: str | None = Field(None, min_length=1)
    interval_seconds: float = Field(1.0, ge=1, le=3600)
    s3_endpoint: str | None = Field(None, min_length=1)


class ArchiveStatus(AnvilModel):
    enabled: bool


class RecoveryStatus(AnvilModel):
    recovery_mode: bool
    marker: dict[str, Any] | None
    last_validation: dict[str, Any] | None


class ValidationReport(AnvilModel):
    ok: bool


class ResumeRequest(RequestModel):
    force: bool = False
    reason: str | None = Field(None, min_length=1)


class Resumed(AnvilModel):
    resumed: bool
    forced: bool
    reason: str | None


# ------------------------------------------------------------------ the pattern for the rest


class Document(AnvilModel):
    """A JSON object this document does not describe field by field yet (see docs/api.md)."""


def iter_models() -> Iterator[type[BaseModel]]:
    """Every model of this module, for the OpenAPI components."""
    for value in list(globals().values()):
        if (isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == __name__
                and value not in (AnvilModel, RequestModel)):
            yield value
