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
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SkipValidation, ValidationError

# ------------------------------------------------------------------ bases

_MISSING: Any = object()


class AnvilModel(BaseModel):
    """A response model: attribute access, and the read side of a dict over the fields the server sent."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, defer_build=True)

    def _present(self) -> list[str]:
        # The keys of the JSON object this model was read from: declared fields that were given,
        # then the extra ones. A field left at its default was not in the answer, so it is no key.
        # A field whose JSON name is not a Python name (`keys`, `schema`) is keyed by its alias.
        sent = self.model_fields_set
        keys = [f.alias or name for name, f in type(self).model_fields.items() if name in sent]
        keys += list(self.__pydantic_extra__ or ())
        return keys

    def _attr(self, key: str) -> str:
        """The attribute holding JSON key `key` (its field's name when the field has an alias)."""
        for name, f in type(self).model_fields.items():
            if f.alias == key:
                return name
        return key

    def __getitem__(self, key: str) -> Any:
        if key in self._present():
            return getattr(self, self._attr(key))
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        attr = self._attr(key)
        setattr(self, attr, value)
        if attr in type(self).model_fields:
            self.__pydantic_fields_set__.add(attr)

    def __contains__(self, key: object) -> bool:
        return key in self._present()

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def keys(self) -> list[str]:
        return self._present()

    def values(self) -> list[Any]:
        return [self[k] for k in self._present()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, self[k]) for k in self._present()]

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
        value = self[key]
        extra = self.__pydantic_extra__
        if extra is not None and key in extra:
            del extra[key]
        else:
            self.__pydantic_fields_set__.discard(self._attr(key))  # no longer "sent": not a key any more
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
        return self.model_dump(mode="json", exclude_unset=True, by_alias=True)

    def __eq__(self, other: object) -> bool:
        # As dicts compare: the keys sent and their values (a popped key is gone on both sides).
        if isinstance(other, AnvilModel):
            return self.model_dump(exclude_unset=True, by_alias=True) == other.model_dump(exclude_unset=True,
                                                                                           by_alias=True)
        if isinstance(other, Mapping):
            return self.model_dump(exclude_unset=True, by_alias=True) == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def jsonable(value: Any) -> Any:
    """`json.dumps(..., default=jsonable)`: SDK results (models, lists of models) as plain JSON."""
    if isinstance(value, AnvilModel):
        return value.to_dict()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


class RequestModel(BaseModel):
    """A request body: strict types (no "1" for 1, no 1 for true), unknown fields ignored as before."""

    model_config = ConfigDict(strict=True, extra="ignore", defer_build=True)


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


class ArchiveStatus(AnvilModel):
    """Continuous archiving; a stopped archiver answers `enabled` alone."""

    enabled: bool
    repository: str | None = None
    interval_seconds: float | None = None
    deployment_id: str | None = None
    archived_seq: int | None = Field(None, description="the last journal seq in the archive")
    archived_ts: float | None = None
    head_seq: int | None = None
    lag_events: int | None = None
    lag_seconds: float | None = None
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    segments_written: int | None = None
    events_shipped: int | None = None
    bytes_written: int | None = None
    gap: str | None = Field(None, description="events the archive misses (compacted before they were shipped)")
    ok: bool | None = None


class LastBackup(AnvilModel):
    """The last backup this server took (or skipped)."""

    time: float
    ok: bool
    snapshot: str | None = None
    repository: str | None = None
    problems: int | None = None
    error: str | None = None
    skipped: str | None = Field(None, description="why a scheduled backup did not run (recovery mode)")


class BackupSchedule(AnvilModel):
    repository: str
    every_seconds: float
    next: float = Field(description="when the next scheduled backup starts (seconds since the epoch)")


class BackupRunning(AnvilModel):
    started: float
    repository: str
    bytes_done: int
    bytes_total: int | None
    incremental: bool


