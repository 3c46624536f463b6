"""What a watcher sees: event kinds, scopes, the projection of journal events, and the read filter.

A journal event carries everything needed to replay a mutation (chunk lists, metadata...).
A watch event is a small, stable projection of it: seq (the cursor), kind, bucket, key,
version id, ETag, size, actor, request id and time, plus a few kind-specific fields.
Projection is independent of the watcher, so it is done once per event and shared.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from anvil.context import Principal
from anvil.errors import AnvilError
from anvil.identity import authorize
from anvil.identity.gate import authorize_scopes
from anvil.objects import validation as v
from anvil.storage.journal import Event

# Exact kinds per family. A family may have no exact kinds yet (identity): `family` and
# `family.*` are still accepted so watchers can subscribe before the emitters land.
KINDS: dict[str, set[str]] = {
    "object": {"object.put", "object.delete", "object.tagging", "object.acl"},
    "bucket": {"bucket.create", "bucket.delete", "bucket.versioning", "bucket.public", "bucket.tagging",
               "bucket.lifecycle", "bucket.cors"},
    "multipart": {"multipart.create", "multipart.part", "multipart.abort"},
    "identity": set(),
    "watch": {"watch.consumer.create", "watch.consumer.delete", "watch.checkpoint", "watch.compact"},
    "authz": {"authz.schema.write", "authz.relationships.write", "authz.relationships.delete"},
}

# `watch.*` is excluded by default: a consumer's own checkpoints would otherwise wake every
# default watcher of its tenant and feed consumers their own bookkeeping.
DEFAULT_FAMILIES: tuple[str, ...] = ("object", "bucket", "multipart", "identity")


def register_kinds(family: str, kinds: set[str] | frozenset[str] = frozenset()) -> None:
    """For subsystems that add event kinds (identity, authz, indexes, PersonalDB)."""
    KINDS.setdefault(family, set()).update(kinds)


def family_of(kind: str) -> str:
    return kind.split(".", 1)[0]


@dataclass(frozen=True)
class KindFilter:
    """Which kinds pass: whole families and exact kinds."""

    families: frozenset[str]
    exact: frozenset[str] = frozenset()

    def matches(self, kind: str) -> bool:
        return kind in self.exact or family_of(kind) in self.families

    def to_list(self) -> list[str]:
        return sorted([f + ".*" for f in self.families] + list(self.exact))


def parse_kinds(raw: str | list[str] | None) -> KindFilter:
    """`object.*,bucket.create` or a list of such; empty means the default families."""
    if raw is None:
        items: list[str] = []
    elif isinstance(raw, str):
        items = [p.strip() for p in raw.split(",") if p.strip()]
    elif not isinstance(raw, (list, tuple)):
        raise AnvilError("InvalidArgument", "kinds must be a string or a list of strings")
    else:
        if not all(isinstance(p, str) for p in raw):
            raise AnvilError("InvalidArgument", "kinds must be strings")
        items = [p.strip() for p in raw if p.strip()]
    if not items:
        return KindFilter(frozenset(DEFAULT_FAMILIES))
    families: set[str] = set()
    exact: set[str] = set()
    for item in items:
        if item in ("*", "all"):
            families.update(KINDS)
        elif item.endswith(".*") and item[:-2] in KINDS:
            families.add(item[:-2])
        elif item in KINDS:
            families.add(item)
        elif family_of(item) in KINDS and item in KINDS[family_of(item)]:
            exact.add(item)
        else:
            known = ", ".join(sorted(f + ".*" for f in KINDS))
            raise AnvilError("InvalidArgument", f"unknown event kind {item[:64]!r} (known families: {known})")
    return KindFilter(frozenset(families), frozenset(exact))


@dataclass(frozen=True)
class Scope:
    """What a watch covers. `bucket=None` means the whole tenant."""

    tenant: str
    bucket: str | None = None
    prefix: str = ""
    kinds: KindFilter = field(default_factory=lambda: parse_kinds(None))

    def to_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "bucket": self.bucket, "prefix": self.prefix, "kinds": self.kinds.to_list()}


def make_scope(principal: Principal, *, bucket: str | None = None, prefix: str = "",
               kinds: str | list[str] | None = None, tenant: str | None = None) -> Scope:
    """Validate a requested scope (clear InvalidArgument on bad input)."""
    if principal.anonymous:
        # Watches are never public: even a public bucket's feed needs an identity.
        raise AnvilError("Unauthenticated", "authentication required")
    if bucket is not None and bucket != "":
        if not isinstance(bucket, str):
            raise AnvilError("InvalidArgument", "bucket must be a string")
        v.check_bucket_name(bucket)
    else:
        bucket = None
    if not isinstance(prefix, str):
        raise AnvilError("InvalidArgument", "prefix must be a string")
    if prefix and bucket is None:
        raise AnvilError("InvalidArgument", "a prefix needs a bucket")
    if len(prefix.encode()) > 1024:
        raise AnvilError("InvalidArgument", "prefix is longer than 1024 bytes")
    if v.is_reserved_key(prefix):
        raise v.reserved_error()
    if tenant is None or tenant == "":
        tenant = principal.tenant
    if not isinstance(tenant, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}", tenant):
        raise AnvilError("InvalidArgument", "invalid tenant in watch scope")
    return Scope(tenant=tenant, bucket=bucket, prefix=prefix, kinds=parse_kinds(kinds))


def authorize_scope(principal: Principal, scope: Scope) -> None:
    """The check made when a watch (or consumer) opens; events are filtered one by one after it."""
    if scope.tenant != principal.tenant and not principal.admin:
        raise AnvilError("PermissionDenied", "not allowed")
    if scope.bucket is None:
        authorize(principal, "bucket:list", f"tenant:{scope.tenant}")
    elif scope.prefix:
        # The scopes only: a prefix is no object, so a bucket binding has nothing to say here; each
        # event is then checked for the subject by ReadFilter (docs/authz.md, "Object access").
        authorize_scopes(principal, "object:read", f"bucket:{scope.bucket}/{scope.prefix}")
    else:
        authorize(principal, "bucket:read", f"bucket:{scope.bucket}")


def parse_cursor(raw: str | int | None, *, name: str = "cursor") -> int | None:
    """A cursor is a journal seq: a non-negative decimal integer."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool):
        raise AnvilError("InvalidArgument", f"malformed {name}: expected a non-negative integer")
    if isinstance(raw, int):
        value = raw
    else:
        text = str(raw).strip()
        if not text.isascii() or not text.isdigit() or len(text) > 18:
            raise AnvilError("InvalidArgument", f"malformed {name}: expected a non-negative integer")
        value = int(text)
    if value < 0:
        raise AnvilError("InvalidArgument", f"malformed {name}: expected a non-negative integer")
    return value


