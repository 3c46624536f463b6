"""The authorisation gate: every exposure calls `authorize(principal, action, resource)`.

Actions look like `object:read`; resources like `bucket:photos/cats/1.jpg`, `bucket:photos`
or `tenant:acme`. Until tenants, applications and policies land, the only principal is the
development principal, which holds `*`; anything else is denied (fail closed).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from anvil.context import Principal
from anvil.errors import AnvilError

ACTIONS = frozenset({
    "bucket:create", "bucket:list", "bucket:read", "bucket:delete", "bucket:configure",
    "object:read", "object:list", "object:write", "object:delete",
    "admin:read", "admin:write",
})


def scope_allows(scope: str, action: str, resource: str) -> bool:
    if scope == "*":
        return True
    scope_action, _, scope_resource = scope.partition("|")
    return fnmatchcase(action, scope_action) and fnmatchcase(resource, scope_resource or "*")


def authorize(principal: Principal, action: str, resource: str) -> None:
    """Raise PermissionDenied unless one of the principal's scopes allows the action."""
    if action not in ACTIONS:
        raise AnvilError("PermissionDenied", "unknown action")
    if principal.anonymous:
        raise AnvilError("Unauthenticated", "authentication required")
    if any(scope_allows(s, action, resource) for s in principal.scopes):
        return
    raise AnvilError("PermissionDenied", "not allowed")