class ReadyBackup(AnvilModel):
    last: LastBackup | None = None
    schedule: BackupSchedule | None = None
    archive: ArchiveStatus = Field(description="continuous archiving: enabled, cursor, lag, last error")
    running: BackupRunning | None = Field(None, description="a backup the server is taking: bytes done and total")


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
    """One change event (`data:` of the SSE stream; its `id:` is the seq). Each kind adds its own
    fields (object.put: sha256, content_type; authz.*: revision, updates; pdb.*: group, index, ...)."""

    seq: int
    kind: str
    tenant: str
    bucket: str | None
    key: str | None
    version_id: str | None
    etag: str | None
    size: int | None
    actor: str | None
    request_id: str | None
    time: float = Field(description="seconds since the epoch")


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


# ------------------------------------------------------------------ shared pieces of the areas below


class EmptyRequest(RequestModel):
    """An operation that takes no parameters: the body may be omitted, or be a JSON object (ignored)."""

# Consistency of an authz question (docs/authz.md): a mode name, or {"at_least_as_fresh": TOKEN},
# {"at_exact_snapshot": TOKEN}; the service checks which (InvalidArgument naming the mode).
Consistency = str | dict[str, Any] | None


# ------------------------------------------------------------------ authz (docs/authz.md)


class AuthzSchemaRequest(RequestModel):
    """The JSON form of writeAuthzSchema (a text/plain body is the schema text itself)."""

    schema_text: str = Field(alias="schema", description="the schema in SpiceDB's language")
    tenant: str | None = Field(None, description="admins: another tenant")


class AuthzSchemaWritten(AnvilModel):
    written_at: str = Field(description="consistency token of the write (z1.REVISION.DEPLOYMENT)")
    revision: int
    tenant: str
    definitions: list[str]
    caveats: list[str]


class AuthzSchema(AnvilModel):
    schema_text: str = Field(alias="schema", description="the schema text")
    schema_revision: int
    read_at: str
    tenant: str


class WriteRelationshipsRequest(RequestModel):
    updates: list[dict[str, Any] | str] = Field(
        description="each {operation: create|touch|delete (default touch), relationship: TEXT or "
                    "{resource, relation, subject, caveat?, expires_at?}}")
    preconditions: list[dict[str, Any]] | None = Field(
        None, description="each {operation: must_match|must_not_match, filter}")
    tenant: str | None = None


class RelationshipsWritten(AnvilModel):
    written_at: str
    revision: int
    changed: int = Field(description="relationships created, touched or deleted")


class RelationshipFilterRequest(RequestModel):
    filter: dict[str, Any] = Field(description="{resource_type, resource_id?, relation?, subject_type?, "
                                               "subject_id?, subject_relation?}")
    limit: int | None = Field(None, description="page size (read: 1 to 1000, default 100)")
    cursor: str | None = Field(None, description="the previous page's cursor (same snapshot)")
    consistency: Consistency = None
    tenant: str | None = None


class DeleteRelationshipsRequest(RequestModel):
    filter: dict[str, Any] = Field(description="as readRelationships' filter")
    preconditions: list[dict[str, Any]] | None = None
    limit: int | None = None
    allow_partial: bool = Field(False, description="delete the first `limit` matches when more match")
    tenant: str | None = None


class RelationshipsDeleted(AnvilModel):
    deleted_at: str
    revision: int
    deleted: int
    partial: bool


class CaveatRef(AnvilModel):
    name: str
    context: dict[str, Any]


class Relationship(AnvilModel):
    relationship: str = Field(description="SpiceDB's text form")
    resource: str
    relation: str
    subject: str
    caveat: CaveatRef | None = None
    expires_at: str | None = Field(None, description="RFC 3339")


class RelationshipPage(AnvilModel):
    relationships: list[Relationship]
    cursor: str | None = Field(description="pass back for the next page; null on the last")
    read_at: str


class CheckRequest(RequestModel):
    resource: str = Field(description="type:id, e.g. document:readme")
    permission: str
    subject: str = Field(description="type:id or type:id#relation")
    context: dict[str, Any] | None = Field(None, description="caveat parameters")
    consistency: Consistency = None
    tenant: str | None = None


class CheckResult(AnvilModel):
    permissionship: str = Field(description="has_permission, no_permission or conditional")
    missing_context: list[str] | None = Field(None, description="conditional: the caveat parameters missing")
    checked_at: str


class BulkCheckRequest(RequestModel):
    items: list[dict[str, Any]] = Field(description="each {resource, permission, subject, context?}")
    context: dict[str, Any] | None = None
    consistency: Consistency = None
    tenant: str | None = None


