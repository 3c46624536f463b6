"""Scopes: `action|resource`, with `*` as the only wildcard.

Examples: `object:read|bucket:documents/*`, `object:write|bucket:uploads/tenants/acme/*`,
`bucket:create|tenant:acme`, `policy:grant|tenant:acme`, and `*` (everything; admins).

`?` and `[...]` are refused so that containment ("does scope A cover scope B?") can be
decided exactly for the shapes people write, and conservatively (refuse) for the rest.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fnmatch import fnmatchcase
from functools import lru_cache

from anvil.errors import AnvilError

ACTIONS = frozenset({
    "bucket:create", "bucket:list", "bucket:read", "bucket:delete", "bucket:configure",
    "object:read", "object:list", "object:write", "object:delete",
    "admin:read", "admin:write",
    "app:create", "app:read", "policy:grant", "policy:read",
    # Relationship-based authorisation (anvil.authz), on `tenant:NAME`: read = questions and
    # reads of schema and relationships; write = schema and relationship writes.
    "authz:read", "authz:write",
    # ... and act for an end user: a token exchanged with `subject` (docs/authz.md, "Object access").
    "authz:act",
    # artefacts (docs/artefacts.md), on bucket:BUCKET/NAME
    "artefact:push", "artefact:pull", "artefact:tag", "artefact:verify",
    # PersonalDB: create groups (on tenant:T), read/administer one (pdb:GROUP), and per-row writes
    # (pdb:GROUP/TABLE/PK), see docs/personaldb.md.
    "pdb:create", "pdb:read", "pdb:admin", "pdb:insert", "pdb:update", "pdb:delete",
    # anvil.indexes: manage a bucket's index definitions / query index_only indexes.
    "index:read", "index:write",
    # `GET /anvil/metrics` (docs/operations.md), on `system`: admins, or a system-tenant scraper app.
    "metrics:read",
})

MAX_SCOPE_LENGTH = 512
MAX_SCOPES = 100
_ACTION_RE = re.compile(r"^[a-z*]+:[a-z*]+$|^\*$")
_RESOURCE_RE = re.compile(r"^(\*|system|(bucket|tenant|pdb):[^\s|?\[\]]+)$")


def invalid_scope(message: str) -> AnvilError:
    return AnvilError("InvalidTokenScope", message)


@lru_cache(maxsize=4096)
def parse(scope: str) -> tuple[str, str]:
    """Validate a scope and split it into (action pattern, resource pattern)."""
    if not isinstance(scope, str) or not scope or len(scope) > MAX_SCOPE_LENGTH:
        raise invalid_scope(f"a scope is a non-empty string of at most {MAX_SCOPE_LENGTH} characters")
    if scope == "*":
        return "*", "*"
    action, sep, resource = scope.partition("|")
    if not sep:
        raise invalid_scope(f"scope {scope!r} must look like ACTION|RESOURCE, e.g. object:read|bucket:docs/*")
    if not _ACTION_RE.match(action) or not any(fnmatchcase(a, action) for a in ACTIONS):
        raise invalid_scope(f"scope {scope!r}: unknown action {action!r}")
    if not _RESOURCE_RE.match(resource):
        raise invalid_scope(f"scope {scope!r}: resource must be bucket:NAME[/KEY], tenant:NAME, "
                            "pdb:GROUP[/TABLE/PK] or system (only * is a wildcard)")
    return action, resource


def validate(scopes: object) -> list[str]:
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise invalid_scope("scopes must be a list of strings")
    if len(scopes) > MAX_SCOPES:
        raise invalid_scope(f"at most {MAX_SCOPES} scopes")
    for s in scopes:
        parse(s)
    return list(dict.fromkeys(scopes))


def allows(scope: str, action: str, resource: str) -> bool:
    if scope == "*":
        return True
    match_action, match_resource = _scope_matchers(scope)
    return match_action(action) and match_resource(resource)


def allows_any(scopes: tuple[str, ...] | list[str], action: str, resource: str) -> bool:
    """`any(allows(s, action, resource) for s in scopes)`, with a principal's scopes sorted by action once:
    a request then tests only the resource patterns of the scopes that grant its action."""
    tests = _resource_tests(tuple(scopes), action)
    if tests is None:
        return True
    for test in tests:
        if test(resource):
            return True
    return False


@lru_cache(maxsize=1024)
def _resource_tests(scopes: tuple[str, ...], action: str) -> tuple[Callable[[str], bool], ...] | None:
    """The resource tests of the scopes whose action pattern matches `action`, in order (None: a `*`
    scope, which allows everything)."""
    out = []
    for scope in scopes:
        if scope == "*":
            return None
        match_action, match_resource = _scope_matchers(scope)
        if match_action(action):
            out.append(match_resource)
    return tuple(out)


_GLOB_CHARS = frozenset("*?[")


def _glob(pattern: str) -> Callable[[str], bool]:
    """`fnmatchcase(name, pattern)` as a function of the name: an equality or a prefix test when the
    pattern is only that (every request checks a principal's scopes, usually `PREFIX*` patterns)."""
    if _GLOB_CHARS.isdisjoint(pattern):
        return pattern.__eq__
    prefix = pattern[:-1]
    if pattern[-1] == "*" and _GLOB_CHARS.isdisjoint(prefix):
        return lambda name: name.startswith(prefix)
    return lambda name: fnmatchcase(name, pattern)


@lru_cache(maxsize=4096)
def _scope_matchers(scope: str) -> tuple[Callable[[str], bool], Callable[[str], bool]]:
    scope_action, _, scope_resource = scope.partition("|")
    return _glob(scope_action), _glob(scope_resource or "*")


def _pattern_covers(outer: str, inner: str) -> bool:
    """True only if every string matching glob `inner` also matches glob `outer`."""
    if outer == inner:
        return True
    if "*" not in inner:
        return fnmatchcase(inner, outer)
    # `inner` has wildcards: decide only the common prefix form `abc*`.
    if outer.endswith("*") and "*" not in outer[:-1]:
        return inner.startswith(outer[:-1])
    return False


def covers(outer: str, inner: str) -> bool:
    """Does holding `outer` imply holding everything `inner` grants?"""
    if outer == "*":
        return True
    if inner == "*":
        return False
    oa, orr = parse(outer)
    ia, ir = parse(inner)
    return _pattern_covers(oa, ia) and _pattern_covers(orr, ir)


def intersect(requested: list[str], granted: list[str]) -> list[str]:
    """The requested scopes narrowed to what is granted (a broad request yields the grant)."""
    out: list[str] = []
    for r in requested:
        for g in granted:
            if covers(g, r):
                out.append(r)
            elif covers(r, g):
                out.append(g)
    return list(dict.fromkeys(out))