# ------------------------------------------------------------------ projection


@dataclass(frozen=True)
class WatchEvent:
    seq: int
    tenant: str
    kind: str
    bucket: str | None
    key: str | None
    data: dict[str, Any]
    frame: bytes  # the SSE frame (`id:` and the JSON `data:` line), built once and shared by every watcher
    permission: tuple[str, str] = ("admin:read", "system")  # what a reader needs, computed once

    @property
    def reserved(self) -> bool:
        return self.key is not None and v.is_reserved_key(self.key)


def project(ev: Event) -> WatchEvent:
    p = ev.payload
    bucket = p.get("bucket") if isinstance(p.get("bucket"), str) else None
    key = p.get("key") if isinstance(p.get("key"), str) else None
    data: dict[str, Any] = {
        "seq": ev.seq, "kind": ev.kind, "tenant": ev.tenant, "bucket": bucket, "key": key,
        "version_id": p.get("version_id"), "etag": None, "size": None,
        "actor": ev.actor, "request_id": ev.request_id, "time": ev.ts,
    }
    if ev.kind == "object.put":
        data.update(etag=p.get("etag"), size=p.get("size"), sha256=p.get("sha256"),
                    content_type=p.get("content_type"), source=p.get("source"))
    elif ev.kind == "object.delete":
        data.update(delete_marker=bool(p.get("delete_marker")))
    elif ev.kind.startswith("multipart."):
        data.update(upload_id=p.get("upload_id"))
        if ev.kind == "multipart.part":
            data.update(part_number=p.get("part_number"), etag=p.get("md5"), size=p.get("size"))
    elif ev.kind == "bucket.versioning":
        data.update(versioning=p.get("status"))
    elif ev.kind == "bucket.create":
        data.update(versioning=p.get("versioning") or "Unversioned")
    elif ev.kind in ("bucket.public", "object.acl"):
        data.update(public=p.get("public"))
    elif ev.kind == "object.tagging":
        data.update(tags=p.get("tags"))
    elif ev.kind in ("bucket.tagging", "bucket.lifecycle", "bucket.cors"):
        data.update(document=p.get("document"))  # the new configuration; None when it was removed
    elif ev.kind.startswith("authz."):
        # The revision is the consistency token's position; updates are the relationships changed.
        data.update(revision=p.get("revision"), updates=p.get("updates"), schema_digest=p.get("digest"))
        if "binding" in p:  # authz.binding.put: the bucket's new binding (docs/authz.md, "Object access")
            data["binding"] = p["binding"]
    elif ev.kind.startswith("watch."):
        for name in ("consumer", "cursor", "through_seq", "deleted"):
            if name in p:
                data[name] = p[name]
    elif ev.kind.startswith("pdb."):  # PersonalDB (docs/personaldb.md): never the schema or SQL bodies
        for name in ("group", "index", "hash", "prev_hash", "changeset_sha256", "tables", "rows", "schema_version",
                     "projection", "source_index", "source_hash", "state_hash", "through"):
            if name in p:
                data[name] = p[name]
    encoded = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    frame = f"id: {ev.seq}\ndata: {encoded}\n\n".encode()
    we = WatchEvent(ev.seq, ev.tenant, ev.kind, bucket, key, data, frame)
    return dataclasses.replace(we, permission=required_permission(we))