class ItemError(AnvilModel):
    code: str
    message: str


class BulkCheckItem(AnvilModel):
    resource: Any = Field(description="as asked")
    permission: Any = Field(description="as asked")
    subject: Any = Field(description="as asked")
    permissionship: str | None = None
    missing_context: list[str] | None = None
    error: ItemError | None = Field(None, description="this item's bad input (the others are answered)")


class BulkCheckResults(AnvilModel):
    results: list[BulkCheckItem]
    checked_at: str


class LookupResourcesRequest(RequestModel):
    resource_type: str
    permission: str
    subject: str
    context: dict[str, Any] | None = None
    limit: int | None = None
    consistency: Consistency = None
    tenant: str | None = None


class LookedUpResource(AnvilModel):
    resource_id: str
    permissionship: str
    missing_context: list[str] | None = None


class ResourceLookup(AnvilModel):
    resources: list[LookedUpResource]
    looked_up_at: str


class LookupSubjectsRequest(RequestModel):
    resource: str
    permission: str
    subject_type: str
    subject_relation: str | None = None
    context: dict[str, Any] | None = None
    consistency: Consistency = None
    tenant: str | None = None


class LookedUpSubject(AnvilModel):
    subject: str = Field(description="type:id[#relation], or type:* (see `excluded`)")
    permissionship: str
    missing_context: list[str] | None = None
    excluded: list[str] | None = Field(None, description="a wildcard's exclusions")


class SubjectLookup(AnvilModel):
    subjects: list[LookedUpSubject]
    looked_up_at: str


class ExpandRequest(RequestModel):
    resource: str
    permission: str
    consistency: Consistency = None
    tenant: str | None = None


class ExpandNode(AnvilModel):
    """One node of a permission tree: an object's relation with its `leaf` subjects, or an operation."""

    object: str | None = Field(None, description="type:id#relation")
    leaf: list[dict[str, Any]] | None = Field(None, description="direct subjects {subject, caveat?, expires?}")
    children: list[ExpandNode] | None = None
    expression: ExpandNode | None = None
    arrow: str | None = None
    union: list[ExpandNode] | None = None
    intersection: list[ExpandNode] | None = None
    exclusion: list[ExpandNode] | None = None
    cycle: bool | None = None
    nil: bool | None = None


class Expansion(AnvilModel):
    tree: ExpandNode
    expanded_at: str


class ArtefactBinding(AnvilModel):
    resource_type: str
    pull: str
    push: str
    tag: str
    verify: str


class Binding(AnvilModel):
    resource_type: str
    read: str
    write: str
    delete: str
    without_subject: str = Field(description="deny or scopes")
    artefacts: ArtefactBinding | None = None
    list: str  # noqa: A003 - the JSON name; declared last so `list[...]` above means the builtin


class ArtefactBindingRequest(RequestModel):
    resource_type: str
    pull: str
    push: str
    tag: str | None = Field(None, description="default: push")
    verify: str | None = Field(None, description="default: pull")


def _required(*names: str) -> Any:
    """`json_schema_extra` for a body whose presence checks are the service's: named as required."""
    def extra(schema: dict[str, Any]) -> None:
        schema["required"] = list(names)
        for name in names:
            schema["properties"][name].pop("default", None)
    return extra


class BindingRequest(RequestModel):
    """A bucket binding: object operations (and optionally artefact operations) to permissions."""

    # Described here, checked by the service (SkipValidation): its messages name the binding's own
    # fields (`artefacts.push`, `unknown artefacts field`), which callers of the CLI read.
    model_config = ConfigDict(json_schema_extra=_required("resource_type", "read", "write"))

    resource_type: Annotated[str, SkipValidation] = Field(None, description="a definition of the schema")
    read: Annotated[str, SkipValidation] = Field(None, description="the permission GET/HEAD need")
    write: Annotated[str, SkipValidation] = Field(None, description="the permission PUT needs")
    delete: Annotated[str | None, SkipValidation] = Field(None, description="default: write")
    without_subject: Annotated[str | None, SkipValidation] = Field(None, description="deny (default) or scopes")
    artefacts: Annotated[ArtefactBindingRequest | None, SkipValidation] = Field(
        None, description="artefact operations decided by relationships too")
    list: Annotated[str | None, SkipValidation] = Field(None, description="default: read")  # noqa: A003 - last


