"""The authorisation gate: every exposure calls `authorize(principal, action, resource)`.

Actions look like `object:read`; resources like `bucket:photos/cats/1.jpg`, `bucket:photos`,
`tenant:acme` or `system`. Order of checks (fail closed):

1. Tenant isolation. A bucket belongs to one tenant. For a principal of another tenant a
   foreign bucket is indistinguishable from a missing one: the gate raises the same
   `NotFound` ("bucket not found", no name) the object service raises for a missing bucket,
   so neither status nor message tells them apart. Public buckets are readable by anyone.
2. Scopes. One of the principal's scopes must allow (action, resource), else PermissionDenied.
3. Bucket bindings. For `object:*` on `bucket:NAME/KEY`, an installed object-access hook (the
   API installs one that asks anvil.authz, docs/authz.md "Object access") may refuse the object
   for the principal's subject. Listings ask `object_filter` for the keys a subject may see.

Admins (principals of the system tenant) skip isolation but still need a scope.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from anvil.context import Principal
from anvil.errors import AnvilError
from anvil.identity.scopes import ACTIONS, allows, allows_any

# Anonymous callers may do these on a public bucket; everything else needs a token.
PUBLIC_ACTIONS = frozenset({"object:read", "object:list", "bucket:read", "artefact:pull"})


class BucketAccess(NamedTuple):
    tenant: str
    public: bool


# Installed by the runtime (objects -> (tenant, public) for a bucket name, None if absent).
# A process serves one storage path, so one lookup suffices; without one, buckets are closed.
_bucket_lookup: Callable[[str], BucketAccess | None] | None = None


def install_bucket_lookup(lookup: Callable[[str], BucketAccess | None] | None) -> None:
    global _bucket_lookup
    _bucket_lookup = lookup


class KeyFilter(Protocol):
    """Which keys of one bucket a principal may see (a listing, a watch, search hits)."""

    def allows(self, key: str) -> bool: ...

    def any_under(self, prefix: str) -> bool: ...


class ObjectAccess(Protocol):
    def check(self, principal: Principal, action: str, bucket: str, key: str) -> None: ...

    def key_filter(self, principal: Principal, action: str, bucket: str) -> KeyFilter | None: ...


OBJECT_ACTIONS = frozenset({"object:read", "object:write", "object:list", "object:delete"})
_object_access: ObjectAccess | None = None


def install_object_access(hook: ObjectAccess | None) -> None:
    """Installed by the API layer (it composes objects and authz, which this layer cannot see)."""
    global _object_access
    _object_access = hook


def object_filter(principal: Principal, action: str, bucket: str) -> KeyFilter | None:
    """The keys of `bucket` a principal may `action` by the bucket's binding (None: no per-key
    restriction beyond the scopes)."""
    hook = _object_access
    return hook.key_filter(principal, action, bucket) if hook is not None else None


def scope_allows(scope: str, action: str, resource: str) -> bool:
    return allows(scope, action, resource)


def hidden_bucket() -> AnvilError:
    """What a caller sees for a bucket it may not know about: exactly a missing bucket."""
    err = AnvilError("NotFound", "bucket not found")
    err.denied = True  # type: ignore[attr-defined]  # the audit log records it as a denial
    return err


def _denied(code: str, message: str) -> AnvilError:
    err = AnvilError(code, message)
    err.denied = True  # type: ignore[attr-defined]
    return err


def bucket_access(name: str) -> BucketAccess | None:
    return _bucket_lookup(name) if _bucket_lookup is not None else None


def authorize(principal: Principal, action: str, resource: str) -> None:
    """Raise unless the principal may perform `action` on `resource`."""
    authorize_scopes(principal, action, resource)
    hook = _object_access
    if hook is not None and action in OBJECT_ACTIONS and resource.startswith("bucket:"):
        name, sep, key = resource[len("bucket:"):].partition("/")
        if sep and key:
            hook.check(principal, action, name, key)


def authorize_scopes(principal: Principal, action: str, resource: str) -> None:
    """Steps 1 and 2 only (isolation and scopes): for questions about a prefix, not an object."""
    if action not in ACTIONS:
        raise _denied("PermissionDenied", "unknown action")
    if resource.startswith("bucket:") and not principal.admin:
        name = resource[len("bucket:"):].split("/", 1)[0]
        access = bucket_access(name)
        public_read = access is not None and access.public and action in PUBLIC_ACTIONS
        if principal.anonymous:
            if public_read:
                return
            raise _denied("Unauthenticated", "authentication required")
        if access is None:
            raise AnvilError("NotFound", "bucket not found")
        if public_read:
            return
        if access.tenant != principal.tenant:
            raise hidden_bucket()
    elif principal.anonymous:
        raise _denied("Unauthenticated", "authentication required")
    elif resource.startswith("tenant:") and not principal.admin:
        if resource[len("tenant:"):] != principal.tenant:
            raise _denied("PermissionDenied", "not allowed")
    # `pdb:GROUP...` (PersonalDB): the group's tenant is checked by its owner (the personaldb service,
    # the watch filter) before it asks; here only the scopes decide.
    elif not resource.startswith(("bucket:", "tenant:", "pdb:")) and not principal.admin:
        raise _denied("PermissionDenied", "not allowed")
    if allows_any(principal.scopes, action, resource):
        return
    raise _denied("PermissionDenied", "not allowed")