def in_scope(scope: Scope, ev: WatchEvent) -> bool:
    if ev.tenant != scope.tenant or not scope.kinds.matches(ev.kind):
        return False
    if ev.reserved:
        return False  # the reserved namespace never shows, whatever the scope
    if scope.bucket is None:
        return True
    if ev.bucket != scope.bucket:
        return False
    if scope.prefix:
        # Bucket-level events (create, delete, versioning) have no key: only a whole-bucket scope sees them.
        return ev.key is not None and ev.key.startswith(scope.prefix)
    return True


def required_permission(ev: WatchEvent) -> tuple[str, str]:
    """The (action, resource) a reader needs to see this event; unknown families need admin."""
    fam = family_of(ev.kind)
    if fam in ("object", "multipart") and ev.bucket is not None and ev.key is not None:
        return "object:read", f"bucket:{ev.bucket}/{ev.key}"
    if fam == "bucket" and ev.bucket is not None:
        return "bucket:read", f"bucket:{ev.bucket}"
    if fam == "identity":
        return "admin:read", f"tenant:{ev.tenant}"
    if fam == "authz":
        return "authz:read", f"tenant:{ev.tenant}"
    if fam == "pdb" and isinstance(ev.data.get("group"), str):
        return "pdb:read", f"pdb:{ev.data['group']}"
    return "admin:read", "system"


class ReadFilter:
    """Per-watcher authorisation of each event through the gate, with a small bounded cache.

    Decisions are cached per (action, resource) for `ttl` seconds so a long-lived stream
    notices policy changes without calling the gate for every event of a busy key.
    """

    def __init__(self, principal: Principal, *, max_entries: int = 4096, ttl: float = 30.0):
        self.principal = principal
        self.max_entries = max_entries
        self.ttl = ttl
        self._cache: dict[tuple[str, str], tuple[bool, float]] = {}

    def allows(self, ev: WatchEvent) -> bool:
        if ev.tenant != self.principal.tenant and not self.principal.admin:
            return False
        action, resource = perm = ev.permission
        now = time.monotonic()
        hit = self._cache.get(perm)
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            authorize(self.principal, action, resource)
            ok = True
        except AnvilError:
            ok = False  # fail closed: any refusal, including unknown actions, hides the event
        if len(self._cache) >= self.max_entries:
            self._cache.clear()  # bounded: a full cache restarts; decisions are cheap to remake
        self._cache[perm] = (ok, now + self.ttl)
        return ok

    def visible(self, scope: Scope, ev: WatchEvent) -> bool:
        return in_scope(scope, ev) and self.allows(ev)