class BucketBinding(AnvilModel):
    bucket: str
    tenant: str
    binding: Binding
    revision: int | None = Field(None, description="on a write: the authz revision")


class PdbBindingRequest(RequestModel):
    """A group's row binding: row changes to permissions on a resource per row (docs/personaldb.md)."""

    # Described here, checked by the service (SkipValidation), whose messages name the binding's fields.
    model_config = ConfigDict(json_schema_extra=_required("resource_type", "update"))

    resource_type: Annotated[str, SkipValidation] = Field(None, description="a definition of the schema")
    resource: Annotated[str | None, SkipValidation] = Field(
        None, description="the row's resource id template ({group}, {table}, {pk} or a column); default {table}/{pk}")
    insert: Annotated[str | None, SkipValidation] = Field(None, description="the permission an INSERT needs")
    update: Annotated[str, SkipValidation] = Field(None, description="the permission an UPDATE needs")
    delete: Annotated[str | None, SkipValidation] = Field(None, description="the permission a DELETE needs")
    without_subject: Annotated[str | None, SkipValidation] = Field(None, description="deny (default) or scopes")


class PdbRowBinding(AnvilModel):
    resource_type: str
    resource: str
    insert: str
    update_: str = Field(alias="update")  # `update()` is the dict method
    delete: str
    without_subject: str


class PdbGroupBinding(AnvilModel):
    group: str
    tenant: str
    binding: PdbRowBinding


class PdbUnbound(AnvilModel):
    group: str
    unbound: bool


class BucketUnbound(AnvilModel):
    bucket: str
    unbound: bool
    revision: int


# ------------------------------------------------------------------ artefacts (docs/artefacts.md)


class ArtefactSummary(AnvilModel):
    id: str
    name: str
    kind: str
    created: float
    tags: list[str]
    signed_by: list[str]


class ArtefactList(AnvilModel):
    artefacts: list[ArtefactSummary]


class ArtefactTag(AnvilModel):
    tag: str
    id: str | None = Field(description="null: the tag names no artefact yet (a policy set first)")
    required_key: str | None
    updated: float


class ArtefactName(AnvilModel):
    name: str
    artefacts: list[ArtefactSummary]
    tags: list[ArtefactTag]


class PushArtefactRequest(RequestModel):
    manifest: dict[str, Any] = Field(description="the manifest (artefact_format): name, kind, components, ...")
    signatures: list[dict[str, Any]] | None = Field(None, description="each {key_id, signature}")
    tag: str | None = Field(None, description="also move this tag to the artefact")


class TagMoved(AnvilModel):
    tag: str
    id: str | None = Field(description="null: the tag names no artefact yet (a policy set first)")
    previous: str | None
    required_key: str | None


class ArtefactPushed(AnvilModel):
    id: str
    name: str
    kind: str
    created: bool = Field(description="false: already recorded (200)")
    tag: TagMoved | None
    components: int | None = None
    files: int | None = None
    tensors: int | None = None


class MissingComponentsRequest(RequestModel):
    sha256s: list[str]


class MissingComponents(AnvilModel):
    missing: list[str]


class ComponentStored(AnvilModel):
    sha256: str
    size: int


class TagRequest(RequestModel):
    id: str | None = Field(None, description="the artefact id (or a unique prefix); null: a tag that names no "
                                             "artefact yet (a signing policy set first)")
    require_key: str | None = Field(None, description="from now on, only artefacts signed by this key")


class ArtefactFile(AnvilModel):
    path: str
    sha256: str
    size: int


class ArtefactDescription(AnvilModel):
    id: str
    name: str
    kind: str
    manifest: dict[str, Any] = Field(description="the manifest as pushed (user-defined metadata inside)")
    signatures: list[dict[str, Any]]
    created: float
    seq: int
    files: list[ArtefactFile] = Field(description="effective files (a delta's base files included)")


class SignatureCheck(AnvilModel):
    key_id: str
    ok: bool


class ComponentCheck(AnvilModel):
    path: str
    ok: bool


class ArtefactVerified(AnvilModel):
    id: str
    ok: bool
    problems: list[str]
    signatures: list[SignatureCheck]
    components: list[ComponentCheck]


class Tensor(AnvilModel):
    name: str
    dtype: str
    shape: list[int]
    file: str
    offset: int
    length: int


class TensorList(AnvilModel):
    tensors: list[Tensor]


class GitRef(AnvilModel):
    ref: str
    commit: str


class GitTreeEntry(AnvilModel):
    name: str
    mode: str
    sha: str
    type: str = Field(description="blob or tree")


class GitTree(AnvilModel):
    commit: str
    path: str
    entries: list[GitTreeEntry]


class AddSigningKeyRequest(RequestModel):
    key_id: str
    public_key: str = Field(description="base64 of the raw Ed25519 public key")
    tenant: str | None = None


class SigningKeyAdded(AnvilModel):
    tenant: str
    key_id: str
    public_key: str
    created: bool = Field(description="false: the same key was already registered (200)")


class SigningKey(AnvilModel):
    tenant: str
    key_id: str
    public_key: str
    created: float


class SigningKeyList(AnvilModel):
    keys_: list[SigningKey] = Field(alias="keys")  # `keys()` is the dict method


class HfSibling(AnvilModel):
    rfilename: str


class HfModelInfo(AnvilModel):
    """Hugging Face Hub's model info, as huggingface_hub reads it."""

    id: str
    modelId: str  # noqa: N815 - the Hub's JSON name
    sha: str
    private: bool
    tags: list[str]
    siblings: list[HfSibling]
    anvil: dict[str, Any] = Field(description="{artefact_id}")


class HfTreeEntry(AnvilModel):
    type: str = Field(description="file or directory")
    path: str
    oid: str
    size: int | None = None
    lfs: dict[str, Any] | None = Field(None, description="{oid, size, pointerSize}")


# ------------------------------------------------------------------ PersonalDB (docs/personaldb.md)


class PdbCreateGroupRequest(RequestModel):
    name: str
    schema_sql: str = Field(alias="schema", description="the SQL schema (CREATE TABLE ...)")
    snapshot_every: int | None = None
    max_changeset: int | None = Field(None, description="bytes")


class PdbSnapshot(AnvilModel):
    index: int
    hash: str
    state_hash: str
    schema_version: int
    sha256: str
    size: int
    raw_size: int
    time: float
    certificate: dict[str, Any]


class PdbGroup(AnvilModel):
    name: str
    tenant: str
    schema_version: int
    genesis: str
    head_index: int
    head_hash: str
    snapshot_every: int
    max_changeset: int = Field(description="bytes")
    schema_sha256: str | None = Field(None, description="on creation")
    created: float | None = None
    created_by: str | None = None
    compacted_through: int | None = None
    tables: Any = Field(None, description="created: the table names; described: each table's columns")
    schemas: list[dict[str, Any]] | None = Field(None, description="described: {version, sql, sql_sha256}")
    snapshots: list[PdbSnapshot] | None = Field(None, description="described: its snapshots")


class PdbGroupList(AnvilModel):
    groups: list[PdbGroup]


class PdbMigrateRequest(RequestModel):
    sql: str


class PdbEntry(AnvilModel):
    """A certified log entry: a commit, a migration or a write-back."""

    group: str | None = None
    index: int
    prev_hash: str
    hash: str
    kind: str
    changeset_sha256: str
    size: int
    schema_version: int
    certificate: dict[str, Any] = Field(description="the witness's signed statement")
    idempotent_replay: bool | None = None


class PdbChangesetItem(RequestModel):
    changeset: str = Field(description="base64 of a session changeset")
    idempotency_key: str | None = None


class PdbCommitBatchRequest(RequestModel):
    base_index: int
    base_hash: str
    schema_version: int | None = None
    changesets: list[PdbChangesetItem]


class PdbEntries(AnvilModel):
    entries: list[PdbEntry]


class PdbHead(AnvilModel):
    index: int
    hash: str
    schema_version: int


class PdbCatchUp(AnvilModel):
    """`status` ok: entries after the base; snapshot_required: start from `snapshot`."""

    status: str
    group: str
    head: PdbHead
    entries: list[PdbEntry]
    more: bool
    genesis: str | None = None
    reason: str | None = Field(None, description="snapshot_required: divergent or compacted")
    detail: str | None = None
    snapshot: PdbSnapshot | None = None


class PdbSnapshotList(AnvilModel):
    snapshots: list[PdbSnapshot]


class PdbCompacted(AnvilModel):
    group: str
    compacted_through: int
    entries: int


class PdbKey(AnvilModel):
    key_id: str
    public: str
    created: float
    retired: float | None


class PdbKeyList(AnvilModel):
    keys_: list[PdbKey] = Field(alias="keys")  # `keys()` is the dict method


class PdbKeyRotated(AnvilModel):
    key_id: str
    keys_: list[PdbKey] = Field(alias="keys")  # `keys()` is the dict method


class PdbCreateProjectionRequest(RequestModel):
    name: str
    # Required too; left to the service, which answers a missing source group as NotFound.
    source: str | None = Field(None, description="the source group (required)")
    spec: dict[str, Any] = Field(description="tables, columns and row filters (docs/personaldb.md)")


class PdbProjection(AnvilModel):
    name: str
    source: str
    spec: dict[str, Any]
    source_index: int
    source_hash: str | None
    state_hash: str | None


class PdbProjectionChange(AnvilModel):
    source_index: int
    source_hash: str
    changeset: str = Field(description="base64 of the projection's changeset for that source entry")


class PdbProjectionChanges(AnvilModel):
    """`status` ok: apply `entries` in order; snapshot_required: load the projection's file again."""

    projection: str
    status: str
    reason: str | None = None
    more: bool | None = None
    entries: list[PdbProjectionChange] | None = None


# ------------------------------------------------------------------ indexes (docs/indexes.md)


class IndexDefinitionRequest(RequestModel):
    """An index definition; the service fills defaults and names the first problem (InvalidArgument)."""

    name: str | None = Field(None, description="create: required; update: the path's name")
    kind: str = Field(description="metadata, full-text, vector or hybrid")
    fields: dict[str, dict[str, Any]] = Field(
        description="NAME -> {source: metadata:KEY | json:/POINTER | key | size | ..., type, dimension?, boost?}")
    selector: dict[str, Any] | None = Field(None, description="{prefix?, content_types?}")
    authorization: str | None = Field(None, description="inherit_object (default) or public")
    build: dict[str, Any] | None = Field(None, description="{batch?, publish_interval?}")
    vector: dict[str, Any] | None = Field(None, description="{metric?, hnsw?}")
    full_text: dict[str, Any] | None = Field(None, description="{analyzer?, positions?}")


class IndexStatus(AnvilModel):
    state: str = Field(description="ready, catching-up, building, disabled")
    head: int = Field(description="the journal head")
    cursor: int | None = None
    generation: int | None = None
    documents: int | None = None
    vectors: int | None = None
    lag_events: int | None = None
    lag_seconds: float | None = None
    definition_version: int | None = None
    diagnostic_count: int | None = None
    diagnostics: list[dict[str, Any]] | None = Field(None, description="documents that could not be indexed")
    published_at: float | None = None
    hnsw: dict[str, Any] | None = None
    error: str | None = None


class Index(AnvilModel):
    bucket: str
    name: str
    tenant: str
    version: int
    state: str = Field(description="enabled, disabled or dropped")
    definition: dict[str, Any] = Field(description="the normalised definition (defaults filled)")
    created: float
    updated: float
    cursor: int | None = Field(None, description="on a change: the journal seq of its event")
    status: IndexStatus | None = Field(None, description="on reads")


class IndexList(AnvilModel):
    indexes: list[Index]


class IndexRebuilt(IndexStatus):
    bucket: str
    name: str
    rebuilt: bool
    state: str | None = None  # type: ignore[assignment]
    head: int | None = None  # type: ignore[assignment]


class IndexQueryRequest(RequestModel):
    text: str | None = None
    fields: list[str] | None = Field(None, description="text fields to search (default: all)")
    boosts: dict[str, float] | None = None
    fuzzy: dict[str, int] | None = None
    vector: list[float] | None = None
    filter: dict[str, Any] | None = Field(None, description="{field, op, value} or {and|or|not: ...}")
    sort: Any = Field(None, description="a field name, or [{field, order}]")
    limit: int | None = Field(None, description="1 to 1000, default 10")
    page_token: str | None = None
    min_cursor: int | None = Field(None, description="wait until the index has seen this journal seq")
    wait_ms: float | None = None
    return_fields: list[str] | None = None
    highlight: Any = None
    hybrid: dict[str, Any] | None = Field(None, description="{text_weight?, vector_weight?, k?}")
    ef_search: int | None = None


class IndexHit(AnvilModel):
    bucket: str
    key: str
    version: str
    score: float
    fields: dict[str, Any]
    snippets: dict[str, Any] | None = None
    components: dict[str, Any] | None = Field(None, description="hybrid: the text and vector ranks")


class IndexResults(AnvilModel):
    hits: list[IndexHit]
    count: int
    cursor: int = Field(description="the journal seq the index has seen")
    generation: int
    next_page_token: str | None = None


# ------------------------------------------------------------------ diagnostics (docs/diagnostics.md)


class Finding(AnvilModel):
    id: str
    time: float
    subsystem: str
    severity: str = Field(description="info, warning or error")
    invariant: str
    detail: str
    affected: dict[str, Any]
    cursor: str | None
    origin: str
    run_id: str | None
    fingerprint: str
    repair_attempted: bool
    repair_result: str | None
    operator_action_required: bool
    resolved_at: float | None
    resolution: str | None


class FindingList(AnvilModel):
    findings: list[Finding]


class ResolveFindingRequest(RequestModel):
    resolution: str | None = Field(None, description="what was done about it")


class FsckRequest(RequestModel):
    deep: bool = Field(False, description="also re-hash every blob")


class FsckReport(AnvilModel):
    run_id: str
    mode: str
    deep: bool
    started: float
    finished: float
    ok: bool
    counts: dict[str, int] = Field(description="findings by severity")
    checks: dict[str, dict[str, Any]]
    findings: list[Finding]
    new_findings: int
    resolved: list[str]
    unresolved_earlier: int
    record_error: str | None


class GcRequest(RequestModel):
    grace_seconds: float | None = None
    upload_expiry_seconds: float | None = None
    dry_run: bool = False


class GcReport(AnvilModel):
    run_id: str
    dry_run: bool
    grace_seconds: float
    upload_expiry_seconds: float
    blobs_removed: list[dict[str, Any]]
    blob_count: int
    bytes_removed: int
    young_orphans_kept: int
    restored: int
    uploads_expired: list[dict[str, Any]]
    tmp_files_removed: int
    disk_full: bool
    sidecars_removed: int
    held_kept: int = Field(0, description="unreferenced blobs kept for a hold (unarchived events, a running backup)")
    holds: list[dict[str, Any]] = Field(default_factory=list, description="the holds in the record store gc respected")
    finding: dict[str, Any] | None


class RepairRequest(RequestModel):
    families: list[str] | None = Field(None, description="derived families (default: all)")


class RepairResult(AnvilModel):
    family: str
    ok: bool
    summary: list[dict[str, Any]] | None = None
    error: str | None = None


class RepairReport(AnvilModel):
    run_id: str
    families: list[str]
    results: list[RepairResult]
    ok: bool
    findings: list[Finding]


# ------------------------------------------------------------------ admin status


class LifecycleStatus(AnvilModel):
    """What the S3 lifecycle worker has done since the server started (counts add up over runs)."""

    interval_seconds: float
    day_seconds: float
    running: bool
    runs: int
    last_run_started: float | None
    last_run_seconds: float | None
    expired: int
    delete_markers_removed: int
    noncurrent_removed: int
    uploads_aborted: int
    errors: int
    last_error: str | None


class OpenApiDocument(AnvilModel):
    """This document (OpenAPI 3.1)."""

    openapi: str
    info: dict[str, Any]
    servers: list[dict[str, Any]]
    paths: dict[str, Any]
    components: dict[str, Any]


def iter_models() -> Iterator[type[BaseModel]]:
    """Every model of this module, for the OpenAPI components."""
    for value in list(globals().values()):
        if (isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == __name__
                and value not in (AnvilModel, RequestModel)):
            yield value
